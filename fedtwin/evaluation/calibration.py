"""Split-conformal calibration of the twin's prediction intervals.

The twin's predictive distribution per horizon bin and variable is N(mu, sd^2) in the spec's
transformed space; its 90 % interval is mu +- z90 sd. Trained by an ELBO with a Gaussian
likelihood, sd is calibrated only on average and only for Gaussian errors: on the synthetic ICU
sites the uncalibrated 90 % intervals covered 0.92-0.94 of held-out observations (heavier-than-
Gaussian tails make a likelihood-fitted Gaussian over-cover at 50 % and 90 %).

``calibrate_intervals`` fits one factor per variable on CALIBRATION patients the model did not
train on (split conformal prediction with normalised scores): with ``|z| = |u - mu| / sd`` of
every observed horizon entry, ``c_v = q_v / z_level`` where ``q_v`` is the
``ceil((n + 1) level) / n`` empirical quantile of variable v's ``|z|``. Scaling sd by ``c_v``
then gives a level-``level`` interval with at least that marginal coverage on exchangeable
patients (Lei et al. 2018; here per variable, pooled over horizon bins, so coverage per bin
can differ). The factor is stored on the model (``TwinModel.interval_scale``) and saved with it;
every forecast, what-if band and evaluation then uses it.

Privacy: the factors are statistics of the calibration patients (V numbers). Fit them on data
whose release is allowed: a site's own validation split for a model that stays at the site, or
synthetic/public data; for a federated model under DP they are an additional release that the
privacy ledger must account for (not done here).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedtwin.errors import FedTwinError
from fedtwin.extract.tensors import CohortTensors
from fedtwin.metrics import z_value
from fedtwin.twin.batch import prepare_batch
from fedtwin.twin.forecast import horizon_dose_override, model_doses, simulate
from fedtwin.twin.model import TwinModel
from fedtwin.twin.training import torch_threads

MIN_OBSERVATIONS = 20


def calibrate_intervals(
    model: TwinModel,
    calibration: CohortTensors,
    *,
    level: float = 0.9,
    n_samples: int = 32,
    seed: int = 0,
    min_observations: int = MIN_OBSERVATIONS,
    num_threads: int | None = None,
) -> np.ndarray:
    """Fit and set ``model.interval_scale`` (V,) on ``calibration`` patients; returns the factors.

    A variable with fewer than ``min_observations`` horizon observations keeps factor 1.
    Refitting replaces an earlier calibration (the scores are computed without it).
    """
    if not 0 < level < 1:
        raise FedTwinError(f"calibration level must be in (0, 1), got {level}")
    if calibration.n_patients == 0:
        raise FedTwinError("cannot calibrate intervals on an empty cohort", "pass the calibration (validation) patients")
    h = model.history
    previous = model.interval_scale
    model.interval_scale = None
    try:
        with torch_threads(num_threads):
            batch = prepare_batch(calibration, model.spec, model.norm)
            plan = model_doses(model, horizon_dose_override(model, calibration, "recorded"))
            sim = simulate(model, batch, [plan], n_samples, seed, mechanism_only=False, row_keys=calibration.person_ids)[0]
    except Exception:
        model.interval_scale = previous
        raise
    u = batch.y[:, h:].numpy().astype(np.float64)
    mask = batch.m[:, h:].numpy() > 0
    z = np.abs(u - sim.mean[:, h:]) / np.sqrt(np.maximum(sim.var[:, h:], 1e-12))
    zl = z_value(level)
    scale = np.ones(model.n_vars)
    for j in range(model.n_vars):
        scores = np.sort(z[..., j][mask[..., j]])
        n = scores.size
        if n < min_observations:
            continue
        k = min(n, math.ceil((n + 1) * level))
        scale[j] = scores[k - 1] / zl
    model.interval_scale = torch.tensor(scale, dtype=torch.float32)
    return scale
