"""Number hygiene shared by the card and its renderings.

The card JSON must be byte-identical when rebuilt from the same evidence, whatever the dict order
of the inputs and however a float was computed on the way: every float is rounded to
:data:`SIGNIFICANT_DIGITS` significant digits once, NaN/inf become ``null`` (canonical JSON has no
form for them), tuples become lists, and mappings are rebuilt with sorted keys. Renderers then format
the already-rounded numbers; they never compute new ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SIGNIFICANT_DIGITS = 6
SUPPRESSED = "suppressed"


def round_float(x: float) -> float | None:
    """``x`` to :data:`SIGNIFICANT_DIGITS` significant digits; None if not finite."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def normalize(value: Any) -> Any:
    """A plain, rounded, key-sorted JSON copy of ``value`` (see module docstring)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return round_float(value)
    if isinstance(value, Mapping):
        return {str(k): normalize(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if hasattr(value, "item"):  # a numpy scalar
        return normalize(value.item())
    raise TypeError(f"{type(value).__name__} has no place in a model card")


def is_cell(value: Any) -> bool:
    """A shown report cell: ``{"value": v, "ci": [lo, hi], "n_patients": k, ...}``."""
    return isinstance(value, Mapping) and "value" in value


def fmt_number(x: Any) -> str:
    """4 significant digits for people (the JSON keeps 6)."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def fmt_cell(cell: Any, *, with_n: bool = False) -> str:
    """``0.712 [0.65, 0.77]``; a suppressed cell stays the bare word, nothing else is shown of it."""
    if cell is None:
        return "n/a"
    if isinstance(cell, str):
        return cell  # "suppressed", "<10"
    if not is_cell(cell):
        return fmt_number(cell)
    v = cell.get("value")
    if v is None:
        return "undefined"
    text = fmt_number(v)
    ci = cell.get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(c is not None for c in ci):
        text += f" [{fmt_number(ci[0])}, {fmt_number(ci[1])}]"
    if with_n and cell.get("n_patients") is not None:
        text += f" (n={fmt_number(cell['n_patients'])})"
    return text
