"""Reading specs from YAML with errors a site operator can act on, and hashing them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedtwin.errors import SpecError
from fedtwin.validation_errors import error_rows
from fedtwin.spec.model import TwinSpec


def spec_from_dict(data: Any, source: str = "<spec>") -> TwinSpec:
    """Validate a parsed spec; every problem is reported with its field, value and a fix."""
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: a twin spec must be a YAML mapping, got {type(data).__name__}",
            "start from specs/icu-hemodynamics.yaml",
        )
    try:
        return TwinSpec.model_validate(data)
    except ValidationError as exc:
        lines = [f"  - field '{where}' = {shown}: {msg}" for where, shown, msg in error_rows(exc, data)]
        raise SpecError(
            f"{source}: invalid twin spec ({len(lines)} problem{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines),
            "correct the fields named above; docs/twin-specs.md documents every field",
        ) from None


def load_spec(path: str | Path) -> TwinSpec:
    """Load and validate a YAML twin spec."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {p} does not exist", "pass the path of a YAML spec, e.g. specs/icu-hemodynamics.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file {p} cannot be read: {exc}", "check the path and that it is a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML: {exc}", "fix the YAML syntax at the position shown") from None
    return spec_from_dict(data, source=str(p))


def canonical_json(spec: TwinSpec) -> str:
    """The canonical form that is hashed: sorted keys, no whitespace, defaults made explicit."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def spec_hash(spec: TwinSpec) -> str:
    """sha256 of the canonical form: equal for specs that mean the same, whatever their YAML layout."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()
