"""Calibration from binned sums: ECE, O/E ratio, and logistic recalibration slope and intercept.

The recalibration model is ``logit P(y = 1) = a + b * logit(p)``. Its log-likelihood is

    L(a, b) = a * sum y  +  b * sum y x  -  sum log(1 + exp(a + b x)),      x = logit(p).

The first two terms are exact from additive sums. The last is not a function of any finite set of
sums, so it is approximated per logit bin k (count n_k, mean x_k, within-bin sum of squares SS_k)
by a second-order expansion around the bin mean:

    sum_{i in k} f(a + b x_i)  ~=  n_k f(a + b x_k)  +  1/2 b^2 SS_k f''(a + b x_k),   f = log1p(exp).

With the default 48 logit bins (width ~0.35 on [-8, 8]) the omitted third-order term is
negligible; the test suite checks agreement with the exact individual-level fit. The fit is by
Newton-Raphson on this approximate likelihood; Wald CIs come from its observed information.

Reported conventions (Van Calster et al. 2016/2019):
- calibration slope: b of the two-parameter fit (ideal 1; < 1 = predictions too extreme);
- calibration intercept ("calibration-in-the-large"): a with b fixed at 1, i.e. logit(p) as
  an offset (ideal 0; > 0 = risks underestimated).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.special import expit

from fedtwin.metrics.intervals import normal_interval, oe_interval
from fedtwin.metrics.outcome import OutcomeStats
from fedtwin.metrics.result import MetricResult

MIN_LOGIT_SD = 0.05
"""Below this spread of logit(p) the slope is reported as not estimable (NaN).

Predicted risks that barely differ carry no information about a slope: with SD s of logit(p),
N patients and event rate p, its standard error is about 1 / (s sqrt(N p (1 - p))), over 4
for s = 0.05 and N = 100. Such a fit is also ill-conditioned: the federated sums are exact to
2^-20 (fedtwin.federation.secure_sums), and at s = 0.005 that rounding alone moved a subgroup's
slope CI by 1 % (a slope of -142, CI -279 to -4.6, from a barely trained twin); at s >= 0.05 by
under 3e-4 (10,000 simulated subgroups).
"""


@dataclass(frozen=True)
class RecalibrationFit:
    """Result of the binned logistic recalibration fit."""

    intercept: float
    slope: float
    cov: np.ndarray  # 2x2 (or 1x1 with the slope fixed) inverse observed information
    converged: bool
    iterations: int


def _objective(theta: np.ndarray, fixed_slope: float | None, xbar, n, ss, sy, syx):
    """Negative approximate log-likelihood, its gradient and Hessian (in the free parameters)."""
    a = theta[0]
    b = fixed_slope if fixed_slope is not None else theta[1]
    z = a + b * xbar
    sig = expit(z)
    h = sig * (1 - sig)
    t = h * (1 - 2 * sig)
    u = h * (1 - 6 * h)
    f = np.logaddexp(0.0, z)
    value = -(a * sy + b * syx) + float(np.sum(n * f + 0.5 * b * b * ss * h))
    ga = -sy + float(np.sum(n * sig + 0.5 * b * b * ss * t))
    haa = float(np.sum(n * h + 0.5 * b * b * ss * u))
    if fixed_slope is not None:
        return value, np.array([ga]), np.array([[haa]])
    gb = -syx + float(np.sum(n * sig * xbar + b * ss * h + 0.5 * b * b * ss * t * xbar))
    hab = float(np.sum(n * h * xbar + b * ss * t + 0.5 * b * b * ss * u * xbar))
    hbb = float(np.sum(n * h * xbar**2 + ss * h + 2 * b * ss * t * xbar + 0.5 * b * b * ss * u * xbar**2))
    return value, np.array([ga, gb]), np.array([[haa, hab], [hab, hbb]])


def fit_recalibration(
    n: np.ndarray,
    sum_x: np.ndarray,
    sum_x2: np.ndarray,
    sum_y: np.ndarray,
    sum_yx: np.ndarray,
    *,
    fixed_slope: float | None = None,
    max_iter: int = 100,
) -> RecalibrationFit:
    """Fit ``logit P(y) = a + b x`` from per-logit-bin sums (see the module docstring).

    ``fixed_slope=1.0`` fits the calibration-in-the-large intercept with logit(p) as offset.
    Returns NaNs (``converged=False``) when there are no events or no non-events, the fit runs
    away (complete separation), or - for the slope - logit(p) varies by less than
    ``MIN_LOGIT_SD``.
    """
    keep = n > 0
    n_, sx, sx2 = n[keep], sum_x[keep], sum_x2[keep]
    xbar = sx / n_
    ss = np.maximum(sx2 - sx * xbar, 0.0)
    sy, syx = float(np.sum(sum_y)), float(np.sum(sum_yx))
    total = float(np.sum(n_))
    dim = 1 if fixed_slope is not None else 2
    nan_fit = RecalibrationFit(float("nan"), float("nan"), np.full((dim, dim), np.nan), False, 0)
    if sy <= 0 or sy >= total:
        return nan_fit
    spread = float(np.sum(sx2)) / total - (float(np.sum(sx)) / total) ** 2
    if fixed_slope is None and spread < MIN_LOGIT_SD**2:
        return nan_fit  # (nearly) equal risks: the slope is not identifiable
    theta = np.array([0.0] if fixed_slope is not None else [0.0, 1.0])
    args = (fixed_slope, xbar, n_, ss, sy, syx)
    value, grad, hess = _objective(theta, *args)
    for it in range(1, max_iter + 1):
        if not (np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))):
            return nan_fit  # degenerate (e.g. a handful of separated patients in a small subgroup)
        damping = 0.0
        while True:  # Levenberg damping until the Hessian is positive definite
            try:
                np.linalg.cholesky(hess + damping * np.eye(dim))
                break
            except np.linalg.LinAlgError:
                damping = max(1e-6, damping * 10) if damping else 1e-6 * (1 + np.abs(hess).max())
        try:
            step = np.linalg.solve(hess + damping * np.eye(dim), grad)
        except np.linalg.LinAlgError:
            return nan_fit  # the curvature vanished: the fit runs away (separation)
        scale = 1.0
        accepted = False
        while scale > 1e-8:  # backtracking line search
            cand = theta - scale * step
            cv, cg, ch = _objective(cand, *args)
            if np.isfinite(cv) and cv <= value + 1e-12 * abs(value):
                accepted = True
                break
            scale /= 2
        if not accepted:
            break  # no descent step left: stop here (``converged`` below says whether it is a fit)
        theta, value, grad, hess = cand, cv, cg, ch
        if np.max(np.abs(theta)) > 1e3:
            return nan_fit
        if np.max(np.abs(scale * step)) < 1e-10 or np.max(np.abs(grad)) < 1e-9 * max(total, 1.0):
            break
    try:
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        cov = np.full((dim, dim), np.nan)
    converged = bool(np.max(np.abs(grad)) < 1e-6 * max(total, 1.0))
    slope = float(fixed_slope) if fixed_slope is not None else float(theta[1])
    return RecalibrationFit(float(theta[0]), slope, cov, converged, it)


def _fit(stats: OutcomeStats, j: int, fixed_slope: float | None) -> RecalibrationFit:
    return fit_recalibration(
        stats.rc_n[j], stats.rc_sum_x[j], stats.rc_sum_x2[j], stats.rc_sum_y[j], stats.rc_sum_yx[j],
        fixed_slope=fixed_slope,
    )


def _result(stats: OutcomeStats, j: int, name: str, value: float, lo: float, hi: float, method: str, level: float):
    pos, neg = stats.counts(j)
    return MetricResult(
        name, value, lo, hi, n=pos + neg, n_patients=pos + neg, disclosure_count=min(pos, neg), method=method,
        level=level, n_events=pos, n_non_events=neg,
    )


def calibration_slope(stats: OutcomeStats, outcome: str | int, *, level: float = 0.95) -> MetricResult:
    """Slope b of ``logit P(y) = a + b logit(p)`` (ideal 1), Wald CI from the binned fit."""
    j = stats.index(outcome)
    fit = _fit(stats, j, None)
    se = float(np.sqrt(fit.cov[1, 1])) if fit.converged and fit.cov[1, 1] > 0 else float("nan")
    lo, hi = normal_interval(fit.slope if fit.converged else np.nan, se, level)
    value = fit.slope if fit.converged else float("nan")
    return _result(stats, j, "calibration_slope", value, float(lo), float(hi), "Wald (binned logistic fit)", level)


def calibration_intercept(stats: OutcomeStats, outcome: str | int, *, level: float = 0.95) -> MetricResult:
    """Calibration-in-the-large a of ``logit P(y) = a + logit(p)`` (ideal 0), Wald CI."""
    j = stats.index(outcome)
    fit = _fit(stats, j, 1.0)
    se = float(np.sqrt(fit.cov[0, 0])) if fit.converged and fit.cov[0, 0] > 0 else float("nan")
    value = fit.intercept if fit.converged else float("nan")
    lo, hi = normal_interval(value, se, level)
    return _result(stats, j, "calibration_intercept", value, float(lo), float(hi), "Wald (binned logistic fit, slope 1)", level)


def ece(stats: OutcomeStats, outcome: str | int, *, level: float = 0.95) -> MetricResult:
    """Expected calibration error ``sum_c |sum y_c - sum p_c| / N`` over equal-width bins.

    CI: Wald with ``var = sum_c (n_c / N)^2 * pbar_c (1 - pbar_c) / n_c`` (binomial noise of each
    bin's observed rate, using the predicted rate). Approximate: ECE is biased upward in small
    bins and |.| is not smooth at 0, so the interval is unreliable for well-calibrated models;
    use it to compare, not to test calibration (use slope/intercept for that).
    """
    j = stats.index(outcome)
    n_c, sp, sy = stats.cal_n[j], stats.cal_sum_p[j], stats.cal_sum_y[j]
    total = float(n_c.sum())
    value = float(np.abs(sy - sp).sum() / total) if total else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        pbar = np.where(n_c > 0, sp / n_c, 0.0)
    var = float(np.sum(n_c * pbar * (1 - pbar)) / total**2) if total else float("nan")
    lo, hi = normal_interval(value, np.sqrt(var), level, lower=0.0, upper=1.0)
    res = _result(stats, j, "ece", value, float(lo), float(hi), "normal (approximate)", level)
    return replace(res, params={"bins": float(len(n_c))})


def oe_ratio(stats: OutcomeStats, outcome: str | int, *, level: float = 0.95) -> MetricResult:
    """Observed / expected events ``sum y / sum p`` (ideal 1), CI ``exp(log(O/E) +- z/sqrt(O))``."""
    j = stats.index(outcome)
    o, e = float(stats.cal_sum_y[j].sum()), float(stats.cal_sum_p[j].sum())
    value = o / e if e > 0 else float("nan")
    lo, hi = oe_interval(o, e, level)
    return _result(stats, j, "oe_ratio", value, lo, hi, "Poisson on O (log scale)", level)


__all__ = [
    "RecalibrationFit",
    "fit_recalibration",
    "calibration_slope",
    "calibration_intercept",
    "ece",
    "oe_ratio",
]
