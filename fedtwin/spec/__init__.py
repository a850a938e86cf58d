"""Twin specs: what a twin models, validated with pydantic and hashed for provenance."""

from fedtwin.spec.model import (
    CohortSpec,
    FairnessSpec,
    InterventionSpec,
    OutcomeSpec,
    StateVariableSpec,
    TimeSpec,
    TwinSpec,
    UnitConversion,
)
from fedtwin.spec.io import load_spec, spec_hash

__all__ = [
    "CohortSpec",
    "FairnessSpec",
    "InterventionSpec",
    "OutcomeSpec",
    "StateVariableSpec",
    "TimeSpec",
    "TwinSpec",
    "UnitConversion",
    "load_spec",
    "spec_hash",
]
