"""What-if effect error against a known ground-truth effect.

Only simulated cohorts know the true effect of an intervention (the counterfactual is never
observed in real data), so this is how a twin's causal accuracy is validated on synthetic sites.
The effect is a difference of trajectories (with vs. without the intervention) per patient,
step and variable; the statistics are the same error sums as for forecasts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedtwin.metrics.forecast import MetricKey, error_metrics
from fedtwin.metrics.layout import MetricsLayout, MetricsLayoutError
from fedtwin.metrics.pointwise import PointwiseStats
from fedtwin.metrics.result import MetricResult


@dataclass(frozen=True)
class EffectInputs:
    """True and predicted effects, (N, H, V_effect), with mask True where the truth is known."""

    true_effect: np.ndarray
    pred_effect: np.ndarray
    mask: np.ndarray

    def select(self, rows: np.ndarray) -> "EffectInputs":
        return EffectInputs(self.true_effect[rows], self.pred_effect[rows], self.mask[rows])


@dataclass(eq=False)
class EffectStats(PointwiseStats):
    """Sums of effect error, |error| and error^2 per effect variable and step."""

    @classmethod
    def quantity_names(cls, layout: MetricsLayout) -> tuple[str, ...]:
        return ("err", "abs_err", "sq_err")

    @classmethod
    def variables(cls, layout: MetricsLayout) -> tuple[str, ...]:
        return layout.effect_variable_names

    @classmethod
    def from_arrays(
        cls, layout: MetricsLayout, true_effect: np.ndarray, pred_effect: np.ndarray, mask: np.ndarray
    ) -> "EffectStats":
        mask = np.asarray(mask, dtype=bool)
        t, p = np.asarray(true_effect, dtype=np.float64), np.asarray(pred_effect, dtype=np.float64)
        if not (t.shape == p.shape == mask.shape):
            raise MetricsLayoutError(f"true_effect, pred_effect, mask shapes differ: {t.shape}, {p.shape}, {mask.shape}")
        cls._check_grid(layout, mask)
        if not (np.all(np.isfinite(t[mask])) and np.all(np.isfinite(p[mask]))):
            raise ValueError("effect arrays hold NaN/inf at masked-in entries")
        err = np.where(mask, p - t, 0.0)
        return cls._from_quantities(layout, {"err": err, "abs_err": np.abs(err), "sq_err": err * err}, mask)  # type: ignore[return-value]

    @classmethod
    def from_inputs(cls, layout: MetricsLayout, inputs: EffectInputs) -> "EffectStats":
        return cls.from_arrays(layout, inputs.true_effect, inputs.pred_effect, inputs.mask)


def effect_metrics(
    stats: EffectStats,
    *,
    level: float = 0.95,
    cells: bool = True,
    rmse_method: Literal["normal", "chisq"] = "normal",
) -> dict[MetricKey, MetricResult]:
    """``bias`` (predicted - true), ``mae``, ``rmse`` of the effect, keyed like forecast metrics."""
    return error_metrics(stats, "effect", level=level, cells=cells, rmse_method=rmse_method)
