"""Signing a payload: Ed25519 over its canonical JSON bytes, the signature in base64.

The payload always carries a ``type`` (``fedtwin.site-manifest``, ``fedtwin.round-record``), so a
signature made for one kind of document can never be presented as a signature of another, and the
signer's ``key_id``, so the signature also binds who claims to have signed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Self

from fedtwin.provenance.canonical import canonical_bytes
from fedtwin.provenance.keys import SigningKey, VerifyKey

SIGNATURE_BYTES = 64


def sign_payload(key: SigningKey, payload: Mapping[str, Any]) -> str:
    """Base64 Ed25519 signature of ``canonical_bytes(payload)``."""
    return base64.b64encode(key.sign(canonical_bytes(payload))).decode("ascii")


def decode_signature(signature: str | None) -> bytes | None:
    """The 64 signature bytes, or None if ``signature`` is not well-formed base64 of 64 bytes."""
    if not isinstance(signature, str):
        return None
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return raw if len(raw) == SIGNATURE_BYTES else None


def signature_valid(key: VerifyKey, payload: Mapping[str, Any], signature: str | None) -> bool:
    """True if ``signature`` is ``key``'s signature of ``payload``; False for any other input."""
    raw = decode_signature(signature)
    return raw is not None and key.verify(canonical_bytes(payload), raw)


class SignedDocument:
    """``payload``/``sign``/``signature_valid`` for a frozen dataclass with ``key_id`` and ``signature``
    fields and a ``to_dict()``: the signature covers everything but itself, the key id included."""

    key_id: str | None
    signature: str | None

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - provided by the document
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:
        """What the signature covers: everything but the signature."""
        d = self.to_dict()
        del d["signature"]
        return d

    def sign(self, key: SigningKey) -> Self:
        """A copy with ``key_id`` set to ``key``'s and signed by it."""
        unsigned = replace(self, key_id=key.key_id, signature=None)  # type: ignore[type-var]
        return replace(unsigned, signature=sign_payload(key, unsigned.payload()))

    def signature_valid(self, key: VerifyKey) -> bool:
        """True if signed, with ``key``'s id, and the signature verifies."""
        return self.key_id == key.key_id and signature_valid(key, self.payload(), self.signature)
