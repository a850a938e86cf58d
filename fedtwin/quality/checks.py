"""The data-quality checks: what each tests, its DQD category, default threshold and severity.

Modelled on OHDSI DataQualityDashboard (Kahn et al.'s conformance / completeness / plausibility
framework), restricted to what a twin spec reads. A check counts the rows (or persons, or concept
ids) that fail and the rows it looked at; it fails when the failing share exceeds its threshold
(``threshold_pct``, a maximum percentage, as in DQD), or, for the cohort size, when the count is
below a minimum. A *blocking* check that fails stops the site (status FAIL); a non-blocking one
only warns (status WARN). docs/data-quality.md documents every check listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Category = Literal["conformance", "completeness", "plausibility"]
Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True)
class CheckDef:
    """One kind of check. ``per`` says what it is repeated for (a variable, an intervention, a table)."""

    id: str
    category: Category
    table: str
    blocking: bool
    threshold_pct: float | None
    counts: Literal["rows", "persons", "concept ids"]
    per: Literal["spec", "table", "state variable", "intervention"]
    description: str
    fix: str


_DEFS = [
    # --- conformance -------------------------------------------------------------------------
    CheckDef(
        "concept_in_vocabulary", "conformance", "concept", True, 0.0, "concept ids", "spec",
        "concept ids the spec uses (measurements, units, visits, conditions, drugs, outcomes) "
        "that are absent from the concept table",
        "correct the concept id in the spec, or load the full OHDSI vocabulary (Athena) into the "
        "concept table; missing: {missing}",
    ),
    CheckDef(
        "measurement_unit_known", "conformance", "measurement", True, 5.0, "rows", "state variable",
        "measurement rows of {subject} whose unit_concept_id is not one of the spec's accepted units",
        "add the unit to state_variables {subject} units with the factor that converts it to "
        "the canonical unit, or map the unit in the ETL; unknown unit concept ids seen: {units}",
    ),
    CheckDef(
        "drug_dose_unit_known", "conformance", "drug_exposure", True, 5.0, "rows", "intervention",
        "drug_exposure rows of {subject} (a {kind}) whose dose_unit_source_value is missing or not "
        "a key of the spec's dose_units",
        "add the site's dose unit spelling to interventions {subject} dose_units with its factor, "
        "or fill dose_unit_source_value in the ETL",
    ),
    CheckDef(
        "person_exists", "conformance", "person", True, 5.0, "rows", "table",
        "{subject} rows the spec reads whose person_id is not in the person table (orphans)",
        "load the missing persons into person, or delete the orphan {subject} rows in the ETL",
    ),
    # --- completeness ------------------------------------------------------------------------
    CheckDef(
        "cohort_size", "completeness", "person", True, None, "persons", "spec",
        "persons with a qualifying anchor ({anchor}) at or above min_age; must be at least "
        "the spec's cohort.min_patients",
        "check the anchor concept ids and min_age of the spec against this site, or join the "
        "federation with a spec whose cohort this site has (cohort.min_patients is {min_patients})",
    ),
    CheckDef(
        "measurement_value_present", "completeness", "measurement", False, 5.0, "rows", "state variable",
        "measurement rows of {subject} with no value_as_number",
        "fill value_as_number in the ETL (values recorded as text belong in value_as_number once parsed)",
    ),
    CheckDef(
        "variable_recorded", "completeness", "measurement", False, 90.0, "persons", "state variable",
        "cohort persons with no {subject} measurement carrying a value",
        "check that {subject} is recorded at this site under the spec's concept ids; map local "
        "codes to them in the ETL",
    ),
    CheckDef(
        "drug_quantity_present", "completeness", "drug_exposure", False, 5.0, "rows", "intervention",
        "drug_exposure rows of {subject} (a {kind}) with no quantity",
        "fill drug_exposure.quantity in the ETL; a {kind} dose cannot be computed without it",
    ),
    CheckDef(
        "person_has_observation_period", "completeness", "observation_period", False, 0.0, "persons", "spec",
        "persons with no observation_period row",
        "build observation periods for every person in the ETL (OHDSI convention: one per "
        "continuous span of data)",
    ),
    # --- plausibility ------------------------------------------------------------------------
    CheckDef(
        "measurement_value_plausible", "plausibility", "measurement", True, 5.0, "rows", "state variable",
        "measurement rows of {subject} whose value, converted to the canonical unit, lies outside "
        "the spec's plausible_range",
        "check the unit mapping of {subject} (a wrong unit_concept_id shows as implausible values) "
        "and the spec's conversion factors and plausible_range",
    ),
    CheckDef(
        "measurement_duplicate", "plausibility", "measurement", False, 1.0, "rows", "table",
        "extra copies of measurement rows of the spec's concepts (same person, concept, date, "
        "datetime, value and unit recorded more than once)",
        "remove duplicate rows in the ETL (often a join that multiplies rows)",
    ),
    CheckDef(
        "measurement_in_observation_period", "plausibility", "measurement", False, 5.0, "rows", "table",
        "measurement rows of the spec's concepts (of known persons) dated outside every "
        "observation period of their person",
        "extend the observation periods in the ETL to cover the data, or correct the dates",
    ),
    CheckDef(
        "drug_in_observation_period", "plausibility", "drug_exposure", False, 5.0, "rows", "table",
        "drug_exposure rows of the spec's drugs (of known persons) starting outside every "
        "observation period of their person",
        "extend the observation periods in the ETL to cover the data, or correct the dates",
    ),
    CheckDef(
        "drug_quantity_not_negative", "plausibility", "drug_exposure", True, 5.0, "rows", "intervention",
        "drug_exposure rows of {subject} (a {kind}) with a negative quantity",
        "record cancellations and reversals by removing the original row, not as negative "
        "quantities, and correct sign errors in the ETL",
    ),
    CheckDef(
        "drug_start_before_end", "plausibility", "drug_exposure", True, 5.0, "rows", "table",
        "drug_exposure rows of the spec's drugs whose end is before their start",
        "correct the start and end dates (or datetimes) in the ETL; they may be swapped",
    ),
]

CHECKS: dict[str, CheckDef] = {d.id: d for d in _DEFS}


@dataclass
class CheckResult:
    """One executed check. ``failing``/``checked`` are EXACT counts and stay in memory: every
    rendering (rich table, JSON, error message) goes through suppression in :mod:`.report`.

    ``details`` holds only aggregates that are already privacy-safe (suppressed counts, concept
    ids, spec names). ``hide_checked`` is set by complementary suppression: a denominator that
    would let a suppressed one be recovered by subtraction from a shown total.
    """

    check: CheckDef
    subject: str | None
    table: str
    failing: int | None
    checked: int
    threshold_pct: float | None
    min_count: int | None
    description: str
    fix: str
    details: dict[str, Any] = field(default_factory=dict)
    hide_checked: bool = False

    @property
    def key(self) -> str:
        return self.check.id if self.subject is None else f"{self.check.id}.{self.subject}"

    @property
    def blocking(self) -> bool:
        return self.check.blocking

    @property
    def exceeded(self) -> bool:
        """Whether the threshold is crossed (decided on exact counts)."""
        if self.min_count is not None:
            return self.checked < self.min_count
        if not self.failing or not self.checked:
            return False
        assert self.threshold_pct is not None
        # failing / checked > threshold%, in integers-and-floats that never round a 0.5% away
        return self.failing * 100.0 > self.threshold_pct * self.checked

    @property
    def status(self) -> Status:
        if not self.exceeded:
            return "PASS"
        return "FAIL" if self.blocking else "WARN"
