"""The twin spec: one YAML document that says what a twin models and how to read it from OMOP.

Every field a site operator can get wrong is validated here, so that extraction and training
never see an inconsistent spec. String fields are never interpolated into SQL: names are
restricted to identifiers and concept ids to positive integers, and every value reaches the
database as a bound parameter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedtwin.spec.duration import parse_duration

Name = str
_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
ConceptId = int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _positive_ids(values: list[int]) -> list[int]:
    bad = [v for v in values if v <= 0]
    if bad:
        raise ValueError(f"concept ids must be positive integers, got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"concept ids must not repeat, got {values}")
    return values


class TimeSpec(_Strict):
    """The twin's clock: from minutes (ICU monitors, glucose sensors) to days (chronic care)."""

    step: str = Field(description="bin width, e.g. '5min', '1h', '1d'")
    history_steps: int = Field(ge=1, le=5000, description="bins the twin sees before it forecasts")
    horizon_steps: int = Field(ge=1, le=5000, description="bins it forecasts")

    @field_validator("step")
    @classmethod
    def _step_parses(cls, v: str) -> str:
        parse_duration(v)
        return v

    @property
    def step_seconds(self) -> float:
        return parse_duration(self.step)

    @property
    def total_steps(self) -> int:
        return self.history_steps + self.horizon_steps


class CohortSpec(_Strict):
    """Who is in the cohort and where each patient's timeline starts (the index time).

    anchor:
      - ``visit``: start of the first visit whose concept is in ``visit_concept_ids``
      - ``condition``: first occurrence of a condition in ``condition_concept_ids``
      - ``first_measurement``: first measurement of any state variable
      - ``observation_period``: start of the first observation period
    The history window is ``[index, index + history)``, the forecast window follows it, and
    outcomes are counted from the end of the history (the prediction time).
    """

    anchor: Literal["visit", "condition", "first_measurement", "observation_period"]
    visit_concept_ids: list[ConceptId] = Field(default_factory=list)
    condition_concept_ids: list[ConceptId] = Field(default_factory=list)
    min_age: float | None = Field(default=None, ge=0, le=130)
    max_age: float | None = Field(default=None, ge=0, le=130)
    min_history_observations: int = Field(default=1, ge=0)
    min_patients: int = Field(default=20, ge=1, description="smallest cohort the data-quality gate accepts")

    _ids_v = field_validator("visit_concept_ids", "condition_concept_ids")(_positive_ids)

    @model_validator(mode="after")
    def _anchor_has_concepts(self) -> "CohortSpec":
        if self.anchor == "visit" and not self.visit_concept_ids:
            raise ValueError("anchor 'visit' needs visit_concept_ids (e.g. [9201] for inpatient visits)")
        if self.anchor == "condition" and not self.condition_concept_ids:
            raise ValueError("anchor 'condition' needs condition_concept_ids")
        if self.min_age is not None and self.max_age is not None and self.min_age >= self.max_age:
            raise ValueError(f"min_age ({self.min_age}) must be below max_age ({self.max_age})")
        return self


class UnitConversion(_Strict):
    """``canonical = value * factor + offset`` for values recorded in this unit concept."""

    concept_id: ConceptId = Field(ge=0, description="unit_concept_id as recorded (0 = no unit recorded)")
    code: str = Field(min_length=1, max_length=50, description="UCUM code, for people and reports")
    factor: float = 1.0
    offset: float = 0.0

    @field_validator("factor")
    @classmethod
    def _factor_nonzero(cls, v: float) -> float:
        if v == 0:
            raise ValueError("factor 0 would erase every value; use the number that converts to the canonical unit")
        return v


class StateVariableSpec(_Strict):
    """A physiological variable the twin tracks (a vital sign or a lab)."""

    name: Name = Field(pattern=_NAME_PATTERN)
    concept_ids: list[ConceptId] = Field(min_length=1)
    canonical_unit: str = Field(min_length=1, max_length=50)
    units: list[UnitConversion] = Field(min_length=1)
    plausible_range: tuple[float, float]

    _ids_v = field_validator("concept_ids")(_positive_ids)

    @model_validator(mode="after")
    def _consistent(self) -> "StateVariableSpec":
        lo, hi = self.plausible_range
        if not lo < hi:
            raise ValueError(f"plausible_range lower bound {lo} must be below upper bound {hi}")
        ids = [u.concept_id for u in self.units]
        if len(set(ids)) != len(ids):
            raise ValueError(f"unit concept ids repeat in units: {ids}")
        if not any(u.code == self.canonical_unit for u in self.units):
            raise ValueError(
                f"canonical_unit {self.canonical_unit!r} is not one of the accepted units "
                f"{[u.code for u in self.units]}; add it with factor 1"
            )
        return self

    def conversion_for(self, unit_concept_id: int) -> UnitConversion | None:
        return next((u for u in self.units if u.concept_id == unit_concept_id), None)


class InterventionSpec(_Strict):
    """A drug (or fluid, or meal) that acts on state variables.

    kind:
      - ``bolus``: the whole quantity is given at the exposure start (a bolus, a meal)
      - ``infusion``: the quantity is spread evenly over [start, end] (an infusion, basal insulin)
      - ``exposure``: the fraction of each bin covered by [start, end], for chronic drugs whose
        recorded quantity is unreliable (e.g. daily tablets); the canonical unit is then 'exposure'
    dose_units maps ``drug_exposure.dose_unit_source_value`` to the factor into the canonical unit.
    """

    name: Name = Field(pattern=_NAME_PATTERN)
    concept_ids: list[ConceptId] = Field(min_length=1)
    kind: Literal["bolus", "infusion", "exposure"]
    canonical_unit: str = Field(min_length=1, max_length=50)
    dose_units: dict[str, float] = Field(default_factory=dict)
    affects: list[Name] = Field(min_length=1, description="state variables this intervention acts on")

    _ids_v = field_validator("concept_ids")(_positive_ids)

    @model_validator(mode="after")
    def _units_given(self) -> "InterventionSpec":
        if self.kind != "exposure" and not self.dose_units:
            raise ValueError(
                f"kind {self.kind!r} needs dose_units (e.g. {{'mg': 1.0, 'g': 1000.0}}) to convert recorded quantities"
            )
        bad = {k: v for k, v in self.dose_units.items() if not v > 0}
        if bad:
            raise ValueError(f"dose_units factors must be positive, got {bad}")
        return self


class OutcomeSpec(_Strict):
    """An event the twin scores as a risk within ``within_steps`` after the prediction time."""

    name: Name = Field(pattern=_NAME_PATTERN)
    kind: Literal["death", "condition"]
    concept_ids: list[ConceptId] = Field(default_factory=list)
    within_steps: int = Field(ge=1, le=100000)

    _ids_v = field_validator("concept_ids")(_positive_ids)

    @model_validator(mode="after")
    def _condition_has_concepts(self) -> "OutcomeSpec":
        if self.kind == "condition" and not self.concept_ids:
            raise ValueError("a 'condition' outcome needs concept_ids")
        return self


class FairnessSpec(_Strict):
    """Subgroups every metric is disaggregated by."""

    sex: bool = True
    race: bool = True
    age_bands: list[float] = Field(default_factory=lambda: [18.0, 45.0, 65.0, 80.0])
    intersections: bool = True

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"age_bands must be strictly increasing, got {v}")
        return v


class TwinSpec(_Strict):
    """The whole spec. Load it with :func:`fedtwin.spec.load_spec`."""

    name: Name = Field(pattern=_NAME_PATTERN)
    version: int = Field(default=1, ge=1)
    description: str = ""
    cdm_version: Literal["5.4", "5.3"] = "5.4"
    time: TimeSpec
    cohort: CohortSpec
    state_variables: list[StateVariableSpec] = Field(min_length=1)
    interventions: list[InterventionSpec] = Field(default_factory=list)
    outcomes: list[OutcomeSpec] = Field(default_factory=list)
    static_covariates: list[Literal["age", "sex", "race", "ethnicity"]] = Field(default_factory=lambda: ["age", "sex"])
    fairness: FairnessSpec = Field(default_factory=FairnessSpec)
    suppression_threshold: int = Field(default=10, ge=1, le=1000)

    @model_validator(mode="after")
    def _cross_references(self) -> "TwinSpec":
        for label, items in (
            ("state_variables", self.state_variables),
            ("interventions", self.interventions),
            ("outcomes", self.outcomes),
        ):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{label} names must be unique, repeated: {dupes}")
        state_names = {v.name for v in self.state_variables}
        for iv in self.interventions:
            unknown = [a for a in iv.affects if a not in state_names]
            if unknown:
                raise ValueError(
                    f"intervention {iv.name!r} affects {unknown}, which are not state variables; "
                    f"choose from {sorted(state_names)}"
                )
        seen: dict[int, str] = {}
        for v in self.state_variables:
            for cid in v.concept_ids:
                if cid in seen:
                    raise ValueError(f"measurement concept {cid} is claimed by both {seen[cid]!r} and {v.name!r}")
                seen[cid] = v.name
        return self

    @property
    def state_names(self) -> list[str]:
        return [v.name for v in self.state_variables]

    @property
    def intervention_names(self) -> list[str]:
        return [i.name for i in self.interventions]

    @property
    def outcome_names(self) -> list[str]:
        return [o.name for o in self.outcomes]
