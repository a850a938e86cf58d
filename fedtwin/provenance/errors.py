"""Provenance errors: every one names what is wrong (the file, key, field or line) and the fix.

:class:`FieldError` also carries the field path and the expected/found values, so that the chain
verifier can turn a record that does not even parse into a precise report row instead of stopping.
"""

from __future__ import annotations

from fedtwin.errors import FedTwinError


class ProvenanceError(FedTwinError):
    """Provenance evidence (a key, a signature, a manifest, a record, a log) is missing or invalid."""


class FieldError(ProvenanceError):
    """One field of a manifest or record has the wrong type, format or value."""

    def __init__(self, field: str, expected: str, found: object, fix: str = "") -> None:
        self.field = field
        self.expected = expected
        self.found = found if isinstance(found, str) else repr(found)
        super().__init__(
            f"{field}: expected {expected}, found {self.found}",
            fix or "provenance documents are written by FedTwin only; do not edit them by hand",
        )


class LogError(ProvenanceError):
    """A site's append-only provenance log is tampered with, truncated or cannot be written."""
