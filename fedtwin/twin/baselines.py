"""Baselines behind one interface, for evaluating the twin against simpler forecasters.

Every baseline is fitted on training tensors and returns, for other tensors, the mean and
std per horizon bin and variable in canonical units (:class:`BaselineForecast`); only the
history part of the tensors is read at prediction time.

- ``PersistenceBaseline``: the last observed value of the history; std per variable and
  horizon bin = root mean square persistence error on the training data.
- ``PopulationMeanBaseline``: the training mean and std of each variable over all bins.
- ``MechanisticOnlyBaseline``: a trained hybrid twin with the residual switched off.
- ``ResidualOnlyBaseline``: the twin's network without the mechanistic core (no set points,
  no PK/PD: the state carries over and the residual predicts every change), trained from scratch.
- ``HybridTwinBaseline``: the hybrid itself, so evaluations can loop over one list.

The population statistics are site-local (they are for evaluation at a site; a federated
evaluation would sum them through the metrics package's additive statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np

from fedtwin.errors import FedTwinError
from fedtwin.extract.tensors import CohortTensors
from fedtwin.spec import TwinSpec
from fedtwin.twin.config import FitConfig, TwinConfig
from fedtwin.twin.forecast import forecast
from fedtwin.twin.model import TwinModel
from fedtwin.twin.training import fit


@dataclass
class BaselineForecast:
    name: str
    state_names: list[str]
    mean: np.ndarray  # (N, F, V) canonical units
    std: np.ndarray  # (N, F, V)


@runtime_checkable
class Forecaster(Protocol):
    name: str

    def fit(self, train: CohortTensors) -> "Forecaster": ...

    def predict(self, tensors: CohortTensors) -> BaselineForecast: ...


def _last_observed(tensors: CohortTensors) -> tuple[np.ndarray, np.ndarray]:
    """Last observed history value per (patient, variable) and whether there is one."""
    h = tensors.history_steps
    m = np.asarray(tensors.mask[:, :h], bool)
    idx = np.where(m, np.arange(h)[None, :, None], -1).max(axis=1)
    has = idx >= 0
    vals = np.take_along_axis(np.asarray(tensors.values[:, :h], np.float64), np.maximum(idx, 0)[:, None, :], axis=1)[:, 0, :]
    return np.where(has, vals, np.nan), has


def _population_stats(tensors: CohortTensors) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(tensors.mask, bool)
    v = np.asarray(tensors.values, np.float64)
    cnt = m.sum(axis=(0, 1))
    mean = np.where(cnt > 0, (v * m).sum(axis=(0, 1)) / np.maximum(cnt, 1), np.nan)
    var = np.where(cnt > 1, (((v - mean) * m) ** 2).sum(axis=(0, 1)) / np.maximum(cnt - 1, 1), np.nan)
    return mean, np.sqrt(var)


class PopulationMeanBaseline:
    name = "population_mean"

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, train: CohortTensors) -> "PopulationMeanBaseline":
        self.mean, self.std = _population_stats(train)
        return self

    def predict(self, tensors: CohortTensors) -> BaselineForecast:
        if self.mean is None or self.std is None:
            raise FedTwinError("the population-mean baseline is not fitted", "call fit(train) first")
        shape = (tensors.n_patients, tensors.horizon_steps, len(tensors.state_names))
        return BaselineForecast(self.name, list(tensors.state_names), np.broadcast_to(self.mean, shape).copy(), np.broadcast_to(self.std, shape).copy())


class PersistenceBaseline:
    name = "persistence"

    def __init__(self) -> None:
        self.pop = PopulationMeanBaseline()
        self.rmse: np.ndarray | None = None  # (F, V)

    def fit(self, train: CohortTensors) -> "PersistenceBaseline":
        self.pop.fit(train)
        last, has = _last_observed(train)
        h = train.history_steps
        y = np.asarray(train.values[:, h:], np.float64)
        m = np.asarray(train.mask[:, h:], bool) & has[:, None, :]
        err2 = np.where(m, (y - np.nan_to_num(last)[:, None, :]) ** 2, 0.0)
        cnt = m.sum(axis=0)
        rmse = np.sqrt(err2.sum(axis=0) / np.maximum(cnt, 1))
        assert self.pop.std is not None
        self.rmse = np.where(cnt > 0, rmse, self.pop.std[None, :])
        return self

    def predict(self, tensors: CohortTensors) -> BaselineForecast:
        if self.rmse is None:
            raise FedTwinError("the persistence baseline is not fitted", "call fit(train) first")
        last, has = _last_observed(tensors)
        fallback = self.pop.predict(tensors)
        mean = np.where(has[:, None, :], np.nan_to_num(last)[:, None, :], fallback.mean)
        std = np.where(has[:, None, :], np.broadcast_to(self.rmse, mean.shape), fallback.std)
        return BaselineForecast(self.name, list(tensors.state_names), mean, std)


class MechanisticOnlyBaseline:
    """The trained hybrid with the residual switched off (same calibrated parameters)."""

    name = "mechanistic_only"

    def __init__(self, model: TwinModel, n_samples: int = 32) -> None:
        if not model.config.mechanism:
            raise FedTwinError("the mechanistic-only baseline needs a twin with the mechanism on")
        self.model, self.n_samples = model, n_samples

    def fit(self, train: CohortTensors) -> "MechanisticOnlyBaseline":
        return self  # uses the hybrid's training

    def predict(self, tensors: CohortTensors) -> BaselineForecast:
        f = forecast(self.model, tensors, n_samples=self.n_samples)
        return BaselineForecast(self.name, f.state_names, f.mechanism.mean, f.mechanism.std)


class HybridTwinBaseline:
    """The hybrid twin itself, behind the baseline interface."""

    name = "hybrid_twin"

    def __init__(self, model: TwinModel, n_samples: int = 32) -> None:
        self.model, self.n_samples = model, n_samples

    def fit(self, train: CohortTensors) -> "HybridTwinBaseline":
        return self

    def predict(self, tensors: CohortTensors) -> BaselineForecast:
        f = forecast(self.model, tensors, n_samples=self.n_samples)
        return BaselineForecast(self.name, f.state_names, f.mean, f.std)


class ResidualOnlyBaseline:
    """The residual network without the mechanistic core, trained on the training tensors."""

    name = "residual_only"

    def __init__(self, spec: TwinSpec, config: TwinConfig | None = None, fit_config: FitConfig | None = None, n_samples: int = 32) -> None:
        cfg = replace(config or TwinConfig(), mechanism=False, residual=True)
        if cfg.latent_dim < 1:
            cfg = replace(cfg, latent_dim=4)
        self.model = TwinModel(spec, cfg)
        self.fit_config = fit_config or FitConfig(epochs=20)
        self.n_samples = n_samples

    def fit(self, train: CohortTensors) -> "ResidualOnlyBaseline":
        fit(self.model, train, self.fit_config)
        return self

    def predict(self, tensors: CohortTensors) -> BaselineForecast:
        f = forecast(self.model, tensors, n_samples=self.n_samples)
        return BaselineForecast(self.name, f.state_names, f.mean, f.std)
