"""Small-cell suppression: counts below the threshold are never reported as numbers.

Every count FedTwin shows or writes about patients goes through :func:`suppress_count`, so the
rule lives in one place (OHDSI practice: a minimum cell count, 10 by default, below which a count
could single out a patient, is shown as ``<10``). Zero is also suppressed: "no patient has X" is
itself disclosive when combined with other counts.
"""

from __future__ import annotations

from typing import Any

DEFAULT_THRESHOLD = 10


def suppress_count(n: int, threshold: int = DEFAULT_THRESHOLD) -> int | str:
    """Return ``n`` if it may be shown, else the string ``"<threshold"``."""
    if threshold < 1:
        raise ValueError(f"suppression threshold must be >= 1, got {threshold}")
    n = int(n)
    return n if n >= threshold else f"<{threshold}"


def is_suppressed(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("<") or value == "suppressed")


def suppress_share(numerator: int, denominator: int, threshold: int = DEFAULT_THRESHOLD) -> float | str:
    """A proportion is shown only when both its numerator and denominator may be shown.

    A share over an unsuppressed denominator would let anyone recover a small numerator.
    """
    if numerator < threshold or denominator < threshold:
        return "suppressed"
    return round(numerator / denominator, 4)


def suppress_partition(counts: dict[str, int], threshold: int = DEFAULT_THRESHOLD) -> dict[str, int | str]:
    """Suppress the cells of a partition whose total is shown elsewhere (e.g. sex = F / M).

    Primary suppression hides cells below the threshold. If that hides exactly one cell, its
    value is the total minus the others, so the smallest remaining cell is hidden too
    (complementary suppression, as statistical agencies do).
    """
    out: dict[str, int | str] = {k: suppress_count(v, threshold) for k, v in counts.items()}
    hidden = [k for k, v in out.items() if is_suppressed(v)]
    if len(hidden) == 1:
        shown = sorted((v, k) for k, v in counts.items() if k not in hidden)
        if shown:
            out[shown[0][1]] = "suppressed"
    return out
