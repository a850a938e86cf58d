"""Clinician-facing explanations: each patient's calibrated parameters with their uncertainty,
the share of the forecast explained by the mechanism, and the outcome risks.

Parameters are reported in clinical terms:

- set point: the value the variable returns to without treatment, canonical units;
- rate: the half-life of a deviation from the set point (ln 2 / k), in hours or days;
- sensitivity: the shift of the variable's equilibrium when the drug's effect is at its maximum
  (Emax PD) or per unit of PK amount (linear PD): in the variable's unit for linearly scaled
  variables, in percent for log-scaled ones.

The estimate is the posterior median and the interval the central 90% credible interval:
every reported quantity is a monotone function of one Gaussian coordinate of theta, so its
quantiles are the transformed quantiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedtwin.errors import FedTwinError
from fedtwin.extract.tensors import CohortTensors
from fedtwin.twin.batch import prepare_batch
from fedtwin.twin.forecast import forecast
from fedtwin.twin.mechanistic import MIN_RATE, pk_unpack
from fedtwin.twin.model import TwinModel
from fedtwin.twin.normalization import Z90, VariableScale


@dataclass(frozen=True)
class ParameterEstimate:
    """One patient parameter: posterior median and 90% credible interval, with the population
    prior median for comparison."""

    name: str
    kind: str
    variable: str
    intervention: str | None
    unit: str
    estimate: float
    lower90: float
    upper90: float
    population: float
    posterior_sd_model: float
    description: str


@dataclass
class PatientExplanation:
    person_id: int
    parameters: list[ParameterEstimate]
    mechanism_share: dict[str, float]
    risk: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table a clinician-facing report can print as is."""
        rows = [("parameter", "estimate", "90% interval", "population", "unit")]
        for p in self.parameters:
            rows.append((p.description, _fmt(p.estimate), f"{_fmt(p.lower90)} - {_fmt(p.upper90)}", _fmt(p.population), p.unit))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"patient {self.person_id}"]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.mechanism_share:
            shares = ", ".join(f"{v} {'n/a' if math.isnan(s) else f'{100 * s:.0f}%'}" for v, s in self.mechanism_share.items())
            lines.append(f"forecast movement explained by the mechanism (rest: learned residual): {shares}")
        if self.risk:
            lines.append("risk: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.risk.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    a = abs(x)
    return f"{x:.3g}" if a < 1000 else f"{x:.0f}"


def _time_unit(step_seconds: float) -> tuple[str, float]:
    """A readable unit for durations and its size in bins: hours, days or years."""
    if step_seconds >= 180 * 86400:
        return "y", step_seconds / (365.25 * 86400.0)
    return ("d", step_seconds / 86400.0) if step_seconds >= 2 * 86400 else ("h", step_seconds / 3600.0)


def _sens(vs: VariableScale, th: np.ndarray) -> np.ndarray:
    return (np.expm1(np.clip(th * vs.scale, -50, 50)) * 100.0) if vs.log else th * vs.scale


def _half_life(th: np.ndarray, per_bin: float) -> np.ndarray:
    k = F.softplus(torch.as_tensor(th, dtype=torch.float64)).numpy() + MIN_RATE
    return math.log(2) / k * per_bin


def explain(model: TwinModel, tensors: CohortTensors, patients: Sequence[int] | None = None, n_samples: int = 32, seed: int = 0) -> list[PatientExplanation]:
    """Explanations for the patients at positions ``patients`` (all when None)."""
    if not model.config.mechanism:
        raise FedTwinError("a residual-only twin has no mechanistic parameters to explain", "explain a hybrid twin")
    if patients is not None:
        tensors = tensors.select(np.asarray(list(patients), dtype=np.int64))
    batch = prepare_batch(tensors, model.spec, model.norm)
    with torch.no_grad():
        model.eval()
        post = model.posterior(batch)
    mu, sd = post.mu.numpy().astype(np.float64), np.exp(0.5 * post.logvar.numpy().astype(np.float64))
    pmu = post.prior_mu[:1].numpy().astype(np.float64)[0] if batch.size else np.zeros(mu.shape[1])
    fc = forecast(model, tensors, n_samples=n_samples, seed=seed)
    layout, spec = model.layout, model.spec
    v = layout.n_vars
    tunit, per_bin = _time_unit(spec.time.step_seconds)
    scales = model.norm.variables
    out: list[PatientExplanation] = []
    for i in range(batch.size):
        lo, hi = mu[i] - Z90 * sd[i], mu[i] + Z90 * sd[i]
        params: list[ParameterEstimate] = []
        for j, vs in enumerate(scales):
            params.append(ParameterEstimate(
                f"{vs.name}.set_point", "set_point", vs.name, None, vs.unit,
                float(vs.to_canonical(mu[i, j])), float(vs.to_canonical(lo[j])), float(vs.to_canonical(hi[j])),
                float(vs.to_canonical(pmu[j])), float(sd[i, j]), f"{vs.name} set point",
            ))
        for j, vs in enumerate(scales):
            k = v + j
            params.append(ParameterEstimate(
                f"{vs.name}.rate", "rate", vs.name, None, tunit,
                float(_half_life(mu[i, k], per_bin)), float(_half_life(hi[k], per_bin)), float(_half_life(lo[k], per_bin)),
                float(_half_life(pmu[k], per_bin)), float(sd[i, k]), f"{vs.name} half-life of a deviation",
            ))
        for n, (vi, di) in enumerate(layout.links):
            k, vs = 2 * v + n, scales[vi]
            drug = layout.intervention_names[di]
            unit = "%" if vs.log else vs.unit
            what = "at full effect" if model.config.pd == "emax" else "per unit amount"
            params.append(ParameterEstimate(
                f"{drug}->{vs.name}.sensitivity", "sensitivity", vs.name, drug, unit,
                float(_sens(vs, mu[i, k])), float(_sens(vs, lo[k])), float(_sens(vs, hi[k])),
                float(_sens(vs, pmu[k])), float(sd[i, k]), f"{drug} shift of {vs.name} {what}",
            ))
        share = {name: float(fc.mechanism_share[i, j]) for j, name in enumerate(fc.state_names)}
        risk = {name: float(fc.risk[i, k]) for k, name in enumerate(fc.outcome_names)}
        out.append(PatientExplanation(int(tensors.person_ids[i]), params, share, risk))
    return out


def population_pk(model: TwinModel) -> dict[str, dict[str, float]]:
    """Population PK/PD per intervention: elimination half-life (time units of the step) and
    EC50 in model dose units (log1p(dose)/dose_log_scale, or exposure fraction)."""
    if model.pk is None:
        return {}
    with torch.no_grad():
        retention, ec50 = pk_unpack(model.pk.value().unsqueeze(0), model.n_drugs)
    tunit, per_bin = _time_unit(model.spec.time.step_seconds)
    out = {}
    for d, name in enumerate(model.spec.intervention_names):
        ke = -math.log(float(retention[0, d]))
        out[name] = {f"elimination_half_life_{tunit}": math.log(2) / ke * per_bin, "ec50_model_units": float(ec50[0, d])}
    return out
