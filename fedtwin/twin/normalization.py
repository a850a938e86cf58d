"""Spec-derived normalisation of state variables, doses and static covariates.

Every constant here comes from the twin spec (or is a fixed documented constant), never from
data: in a federation no site may reveal its means or spreads through a shared normalisation,
and every site must map a value to the same number.

State variables: a variable whose plausible range is positive and spans a ratio of at least
``LOG_RATIO`` (glucose 10-1500, creatinine 0.1-20, heart rate 20-250, ...) is modelled in log
space, so that relaxation is multiplicative and the typical values are not squeezed into a
corner of the range; the others are modelled linearly. Either way the plausible range maps
onto [-1, 1]: ``u = (f(x) - c) / s`` with ``f`` = log or identity, ``c`` the midpoint and
``s`` the half-width of ``f(plausible_range)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtwin.spec import TwinSpec

LOG_RATIO = 3.0
AGE_CENTER, AGE_SCALE = 50.0, 20.0
Z90 = 1.6448536269514722
Z50 = 0.6744897501960817


@dataclass(frozen=True)
class VariableScale:
    """How one state variable maps between canonical units and the model's units."""

    name: str
    unit: str
    log: bool
    center: float
    scale: float
    lo: float
    hi: float

    def to_model(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, np.float64), self.lo, self.hi)
        f = np.log(x) if self.log else x
        return (f - self.center) / self.scale

    def to_canonical(self, u: np.ndarray) -> np.ndarray:
        f = self.center + self.scale * np.asarray(u, np.float64)
        return np.exp(np.clip(f, -700.0, 700.0)) if self.log else f

    def canonical_moments(self, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std in canonical units of a Gaussian N(mean, var) in model units.

        For log variables this is the log-normal mean and std (the mean is above the median).
        """
        mean = np.asarray(mean, np.float64)
        var = np.maximum(np.asarray(var, np.float64), 0.0)
        if not self.log:
            return self.center + self.scale * mean, self.scale * np.sqrt(var)
        mu = self.center + self.scale * mean
        s2 = np.minimum(self.scale**2 * var, 50.0)
        m = np.exp(np.clip(mu + s2 / 2, -700, 700))
        return m, m * np.sqrt(np.expm1(s2))

    def canonical_quantile(self, mean: np.ndarray, var: np.ndarray, z: float) -> np.ndarray:
        """The quantile at standard-normal score ``z`` (exact: the map is monotone)."""
        return self.to_canonical(np.asarray(mean) + z * np.sqrt(np.maximum(np.asarray(var, np.float64), 0.0)))

    def describe(self) -> str:
        kind = "log" if self.log else "linear"
        lo_hi = f"[{self.lo:g}, {self.hi:g}] {self.unit}"
        return f"{self.name}: {kind}, plausible range {lo_hi} -> [-1, 1]"


@dataclass(frozen=True)
class DoseScale:
    """Dose per bin in canonical units -> model units (see TwinConfig.dose_log_scale)."""

    name: str
    unit: str
    exposure: bool
    log_scale: float

    def to_model(self, d: np.ndarray) -> np.ndarray:
        d = np.maximum(np.asarray(d, np.float64), 0.0)
        return d if self.exposure else np.log1p(d) / self.log_scale


@dataclass(frozen=True)
class Normalizer:
    """All spec-derived scales of one twin spec."""

    variables: tuple[VariableScale, ...]
    doses: tuple[DoseScale, ...]

    @classmethod
    def from_spec(cls, spec: TwinSpec, dose_log_scale: float) -> "Normalizer":
        vs = []
        for v in spec.state_variables:
            lo, hi = (float(b) for b in v.plausible_range)
            use_log = lo > 0 and hi / lo >= LOG_RATIO
            flo, fhi = (math.log(lo), math.log(hi)) if use_log else (lo, hi)
            vs.append(VariableScale(v.name, v.canonical_unit, use_log, (flo + fhi) / 2, (fhi - flo) / 2, lo, hi))
        ds = tuple(
            DoseScale(i.name, i.canonical_unit, i.kind == "exposure", float(dose_log_scale)) for i in spec.interventions
        )
        return cls(tuple(vs), ds)

    def values_to_model(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(..., V) canonical values -> model units; unobserved entries become exactly 0.

        The placeholders are never transformed (log of the 0 placeholder would be -inf).
        """
        out = np.zeros(values.shape, np.float32)
        for j, vs in enumerate(self.variables):
            m = mask[..., j]
            out[..., j][m] = vs.to_model(values[..., j][m])
        return out

    def doses_to_model(self, doses: np.ndarray) -> np.ndarray:
        out = np.zeros(doses.shape, np.float32)
        for j, ds in enumerate(self.doses):
            out[..., j] = ds.to_model(doses[..., j])
        return out

    def to_canonical(self, u: np.ndarray) -> np.ndarray:
        """(..., V) model units -> canonical units."""
        out = np.empty(u.shape, np.float64)
        for j, vs in enumerate(self.variables):
            out[..., j] = vs.to_canonical(u[..., j])
        return out

    def canonical_moments(self, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = np.empty(mean.shape, np.float64)
        s = np.empty(mean.shape, np.float64)
        for j, vs in enumerate(self.variables):
            m[..., j], s[..., j] = vs.canonical_moments(mean[..., j], var[..., j])
        return m, s

    def canonical_quantile(self, mean: np.ndarray, var: np.ndarray, z: float) -> np.ndarray:
        out = np.empty(mean.shape, np.float64)
        for j, vs in enumerate(self.variables):
            out[..., j] = vs.canonical_quantile(mean[..., j], var[..., j], z)
        return out


def static_to_model(static: np.ndarray, names: list[str]) -> np.ndarray:
    """Static covariates -> model units: age centred/scaled by fixed constants, indicators as is.

    A missing (non-finite) covariate becomes 0 (the centre), since the extractor's indicators
    already code unknown categories explicitly.
    """
    out = np.nan_to_num(np.asarray(static, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    for j, n in enumerate(names):
        if n == "age":
            col = np.asarray(static[:, j], np.float64)
            out[:, j] = np.where(np.isfinite(col), (col - AGE_CENTER) / AGE_SCALE, 0.0)
    return np.clip(out, -5.0, 5.0).astype(np.float32)
