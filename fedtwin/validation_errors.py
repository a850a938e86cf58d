"""pydantic validation errors as (where, value shown, message) rows a person can act on.

Shared by twin specs (YAML) and consortium configs (TOML), so both name the field, the value
found and the rule the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

_TYPE_TAGS = ("int", "float", "constrained-int")


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (part.startswith("function-") or part in _TYPE_TAGS)


def location(loc: tuple[Any, ...]) -> str:
    """``state_variables[0].plausible_range`` from pydantic's loc tuple."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_tag(part):
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def value_at(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if _is_tag(part):
            continue
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return data


def error_rows(exc: ValidationError, data: Any, width: int = 80) -> list[tuple[str, str, str]]:
    """One row per distinct problem: (field location, repr of the value found, message)."""
    rows, seen = [], set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = location(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if (where, msg) in seen:
            continue
        seen.add((where, msg))
        shown = repr(value_at(data, loc))
        if len(shown) > width:
            shown = shown[: width - 3] + "..."
        rows.append((where, shown, msg))
    return rows
