"""Additive sums for per-observation quantities on a (horizon step x variable) grid.

Forecast errors and what-if effect errors are both "one value per patient, step and variable,
when observed". For each such quantity q this keeps, at three levels of pooling:

- per cell (step h, variable v): ``n``, ``sum q``, ``sum q^2``. A patient contributes at most one
  observation to a cell, so cells use the ordinary i.i.d. variance.
- per variable (pooled over steps) and overall (pooled over steps and variables): the
  patient-cluster sums ``k`` (patients), ``sum n_i^2``, ``sum S_i^2``, ``sum S_i n_i``, so pooled
  metrics get patient-level (cluster-robust) CIs - see :func:`~fedtwin.metrics.intervals.clustered_mean`.

Every field is a sum over patients, hence additive across sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from fedtwin.metrics.additive import AdditiveStats, static_field
from fedtwin.metrics.intervals import clustered_mean
from fedtwin.metrics.layout import MetricsLayout, MetricsLayoutError

Level = Literal["cell", "variable", "all"]


@dataclass(frozen=True)
class LevelSums:
    """The sums one pooling level needs; leading axis of ``total``/``obs_sq``/... is the quantity."""

    n: np.ndarray
    clusters: np.ndarray
    n_sq: np.ndarray
    total: np.ndarray
    obs_sq: np.ndarray
    clus_sq: np.ndarray
    clus_n: np.ndarray

    def means(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`mean` of every quantity, in quantity order (compute once, index many times)."""
        return [self.mean(qi) for qi in range(self.total.shape[0])]

    def mean(self, qi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, cluster-robust variance of the mean, i.i.d. variance of the mean) of quantity qi."""
        m, var_cl = clustered_mean(self.n, self.clusters, self.n_sq, self.total[qi], self.clus_sq[qi], self.clus_n[qi])
        with np.errstate(invalid="ignore", divide="ignore"):
            s2 = (self.obs_sq[qi] - self.n * m * m) / (self.n - 1.0)
            var_iid = np.where(self.n > 1, np.maximum(s2, 0.0) / self.n, np.nan)
        return m, var_cl, var_iid


@dataclass(eq=False)
class PointwiseStats(AdditiveStats):
    """Base class; subclasses say which quantities and variables (see the module docstring)."""

    layout: MetricsLayout = static_field()
    n: np.ndarray  # (H, V) observations per cell
    total: np.ndarray  # (Q, H, V) sum q
    total_sq: np.ndarray  # (Q, H, V) sum q^2
    var_patients: np.ndarray  # (V,) patients with >= 1 obs
    var_n_sq: np.ndarray  # (V,) sum_i n_iv^2
    var_clus_sq: np.ndarray  # (Q, V) sum_i S_iqv^2
    var_clus_n: np.ndarray  # (Q, V) sum_i S_iqv n_iv
    all_patients: np.ndarray  # () patients with >= 1 obs
    all_n_sq: np.ndarray  # () sum_i n_i^2
    all_clus_sq: np.ndarray  # (Q,)
    all_clus_n: np.ndarray  # (Q,)

    KIND: ClassVar[str] = "pointwise"

    # -- what a subclass defines ----------------------------------------------------------------

    @classmethod
    def quantity_names(cls, layout: MetricsLayout) -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def variables(cls, layout: MetricsLayout) -> tuple[str, ...]:
        raise NotImplementedError

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def zeros(cls, layout: MetricsLayout) -> "PointwiseStats":
        q, h, v = len(cls.quantity_names(layout)), layout.horizon, len(cls.variables(layout))
        z = np.zeros
        return cls(
            layout=layout,
            n=z((h, v)),
            total=z((q, h, v)),
            total_sq=z((q, h, v)),
            var_patients=z(v),
            var_n_sq=z(v),
            var_clus_sq=z((q, v)),
            var_clus_n=z((q, v)),
            all_patients=z(()),
            all_n_sq=z(()),
            all_clus_sq=z(q),
            all_clus_n=z(q),
        )

    @classmethod
    def _check_grid(cls, layout: MetricsLayout, mask: np.ndarray) -> None:
        want = (layout.horizon, len(cls.variables(layout)))
        if mask.ndim != 3 or mask.shape[1:] != want:
            raise MetricsLayoutError(
                f"{cls.__name__}: arrays must have shape (N, {want[0]}, {want[1]}) for this layout, got {mask.shape}",
                "slice the horizon part of the tensors and keep the layout's variable order",
            )

    @classmethod
    def _from_quantities(
        cls, layout: MetricsLayout, quantities: dict[str, np.ndarray], mask: np.ndarray
    ) -> "PointwiseStats":
        """Accumulate the sums from per-observation values (N, H, V); unmasked entries are ignored."""
        names = cls.quantity_names(layout)
        mask = np.asarray(mask, dtype=bool)
        cls._check_grid(layout, mask)
        out = cls.zeros(layout)
        m = mask.astype(np.float64)
        out.n = m.sum(axis=0)
        n_iv = m.sum(axis=1)  # (N, V)
        n_i = n_iv.sum(axis=1)  # (N,)
        out.var_patients = (n_iv > 0).sum(axis=0).astype(np.float64)
        out.var_n_sq = (n_iv * n_iv).sum(axis=0)
        out.all_patients = np.asarray(float((n_i > 0).sum()))
        out.all_n_sq = np.asarray(float((n_i * n_i).sum()))
        for qi, name in enumerate(names):
            q = np.where(mask, quantities[name], 0.0).astype(np.float64)
            out.total[qi] = q.sum(axis=0)
            out.total_sq[qi] = (q * q).sum(axis=0)
            s_iv = q.sum(axis=1)  # (N, V)
            out.var_clus_sq[qi] = (s_iv * s_iv).sum(axis=0)
            out.var_clus_n[qi] = (s_iv * n_iv).sum(axis=0)
            s_i = s_iv.sum(axis=1)
            out.all_clus_sq[qi] = (s_i * s_i).sum()
            out.all_clus_n[qi] = (s_i * n_i).sum()
        return out

    # -- pooling levels ------------------------------------------------------------------------

    def level(self, level: Level) -> LevelSums:
        """Sums for per-cell (H, V), per-variable (V,) or overall () estimates."""
        if level == "cell":
            return LevelSums(self.n, self.n, self.n, self.total, self.total_sq, self.total_sq, self.total)
        if level == "variable":
            return LevelSums(
                self.n.sum(axis=0),
                self.var_patients,
                self.var_n_sq,
                self.total.sum(axis=1),
                self.total_sq.sum(axis=1),
                self.var_clus_sq,
                self.var_clus_n,
            )
        if level == "all":
            return LevelSums(
                self.n.sum(),
                self.all_patients,
                self.all_n_sq,
                self.total.sum(axis=(1, 2)),
                self.total_sq.sum(axis=(1, 2)),
                self.all_clus_sq,
                self.all_clus_n,
            )
        raise ValueError(f"level must be 'cell', 'variable' or 'all', got {level!r}")

    def qi(self, name: str) -> int:
        return self.quantity_names(self.layout).index(name)


def iter_level_keys(
    variables: tuple[str, ...], horizon: int, cells: bool
) -> list[tuple[Level, tuple[int, ...], str, str]]:
    """(level, index into that level's arrays, variable key, horizon key) for every reported estimate.

    Horizon keys are ``"h1"`` .. ``"hH"`` (steps ahead); pooled estimates use ``"all"``.
    """
    out: list[tuple[Level, tuple[int, ...], str, str]] = [("all", (), "all", "all")]
    for vi, v in enumerate(variables):
        out.append(("variable", (vi,), v, "all"))
        if cells:
            for h in range(horizon):
                out.append(("cell", (h, vi), v, f"h{h + 1}"))
    return out
