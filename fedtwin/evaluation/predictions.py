"""Every scored model's predictions for one cohort, in the form the statistics need.

Site-local: nothing here leaves the site; :mod:`fedtwin.evaluation.stats` reduces it to sums.

For each model and patient: the predictive mean and std per horizon bin and variable
(canonical units), the predictive distribution (a Gaussian in the model's own space), the
outcome risk (models with a hazard head) and the predicted what-if effect of every ground-truth
plan (models that respond to a plan).

* **The twin and mechanistic-only** come from ONE Monte Carlo simulation with common posterior
  draws (:func:`fedtwin.twin.forecast.simulate`) of: the recorded doses (the forecast), the
  prospective default plan (the risk; see TwinConfig.hazard_plan - never the recorded future
  doses, which leak the outcome) and each ground-truth plan with its recorded reference (the
  effects). Mechanistic-only = the same draws with the residual switched off.
* **Residual-only** is a twin without the mechanism, trained on the training data; same path.
* **Persistence / population mean** (fedtwin.twin.baselines) are Gaussian in canonical units;
  they ignore the plan, so their predicted effect is 0 (persistence carries the "no effect"
  reference in the effect statistics).

Density scale. The twin's predictive distribution is N(mu, sd^2) in the spec's transformed space
``u = T(y)`` (log for log-scaled variables), and its intervals are exact quantiles. Its
statistics use ``y' = T(y)/J``, ``mu' = mu/J``, ``sd' = sd/J`` with ``J = T'(y)`` at the observed
value: then ``|y' - mu'| <= z sd'`` exactly when ``y`` is inside the twin's interval, and the
Gaussian NLL of ``y'`` equals ``-log p(y)``, the twin's density in canonical units (change of
variables). So coverage is that of the intervals the twin shows and NLL is comparable with the
canonical-unit Gaussian NLL of the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedtwin.errors import FedTwinError
from fedtwin.evaluation.truth import MatchedTruth
from fedtwin.extract.tensors import CohortTensors
from fedtwin.twin.baselines import BaselineForecast
from fedtwin.twin.batch import prepare_batch
from fedtwin.twin.forecast import horizon_dose_override, model_doses, simulate
from fedtwin.twin.model import TwinModel
from fedtwin.twin.normalization import Normalizer
from fedtwin.twin.training import torch_threads


@dataclass
class ModelPredictions:
    """One model's predictions for N patients, F horizon bins, V variables.

    ``mean``/``std`` (N, F, V): predictive mean and std in canonical units (point metrics).
    ``g_mean``/``g_std``: the predictive Gaussian in ``space`` (``model``: the spec's transformed
    space of the twin; ``canonical``: canonical units). ``risk`` (N, O) or None; ``effect``
    (N, P, F, V) predicted effects of the ground-truth plans, or None.
    """

    name: str
    mean: np.ndarray
    std: np.ndarray
    space: Literal["model", "canonical"]
    g_mean: np.ndarray
    g_std: np.ndarray
    risk: np.ndarray | None = None
    effect: np.ndarray | None = None


def _twin_doses(model: TwinModel, tensors: CohortTensors, truth: MatchedTruth | None) -> tuple[list[torch.Tensor], int]:
    """Model-unit dose plans: [recorded, prospective default, (truth recorded, truth plans...)]."""
    plans = [
        model_doses(model, horizon_dose_override(model, tensors, "recorded")),
        model_doses(model, horizon_dose_override(model, tensors, model.config.hazard_plan)),
    ]
    if truth is not None:
        h = model.history
        base = np.asarray(tensors.doses, np.float32)
        for j in range(truth.doses.shape[1]):
            d = base.copy()
            d[:, h:] = truth.doses[:, j]
            plans.append(model_doses(model, d))
    return plans, 2


def twin_predictions(
    model: TwinModel,
    tensors: CohortTensors,
    truth: MatchedTruth | None = None,
    *,
    name: str = "twin",
    mechanism_name: str | None = "mechanistic_only",
    n_samples: int = 32,
    seed: int = 0,
    num_threads: int | None = None,
) -> dict[str, ModelPredictions]:
    """The twin's (and, with ``mechanism_name``, its mechanism-only) predictions, one simulation."""
    with_mech = mechanism_name is not None and model.config.mechanism and model.residual is not None
    if mechanism_name is not None and not model.config.mechanism:
        raise FedTwinError("a mechanistic-only baseline needs a twin with the mechanism on")
    h = model.history
    with torch_threads(num_threads):
        batch = prepare_batch(tensors, model.spec, model.norm)
        plans, first_truth = _twin_doses(model, tensors, truth)
        flags = [with_mech, False] + [with_mech] * (len(plans) - 2)
        sims = simulate(model, batch, plans, n_samples, seed, mechanism_only=flags, row_keys=tensors.person_ids)
    norm = model.norm
    has_risk = model.hazard is not None

    def build(label: str, mean_key: str, var_key: str, risk: bool) -> ModelPredictions:
        mu = getattr(sims[0], mean_key)[:, h:]
        var = getattr(sims[0], var_key)[:, h:]
        c_mean, c_std = norm.canonical_moments(mu, var)
        effect = None
        if truth is not None:
            ref = norm.canonical_moments(getattr(sims[first_truth], mean_key)[:, h:], getattr(sims[first_truth], var_key)[:, h:])[0]
            effect = np.stack(
                [norm.canonical_moments(getattr(s, mean_key)[:, h:], getattr(s, var_key)[:, h:])[0] - ref for s in sims[first_truth + 1 :]],
                axis=1,
            ) if len(sims) > first_truth + 1 else np.zeros((batch.size, 0, *mu.shape[1:]))
        return ModelPredictions(
            name=label, mean=c_mean, std=c_std, space="model", g_mean=mu.astype(np.float64),
            g_std=np.sqrt(np.maximum(var.astype(np.float64), 1e-12)),
            risk=sims[1].risk.astype(np.float64) if (risk and has_risk) else None, effect=effect,
        )

    out = {name: build(name, "mean", "var", True)}
    if with_mech and mechanism_name is not None:
        out[mechanism_name] = build(mechanism_name, "mech_mean", "mech_var", False)
    return out


def baseline_predictions(
    forecast: BaselineForecast, norm: Normalizer, truth: MatchedTruth | None = None, *, with_effect: bool = False
) -> ModelPredictions:
    """A canonical-Gaussian baseline; a non-finite mean or non-positive std (a variable never
    observed in the training data) falls back to the middle of the spec's plausible range with
    its half-width as std (data-independent)."""
    mean = np.asarray(forecast.mean, np.float64)
    std = np.asarray(forecast.std, np.float64)
    lo = np.array([v.lo for v in norm.variables])
    hi = np.array([v.hi for v in norm.variables])
    mid = norm.to_canonical(np.zeros((1, len(norm.variables))))[0]
    mean = np.where(np.isfinite(mean), mean, mid)
    std = np.where(np.isfinite(std) & (std > 0), std, (hi - lo) / 2)
    effect = None
    if with_effect and truth is not None:
        effect = np.zeros_like(truth.effect)
    return ModelPredictions(forecast.name, mean, std, "canonical", mean, std, None, effect)


def density_inputs(pred: ModelPredictions, norm: Normalizer, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y', mean', std') on which Gaussian NLL and interval hits are those of the model's own
    predictive distribution, NLL in canonical units (see the module docstring)."""
    y = np.asarray(y, np.float64)
    if pred.space == "canonical":
        return y, pred.g_mean, pred.g_std
    mask = np.asarray(mask, bool)
    u = norm.values_to_model(y, mask).astype(np.float64)
    jac = np.ones_like(y)
    for j, vs in enumerate(norm.variables):
        if vs.log:
            safe = np.where(mask[..., j], np.clip(y[..., j], vs.lo, vs.hi), 1.0)
            jac[..., j] = 1.0 / (vs.scale * safe)
        else:
            jac[..., j] = 1.0 / vs.scale
    return u / jac, pred.g_mean / jac, pred.g_std / jac
