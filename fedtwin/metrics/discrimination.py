"""Discrimination from binned score histograms: AUROC, AUPRC (average precision), TPR/FPR.

Binning replaces each risk by its bin, so two patients in the same bin are tied. AUROC is then
exactly the Mann-Whitney statistic of the binned scores with ties counted 1/2, and differs from
the continuous AUROC only through pairs that share a bin (at most the share of such pairs;
in practice far less than 1/B with B = 200). Because the histograms are integer counts that add
exactly, the pooled AUROC from summed histograms is bit-identical to the AUROC of the pooled data
binned the same way.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedtwin.metrics.intervals import hanley_mcneil_se, logit_interval, normal_interval, wilson_interval
from fedtwin.metrics.outcome import OutcomeStats
from fedtwin.metrics.result import MetricResult


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """``sum_b pos_b (neg_below_b + neg_b / 2) / (P N)``: Mann-Whitney with in-bin ties as 1/2."""
    p_tot, n_tot = float(pos.sum()), float(neg.sum())
    if p_tot == 0 or n_tot == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (p_tot * n_tot))


def delong_se_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """DeLong (1988) standard error, exact for the binned scores.

    All patients of a class in one bin share the same placement value, so the placement-value
    variances are weighted sums over bins.
    """
    p_tot, n_tot = float(pos.sum()), float(neg.sum())
    if p_tot < 2 or n_tot < 2:
        return float("nan")
    a = auroc_from_histograms(pos, neg)
    v10 = (np.cumsum(neg) - neg + 0.5 * neg) / n_tot  # placement of a positive in bin b
    pos_above = pos[::-1].cumsum()[::-1] - pos
    v01 = (pos_above + 0.5 * pos) / p_tot  # placement of a negative in bin b
    s10 = float(np.sum(pos * (v10 - a) ** 2) / (p_tot - 1))
    s01 = float(np.sum(neg * (v01 - a) ** 2) / (n_tot - 1))
    return float(np.sqrt(s10 / p_tot + s01 / n_tot))


def average_precision_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Step-wise average precision ``sum_k (R_k - R_{k+1}) P_k`` over thresholds at bin lower edges.

    Same definition as ``sklearn.metrics.average_precision_score`` (no interpolation), with the
    patients of one bin treated as tied scores.
    """
    p_tot = float(pos.sum())
    if p_tot == 0:
        return float("nan")
    tp = pos[::-1].cumsum()  # predicted positive = score bin >= k, k descending
    fp = neg[::-1].cumsum()
    step = pos[::-1] / p_tot
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    return float(np.sum(step * precision))


def _hists(stats: OutcomeStats, outcome: str | int) -> tuple[int, np.ndarray, np.ndarray]:
    j = stats.index(outcome)
    return j, stats.hist_pos[j], stats.hist_neg[j]


def auroc(
    stats: OutcomeStats,
    outcome: str | int,
    *,
    level: float = 0.95,
    method: Literal["hanley_mcneil", "delong"] = "hanley_mcneil",
) -> MetricResult:
    """AUROC with a Wald CI (clipped to [0, 1]) from the Hanley-McNeil or binned-DeLong SE.

    Hanley-McNeil needs only the AUROC and class sizes but assumes a score distribution shape;
    DeLong is distribution-free and exact for the binned scores. Both are Wald intervals and
    undercover when AUROC is near 1 with few events.
    """
    _, pos, neg = _hists(stats, outcome)
    n_pos, n_neg = int(round(pos.sum())), int(round(neg.sum()))
    a = auroc_from_histograms(pos, neg)
    if method == "hanley_mcneil":
        se = hanley_mcneil_se(a, n_pos, n_neg)
    elif method == "delong":
        se = delong_se_from_histograms(pos, neg)
    else:
        raise ValueError(f"method must be 'hanley_mcneil' or 'delong', got {method!r}")
    lo, hi = normal_interval(a, se, level, lower=0.0, upper=1.0)
    return MetricResult(
        "auroc", a, float(lo), float(hi), n=n_pos + n_neg, n_patients=n_pos + n_neg,
        disclosure_count=min(n_pos, n_neg), method=method.replace("_", "-"), level=level,
        n_events=n_pos, n_non_events=n_neg,
    )


def auprc(stats: OutcomeStats, outcome: str | int, *, level: float = 0.95) -> MetricResult:
    """Average precision with the logit CI of Boyd et al. (2013): ``expit(logit(AP) +- z/sqrt(P AP(1-AP)))``.

    The interval is an approximation (it treats AP like a proportion over the P events);
    Boyd et al. found it among the better-covering bootstrap-free choices.
    """
    _, pos, neg = _hists(stats, outcome)
    n_pos, n_neg = int(round(pos.sum())), int(round(neg.sum()))
    ap = average_precision_from_histograms(pos, neg)
    lo, hi = logit_interval(ap, n_pos, level) if np.isfinite(ap) else (float("nan"), float("nan"))
    return MetricResult(
        "auprc", ap, lo, hi, n=n_pos + n_neg, n_patients=n_pos + n_neg, disclosure_count=min(n_pos, n_neg),
        method="logit (Boyd 2013)", level=level, n_events=n_pos, n_non_events=n_neg,
        params={"prevalence": n_pos / (n_pos + n_neg) if n_pos + n_neg else float("nan")},
    )


def snap_threshold(threshold: float, n_bins: int) -> tuple[int, float]:
    """Nearest score-bin edge to ``threshold``: (first bin counted positive, threshold used).

    Histograms only know which bin a score fell in, so a decision threshold must sit on a bin
    edge; with B = 200 the edges are 0.005 apart. Risk >= edge is predicted positive.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    k = int(round(threshold * n_bins))
    return k, k / n_bins


def tpr_fpr(
    stats: OutcomeStats, outcome: str | int, threshold: float, *, level: float = 0.95
) -> tuple[MetricResult, MetricResult]:
    """Sensitivity (TPR) and 1 - specificity (FPR) of "risk >= threshold", with Wilson CIs.

    The threshold is snapped to the nearest bin edge (``params["threshold"]`` is the one used).
    Each is a share, so its disclosure count is the smaller of its numerator and denominator.
    """
    _, pos, neg = _hists(stats, outcome)
    k, t = snap_threshold(threshold, pos.shape[0])
    n_pos, n_neg = int(round(pos.sum())), int(round(neg.sum()))
    tp, fp = int(round(pos[k:].sum())), int(round(neg[k:].sum()))
    results = []
    for name, hits, denom in (("tpr", tp, n_pos), ("fpr", fp, n_neg)):
        lo, hi = wilson_interval(hits, denom, level)
        results.append(
            MetricResult(
                name, hits / denom if denom else float("nan"), float(lo), float(hi), n=denom, n_patients=denom,
                disclosure_count=min(hits, denom), method="Wilson", level=level,
                n_events=n_pos if name == "tpr" else None, n_non_events=n_neg if name == "fpr" else None,
                params={"threshold": t},
            )
        )
    return results[0], results[1]
