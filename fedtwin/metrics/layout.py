"""The agreed shape of every statistics vector: a small config that all sites share.

Secure aggregation (Flower SecAgg+) only ever sees flat float vectors and sums them position by
position. That sum is meaningful only if every site puts the same statistic at the same position,
so the layout - variable names, horizon, bins, interval levels and the FIXED list of subgroup
names - is decided once by the coordinator, sent to every site, and checked (by fingerprint)
before any vectors are added. Nothing in the layout depends on a site's data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedtwin.errors import FedTwinError

#: Bump when the order or meaning of any statistic in the vectors changes.
LAYOUT_VERSION = 1


class MetricsLayoutError(FedTwinError, ValueError):
    """A layout is invalid, or two statistics built under different layouts were combined."""


def _as_str_tuple(values: Any, what: str) -> tuple[str, ...]:
    out = tuple(str(v) for v in values)
    dupes = sorted({v for v in out if out.count(v) > 1})
    if dupes:
        raise MetricsLayoutError(f"{what} must be unique, repeated: {dupes}", f"remove duplicates from {what}")
    return out


@dataclass(frozen=True)
class MetricsLayout:
    """Everything that fixes the size and order of the statistics vectors.

    - ``variable_names``: forecast state variables (V), in tensor order.
    - ``horizon``: forecast steps (H); statistics are kept per variable and step ahead.
    - ``outcome_names``: binary outcomes (O) with a predicted risk in [0, 1].
    - ``effect_variable_names``: variables with a ground-truth what-if effect (only simulated
      cohorts have one; empty at real sites).
    - ``subgroup_names``: the fixed fairness subgroup list (see :mod:`fedtwin.metrics.labels`).
    - ``n_score_bins``: equal-width risk bins on [0, 1] for AUROC/AUPRC/TPR/FPR.
    - ``n_calibration_bins``: equal-width risk bins on [0, 1] for ECE and O/E.
    - ``interval_levels``: central prediction-interval levels whose coverage is counted.
    - ``n_logit_bins``, ``logit_range``: bins on the logit scale for the recalibration fit
      (interior bins equal-width on [-logit_range, logit_range], the two outer bins open).
    """

    variable_names: tuple[str, ...]
    horizon: int
    outcome_names: tuple[str, ...] = ()
    effect_variable_names: tuple[str, ...] = ()
    subgroup_names: tuple[str, ...] = ()
    n_score_bins: int = 200
    n_calibration_bins: int = 10
    interval_levels: tuple[float, ...] = (0.5, 0.9)
    n_logit_bins: int = 48
    logit_range: float = 8.0
    version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "variable_names", _as_str_tuple(self.variable_names, "variable_names"))
        set_(self, "outcome_names", _as_str_tuple(self.outcome_names, "outcome_names"))
        set_(self, "effect_variable_names", _as_str_tuple(self.effect_variable_names, "effect_variable_names"))
        set_(self, "subgroup_names", _as_str_tuple(self.subgroup_names, "subgroup_names"))
        levels = tuple(float(x) for x in self.interval_levels)
        set_(self, "interval_levels", levels)
        set_(self, "horizon", int(self.horizon))
        set_(self, "n_score_bins", int(self.n_score_bins))
        set_(self, "n_calibration_bins", int(self.n_calibration_bins))
        set_(self, "n_logit_bins", int(self.n_logit_bins))
        set_(self, "logit_range", float(self.logit_range))
        if self.horizon < 1:
            raise MetricsLayoutError(f"horizon must be >= 1, got {self.horizon}")
        if self.n_score_bins < 2 or self.n_calibration_bins < 1:
            raise MetricsLayoutError(
                f"need n_score_bins >= 2 and n_calibration_bins >= 1, got {self.n_score_bins}, {self.n_calibration_bins}"
            )
        if self.n_logit_bins < 3 or not self.logit_range > 0:
            raise MetricsLayoutError(
                f"need n_logit_bins >= 3 and logit_range > 0, got {self.n_logit_bins}, {self.logit_range}"
            )
        if any(not 0.0 < x < 1.0 for x in levels) or list(levels) != sorted(set(levels)):
            raise MetricsLayoutError(
                f"interval_levels must be increasing values in (0, 1), got {list(levels)}", "e.g. [0.5, 0.9]"
            )
        if self.version != LAYOUT_VERSION:
            raise MetricsLayoutError(
                f"layout version {self.version} is not this FedTwin's version {LAYOUT_VERSION}",
                "run the same FedTwin version at the coordinator and every site",
            )

    # -- exchange -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, sent from the coordinator to every site."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetricsLayout":
        return cls(**d)

    def fingerprint(self) -> str:
        """Short hash of the layout; sites and coordinator compare it before summing vectors."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # -- derived sizes and edges ------------------------------------------------------------------

    @property
    def n_variables(self) -> int:
        return len(self.variable_names)

    @property
    def n_outcomes(self) -> int:
        return len(self.outcome_names)

    @property
    def n_subgroups(self) -> int:
        return len(self.subgroup_names)

    def interval_label(self, level: float) -> str:
        """``0.5 -> "50"``, ``0.9 -> "90"``: used in statistic and metric names."""
        return f"{level * 100:g}"

    def score_bin_edges(self) -> np.ndarray:
        """The B + 1 edges ``k / B``; a risk p falls in bin ``min(floor(p * B), B - 1)``."""
        return np.linspace(0.0, 1.0, self.n_score_bins + 1)

    def logit_bin_edges(self) -> np.ndarray:
        """The R - 1 interior edges of the logit bins (bin 0 and bin R - 1 are open-ended)."""
        return np.linspace(-self.logit_range, self.logit_range, self.n_logit_bins - 1)

    def check_same(self, other: "MetricsLayout") -> None:
        """Raise unless ``other`` is the same layout (statistics under two layouts never add)."""
        if self != other:
            raise MetricsLayoutError(
                f"statistics built under different layouts ({self.fingerprint()} vs {other.fingerprint()})",
                "every site must build its statistics from the layout the coordinator sent",
            )
