"""Injected data defects, counted exactly, so the data-quality gate can be tested against them.

Defects are *added* measurement rows, copies of randomly chosen clean rows with one thing
wrong; the clean rows stay untouched, so the ground truth of the clean data remains valid and
extraction is unaffected (implausible values are filtered, orphans have no person, rows moved
before the observation period fall outside every cohort window; duplicates only raise a bin's
reading count). Each kind matches a check of ``fedtwin.quality``:

- ``implausible_value``: the value times 1000 (a unit slip) or negated (a sign error), so that
  converted to the canonical unit it leaves the spec's plausible range;
- ``duplicate_row``: an exact copy (same person, concept, date, datetime, value and unit) under
  a new measurement_id;
- ``orphan_row``: the row with a person_id that is not in ``person``;
- ``outside_observation_period``: the row moved 1-365 days before its person's observation
  period starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtwin.synth import concepts as C
from fedtwin.synth.population import DAY, PERSON_ID_STRIDE
from fedtwin.synth.profiles import SiteProfile
from fedtwin.synth.records import NULL_INT, Table

DEFECT_KINDS: tuple[str, ...] = ("implausible_value", "duplicate_row", "orphan_row", "outside_observation_period")
ORPHAN_OFFSET = 900_000  # orphan person_ids are site * stride + 900000 + k: never a real person


@dataclass
class DefectReport:
    """What was injected at one site (recorded in its ground-truth manifest)."""

    rate: float
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in DEFECT_KINDS})
    implausible_by_variable: dict[str, int] = field(default_factory=dict)
    measurement_ids: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "rate_per_kind": self.rate,
            "counts": dict(self.counts),
            "implausible_by_variable": dict(self.implausible_by_variable),
            "table": "measurement",
        }


def inject_defects(
    measurement: Table, profile: SiteProfile, person_ids: np.ndarray, period_start: np.ndarray,
    rng: np.random.Generator,
) -> tuple[Table, DefectReport]:
    """Append ``round(profile.defect_rate * clean rows)`` defect rows of each kind."""
    report = DefectReport(rate=profile.defect_rate)
    n_clean = len(measurement)
    per_kind = int(round(profile.defect_rate * n_clean))
    if per_kind == 0 or n_clean == 0:
        report.measurement_ids = {k: np.zeros(0, np.int64) for k in DEFECT_KINDS}
        return measurement, report
    per_kind = min(per_kind, n_clean // len(DEFECT_KINDS))
    # Distinct source rows for every defect, so no two defect rows can coincide.
    chosen = rng.choice(n_clean, size=per_kind * len(DEFECT_KINDS), replace=False)
    chosen = chosen.reshape(len(DEFECT_KINDS), per_kind)
    next_id = int(measurement.data["measurement_id"].max()) + 1
    out = measurement
    for kind, src in zip(DEFECT_KINDS, chosen):
        src = np.sort(src)
        rows = measurement.select(src)
        data = rows.data
        if kind == "implausible_value":
            slip = rng.random(per_kind) < 0.5
            data["value_as_number"] = np.where(slip, data["value_as_number"] * 1000.0, -data["value_as_number"])
            concept = data["measurement_concept_id"]
            report.implausible_by_variable = {
                v.name: int((concept == v.concept_id).sum()) for v in C.STATE_VARIABLES if (concept == v.concept_id).any()
            }
        elif kind == "orphan_row":
            data["person_id"] = profile.site * PERSON_ID_STRIDE + ORPHAN_OFFSET + np.arange(per_kind)
            data["visit_occurrence_id"] = np.full(per_kind, NULL_INT, dtype=np.int64)
        elif kind == "outside_observation_period":
            pos = np.searchsorted(person_ids, data["person_id"])
            days_before = rng.integers(1, 366, per_kind)
            when = data["measurement_datetime"]
            moved = period_start[pos] - days_before * DAY + np.mod(when, DAY)
            data["measurement_date"] = moved
            data["measurement_datetime"] = moved
            data["visit_occurrence_id"] = np.full(per_kind, NULL_INT, dtype=np.int64)
        ids = np.arange(next_id, next_id + per_kind, dtype=np.int64)
        data["measurement_id"] = ids
        next_id += per_kind
        report.counts[kind] = per_kind
        report.measurement_ids[kind] = ids
        out = out.concat(rows)
    return out, report
