"""Federated evaluation metrics from additive sufficient statistics.

Sites never share patient rows, so each site reduces its predictions to sums (histograms,
error moments, calibration-bin sums) laid out by an agreed :class:`MetricsLayout`. Sums from all
sites are added inside SecAgg+ as one flat float vector; every metric and its confidence
interval is then computed from the summed statistics alone. See docs/metrics.md.

Typical flow::

    layout = MetricsLayout(variable_names=..., horizon=H, outcome_names=...,
                           subgroup_names=subgroup_names(config))
    # at each site
    names, member = subgroup_membership(config, sex=..., age=..., race=...)
    vec = EvaluationStats.from_inputs(layout, member, names=names, forecast=..., outcome=...).to_vector()
    # at the coordinator, after SecAgg+ has summed the vectors
    total = EvaluationStats.from_vector(EvaluationStats.zeros(layout), summed_vec)
    report = metrics_report(total)            # JSON-ready, suppressed
"""

from fedtwin.metrics.additive import AdditiveStats, Segment
from fedtwin.metrics.calibration import (
    RecalibrationFit,
    calibration_intercept,
    calibration_slope,
    ece,
    fit_recalibration,
    oe_ratio,
)
from fedtwin.metrics.discrimination import (
    auprc,
    auroc,
    auroc_from_histograms,
    average_precision_from_histograms,
    delong_se_from_histograms,
    snap_threshold,
    tpr_fpr,
)
from fedtwin.metrics.effect import EffectInputs, EffectStats, effect_metrics
from fedtwin.metrics.evaluation import EvaluationStats, vector_size
from fedtwin.metrics.fairness import (
    SUPPRESSED,
    disclosure_count,
    equalized_odds,
    fairness_summary,
    group_gap,
    mover_difference,
    subgroup_metrics,
    suppress_table,
    suppressed_groups,
)
from fedtwin.metrics.forecast import ForecastInputs, ForecastStats, forecast_metrics
from fedtwin.metrics.group import GroupStats, group_metrics, outcome_metrics
from fedtwin.metrics.intervals import (
    chisq_rmse_interval,
    clustered_mean,
    hanley_mcneil_se,
    logit_interval,
    normal_interval,
    oe_interval,
    wilson_interval,
    z_value,
)
from fedtwin.metrics.labels import (
    SubgroupConfig,
    age_band_labels,
    attribute_labels,
    parse_subgroup,
    subgroup_family,
    subgroup_membership,
    subgroup_names,
)
from fedtwin.metrics.layout import LAYOUT_VERSION, MetricsLayout, MetricsLayoutError
from fedtwin.metrics.outcome import OutcomeInputs, OutcomeStats, brier
from fedtwin.metrics.report import metrics_report, nest, suppress_overall
from fedtwin.metrics.result import MetricResult
from fedtwin.metrics.subgroups import SubgroupStats

__all__ = [
    "AdditiveStats",
    "EffectInputs",
    "EffectStats",
    "EvaluationStats",
    "ForecastInputs",
    "ForecastStats",
    "GroupStats",
    "LAYOUT_VERSION",
    "MetricResult",
    "MetricsLayout",
    "MetricsLayoutError",
    "OutcomeInputs",
    "OutcomeStats",
    "RecalibrationFit",
    "SUPPRESSED",
    "Segment",
    "SubgroupConfig",
    "SubgroupStats",
    "age_band_labels",
    "attribute_labels",
    "auprc",
    "auroc",
    "auroc_from_histograms",
    "average_precision_from_histograms",
    "brier",
    "calibration_intercept",
    "calibration_slope",
    "chisq_rmse_interval",
    "clustered_mean",
    "delong_se_from_histograms",
    "disclosure_count",
    "ece",
    "effect_metrics",
    "equalized_odds",
    "fairness_summary",
    "fit_recalibration",
    "forecast_metrics",
    "group_gap",
    "group_metrics",
    "hanley_mcneil_se",
    "logit_interval",
    "metrics_report",
    "mover_difference",
    "nest",
    "normal_interval",
    "oe_interval",
    "oe_ratio",
    "outcome_metrics",
    "parse_subgroup",
    "snap_threshold",
    "subgroup_family",
    "subgroup_membership",
    "subgroup_metrics",
    "subgroup_names",
    "suppress_overall",
    "suppress_table",
    "suppressed_groups",
    "tpr_fpr",
    "vector_size",
    "wilson_interval",
    "z_value",
]
