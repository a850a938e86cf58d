"""The hybrid patient digital twin: mechanistic core + amortised calibration + learned residual.

See docs/twin-model.md for the equations, the objective and the DP-SGD design.
"""

from fedtwin.twin.baselines import (
    BaselineForecast,
    Forecaster,
    HybridTwinBaseline,
    MechanisticOnlyBaseline,
    PersistenceBaseline,
    PopulationMeanBaseline,
    ResidualOnlyBaseline,
)
from fedtwin.twin.config import DPSettings, FitConfig, TwinConfig
from fedtwin.twin.explain import ParameterEstimate, PatientExplanation, explain, population_pk
from fedtwin.twin.forecast import Bands, TwinForecast, forecast
from fedtwin.twin.io import load_model, save_model
from fedtwin.twin.model import TwinModel
from fedtwin.twin.parameters import get_parameters, max_abs_parameter, parameter_names, set_parameters
from fedtwin.twin.plot import plot_what_if
from fedtwin.twin.training import DPReport, FitReport, evaluate, fit
from fedtwin.twin.whatif import WhatIfResult, validate_plan, what_if

__all__ = [
    "Bands",
    "BaselineForecast",
    "DPReport",
    "DPSettings",
    "FitConfig",
    "FitReport",
    "Forecaster",
    "HybridTwinBaseline",
    "MechanisticOnlyBaseline",
    "ParameterEstimate",
    "PatientExplanation",
    "PersistenceBaseline",
    "PopulationMeanBaseline",
    "ResidualOnlyBaseline",
    "TwinConfig",
    "TwinForecast",
    "TwinModel",
    "WhatIfResult",
    "evaluate",
    "explain",
    "fit",
    "forecast",
    "get_parameters",
    "load_model",
    "max_abs_parameter",
    "parameter_names",
    "plot_what_if",
    "population_pk",
    "save_model",
    "set_parameters",
    "validate_plan",
    "what_if",
]
