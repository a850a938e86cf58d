"""Evaluation statistics -> a JSON-ready report with flat metric keys, small cells suppressed.

Key scheme (``.``-separated; the last part is always the model):

=====================  =====================================================================
forecast               ``<metric>.<variable>.<step>.<model>``; metric ``rmse``, ``mae``,
                       ``bias`` (canonical units, predictive mean), ``nll`` (nats, density
                       in canonical units), ``coverage50``, ``coverage90``; step ``h01`` ..
                       ``h12`` (zero-padded) or ``all`` (pooled over the horizon); variable
                       ``all`` (pooled over variables) only for ``nll`` and coverage, since
                       errors in different units do not pool
outcome                ``<metric>.<outcome>.<model>``; ``auroc``, ``auprc``, ``brier``,
                       ``ece``, ``calibration_slope``, ``calibration_intercept``, ``oe_ratio``,
                       ``tpr``, ``fpr`` (at ``report["decision_threshold"]``, also in the
                       cell as ``threshold``; risk >= threshold is predicted positive)
what-if effect         ``effect_<metric>.<plan>.<variable>.<step>.<model>``; ``effect_rmse``,
                       ``effect_mae``, ``effect_bias`` (predicted - true effect)
=====================  =====================================================================

Models: ``twin``, ``mechanistic_only``, ``residual_only``, ``persistence``, ``population_mean``.
Examples: ``rmse.map.h03.twin``, ``coverage90.all.all.twin``, ``auroc.death.twin``,
``effect_rmse.no_vasopressor.map.all.twin``.

A value is ``{"value": v, "ci": [lo, hi], "n_patients": k}`` (outcomes add ``n_events``), or
the string ``"suppressed"`` when it rests on fewer than the threshold (patients; min(events,
non-events) for outcomes; min(patients, hits) for coverage), with complementary suppression
across subgroup partitions (fedtwin.metrics.report). TPR and FPR are shown only when the
group's events and non-events both reach the threshold too (as event counts: a rate's CI gives
away its denominator, and the group's size is published). Counts below the threshold show as
``"<10"``; a count hidden because it would reveal a small one shows as ``"suppressed"``.
Subgroups report metrics pooled over the horizon (``<step>`` = ``all``).

``report["fairness"]`` (twin only; fedtwin.metrics.fairness_summary): per family of disjoint
subgroups, worst group and gap with a MOVER CI of the gap for AUROC, ECE, O/E, forecast RMSE
and interval coverage (``forecast_coverage_50``/``_90``, from the predictive distributions),
and the equalized-odds difference at the decision threshold.
"""

from __future__ import annotations

from typing import Any

from fedtwin.evaluation.layout import EFFECT_SEPARATOR, EvaluationLayout
from fedtwin.evaluation.stats import TwinEvaluationStats
from fedtwin.metrics import SUPPRESSED, metrics_report, snap_threshold, suppressed_groups
from fedtwin.privacy.suppression import suppress_count

FORMAT = "fedtwin-twin-evaluation/1"
POINT_METRICS = ("rmse", "mae", "bias")
DIST_METRICS = {"nll": "nll", "coverage_50": "coverage50", "coverage_90": "coverage90"}
OUTCOME_METRICS = ("auroc", "auprc", "brier", "ece", "calibration_slope", "calibration_intercept", "oe_ratio")
RATE_METRICS = ("tpr", "fpr")  # at the report's decision threshold: ``tpr@<t>`` in fedtwin.metrics
DECISION_THRESHOLD = 0.5


def step_label(k: int | str, horizon: int) -> str:
    """``3 -> "h03"`` (width: at least 2 digits), ``"all" -> "all"``; also accepts ``"h3"``."""
    if isinstance(k, str):
        if k == "all":
            return k
        k = int(k.lstrip("h"))
    return f"h{int(k):0{max(2, len(str(horizon)))}d}"


def metric_key(metric: str, *parts: str, model: str) -> str:
    return ".".join((metric, *parts, model))


def _cell(cell: Any, outcome: bool = False) -> Any:
    if not isinstance(cell, dict):
        return cell  # "suppressed"
    out: dict[str, Any] = {"value": cell["value"], "ci": cell["ci"], "n_patients": cell["n_patients"]}
    if outcome and "n_events" in cell:
        out["n_events"] = cell["n_events"]
    return out


def _rate_cell(cell: Any) -> Any:
    """TPR (``n_events`` = its denominator) or FPR (``n_non_events``), with the threshold used."""
    if not isinstance(cell, dict):
        return cell
    out = _cell(cell, outcome=True)
    if "n_non_events" in cell:
        out["n_non_events"] = cell["n_non_events"]
    out["threshold"] = cell["threshold"]
    return out


def _flatten(layout: EvaluationLayout, model: str, point: dict[str, Any], dist: dict[str, Any], *, cells: bool) -> dict[str, Any]:
    """Flat keys from the nested metric trees of one model's point and dist blocks."""
    out: dict[str, Any] = {}
    h = layout.horizon
    fc = point.get("forecast", {})
    for var in layout.variable_names:
        for step, metrics in fc.get(var, {}).items():
            if step != "all" and not cells:
                continue
            for m in POINT_METRICS:
                if m in metrics:
                    out[metric_key(m, var, step_label(step, h), model=model)] = _cell(metrics[m])
    dfc = dist.get("forecast", {})
    for var in (*layout.variable_names, "all"):
        for step, metrics in dfc.get(var, {}).items():
            if step != "all" and not cells:
                continue
            for m, label in DIST_METRICS.items():
                if m in metrics:
                    out[metric_key(label, var, step_label(step, h), model=model)] = _cell(metrics[m])
    for outcome, metrics in point.get("outcome", {}).items():
        for m in OUTCOME_METRICS:
            if m in metrics:
                out[metric_key(m, outcome, model=model)] = _cell(metrics[m], outcome=True)
        for m in RATE_METRICS:
            at = [k for k in metrics if k.startswith(f"{m}@")]
            if len(at) == 1:  # one decision threshold per report
                out[metric_key(m, outcome, model=model)] = _rate_cell(metrics[at[0]])
    for name, steps in point.get("effect", {}).items():
        if EFFECT_SEPARATOR not in name:
            continue  # pooled over plans and variables: mixes units
        plan, var = name.split(EFFECT_SEPARATOR, 1)
        for step, metrics in steps.items():
            if step != "all" and not cells:
                continue
            for m in POINT_METRICS:
                if m in metrics:
                    out[metric_key(f"effect_{m}", plan, var, step_label(step, h), model=model)] = _cell(metrics[m])
    return out


def _group_counts(stats: TwinEvaluationStats, threshold: int) -> dict[str, Any]:
    layout = stats.layout
    n = int(round(float(stats.counts.patients)))
    counts = {"": n, **{g: int(round(float(c))) for g, c in zip(layout.subgroup_names, stats.counts.subgroup_patients)}}
    hidden = suppressed_groups(counts, threshold, complementary=True)
    out = {}
    for g in layout.subgroup_names:
        c = counts[g]
        out[g] = suppress_count(c, threshold) if c < threshold else (SUPPRESSED if g in hidden else c)
    return out


def evaluation_report(
    stats: TwinEvaluationStats,
    *,
    suppression_threshold: int = 10,
    level: float = 0.95,
    subgroups: bool = True,
    cells: bool = True,
    decision_threshold: float = DECISION_THRESHOLD,
) -> dict[str, Any]:
    """The JSON-ready report of (summed) evaluation statistics; see the module docstring.

    ``suppression_threshold`` normally comes from the spec (``TwinSpec.suppression_threshold``).
    ``cells=False`` omits the per-step forecast and effect metrics. ``decision_threshold``: the
    risk at which TPR, FPR and equalized odds are reported, snapped to a score-bin edge (the
    edge used is ``report["decision_threshold"]``).
    """
    layout = stats.layout
    thr = suppression_threshold
    metrics: dict[str, Any] = {}
    per_group: dict[str, dict[str, Any]] = {g: {} for g in layout.subgroup_names}
    fairness: dict[str, Any] = {}
    kw: dict[str, Any] = dict(suppression_threshold=thr, level=level, rates_need_both_classes=True)
    used = snap_threshold(decision_threshold, stats.models[0].point.layout.n_score_bins)[1]
    for name, ms in zip(layout.models, stats.models):
        p = metrics_report(ms.point, thresholds=(decision_threshold,), **kw)
        d = metrics_report(ms.dist, thresholds=(decision_threshold,), **kw)
        metrics.update(_flatten(layout, name, p["overall"], d["overall"], cells=cells))
        if subgroups:
            for g in layout.subgroup_names:
                per_group[g].update(_flatten(layout, name, p["subgroups"].get(g, {}), d["subgroups"].get(g, {}), cells=False))
        if name == "twin":
            # outcomes and RMSE from the point predictions; coverage from the predictive distribution
            fairness = {k: v for k, v in p["fairness"].items() if not k.startswith("forecast_coverage_")}
            fairness.update({k: v for k, v in d["fairness"].items() if k.startswith("forecast_coverage_")})
    n = int(round(float(stats.counts.patients)))
    events = {}
    for o, e in zip(layout.outcome_names, stats.counts.events):
        e = int(round(float(e)))
        events[o] = suppress_count(e, thr) if e < thr else (e if n - e >= thr else SUPPRESSED)
    report: dict[str, Any] = {
        "format": FORMAT,
        "layout_fingerprint": layout.fingerprint(),
        "spec_hash": layout.spec_hash,
        "models": list(layout.models),
        "variables": list(layout.variable_names),
        "outcomes": list(layout.outcome_names),
        "plans": list(layout.plans),
        "horizon": layout.horizon,
        "suppression": {"threshold": thr, "metric_marker": SUPPRESSED, "count_marker": f"<{thr}"},
        "ci_level": level,
        "decision_threshold": used,
        "cohort": {
            "n_patients": suppress_count(n, thr),
            "n_with_ground_truth": suppress_count(int(round(float(stats.counts.with_truth))), thr) if layout.plans else None,
            "n_events": events,
        },
        "metrics": metrics,
    }
    if subgroups:
        counts = _group_counts(stats, thr)
        report["subgroups"] = {g: {"n_patients": counts[g], "metrics": per_group[g]} for g in layout.subgroup_names}
        report["fairness"] = fairness
    return report
