"""Canonical JSON: the one byte string that is hashed and signed for a given value.

Signatures and hash chains only work if every party serializes the same value to the same bytes,
whatever the order its dicts were built in and whatever JSON library reads them back. The form:
keys sorted, no whitespace, UTF-8 (non-ASCII kept as is), floats as Python's shortest round-trip
``repr`` (so ``json.loads`` gives back the same float), integers as integers (``1`` and ``1.0``
are different values). NaN and infinities are refused: they are not JSON, and a metric that is NaN
must be left out on purpose, not hashed in a form other tools cannot read.

Only plain JSON types are accepted (dict with str keys, list/tuple, str, int, float, bool, None),
so an unexpected object (a numpy array, a Path, a datetime) fails loudly, naming where it is,
instead of being stringified in some library-dependent way.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from fedtwin.provenance.errors import ProvenanceError

JSONValue = Any  # dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None


def _plain(value: Any, where: str) -> JSONValue:
    """``value`` as plain JSON types, or :class:`ProvenanceError` naming the offending path."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # an int subclass (IntEnum) serializes as its number
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProvenanceError(
                f"{where} is {value!r}: NaN and infinity have no canonical JSON form",
                "leave the value out (or record why it is undefined) before hashing or signing",
            )
        return float(value)  # numpy.float64 and other float subclasses as plain floats
    if isinstance(value, Mapping):
        out: dict[str, JSONValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProvenanceError(f"{where} has a key {k!r} of type {type(k).__name__}", "use string keys only")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ProvenanceError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}, which has no canonical JSON form",
        "convert it to a str, int, float, bool, None, list or dict first (e.g. float(x) for a numpy scalar)",
    )


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (sorted keys, no whitespace, floats as repr, no NaN)."""
    return json.dumps(_plain(value, "$"), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_bytes(value: Any) -> bytes:
    """UTF-8 bytes of :func:`canonical_json`: what is hashed and what is signed."""
    text = canonical_json(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate in a str
        raise ProvenanceError(f"a string holds a character UTF-8 cannot encode: {exc}", "remove it") from None


def sha256_hex(data: bytes) -> str:
    """Lower-case hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest(value: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``value``: equal for equal values, whatever the dict order."""
    return sha256_hex(canonical_bytes(value))
