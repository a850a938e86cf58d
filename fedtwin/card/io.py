"""Card <-> canonical JSON, so a stored card and a rebuilt one compare (and hash) byte for byte."""

from __future__ import annotations

import json
from typing import Any

from fedtwin.card.build import CARD_FORMAT
from fedtwin.errors import FedTwinError
from fedtwin.provenance.canonical import canonical_json


def card_to_json(card: dict[str, Any]) -> str:
    """Canonical JSON of ``card`` (sorted keys, no whitespace, floats as repr, no NaN)."""
    return canonical_json(card)


def card_from_json(text: str | bytes) -> dict[str, Any]:
    """Parse a stored card; refuses anything that is not a ``fedtwin-model-card/1`` object."""
    try:
        card = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FedTwinError(f"model card is not JSON: {exc}", "give the card JSON FedTwin wrote (card_to_json)") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise FedTwinError(f"not a model card of format {CARD_FORMAT!r} (found {found!r})", "give the card JSON FedTwin wrote")
    return card
