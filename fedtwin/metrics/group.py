"""All statistics of one patient group (forecast, outcome, effect), and all its metrics.

The overall cohort and each fairness subgroup are each one :class:`GroupStats`, so subgroup
metrics are computed by exactly the same code as the overall ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from fedtwin.metrics.additive import AdditiveStats, static_field
from fedtwin.metrics.calibration import calibration_intercept, calibration_slope, ece, oe_ratio
from fedtwin.metrics.discrimination import auprc, auroc, snap_threshold, tpr_fpr
from fedtwin.metrics.effect import EffectInputs, EffectStats, effect_metrics
from fedtwin.metrics.forecast import ForecastInputs, ForecastStats, MetricKey, forecast_metrics
from fedtwin.metrics.layout import MetricsLayout
from fedtwin.metrics.outcome import OutcomeInputs, OutcomeStats, brier
from fedtwin.metrics.result import MetricResult

@dataclass(eq=False)
class GroupStats(AdditiveStats):
    """Forecast, outcome and what-if effect statistics of one group of patients."""

    layout: MetricsLayout = static_field()
    forecast: ForecastStats
    outcome: OutcomeStats
    effect: EffectStats

    @classmethod
    def zeros(cls, layout: MetricsLayout) -> "GroupStats":
        return cls(layout, ForecastStats.zeros(layout), OutcomeStats.zeros(layout), EffectStats.zeros(layout))  # type: ignore[arg-type]

    @classmethod
    def from_inputs(
        cls,
        layout: MetricsLayout,
        *,
        forecast: ForecastInputs | None = None,
        outcome: OutcomeInputs | None = None,
        effect: EffectInputs | None = None,
    ) -> "GroupStats":
        """Statistics of the given inputs; a missing input leaves its block at zero (n = 0)."""
        return cls(
            layout,
            ForecastStats.from_inputs(layout, forecast) if forecast is not None else ForecastStats.zeros(layout),  # type: ignore[arg-type]
            OutcomeStats.from_inputs(layout, outcome) if outcome is not None else OutcomeStats.zeros(layout),
            EffectStats.from_inputs(layout, effect) if effect is not None else EffectStats.zeros(layout),  # type: ignore[arg-type]
        )

def outcome_metrics(
    stats: OutcomeStats,
    *,
    thresholds: Sequence[float] = (0.5,),
    level: float = 0.95,
    auroc_method: Literal["hanley_mcneil", "delong"] = "hanley_mcneil",
) -> dict[MetricKey, MetricResult]:
    """Every outcome metric, keyed ``("outcome", outcome, metric)``; TPR/FPR as ``tpr@<t>``.

    ``<t>`` is the threshold after snapping to a score-bin edge.
    """
    out: dict[MetricKey, MetricResult] = {}
    for name in stats.layout.outcome_names:
        out[("outcome", name, "auroc")] = auroc(stats, name, level=level, method=auroc_method)
        out[("outcome", name, "auprc")] = auprc(stats, name, level=level)
        out[("outcome", name, "brier")] = brier(stats, name, level=level)
        out[("outcome", name, "ece")] = ece(stats, name, level=level)
        out[("outcome", name, "calibration_slope")] = calibration_slope(stats, name, level=level)
        out[("outcome", name, "calibration_intercept")] = calibration_intercept(stats, name, level=level)
        out[("outcome", name, "oe_ratio")] = oe_ratio(stats, name, level=level)
        for t in thresholds:
            tpr, fpr = tpr_fpr(stats, name, t, level=level)
            _, used = snap_threshold(t, stats.layout.n_score_bins)
            out[("outcome", name, f"tpr@{used:g}")] = tpr
            out[("outcome", name, f"fpr@{used:g}")] = fpr
    return out

def group_metrics(
    stats: GroupStats,
    *,
    thresholds: Sequence[float] = (0.5,),
    level: float = 0.95,
    cells: bool = True,
    rmse_method: Literal["normal", "chisq"] = "normal",
    auroc_method: Literal["hanley_mcneil", "delong"] = "hanley_mcneil",
) -> dict[MetricKey, MetricResult]:
    """Forecast, outcome and effect metrics of one group (raw: no suppression applied)."""
    out = forecast_metrics(stats.forecast, level=level, cells=cells, rmse_method=rmse_method)
    out.update(outcome_metrics(stats.outcome, thresholds=thresholds, level=level, auroc_method=auroc_method))
    out.update(effect_metrics(stats.effect, level=level, cells=cells, rmse_method=rmse_method))
    return out


__all__ = ["GroupStats", "group_metrics", "outcome_metrics"]
