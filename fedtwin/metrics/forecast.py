"""Forecast accuracy and calibration of a probabilistic (Gaussian) forecast.

A twin forecasts every state variable at every horizon step as a predictive mean and standard
deviation. Per variable and step the sufficient statistics are the error moments, the Gaussian
negative log-likelihood and whether the truth fell inside the central 50% / 90% (layout's
``interval_levels``) prediction intervals - all sums, so sites add them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedtwin.metrics.intervals import chisq_rmse_interval, normal_interval, wilson_interval, z_value
from fedtwin.metrics.layout import MetricsLayout, MetricsLayoutError
from fedtwin.metrics.pointwise import PointwiseStats, iter_level_keys
from fedtwin.metrics.result import MetricResult

_LOG_2PI = float(np.log(2.0 * np.pi))
MetricKey = tuple[str, ...]


@dataclass(frozen=True)
class ForecastInputs:
    """One site's forecasts over the horizon: arrays of shape (N, H, V), mask True where observed."""

    y_true: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    mask: np.ndarray

    def select(self, rows: np.ndarray) -> "ForecastInputs":
        return ForecastInputs(self.y_true[rows], self.mean[rows], self.std[rows], self.mask[rows])


@dataclass(eq=False)
class ForecastStats(PointwiseStats):
    """Sums of error, |error|, error^2, Gaussian NLL and interval hits (see :class:`PointwiseStats`)."""

    @classmethod
    def quantity_names(cls, layout: MetricsLayout) -> tuple[str, ...]:
        return ("err", "abs_err", "sq_err", "nll") + tuple(
            f"inside_{layout.interval_label(a)}" for a in layout.interval_levels
        )

    @classmethod
    def variables(cls, layout: MetricsLayout) -> tuple[str, ...]:
        return layout.variable_names

    @classmethod
    def from_arrays(
        cls, layout: MetricsLayout, y_true: np.ndarray, mean: np.ndarray, std: np.ndarray, mask: np.ndarray
    ) -> "ForecastStats":
        """Statistics of one site's forecasts; entries with ``mask == False`` are ignored entirely."""
        mask = np.asarray(mask, dtype=bool)
        y, mu, sd = (np.asarray(a, dtype=np.float64) for a in (y_true, mean, std))
        if not (y.shape == mu.shape == sd.shape == mask.shape):
            raise MetricsLayoutError(
                f"y_true, mean, std, mask shapes differ: {y.shape}, {mu.shape}, {sd.shape}, {mask.shape}"
            )
        cls._check_grid(layout, mask)
        if not (np.all(np.isfinite(y[mask])) and np.all(np.isfinite(mu[mask])) and np.all(np.isfinite(sd[mask]))):
            raise ValueError("forecast arrays hold NaN/inf at observed entries; one bad value would poison the sum")
        if np.any(sd[mask] <= 0):
            raise ValueError("predictive std must be > 0 wherever the truth is observed")
        sd_safe = np.where(mask, sd, 1.0)
        err = np.where(mask, y - mu, 0.0)
        q: dict[str, np.ndarray] = {
            "err": err,
            "abs_err": np.abs(err),
            "sq_err": err * err,
            "nll": 0.5 * _LOG_2PI + np.log(sd_safe) + 0.5 * (err / sd_safe) ** 2,
        }
        for a in layout.interval_levels:
            q[f"inside_{layout.interval_label(a)}"] = (np.abs(err) <= z_value(a) * sd_safe).astype(np.float64)
        return cls._from_quantities(layout, q, mask)  # type: ignore[return-value]

    @classmethod
    def from_inputs(cls, layout: MetricsLayout, inputs: ForecastInputs) -> "ForecastStats":
        return cls.from_arrays(layout, inputs.y_true, inputs.mean, inputs.std, inputs.mask)


def error_metrics(
    stats: PointwiseStats,
    prefix: str,
    *,
    level: float = 0.95,
    cells: bool = True,
    rmse_method: Literal["normal", "chisq"] = "normal",
) -> dict[MetricKey, MetricResult]:
    """Bias, MAE and RMSE with CIs at every pooling level; shared by forecasts and what-if effects.

    RMSE CI, ``normal`` (default): Wald interval on the MSE from its (patient-clustered)
    standard error, which uses sum e^4, then square-rooted; valid for any error distribution with
    finite fourth moment, asymptotically. ``chisq``: SSE / sigma^2 ~ chi^2(df) (zero-mean normal
    errors), with df = n in a cell and the Kish effective n = n * var_iid / var_cluster when
    pooled over correlated steps.
    """
    out: dict[MetricKey, MetricResult] = {}
    if not stats.variables(stats.layout):
        return out  # e.g. no what-if ground truth in this layout
    i_err, i_abs, i_sq = stats.qi("err"), stats.qi("abs_err"), stats.qi("sq_err")
    sums = {lv: stats.level(lv) for lv in ("cell", "variable", "all")}
    means = {lv: s.means() for lv, s in sums.items()}
    for lv, idx, var, hor in iter_level_keys(stats.variables(stats.layout), stats.layout.horizon, cells):
        s = sums[lv]
        n = int(np.asarray(s.n)[idx])
        k = int(np.asarray(s.clusters)[idx])
        common = dict(n=n, n_patients=k, disclosure_count=k, level=level)
        for qi, name in ((i_err, "bias"), (i_abs, "mae")):
            m, var_cl, _ = (np.asarray(a)[idx] for a in means[lv][qi])
            lo, hi = normal_interval(m, np.sqrt(var_cl), level)
            out[(prefix, var, hor, name)] = MetricResult(
                name, float(m), float(lo), float(hi), method="normal (patient-clustered)", **common
            )
        mse, var_cl, var_iid = (np.asarray(a)[idx] for a in means[lv][i_sq])
        if rmse_method == "normal":
            lo, hi = normal_interval(mse, np.sqrt(var_cl), level, lower=0.0)
            lo, hi, method = np.sqrt(lo), np.sqrt(hi), "normal on MSE (patient-clustered), square-rooted"
        elif rmse_method == "chisq":
            with np.errstate(invalid="ignore", divide="ignore"):
                df = n if lv == "cell" else min(float(n), n * float(var_iid / var_cl))
            lo, hi = chisq_rmse_interval(mse * n, df, level)
            method = "chi-square (zero-mean normal errors, Kish effective n)"
        else:
            raise ValueError(f"rmse_method must be 'normal' or 'chisq', got {rmse_method!r}")
        out[(prefix, var, hor, "rmse")] = MetricResult(
            "rmse", float(np.sqrt(mse)), float(lo), float(hi), method=method, **common
        )
    return out


def forecast_metrics(
    stats: ForecastStats,
    *,
    level: float = 0.95,
    cells: bool = True,
    rmse_method: Literal["normal", "chisq"] = "normal",
) -> dict[MetricKey, MetricResult]:
    """All forecast metrics, keyed ``("forecast", variable | "all", "h<k>" | "all", metric)``.

    Metrics: ``bias``, ``mae``, ``rmse``, ``nll`` (mean Gaussian NLL, nats), ``coverage_<L>`` for
    each interval level. ``cells=False`` skips per-step results (used for subgroups). Pooling over
    variables mixes units: the overall RMSE/MAE/NLL are meaningful only for standardised variables.
    """
    out = error_metrics(stats, "forecast", level=level, cells=cells, rmse_method=rmse_method)
    layout = stats.layout
    if not layout.variable_names:
        return out
    i_nll = stats.qi("nll")
    sums = {lv: stats.level(lv) for lv in ("cell", "variable", "all")}
    means = {lv: s.means() for lv, s in sums.items()}
    for lv, idx, var, hor in iter_level_keys(layout.variable_names, layout.horizon, cells):
        s = sums[lv]
        n = int(np.asarray(s.n)[idx])
        k = int(np.asarray(s.clusters)[idx])
        m, var_cl, _ = (np.asarray(a)[idx] for a in means[lv][i_nll])
        lo, hi = normal_interval(m, np.sqrt(var_cl), level)
        out[("forecast", var, hor, "nll")] = MetricResult(
            "nll", float(m), float(lo), float(hi), n=n, n_patients=k, disclosure_count=k, level=level,
            method="normal (patient-clustered)",
        )
        for a in layout.interval_levels:
            label = layout.interval_label(a)
            qi = stats.qi(f"inside_{label}")
            p, var_cl, _ = (np.asarray(x)[idx] for x in means[lv][qi])
            hits = float(np.asarray(s.total[qi])[idx])
            if lv == "cell":
                n_eff, method = float(n), "Wilson"
            else:
                # design-effect-adjusted Wilson: n_eff = p(1-p) / var_cluster, capped at n
                with np.errstate(invalid="ignore", divide="ignore"):
                    n_eff = float(p * (1 - p) / var_cl)
                n_eff = min(float(n), n_eff) if np.isfinite(n_eff) and n_eff > 0 else float(k)
                method = "Wilson with patient-clustered effective n"
            lo, hi = wilson_interval(p * n_eff, n_eff, level)
            out[("forecast", var, hor, f"coverage_{label}")] = MetricResult(
                f"coverage_{label}", float(p), float(lo), float(hi), n=n, n_patients=k,
                disclosure_count=int(min(k, hits)), level=level, method=method, params={"nominal": a},
            )
    return out
