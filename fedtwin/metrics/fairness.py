"""Fairness: per-subgroup metrics, worst group and gap, equalized odds - with suppression.

Suppression rules (see docs/metrics.md):

1. Primary: a subgroup's metric is replaced by the string ``"suppressed"`` when the metric's
   ``disclosure_count`` is below the threshold (default 10, as :mod:`fedtwin.privacy.suppression`):
   patients for forecast/effect metrics, ``min(events, non-events)`` for outcome metrics,
   ``min(numerator, denominator)`` for shares (TPR, FPR, coverage).
2. Complementary (on by default): subgroups partition their parent (``sex=*`` partitions the
   cohort, ``sex=F&age=*`` partitions ``sex=F``). If exactly one child of a shown parent is
   suppressed, the parent minus the shown children would reveal it, so the smallest shown
   child is suppressed too (:func:`fedtwin.privacy.suppression.suppress_partition`), applied
   to every partition - nested ones included - until nothing changes.
3. Suppressed groups never enter worst-group, gap or equalized-odds computations (their value
   would otherwise leak as the minimum or maximum). Gaps need at least two shown groups.
4. Optional (``rates_need_both_classes=True``, used by the evaluation report): TPR and FPR are
   shown only when the group's events AND non-events both reach the threshold. A shown rate
   (its CI reveals its denominator) next to a shown group size would otherwise give away a small
   count of the other class.

Gap confidence intervals (``gap_ci``) are MOVER intervals (Zou & Donner 2008; Newcombe's hybrid
score interval when both are Wilson) for the difference between the two extreme shown groups,
built from those groups' published CIs only - see :func:`mover_difference` and docs/metrics.md.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

from fedtwin.metrics.forecast import MetricKey
from fedtwin.metrics.group import group_metrics
from fedtwin.metrics.labels import parse_subgroup, subgroup_family
from fedtwin.metrics.result import MetricResult
from fedtwin.metrics.subgroups import SubgroupStats
from fedtwin.privacy.suppression import DEFAULT_THRESHOLD, suppress_partition

SUPPRESSED = "suppressed"
OVERALL = ""  # key of the whole cohort among group counts

Cell = MetricResult | str


def subgroup_metrics(
    stats: SubgroupStats,
    *,
    thresholds: Sequence[float] = (0.5,),
    level: float = 0.95,
    cells: bool = False,
    rmse_method: Literal["normal", "chisq"] = "normal",
    auroc_method: Literal["hanley_mcneil", "delong"] = "hanley_mcneil",
) -> dict[str, dict[MetricKey, MetricResult]]:
    """Raw metrics (no suppression) of every subgroup; forecasts pooled over steps unless ``cells``."""
    return {
        name: group_metrics(
            g, thresholds=thresholds, level=level, cells=cells, rmse_method=rmse_method, auroc_method=auroc_method
        )
        for name, g in stats.items()
    }


def _name(attrs: Mapping[str, str]) -> str:
    """Inverse of :func:`parse_subgroup` (order kept, so a parent's name matches its listing)."""
    return "&".join(f"{a}={v}" for a, v in attrs.items()) if attrs else OVERALL


def suppressed_groups(
    counts: Mapping[str, int], threshold: int = DEFAULT_THRESHOLD, *, complementary: bool = True
) -> set[str]:
    """Names whose value must not be shown, given each group's disclosure count.

    ``counts`` maps subgroup names (and optionally ``""`` for the whole cohort) to the count the
    metric rests on. See the module docstring for the rules.
    """
    if threshold < 1:
        raise ValueError(f"suppression threshold must be >= 1, got {threshold}")
    hidden = {g for g, c in counts.items() if c < threshold}
    if not complementary:
        return hidden
    partitions: dict[tuple[str, str], list[str]] = {}
    for g in counts:
        if g == OVERALL:
            continue
        attrs = parse_subgroup(g)
        for a in attrs:
            parent = _name({k: v for k, v in attrs.items() if k != a})
            partitions.setdefault((parent, a), []).append(g)
    changed = True
    while changed:
        changed = False
        for (parent, _), children in sorted(partitions.items()):
            if parent in hidden or (parent != OVERALL and parent not in counts):
                continue
            # the single-partition rule lives in fedtwin.privacy; already-hidden cells enter as 0
            cells = {c: (0 if c in hidden else int(counts[c])) for c in children}
            newly = {c for c, v in suppress_partition(cells, threshold).items() if isinstance(v, str)} - hidden
            if newly:
                hidden |= newly
                changed = True
    return hidden


def is_rate(key: MetricKey) -> bool:
    """``("outcome", o, "tpr@t" | "fpr@t")``."""
    return len(key) == 3 and key[0] == "outcome" and key[2][:4] in ("tpr@", "fpr@")


def disclosure_count(
    row: Mapping[MetricKey, MetricResult], key: MetricKey, *, rates_need_both_classes: bool = False
) -> int:
    """The count ``row[key]`` is suppressed by (rule 1, and rule 4 when asked for)."""
    c = int(row[key].disclosure_count)
    if rates_need_both_classes and is_rate(key):
        t = key[2][4:]
        tpr, fpr = row.get(("outcome", key[1], f"tpr@{t}")), row.get(("outcome", key[1], f"fpr@{t}"))
        events = tpr.n_events if tpr is not None and tpr.n_events is not None else 0
        non_events = fpr.n_non_events if fpr is not None and fpr.n_non_events is not None else 0
        c = min(c, int(events), int(non_events))
    return c


def suppress_table(
    table: Mapping[str, Mapping[MetricKey, MetricResult]],
    threshold: int = DEFAULT_THRESHOLD,
    *,
    overall: Mapping[MetricKey, MetricResult] | None = None,
    complementary: bool = True,
    rates_need_both_classes: bool = False,
) -> dict[str, dict[MetricKey, Cell]]:
    """Per-subgroup metric table with every non-disclosable value replaced by ``"suppressed"``.

    Suppression is decided per metric (each has its own disclosure count). ``overall`` - the
    whole-cohort metrics, if they are published - is the parent of the single-attribute groups.
    ``rates_need_both_classes`` adds rule 4 of the module docstring.
    """
    both = rates_need_both_classes
    keys = sorted({k for row in table.values() for k in row})
    out: dict[str, dict[MetricKey, Cell]] = {g: {} for g in table}
    for key in keys:
        counts = {g: disclosure_count(row, key, rates_need_both_classes=both) for g, row in table.items() if key in row}
        if overall is not None and key in overall:
            # ``overall`` holds published metrics only (rule 4 was applied when publishing them)
            counts[OVERALL] = overall[key].disclosure_count
        hidden = suppressed_groups(counts, threshold, complementary=complementary)
        for g, row in table.items():
            if key in row:
                out[g][key] = SUPPRESSED if g in hidden else row[key]
    return out


def mover_difference(a: MetricResult, b: MetricResult) -> tuple[float, float] | None:
    """CI of ``|theta_a - theta_b|`` for two independent estimates, from their own CIs (MOVER).

    MOVER (method of variance estimates recovery; Zou & Donner 2008, Newcombe 1998 for two
    Wilson intervals) for ``d = a - b``::

        L = d - sqrt((a - l_a)^2 + (u_b - b)^2),    U = d + sqrt((u_a - a)^2 + (b - l_b)^2)

    It keeps each interval's asymmetry (Wilson, log-scale O/E, square-rooted RMSE, clipped AUROC)
    and is the Wald interval ``d +- z sqrt(se_a^2 + se_b^2)`` when both are symmetric Wald
    intervals. For the absolute difference: ``[L, U]`` if ``L >= 0``, else ``[0, max(-L, U)]``
    (contains ``|d|`` whenever ``[L, U]`` contains ``d``). ``None`` when a CI is undefined.
    """
    vals = (a.value, a.ci_low, a.ci_high, b.value, b.ci_low, b.ci_high)
    if not all(math.isfinite(float(x)) for x in vals):
        return None
    d = a.value - b.value
    lo = d - math.hypot(a.value - a.ci_low, b.ci_high - b.value)
    hi = d + math.hypot(a.ci_high - a.value, b.value - b.ci_low)
    if d < 0:  # order so that the difference is >= 0
        lo, hi = -hi, -lo
    return (lo, hi) if lo >= 0 else (0.0, max(-lo, hi))


def group_gap(
    values: Mapping[str, Cell], *, higher_is_better: bool = True, ideal: float | None = None, log: bool = False
) -> dict[str, object]:
    """Worst and best shown group and the gap ``max - min`` (suppressed/undefined groups excluded).

    With ``ideal`` (coverage: the nominal level; O/E: 1) the worst group is the one farthest from
    it (on the log scale if ``log``) and the best the closest; otherwise the lowest (highest if
    not ``higher_is_better``). ``gap_ci`` is the MOVER interval (:func:`mover_difference`) of the
    difference between the two groups the gap is taken between (``gap_groups``: max, min);
    ``worst_n``/``best_n`` are those groups' ``n_patients`` (what their value rests on).
    """
    results = {g: v for g, v in values.items() if isinstance(v, MetricResult) and v.defined}
    shown = {g: v.value for g, v in results.items()}
    excluded = sorted(g for g in values if g not in shown)
    if len(shown) < 2:
        return {"worst_group": None, "worst": None, "best_group": None, "best": None, "gap": None,
                "groups": len(shown), "excluded": excluded,
                "gap_ci": None, "ci_method": None, "gap_groups": None, "worst_n": None, "best_n": None}
    lo_g = min(shown, key=lambda g: (shown[g], g))
    hi_g = max(shown, key=lambda g: (shown[g], g))
    if ideal is not None:
        if log:
            dist = {g: (abs(math.log(v / ideal)) if v > 0 else math.inf) for g, v in shown.items()}
        else:
            dist = {g: abs(v - ideal) for g, v in shown.items()}
        worst_g = max(shown, key=lambda g: (dist[g], g))
        best_g = min(shown, key=lambda g: (dist[g], g))
    else:
        worst_g, best_g = (lo_g, hi_g) if higher_is_better else (hi_g, lo_g)
    ci = mover_difference(results[hi_g], results[lo_g])
    return {
        "worst_group": worst_g,
        "worst": shown[worst_g],
        "best_group": best_g,
        "best": shown[best_g],
        "gap": shown[hi_g] - shown[lo_g],
        "groups": len(shown),
        "excluded": excluded,
        "gap_ci": list(ci) if ci is not None else None,
        "ci_method": "MOVER" if ci is not None else None,
        "gap_groups": [hi_g, lo_g],
        "worst_n": int(results[worst_g].n_patients),
        "best_n": int(results[best_g].n_patients),
    }


def equalized_odds(tpr: Mapping[str, Cell], fpr: Mapping[str, Cell]) -> dict[str, object]:
    """Equalized-odds difference ``max(max|TPR_g - TPR_h|, max|FPR_g - FPR_h|)`` over shown groups.

    TPR and FPR gaps are each taken over the groups where that rate is shown (a group may have
    enough non-events for FPR but too few events for TPR); the difference is reported only when
    both gaps exist. ``difference_ci`` = ``[max(L_tpr, L_fpr), max(U_tpr, U_fpr)]`` from the two
    gaps' MOVER intervals: max is increasing in both arguments, so it contains the difference
    whenever both gap intervals contain their gaps (coverage >= 1 - 2 alpha by Bonferroni).
    """
    t, f = group_gap(tpr), group_gap(fpr)
    diff = max(t["gap"], f["gap"]) if t["gap"] is not None and f["gap"] is not None else None  # type: ignore[type-var]
    tc, fc = t["gap_ci"], f["gap_ci"]
    ci = [max(tc[0], fc[0]), max(tc[1], fc[1])] if diff is not None and tc and fc else None  # type: ignore[index]
    return {"difference": diff, "tpr_gap": t["gap"], "fpr_gap": f["gap"], "tpr": t, "fpr": f,
            "difference_ci": ci, "tpr_gap_ci": tc, "fpr_gap_ci": fc}


def _families(names: Sequence[str]) -> dict[str, list[str]]:
    fam: dict[str, list[str]] = {}
    for g in names:
        fam.setdefault(subgroup_family(g), []).append(g)
    fam["any"] = list(names)
    return fam


def fairness_summary(
    table: Mapping[str, Mapping[MetricKey, Cell]],
    *,
    outcome_names: Sequence[str] = (),
    variable_names: Sequence[str] = (),
) -> dict[str, object]:
    """Gaps from an already-suppressed table (:func:`suppress_table`).

    Per family of disjoint groups (``sex``, ``age``, ``sex&age``, ...) and across ``any`` group:

    - ``auroc[outcome]``: worst (lowest) group and gap;
    - ``equalized_odds[outcome][threshold]``: equalized-odds difference, TPR and FPR gaps;
    - ``ece[outcome]``: worst (highest) group and gap;
    - ``oe_ratio[outcome]``: worst group = farthest from 1 (log scale), gap = max - min;
    - ``forecast_rmse[variable]``: forecast RMSE (pooled over steps) worst (highest) group, gap;
    - ``forecast_coverage_<L>[variable | "all"]``: interval coverage (pooled over steps; ``all``
      also over variables), worst group = farthest from the nominal level, gap = max - min.

    Every gap carries ``gap_ci`` (MOVER, :func:`group_gap`) and the worst and best groups' n.
    """
    families = _families(list(table))

    def column(key: MetricKey, groups: list[str]) -> dict[str, Cell]:
        return {g: table[g][key] for g in groups if key in table[g]}

    keys = {k for row in table.values() for k in row}
    out: dict[str, object] = {"auroc": {}, "equalized_odds": {}, "forecast_rmse": {}, "ece": {}, "oe_ratio": {}}
    for o in outcome_names:
        out["auroc"][o] = {f: group_gap(column(("outcome", o, "auroc"), gs)) for f, gs in families.items()}  # type: ignore[index]
        rates = sorted(k[2][4:] for k in keys if k[0] == "outcome" and k[1] == o and k[2].startswith("tpr@"))
        out["equalized_odds"][o] = {  # type: ignore[index]
            t: {
                f: equalized_odds(column(("outcome", o, f"tpr@{t}"), gs), column(("outcome", o, f"fpr@{t}"), gs))
                for f, gs in families.items()
            }
            for t in rates
        }
        out["ece"][o] = {  # type: ignore[index]
            f: group_gap(column(("outcome", o, "ece"), gs), higher_is_better=False) for f, gs in families.items()
        }
        out["oe_ratio"][o] = {  # type: ignore[index]
            f: group_gap(column(("outcome", o, "oe_ratio"), gs), ideal=1.0, log=True) for f, gs in families.items()
        }
    for v in variable_names:
        out["forecast_rmse"][v] = {  # type: ignore[index]
            f: group_gap(column(("forecast", v, "all", "rmse"), gs), higher_is_better=False)
            for f, gs in families.items()
        }
    labels = sorted(
        {k[3][len("coverage_"):] for k in keys if k[0] == "forecast" and k[2] == "all" and k[3].startswith("coverage_")},
        key=float,
    )
    for label in labels:
        nominal = float(label) / 100.0
        per_var: dict[str, object] = {}
        for v in (*variable_names, "all"):
            key = ("forecast", v, "all", f"coverage_{label}")
            if key in keys:
                per_var[v] = {f: group_gap(column(key, gs), ideal=nominal) for f, gs in families.items()}
        out[f"forecast_coverage_{label}"] = per_var
    return out
