"""Bootstrap-free confidence intervals computed from summed statistics.

A bootstrap would need the patient rows, which never leave a site; every interval here needs
only sums that SecAgg+ can add. Each function states what it assumes; docs/metrics.md lists
which intervals are exact, asymptotic or heuristic.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import chdtri, ndtri  # scipy.special: avoids the slow scipy.stats import

ArrayLike = float | np.ndarray


@lru_cache(maxsize=64)
def z_value(level: float) -> float:
    """Two-sided standard normal quantile for a confidence ``level`` (0.95 -> 1.95996)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return float(ndtri(0.5 + level / 2.0))


def wilson_interval(successes: ArrayLike, n: ArrayLike, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a proportion ``successes / n``.

    Chosen over the Wald interval because it stays inside [0, 1] and keeps close to nominal
    coverage for small n and proportions near 0 or 1 (coverage, TPR at extreme thresholds).
    ``n`` may be an effective (non-integer) sample size, with ``successes = p * n_eff``.
    NaN where ``n <= 0``.
    """
    s = np.asarray(successes, dtype=np.float64)
    nn = np.asarray(n, dtype=np.float64)
    z2 = z_value(level) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        p = s / nn
        denom = 1.0 + z2 / nn
        centre = (p + z2 / (2.0 * nn)) / denom
        half = np.sqrt(np.maximum(p * (1.0 - p) / nn + z2 / (4.0 * nn * nn), 0.0)) * np.sqrt(z2) / denom
    lo = np.where(nn > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
    hi = np.where(nn > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return lo, hi


def normal_interval(
    estimate: ArrayLike, se: ArrayLike, level: float = 0.95, lower: float = -np.inf, upper: float = np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Wald interval ``estimate +- z * se``, clipped to the metric's range [lower, upper]."""
    est = np.asarray(estimate, dtype=np.float64)
    z = z_value(level)
    s = np.asarray(se, dtype=np.float64)
    return np.clip(est - z * s, lower, upper), np.clip(est + z * s, lower, upper)


def hanley_mcneil_se(auc: float, n_pos: float, n_neg: float) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC.

    Needs only the AUROC and the class sizes; it approximates the placement-value variances by
    assuming exponentially distributed scores (Q1 = A/(2-A), Q2 = 2A^2/(1+A)). Usually close to
    DeLong for moderate AUROC; see :func:`fedtwin.metrics.discrimination.auroc` for the exact
    (binned) DeLong alternative.
    """
    if n_pos < 1 or n_neg < 1 or not np.isfinite(auc):
        return float("nan")
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def clustered_mean(
    n: ArrayLike,
    clusters: ArrayLike,
    n_sq: ArrayLike,
    total: ArrayLike,
    clus_sq: ArrayLike,
    clus_n: ArrayLike,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-observation values and its cluster-robust (patient-level) variance.

    With patient i contributing ``n_i`` observations whose values sum to ``S_i``, the mean is
    ``m = sum S_i / sum n_i`` (a ratio estimator) and its linearised variance is

        var(m) = k / (k - 1) * sum_i (S_i - m n_i)^2 / (sum n_i)^2
               = k / (k - 1) * (sum S_i^2 - 2 m sum S_i n_i + m^2 sum n_i^2) / n^2,

    all of whose parts are additive. ``k`` is the number of patients with any observation.
    When each patient contributes at most one observation (one variable at one horizon step)
    it reduces exactly to the ordinary ``s^2 / n``. Observations of one patient at different
    steps are correlated, which the naive ``s^2 / n`` would ignore (too-narrow CIs).
    """
    n_ = np.asarray(n, dtype=np.float64)
    k = np.asarray(clusters, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.asarray(total, dtype=np.float64) / n_
        resid = np.asarray(clus_sq) - 2.0 * m * np.asarray(clus_n) + m * m * np.asarray(n_sq)
        var = k / (k - 1.0) * np.maximum(resid, 0.0) / (n_ * n_)
    m = np.where(n_ > 0, m, np.nan)
    var = np.where(k > 1, var, np.nan)
    return m, var


def chisq_rmse_interval(sse: ArrayLike, df: ArrayLike, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """CI for an RMSE assuming errors are independent N(0, sigma^2): SSE / sigma^2 ~ chi^2(df).

    Exact under that model; too narrow when errors are biased, heavy-tailed or correlated.
    ``df`` may be an effective number of independent errors.
    """
    alpha = 1.0 - level
    s = np.asarray(sse, dtype=np.float64)
    d = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # chdtri(df, q) is the chi-square quantile with upper-tail probability q
        lo = np.sqrt(s / chdtri(d, alpha / 2.0))
        hi = np.sqrt(s / chdtri(d, 1.0 - alpha / 2.0))
    return np.where(d > 0, lo, np.nan), np.where(d > 0, hi, np.nan)


def oe_interval(observed: float, expected: float, level: float = 0.95) -> tuple[float, float]:
    """CI for O/E treating the observed event count as Poisson: ``exp(log(O/E) +- z / sqrt(O))``.

    The usual approximation (Debray et al., BMJ 2017); ignores the (much smaller) uncertainty
    in E. Undefined when O = 0.
    """
    if observed <= 0 or expected <= 0:
        return float("nan"), float("nan")
    z = z_value(level)
    centre = np.log(observed / expected)
    half = z / np.sqrt(observed)
    return float(np.exp(centre - half)), float(np.exp(centre + half))


def logit_interval(p: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """``expit(logit(p) +- z / sqrt(n p (1 - p)))``: a proportion-like CI kept inside (0, 1).

    Used for the average precision (Boyd et al., 2013, "logit" interval, with n = positives).
    """
    if not (0.0 < p < 1.0) or n <= 0:
        return float("nan"), float("nan")
    z = z_value(level)
    eta = np.log(p / (1.0 - p))
    tau = 1.0 / np.sqrt(n * p * (1.0 - p))
    lo, hi = eta - z * tau, eta + z * tau
    return float(1.0 / (1.0 + np.exp(-lo))), float(1.0 / (1.0 + np.exp(-hi)))
