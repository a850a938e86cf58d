"""Field checks shared by manifests and records: each returns the value in its one canonical type.

Why so strict: a manifest travels in plaintext and a record is kept for years. Every field is a
short identifier, a hex digest or a number, checked here, so nothing free-form (and so nothing
patient-level) can ride along, and a value is always stored in the same type (``3`` and ``3.0``
would otherwise hash differently after a JSON round trip).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from fedtwin.provenance.errors import FieldError
from fedtwin.provenance.keys import KEY_ID_RE
from fedtwin.provenance.signing import decode_signature

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # the same rule as site names and study ids (federation/config.py)
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,79}$")  # e.g. 0.1.0 or 0.1.0+g1a2b3c4d
WORD_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
METRIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+\-]{0,199}$")


def name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise FieldError(field, "a name (lowercase letter, then a-z 0-9 _ -, at most 63 characters)", value)
    return value


def hex_digest(value: Any, field: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise FieldError(field, "a sha256 digest (64 lowercase hex digits)" + (" or null" if optional else ""), value)
    return value


def key_id(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not KEY_ID_RE.match(value):
        raise FieldError(field, "a key id (16 lowercase hex digits) or null", value)
    return value


def signature(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if decode_signature(value) is None:
        raise FieldError(field, "a base64 Ed25519 signature (64 bytes) or null", value if isinstance(value, str) else type(value).__name__)
    return value  # type: ignore[no-any-return]


def version(value: Any, field: str) -> str:
    if not isinstance(value, str) or not VERSION_RE.match(value):
        raise FieldError(field, "a version string (letters, digits, . + _ -; at most 80 characters)", value)
    return value


def word(value: Any, field: str, choices: tuple[str, ...] | None = None) -> str:
    if choices is not None:
        if value not in choices:
            raise FieldError(field, "one of " + ", ".join(repr(c) for c in choices), value)
        return str(value)
    if not isinstance(value, str) or not WORD_RE.match(value):
        raise FieldError(field, "a short lowercase word", value)
    return value


def integer(value: Any, field: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise FieldError(field, "an integer", value)
    v = int(value)
    if minimum is not None and v < minimum:
        raise FieldError(field, f"an integer >= {minimum}", v)
    return v


def number(value: Any, field: str, *, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(field, "a number", value)
    v = float(value)
    if not math.isfinite(v):
        raise FieldError(field, "a finite number", v)
    if low is not None and (v <= low if low_open else v < low):
        raise FieldError(field, f"a number {'>' if low_open else '>='} {low}", v)
    if high is not None and (v >= high if high_open else v > high):
        raise FieldError(field, f"a number {'<' if high_open else '<='} {high}", v)
    return v


def exact_keys(data: Any, field: str, required: set[str], optional: set[str] = frozenset()) -> Mapping[str, Any]:  # type: ignore[assignment]
    """``data`` as a mapping with every required key and nothing unknown (no room for extras)."""
    if not isinstance(data, Mapping):
        raise FieldError(field or "$", "an object", type(data).__name__)
    unknown = sorted(set(data) - required - optional)
    if unknown:
        raise FieldError(f"{field}.{unknown[0]}" if field else unknown[0], "no such field (only the documented fields are allowed)", "present")
    missing = sorted(required - set(data))
    if missing:
        raise FieldError(f"{field}.{missing[0]}" if field else missing[0], "a value", "missing")
    return data
