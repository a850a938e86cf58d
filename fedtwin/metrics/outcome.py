"""Sufficient statistics for a predicted risk of a binary outcome, and the Brier score.

AUROC, AUPRC and TPR/FPR need the joint ranking of event and non-event scores; a histogram of
scores per class on fixed bins keeps that ranking up to the bin width and is additive. ECE and
O/E need per-bin sums of predicted and observed. The logistic recalibration fit (slope,
intercept) needs sums on the logit scale. Brier needs sum (p - y)^2 (and its square for a CI).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtwin.metrics.additive import AdditiveStats, static_field
from fedtwin.metrics.intervals import normal_interval
from fedtwin.metrics.layout import MetricsLayout, MetricsLayoutError
from fedtwin.metrics.result import MetricResult

#: risks are clipped to [EPS, 1 - EPS] before taking logits (logit(0) is -inf)
LOGIT_EPS = 1e-6


@dataclass(frozen=True)
class OutcomeInputs:
    """Observed events and predicted risks, (N, O); ``mask`` False where the outcome is unknown."""

    event: np.ndarray
    risk: np.ndarray
    mask: np.ndarray | None = None

    def select(self, rows: np.ndarray) -> "OutcomeInputs":
        return OutcomeInputs(self.event[rows], self.risk[rows], None if self.mask is None else self.mask[rows])


def score_bins(risk: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index ``min(floor(p * B), B - 1)``: bin k holds [k/B, (k+1)/B), the last bin also 1."""
    return np.minimum(np.floor(risk * n_bins).astype(np.int64), n_bins - 1)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(eq=False)
class OutcomeStats(AdditiveStats):
    """Per outcome (leading axis O):

    - ``hist_pos``, ``hist_neg`` (O, B): patients with / without the event per score bin.
    - ``cal_n``, ``cal_sum_p``, ``cal_sum_y`` (O, C): count, sum of risk, sum of events per
      calibration bin (equal width on [0, 1]).
    - ``rc_n``, ``rc_sum_x``, ``rc_sum_x2``, ``rc_sum_y``, ``rc_sum_yx`` (O, R): per logit bin the
      count, sum of x = logit(p), sum of x^2, sum of y and sum of y*x (recalibration fit).
    - ``sum_sq_err``, ``sum_sq_err_sq`` (O,): sum (p - y)^2 and sum (p - y)^4 (Brier and its CI).
    """

    layout: MetricsLayout = static_field()
    hist_pos: np.ndarray
    hist_neg: np.ndarray
    cal_n: np.ndarray
    cal_sum_p: np.ndarray
    cal_sum_y: np.ndarray
    rc_n: np.ndarray
    rc_sum_x: np.ndarray
    rc_sum_x2: np.ndarray
    rc_sum_y: np.ndarray
    rc_sum_yx: np.ndarray
    sum_sq_err: np.ndarray
    sum_sq_err_sq: np.ndarray

    @classmethod
    def zeros(cls, layout: MetricsLayout) -> "OutcomeStats":
        o, b, c, r = layout.n_outcomes, layout.n_score_bins, layout.n_calibration_bins, layout.n_logit_bins
        z = np.zeros
        return cls(
            layout, z((o, b)), z((o, b)), z((o, c)), z((o, c)), z((o, c)),
            z((o, r)), z((o, r)), z((o, r)), z((o, r)), z((o, r)), z(o), z(o),
        )

    @classmethod
    def from_arrays(
        cls, layout: MetricsLayout, event: np.ndarray, risk: np.ndarray, mask: np.ndarray | None = None
    ) -> "OutcomeStats":
        """Statistics of one site's predicted risks; patients with ``mask == False`` are skipped."""
        y = np.asarray(event)
        p = np.asarray(risk, dtype=np.float64)
        o = layout.n_outcomes
        if y.ndim != 2 or y.shape != p.shape or y.shape[1] != o:
            raise MetricsLayoutError(f"event and risk must both have shape (N, {o}), got {y.shape} and {p.shape}")
        m = np.ones(y.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if m.shape != y.shape:
            raise MetricsLayoutError(f"outcome mask has shape {m.shape}, expected {y.shape}")
        if not np.all(np.isfinite(p[m])) or np.any((p[m] < 0) | (p[m] > 1)):
            raise ValueError("predicted risks must be finite and inside [0, 1]")
        if not np.all(np.isin(y[m], (0, 1))):
            raise ValueError("events must be 0/1 (or bool)")
        out = cls.zeros(layout)
        b, c, r = layout.n_score_bins, layout.n_calibration_bins, layout.n_logit_bins
        edges = layout.logit_bin_edges()
        for j in range(o):
            pj = p[m[:, j], j]
            yj = y[m[:, j], j].astype(np.float64)
            sb = score_bins(pj, b)
            out.hist_pos[j] = np.bincount(sb, weights=yj, minlength=b)
            out.hist_neg[j] = np.bincount(sb, weights=1.0 - yj, minlength=b)
            cb = score_bins(pj, c)
            out.cal_n[j] = np.bincount(cb, minlength=c)
            out.cal_sum_p[j] = np.bincount(cb, weights=pj, minlength=c)
            out.cal_sum_y[j] = np.bincount(cb, weights=yj, minlength=c)
            x = logit(pj)
            lb = np.searchsorted(edges, x, side="right")
            out.rc_n[j] = np.bincount(lb, minlength=r)
            out.rc_sum_x[j] = np.bincount(lb, weights=x, minlength=r)
            out.rc_sum_x2[j] = np.bincount(lb, weights=x * x, minlength=r)
            out.rc_sum_y[j] = np.bincount(lb, weights=yj, minlength=r)
            out.rc_sum_yx[j] = np.bincount(lb, weights=yj * x, minlength=r)
            se = (pj - yj) ** 2
            out.sum_sq_err[j] = se.sum()
            out.sum_sq_err_sq[j] = (se * se).sum()
        return out

    @classmethod
    def from_inputs(cls, layout: MetricsLayout, inputs: OutcomeInputs) -> "OutcomeStats":
        return cls.from_arrays(layout, inputs.event, inputs.risk, inputs.mask)

    # -- counts ---------------------------------------------------------------------------------

    def index(self, outcome: str | int) -> int:
        if isinstance(outcome, str):
            try:
                return self.layout.outcome_names.index(outcome)
            except ValueError:
                raise KeyError(f"unknown outcome {outcome!r}; layout has {list(self.layout.outcome_names)}") from None
        return int(outcome)

    def counts(self, outcome: str | int) -> tuple[int, int]:
        """(events, non-events) for one outcome."""
        j = self.index(outcome)
        return int(round(self.hist_pos[j].sum())), int(round(self.hist_neg[j].sum()))


def brier(stats: OutcomeStats, outcome: str | int, *, level: float = 0.95) -> MetricResult:
    """Brier score ``mean (p - y)^2``; Wald CI from the sample variance of (p - y)^2 (uses sum of 4th powers)."""
    j = stats.index(outcome)
    pos, neg = stats.counts(j)
    n = pos + neg
    s1, s2 = float(stats.sum_sq_err[j]), float(stats.sum_sq_err_sq[j])
    value = s1 / n if n else float("nan")
    se = float(np.sqrt(max(s2 - n * value * value, 0.0) / (n - 1) / n)) if n > 1 else float("nan")
    lo, hi = normal_interval(value, se, level, lower=0.0, upper=1.0)
    return MetricResult(
        "brier", value, float(lo), float(hi), n=n, n_patients=n, disclosure_count=min(pos, neg),
        method="normal", level=level, n_events=pos, n_non_events=neg,
    )
