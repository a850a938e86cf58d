"""The cohort: who qualifies under the spec and each patient's index time, computed in SQL."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.engine import Connection

from fedtwin.omop.time_sql import SECONDS_PER_YEAR, birth_epoch, epoch_seconds, event_epoch
from fedtwin.omop.schema import cdm_table
from fedtwin.spec import TwinSpec

FEMALE, MALE = 8532, 8507
RACES = {8527: "white", 8516: "black", 8515: "asian", 8657: "american_indian", 8557: "pacific_islander"}
HISPANIC = 38003563


def index_query(spec: TwinSpec) -> Select:
    """``(person_id, index_epoch)``: one row per person, the first qualifying anchor event.

    With ``min_age`` the anchor is the first event at which the patient is old enough (the first
    ICU stay *as an adult*), not the first event ever followed by exclusion.
    """
    c = spec.cohort
    p = cdm_table("person")
    if c.anchor == "visit":
        t = cdm_table("visit_occurrence")
        when = event_epoch(t.c.visit_start_datetime, t.c.visit_start_date)
        where = [t.c.visit_concept_id.in_(c.visit_concept_ids)]
    elif c.anchor == "condition":
        t = cdm_table("condition_occurrence")
        when = event_epoch(t.c.condition_start_datetime, t.c.condition_start_date)
        where = [t.c.condition_concept_id.in_(c.condition_concept_ids)]
    elif c.anchor == "first_measurement":
        t = cdm_table("measurement")
        when = event_epoch(t.c.measurement_datetime, t.c.measurement_date)
        ids = [cid for v in spec.state_variables for cid in v.concept_ids]
        where = [t.c.measurement_concept_id.in_(ids), t.c.value_as_number.is_not(None)]
    else:
        t = cdm_table("observation_period")
        when = epoch_seconds(t.c.observation_period_start_date)
        where = []
    q = select(t.c.person_id, func.min(when).label("index_epoch"))
    if c.min_age is not None:
        q = q.select_from(t.join(p, p.c.person_id == t.c.person_id))
        where.append(when >= birth_epoch(p) + c.min_age * SECONDS_PER_YEAR)
    return q.where(*where).group_by(t.c.person_id)


@dataclass
class CohortIndex:
    """The qualifying persons, sorted by person_id, with what extraction needs per person."""

    person_ids: np.ndarray
    index_epoch: np.ndarray
    age: np.ndarray
    gender_concept_id: np.ndarray
    race_concept_id: np.ndarray
    ethnicity_concept_id: np.ndarray
    excluded_age: int
    excluded_no_person: int

    def __len__(self) -> int:
        return int(self.person_ids.shape[0])


def load_cohort_index(conn: Connection, spec: TwinSpec) -> CohortIndex:
    """Anchor events joined to ``person``; age limits applied. One row per person, so fetching
    it is cheap next to the measurement table, which never leaves the database unaggregated."""
    p = cdm_table("person")
    idx = index_query(spec).subquery("idx")
    rows = conn.execute(
        select(
            idx.c.person_id,
            idx.c.index_epoch,
            p.c.person_id.label("p_id"),
            epoch_seconds(p.c.birth_datetime).label("birth_epoch"),
            p.c.year_of_birth,
            p.c.month_of_birth,
            p.c.day_of_birth,
            p.c.gender_concept_id,
            p.c.race_concept_id,
            p.c.ethnicity_concept_id,
        )
        .select_from(idx.outerjoin(p, p.c.person_id == idx.c.person_id))
        .order_by(idx.c.person_id)
    ).all()
    n = len(rows)
    pid = np.fromiter((r[0] for r in rows), dtype=np.int64, count=n)
    index_epoch = np.fromiter((r[1] if r[1] is not None else np.nan for r in rows), dtype=np.float64, count=n)
    has_person = np.fromiter((r[2] is not None for r in rows), dtype=bool, count=n)
    birth = np.array([_birth_epoch(r[3], r[4], r[5], r[6]) for r in rows], dtype=np.float64)
    age = (index_epoch - birth) / SECONDS_PER_YEAR
    gender = np.array([r[7] or 0 for r in rows], dtype=np.int64)
    race = np.array([r[8] or 0 for r in rows], dtype=np.int64)
    eth = np.array([r[9] or 0 for r in rows], dtype=np.int64)
    keep = has_person & np.isfinite(index_epoch)
    age_ok = np.ones(n, dtype=bool)
    if spec.cohort.min_age is not None:
        age_ok &= age >= spec.cohort.min_age
    if spec.cohort.max_age is not None:
        age_ok &= age < spec.cohort.max_age
    age_ok &= np.isfinite(age) | (spec.cohort.min_age is None and spec.cohort.max_age is None)
    sel = keep & age_ok
    return CohortIndex(
        person_ids=pid[sel],
        index_epoch=index_epoch[sel],
        age=age[sel],
        gender_concept_id=gender[sel],
        race_concept_id=race[sel],
        ethnicity_concept_id=eth[sel],
        excluded_age=int((keep & ~age_ok).sum()),
        excluded_no_person=int((~has_person).sum()),
    )


def _birth_epoch(birth_epoch: float | None, year: int | None, month: int | None, day: int | None) -> float:
    """Birth time from birth_datetime, else year/month/day (mid-year when month is unknown)."""
    if birth_epoch is not None:
        return float(birth_epoch)
    if year is None:
        return np.nan
    import datetime as dt

    m = month if month and 1 <= month <= 12 else 7
    d = day if day and 1 <= day <= 28 else (1 if month else 1)
    return dt.datetime(int(year), m, d, tzinfo=dt.timezone.utc).timestamp()
