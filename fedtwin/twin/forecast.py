"""Forecasts: Monte Carlo over the calibrated parameter posterior, summarised in canonical units.

For each patient, S parameter vectors are drawn from q(theta | history) and the twin is
rolled out for each (history teacher-forced, horizon free-running on the horizon doses). The
predictive distribution in model units is the mixture of the S Gaussians; it is summarised by
its mean and total variance (law of total variance: mean of the variances + variance of the
means) and treated as Gaussian. Canonical mean/std are then exact moments of that Gaussian
under the variable's transform (log-normal for log-scaled variables) and interval bounds are
exact quantiles (the transform is monotone), so intervals are asymmetric where they should be.

If the model carries a calibrated ``interval_scale`` (per variable, fitted on patients it did not
train on: fedtwin.evaluation.calibrate_intervals), the hybrid's predictive std in model units is
multiplied by it before the canonical summaries.

The mechanism-only forecast reuses the same parameter draws with the residual switched off;
``residual_contribution = mean - mechanism_mean``, so the two add up to the forecast.

Risk is read from a rollout under an explicit plan, never from one driven by the recorded doses
after the prediction time (unknown then, and they leak the outcome): by default the model's
prospective plan (``TwinConfig.hazard_plan``, ``hold``), the plan the hazard was trained on;
``risk_doses`` names another one. A what-if's risk uses its own plan (fedtwin.twin.whatif).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from fedtwin.errors import FedTwinError
from fedtwin.extract.tensors import CohortTensors
from fedtwin.twin.batch import TwinBatch, prepare_batch
from fedtwin.twin.hazard import risk as hazard_risk
from fedtwin.twin.model import Rollout, TwinModel
from fedtwin.twin.normalization import Z50, Z90
from fedtwin.twin.training import torch_threads

HorizonDoses = Literal["recorded", "zero", "hold"]
MAX_ROWS = 2048  # patients x samples simulated at once (larger chunks fall out of cache: 3x slower at 8192)


@dataclass
class Bands:
    """A predictive distribution per (patient, horizon bin, variable), canonical units."""

    mean: np.ndarray
    std: np.ndarray
    median: np.ndarray
    lower50: np.ndarray
    upper50: np.ndarray
    lower90: np.ndarray
    upper90: np.ndarray

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        if level == 0.5:
            return self.lower50, self.upper50
        if level == 0.9:
            return self.lower90, self.upper90
        raise FedTwinError(f"prediction intervals are available at 0.5 and 0.9, not {level}")


@dataclass
class TwinForecast:
    """Forecast of N patients over F horizon bins for V variables, canonical units.

    ``predicted``: the hybrid twin's bands; ``mechanism``: the same draws without the residual;
    ``residual_contribution = predicted.mean - mechanism.mean``; ``mechanism_share`` (N, V):
    the part of the forecast's movement from the current state explained by the mechanism,
    sum|mech - current| / (sum|mech - current| + sum|residual|) over the horizon (NaN when
    neither moves); ``risk`` (N, O): P(outcome within its window) from the rollout under the
    plan ``risk_plan`` (``hold`` or ``zero``: the model's prospective default, unless the caller
    asked for another one).
    """

    person_ids: np.ndarray
    state_names: list[str]
    units: list[str]
    outcome_names: list[str]
    step_seconds: float
    predicted: Bands
    mechanism: Bands
    residual_contribution: np.ndarray
    current_state: np.ndarray
    mechanism_share: np.ndarray
    risk: np.ndarray
    n_samples: int
    risk_plan: str = "hold"

    @property
    def mean(self) -> np.ndarray:
        return self.predicted.mean

    @property
    def std(self) -> np.ndarray:
        return self.predicted.std

    @property
    def mechanism_mean(self) -> np.ndarray:
        return self.mechanism.mean


@dataclass
class Simulation:
    """Raw Monte Carlo output in model units: predictive mean/var over all T bins (N, T, V)
    for the hybrid and the mechanism-only rollouts, and risk (N, O)."""

    mean: np.ndarray
    var: np.ndarray
    mech_mean: np.ndarray
    mech_var: np.ndarray
    risk: np.ndarray


def horizon_dose_override(model: TwinModel, tensors: CohortTensors, mode: HorizonDoses) -> np.ndarray:
    """Canonical doses (N, T, D) with the horizon replaced according to ``mode``."""
    doses = np.array(tensors.doses, dtype=np.float32, copy=True)
    h = model.history
    if mode == "recorded":
        return doses
    if mode == "zero":
        doses[:, h:] = 0.0
    elif mode == "hold":
        doses[:, h:] = doses[:, h - 1 : h]
    else:
        raise FedTwinError(f"horizon_doses must be 'recorded', 'zero' or 'hold', got {mode!r}")
    return doses


def _mixture(means: torch.Tensor, variances: torch.Tensor, n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    means = means.reshape(n, s, *means.shape[1:])
    variances = variances.reshape(n, s, *variances.shape[1:])
    mu = means.mean(dim=1)
    var = variances.mean(dim=1) + means.var(dim=1, unbiased=False)
    return mu, var


@torch.no_grad()
def simulate(
    model: TwinModel,
    batch: TwinBatch,
    dose_plans: list[torch.Tensor],
    n_samples: int = 32,
    seed: int = 0,
    mechanism_only: bool | Sequence[bool] = True,
    row_keys: Sequence[int] | np.ndarray | None = None,
) -> list[Simulation]:
    """Roll every patient out under each dose plan (model-unit doses (N, T, D)) with the SAME
    posterior draws for all plans (common random numbers: differences are not MC noise).

    Each plan's risk is the hazard read from that plan's own rollout. ``mechanism_only`` (one
    flag, or one per plan) also rolls out the mechanism alone; where False, the mechanism-only
    fields repeat the hybrid's. ``n_samples = 0`` uses the posterior mean only (no parameter
    uncertainty). With ``row_keys`` (one integer per patient, e.g. person ids) a patient's draws
    depend only on ``seed`` and its key: its forecast is the same whichever other patients share
    the batch (a site's evaluation then adds up to the pooled one exactly). Without them the
    draws follow the batch order.
    """
    mech_flags = [mechanism_only] * len(dose_plans) if isinstance(mechanism_only, bool) else list(mechanism_only)
    if len(mech_flags) != len(dose_plans):
        raise ValueError("mechanism_only needs one flag per dose plan")
    model.eval()
    s = max(n_samples, 1)
    chunk = max(1, MAX_ROWS // s)
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, list[np.ndarray]]] = [{k: [] for k in ("mean", "var", "mm", "mv", "risk")} for _ in dose_plans]
    for lo in range(0, batch.size, chunk):
        idx = torch.arange(lo, min(lo + chunk, batch.size))
        b = batch.select(idx)
        n = b.size
        post = model.posterior(b)
        if n_samples == 0:
            theta = post.mu.repeat_interleave(s, dim=0)
        elif row_keys is not None:
            rp = post.repeat(s)
            theta = rp.mu + torch.exp(0.5 * rp.logvar) * patient_draws(row_keys[lo:lo + n], s, rp.mu.shape[1], seed)
        else:
            theta = post.repeat(s).sample(gen)
        rep = b.repeat(s)
        h = model.history
        base: tuple[torch.Tensor, TwinBatch, Rollout] | None = None  # the first plan's doses, batch, rollout
        base_mech: Rollout | None = None
        for k, plan in enumerate(dose_plans):
            dose = plan[idx].repeat_interleave(s, dim=0)
            bp = rep.with_doses(dose)
            # plans that share the history doses continue the first plan's rollout from the
            # prediction time (same draws, same history: only the horizon is recomputed)
            shared = base is not None and torch.equal(dose[:, :h], base[0][:, :h])
            roll = model.branch(base[2], bp, theta) if (shared and base is not None) else model.rollout(bp, theta)
            if base is None:
                base = (dose, bp, roll)
            mu, var = _mixture(roll.mean, roll.var, n, s)
            if model.interval_scale is not None:  # calibrated predictive std (hybrid only)
                var = var * model.interval_scale.square()
            out[k]["mean"].append(mu.numpy())
            out[k]["var"].append(var.numpy())
            if mech_flags[k] and model.residual is not None:
                if shared and base is not None:
                    if base_mech is None:
                        base_mech = model.rollout(base[1], theta, use_residual=False)
                    mroll = model.branch(base_mech, bp, theta, use_residual=False)
                else:
                    mroll = model.rollout(bp, theta, use_residual=False)
                    if k == 0:
                        base_mech = mroll
                mmu, mvar = _mixture(mroll.mean, mroll.var, n, s)
            else:
                mmu, mvar = mu, var
            out[k]["mm"].append(mmu.numpy())
            out[k]["mv"].append(mvar.numpy())
            logits = model.hazard_logits(bp, theta, roll)
            if logits is None:
                r = np.zeros((n, 0), np.float32)
            else:
                r = hazard_risk(logits, model.windows).reshape(n, s, -1).mean(dim=1).numpy()
            out[k]["risk"].append(r)
    cat = lambda xs: np.concatenate(xs, axis=0) if xs else np.zeros((0,))  # noqa: E731
    return [Simulation(cat(o["mean"]), cat(o["var"]), cat(o["mm"]), cat(o["mv"]), cat(o["risk"])) for o in out]


def patient_draws(keys: Sequence[int] | np.ndarray, n_samples: int, dim: int, seed: int) -> torch.Tensor:
    """(len(keys) * n_samples, dim) standard normals, patient-major; each patient's from its own stream."""
    blocks = []
    for key in np.asarray(keys, dtype=np.int64).tolist():
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(key)) % (2**63 - 1))
        blocks.append(torch.randn((n_samples, dim), generator=gen))
    return torch.cat(blocks, dim=0) if blocks else torch.zeros((0, dim))


def bands(model: TwinModel, mean: np.ndarray, var: np.ndarray) -> Bands:
    """Canonical-unit bands of Gaussians given in model units (..., V)."""
    nz = model.norm
    m, sd = nz.canonical_moments(mean, var)
    return Bands(
        mean=m,
        std=sd,
        median=nz.to_canonical(mean),
        lower50=nz.canonical_quantile(mean, var, -Z50),
        upper50=nz.canonical_quantile(mean, var, Z50),
        lower90=nz.canonical_quantile(mean, var, -Z90),
        upper90=nz.canonical_quantile(mean, var, Z90),
    )


def current_state(model: TwinModel, batch: TwinBatch, sim: Simulation) -> np.ndarray:
    """The twin's state at the prediction time (last history bin), canonical units (N, V):
    the observation if that bin was observed, the twin's estimate otherwise."""
    h = model.history - 1
    y, m = batch.y[:, h].numpy(), batch.m[:, h].numpy() > 0
    return model.norm.to_canonical(np.where(m, y, sim.mean[:, h]))


def mechanism_share(mech_mean: np.ndarray, residual: np.ndarray, current: np.ndarray) -> np.ndarray:
    moved = np.abs(mech_mean - current[:, None, :]).sum(axis=1)
    res = np.abs(residual).sum(axis=1)
    total = moved + res
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, moved / np.where(total > 0, total, 1.0), np.nan)


def model_doses(model: TwinModel, doses: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(model.norm.doses_to_model(doses))


def forecast(
    model: TwinModel,
    tensors: CohortTensors,
    n_samples: int = 32,
    seed: int = 0,
    horizon_doses: HorizonDoses = "recorded",
    num_threads: int | None = None,
    risk_doses: HorizonDoses | None = None,
) -> TwinForecast:
    """Forecast the horizon of every patient of ``tensors`` from its history.

    Only history bins of values/masks are read. Horizon doses: ``recorded`` (the doses in the
    tensors, e.g. retrospective evaluation or a planned regimen filled in by the caller),
    ``zero`` (no further treatment) or ``hold`` (each intervention kept at its last history bin).

    The risk is read from the rollout under ``risk_doses`` (default: the model's prospective
    plan ``TwinConfig.hazard_plan``, which the hazard was trained on), whatever the forecast's
    horizon doses, so it depends only on the history. ``risk_doses="recorded"`` conditions the
    risk on the doses actually given after the prediction time: retrospective, and optimistic
    (those doses reflect the outcome); use it only to measure that leak.
    """
    risk_mode: HorizonDoses = risk_doses or model.config.hazard_plan
    with torch_threads(num_threads):
        batch = prepare_batch(tensors, model.spec, model.norm)
        plans = [model_doses(model, horizon_dose_override(model, tensors, horizon_doses))]
        if risk_mode != horizon_doses:
            plans.append(model_doses(model, horizon_dose_override(model, tensors, risk_mode)))
        sims = simulate(model, batch, plans, n_samples, seed, mechanism_only=[True, False][: len(plans)],
                        row_keys=tensors.person_ids)
    sim, risk = sims[0], sims[-1].risk
    h = model.history
    pred = bands(model, sim.mean[:, h:], sim.var[:, h:])
    mech = bands(model, sim.mech_mean[:, h:], sim.mech_var[:, h:])
    residual = pred.mean - mech.mean
    cur = current_state(model, batch, sim)
    return TwinForecast(
        person_ids=np.asarray(tensors.person_ids),
        state_names=list(model.spec.state_names),
        units=[v.canonical_unit for v in model.spec.state_variables],
        outcome_names=list(model.spec.outcome_names),
        step_seconds=model.spec.time.step_seconds,
        predicted=pred,
        mechanism=mech,
        residual_contribution=residual,
        current_state=cur,
        mechanism_share=mechanism_share(mech.mean, residual, cur),
        risk=risk,
        n_samples=n_samples,
        risk_plan=risk_mode,
    )
