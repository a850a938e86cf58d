"""Fitting the baselines an evaluation compares the twin with - on training data only.

What each baseline needs from training data (never from the patients it scores):

- ``population_mean``: the mean and std of every variable over all observed training bins.
- ``persistence``: the last observed history value of the scored patient (its own history, known
  at prediction time) and, for its predictive std, the root mean square persistence error per
  horizon bin and variable on the training data; a scored patient without any history reading
  of a variable falls back to the population mean.
- ``residual_only``: a twin without the mechanistic core (the hybrid's config with
  ``mechanism=False``), trained from scratch with ``EvaluationConfig.residual_fit``. When the
  hybrid carries calibrated intervals (``TwinModel.interval_scale``), the residual-only twin gets
  the same treatment: trained on 80 % of the training patients, intervals calibrated on the
  other 20 % (fedtwin.evaluation.calibration), unless a calibration set is passed.
- ``mechanistic_only``: nothing: the trained hybrid with its residual switched off.

With a training set (e.g. the train split of the site whose test split is scored), baselines
are fitted once on it. Without one (scoring a whole cohort, e.g. a site that did not train the
model), they are **cross-fitted**: patients are put into ``K`` folds by a hash of their person id
and each fold is scored by baselines fitted on the other folds, so no patient is ever predicted
by a baseline that saw it. Patients whose other folds are empty (a cohort of one fold) are not
scored by the trained baselines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

from fedtwin.extract.tensors import CohortTensors
from fedtwin.twin.baselines import PersistenceBaseline, PopulationMeanBaseline
from fedtwin.twin.config import FitConfig, TwinConfig
from fedtwin.twin.model import TwinModel
from fedtwin.twin.training import fit

_SALT = b"fedtwin-crossfit-v1"


@dataclass(frozen=True)
class EvaluationConfig:
    """How a site evaluates.

    - ``n_samples``, ``seed``: Monte Carlo draws from the twin's parameter posterior, and their seed.
    - ``crossfit_folds``: folds for baselines when no training set is given (>= 2).
    - ``residual_fit``: training of the residual-only baseline; ``residual_config``: its model
      config (default: the hybrid's config with the mechanism off).
    - ``num_threads``: torch threads (default 1, see FitConfig).
    """

    n_samples: int = 32
    seed: int = 0
    crossfit_folds: int = 2
    residual_fit: FitConfig = field(default_factory=lambda: FitConfig(epochs=20, batch_size=128))
    residual_config: TwinConfig | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 0 or self.crossfit_folds < 2:
            raise ValueError(f"need n_samples >= 0 and crossfit_folds >= 2, got {self.n_samples}, {self.crossfit_folds}")


@dataclass
class FittedBaselines:
    """The baselines fitted on one training set (None = not requested, or no training data)."""

    n_train: int
    persistence: PersistenceBaseline | None = None
    population_mean: PopulationMeanBaseline | None = None
    residual_only: TwinModel | None = None


def fit_baselines(
    model: TwinModel,
    train: CohortTensors,
    models: tuple[str, ...],
    config: EvaluationConfig | None = None,
    calibration: CohortTensors | None = None,
) -> FittedBaselines:
    """Fit the requested trained baselines on ``train`` (nothing when it is empty).

    ``calibration``: patients (disjoint from ``train``) on which the residual-only twin's
    intervals are calibrated, as the hybrid's were; persistence and population mean are fitted
    on ``train`` and ``calibration`` together.
    """
    from fedtwin.evaluation.calibration import calibrate_intervals
    from fedtwin.extract.extractor import concat

    config = config or EvaluationConfig()
    res_train, res_cal = train, calibration
    if calibration is not None and calibration.n_patients:
        train = concat([train, calibration])
    elif model.interval_scale is not None and "residual_only" in models and train.n_patients >= 10:
        fold = crossfit_folds(train.person_ids, 5)
        res_train, res_cal = train.select(np.flatnonzero(fold != 0)), train.select(np.flatnonzero(fold == 0))
    out = FittedBaselines(n_train=train.n_patients)
    if train.n_patients == 0:
        return out
    if "persistence" in models:
        out.persistence = PersistenceBaseline().fit(train)
    if "population_mean" in models:
        out.population_mean = PopulationMeanBaseline().fit(train)
    if "residual_only" in models:
        cfg = replace(config.residual_config or model.config, mechanism=False, residual=True)
        if cfg.latent_dim < 1:
            cfg = replace(cfg, latent_dim=4)
        res = TwinModel(model.spec, cfg)
        fit(res, res_train, replace(config.residual_fit, num_threads=config.num_threads))
        if res_cal is not None and res_cal.n_patients:
            calibrate_intervals(res, res_cal, n_samples=config.n_samples, seed=config.seed, num_threads=config.num_threads)
        out.residual_only = res
    return out


def crossfit_folds(person_ids: np.ndarray, k: int) -> np.ndarray:
    """Fold (0..k-1) of each person, from a salted hash of the person id (stable across runs)."""
    out = np.empty(len(person_ids), dtype=np.int64)
    for i, pid in enumerate(np.asarray(person_ids).tolist()):
        digest = hashlib.sha256(_SALT + str(int(pid)).encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") % k
    return out
