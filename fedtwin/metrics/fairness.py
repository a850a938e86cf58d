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
"""

from __future__ import annotations

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


def suppress_table(
    table: Mapping[str, Mapping[MetricKey, MetricResult]],
    threshold: int = DEFAULT_THRESHOLD,
    *,
    overall: Mapping[MetricKey, MetricResult] | None = None,
    complementary: bool = True,
) -> dict[str, dict[MetricKey, Cell]]:
    """Per-subgroup metric table with every non-disclosable value replaced by ``"suppressed"``.

    Suppression is decided per metric (each has its own disclosure count). ``overall`` - the
    whole-cohort metrics, if they are published - is the parent of the single-attribute groups.
    """
    keys = sorted({k for row in table.values() for k in row})
    out: dict[str, dict[MetricKey, Cell]] = {g: {} for g in table}
    for key in keys:
        counts = {g: row[key].disclosure_count for g, row in table.items() if key in row}
        if overall is not None and key in overall:
            counts[OVERALL] = overall[key].disclosure_count
        hidden = suppressed_groups(counts, threshold, complementary=complementary)
        for g, row in table.items():
            if key in row:
                out[g][key] = SUPPRESSED if g in hidden else row[key]
    return out


def group_gap(values: Mapping[str, Cell], *, higher_is_better: bool = True) -> dict[str, object]:
    """Worst and best shown group and the gap ``max - min`` (suppressed/undefined groups excluded)."""
    shown = {g: v.value for g, v in values.items() if isinstance(v, MetricResult) and v.defined}
    excluded = sorted(g for g in values if g not in shown)
    if len(shown) < 2:
        return {"worst_group": None, "worst": None, "best_group": None, "best": None, "gap": None,
                "groups": len(shown), "excluded": excluded}
    lo_g = min(shown, key=lambda g: (shown[g], g))
    hi_g = max(shown, key=lambda g: (shown[g], g))
    worst_g, best_g = (lo_g, hi_g) if higher_is_better else (hi_g, lo_g)
    return {
        "worst_group": worst_g,
        "worst": shown[worst_g],
        "best_group": best_g,
        "best": shown[best_g],
        "gap": shown[hi_g] - shown[lo_g],
        "groups": len(shown),
        "excluded": excluded,
    }


def equalized_odds(tpr: Mapping[str, Cell], fpr: Mapping[str, Cell]) -> dict[str, object]:
    """Equalized-odds difference ``max(max|TPR_g - TPR_h|, max|FPR_g - FPR_h|)`` over shown groups.

    TPR and FPR gaps are each taken over the groups where that rate is shown (a group may have
    enough non-events for FPR but too few events for TPR); the difference is reported only when
    both gaps exist.
    """
    t, f = group_gap(tpr), group_gap(fpr)
    diff = max(t["gap"], f["gap"]) if t["gap"] is not None and f["gap"] is not None else None  # type: ignore[type-var]
    return {"difference": diff, "tpr_gap": t["gap"], "fpr_gap": f["gap"], "tpr": t, "fpr": f}


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
    AUROC worst group and gap per outcome; equalized-odds difference per outcome and threshold;
    forecast RMSE (pooled over steps) worst group and gap per variable (higher is worse).
    """
    families = _families(list(table))

    def column(key: MetricKey, groups: list[str]) -> dict[str, Cell]:
        return {g: table[g][key] for g in groups if key in table[g]}

    keys = {k for row in table.values() for k in row}
    out: dict[str, object] = {"auroc": {}, "equalized_odds": {}, "forecast_rmse": {}}
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
    for v in variable_names:
        out["forecast_rmse"][v] = {  # type: ignore[index]
            f: group_gap(column(("forecast", v, "all", "rmse"), gs), higher_is_better=False)
            for f, gs in families.items()
        }
    return out
