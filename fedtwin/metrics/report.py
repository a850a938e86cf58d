"""The JSON-ready metrics report: overall and per-subgroup metrics plus fairness gaps, suppressed.

This is the only place metrics are turned into something shown or written, so suppression is
applied here to everything - the overall cohort included - and a suppressed value is the bare
string ``"suppressed"``: no value, CI or count of it appears anywhere in the output.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

from fedtwin.metrics.evaluation import EvaluationStats
from fedtwin.metrics.fairness import (
    SUPPRESSED,
    Cell,
    disclosure_count,
    fairness_summary,
    subgroup_metrics,
    suppress_table,
)
from fedtwin.metrics.forecast import MetricKey
from fedtwin.metrics.group import group_metrics
from fedtwin.metrics.result import MetricResult
from fedtwin.privacy.suppression import DEFAULT_THRESHOLD


def nest(flat: Mapping[MetricKey, Cell]) -> dict[str, Any]:
    """``{("forecast", "hr", "all", "rmse"): r} -> {"forecast": {"hr": {"all": {"rmse": r.to_dict()}}}}``."""
    out: dict[str, Any] = {}
    for key, cell in flat.items():
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = cell.to_dict() if isinstance(cell, MetricResult) else cell
    return out


def suppress_overall(
    metrics: Mapping[MetricKey, MetricResult], threshold: int = DEFAULT_THRESHOLD, *, rates_need_both_classes: bool = False
) -> dict[MetricKey, Cell]:
    """Whole-cohort metrics with every value resting on fewer than ``threshold`` replaced."""
    both = rates_need_both_classes
    return {
        k: (SUPPRESSED if disclosure_count(metrics, k, rates_need_both_classes=both) < threshold else r)
        for k, r in metrics.items()
    }


def metrics_report(
    stats: EvaluationStats,
    *,
    suppression_threshold: int = DEFAULT_THRESHOLD,
    thresholds: Sequence[float] = (0.5,),
    level: float = 0.95,
    complementary: bool = True,
    subgroup_cells: bool = False,
    rmse_method: Literal["normal", "chisq"] = "normal",
    auroc_method: Literal["hanley_mcneil", "delong"] = "hanley_mcneil",
    rates_need_both_classes: bool = False,
) -> dict[str, Any]:
    """Everything a coordinator publishes about model performance, ready for ``json.dumps``.

    ``thresholds`` are decision thresholds for TPR/FPR (snapped to score-bin edges).
    ``subgroup_cells`` adds per-step forecast metrics for subgroups (large; off by default).
    ``rates_need_both_classes`` shows TPR/FPR only where events and non-events both reach the
    threshold (rule 4 of :mod:`fedtwin.metrics.fairness`; the evaluation report turns it on
    because it publishes group sizes beside them).
    """
    if suppression_threshold < 1:
        raise ValueError(f"suppression threshold must be >= 1, got {suppression_threshold}")
    layout = stats.layout
    kw = dict(level=level, rmse_method=rmse_method, auroc_method=auroc_method, thresholds=thresholds)
    overall_raw = group_metrics(stats.overall, cells=True, **kw)  # type: ignore[arg-type]
    both = rates_need_both_classes
    overall = suppress_overall(overall_raw, suppression_threshold, rates_need_both_classes=both)
    raw = subgroup_metrics(stats.subgroups, cells=subgroup_cells, **kw)  # type: ignore[arg-type]
    published_overall = {k: r for k, r in overall_raw.items() if isinstance(overall[k], MetricResult)}
    table = suppress_table(
        raw, suppression_threshold, overall=published_overall, complementary=complementary, rates_need_both_classes=both
    )
    return {
        "layout_fingerprint": layout.fingerprint(),
        "suppression": {
            "threshold": suppression_threshold,
            "complementary": complementary,
            "rates_need_both_classes": both,
            "marker": SUPPRESSED,
        },
        "ci_level": level,
        "overall": nest(overall),
        "subgroups": {g: nest(row) for g, row in table.items()},
        "fairness": fairness_summary(
            table, outcome_names=layout.outcome_names, variable_names=layout.variable_names
        ),
    }
