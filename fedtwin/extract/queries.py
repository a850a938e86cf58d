"""Set-based queries for one chunk of persons: binned measurements, drug exposures, outcomes.

Unit conversion, plausibility filtering, binning and averaging all run in the database; every
concept id, factor and bound is a bound parameter, never text spliced into SQL.
"""

from __future__ import annotations

from sqlalchemy import Select, and_, case, func, literal, or_, select
from sqlalchemy.sql.expression import ColumnElement

from fedtwin.extract.cohort import index_query
from fedtwin.omop.time_sql import event_epoch, floor_int
from fedtwin.omop.schema import cdm_table
from fedtwin.spec import TwinSpec


def _chunk_index(spec: TwinSpec, lo: int, hi: int):
    q = index_query(spec)
    person_col = q.selected_columns.person_id
    return q.where(and_(person_col >= lo, person_col <= hi)).subquery("idx")


def _converted_value(spec: TwinSpec, m) -> tuple[ColumnElement, ColumnElement]:  # noqa: ANN001
    """(variable index, value in canonical units) for accepted concept/unit pairs, else NULL."""
    unit = func.coalesce(m.c.unit_concept_id, 0)
    var_whens, val_whens, plausible = [], [], []
    for i, var in enumerate(spec.state_variables):
        lo, hi = var.plausible_range
        for u in var.units:
            cond = and_(m.c.measurement_concept_id.in_(var.concept_ids), unit == u.concept_id)
            converted = m.c.value_as_number * literal(u.factor) + literal(u.offset)
            var_whens.append((cond, literal(i)))
            val_whens.append((cond, converted))
            plausible.append(and_(cond, converted >= lo, converted <= hi))
    return case(*var_whens, else_=None), case(*val_whens, else_=None), or_(*plausible)


def measurement_bins(spec: TwinSpec, lo: int, hi: int) -> Select:
    """``(person_id, var, bin, mean, n)`` for plausible, unit-known measurements in the window."""
    m = cdm_table("measurement")
    idx = _chunk_index(spec, lo, hi)
    step = spec.time.step_seconds
    total = step * spec.time.total_steps
    rel = event_epoch(m.c.measurement_datetime, m.c.measurement_date) - idx.c.index_epoch
    var, value, plausible = _converted_value(spec, m)
    ids = [cid for v in spec.state_variables for cid in v.concept_ids]
    bin_ = floor_int(rel / step)
    inner = (
        select(m.c.person_id.label("person_id"), var.label("var"), bin_.label("bin"), value.label("value"))
        .select_from(m.join(idx, idx.c.person_id == m.c.person_id))
        .where(
            m.c.person_id >= lo,
            m.c.person_id <= hi,
            m.c.measurement_concept_id.in_(ids),
            m.c.value_as_number.is_not(None),
            rel >= 0,
            rel < total,
            plausible,
        )
        .subquery("binned")
    )
    return select(
        inner.c.person_id, inner.c.var, inner.c.bin, func.avg(inner.c.value), func.count()
    ).group_by(inner.c.person_id, inner.c.var, inner.c.bin)


def drug_rows(spec: TwinSpec, lo: int, hi: int) -> Select:
    """``(person_id, intervention, start_rel, end_rel, quantity, unit)`` overlapping the window.

    Start and end are seconds from the index time. Drug rows are few next to measurements; how
    an infusion spreads over bins is computed with numpy from these intervals.
    """
    d = cdm_table("drug_exposure")
    idx = _chunk_index(spec, lo, hi)
    total = spec.time.step_seconds * spec.time.total_steps
    which = case(
        *[(d.c.drug_concept_id.in_(iv.concept_ids), literal(i)) for i, iv in enumerate(spec.interventions)], else_=None
    )
    start = event_epoch(d.c.drug_exposure_start_datetime, d.c.drug_exposure_start_date) - idx.c.index_epoch
    end = event_epoch(d.c.drug_exposure_end_datetime, d.c.drug_exposure_end_date) - idx.c.index_epoch
    ids = [cid for iv in spec.interventions for cid in iv.concept_ids]
    return (
        select(d.c.person_id, which, start, func.coalesce(end, start), d.c.quantity, d.c.dose_unit_source_value)
        .select_from(d.join(idx, idx.c.person_id == d.c.person_id))
        .where(
            d.c.person_id >= lo,
            d.c.person_id <= hi,
            d.c.drug_concept_id.in_(ids),
            start < total,
            func.coalesce(end, start) >= 0,
        )
    )


def death_times(spec: TwinSpec, lo: int, hi: int) -> Select:
    """``(person_id, seconds from index to death)`` for persons of the chunk who died."""
    de = cdm_table("death")
    idx = _chunk_index(spec, lo, hi)
    rel = event_epoch(de.c.death_datetime, de.c.death_date) - idx.c.index_epoch
    return (
        select(de.c.person_id, func.min(rel))
        .select_from(de.join(idx, idx.c.person_id == de.c.person_id))
        .where(de.c.person_id >= lo, de.c.person_id <= hi)
        .group_by(de.c.person_id)
    )


def condition_times(spec: TwinSpec, concept_ids: list[int], lo: int, hi: int) -> Select:
    """``(person_id, seconds from index to the first occurrence at or after the prediction time)``."""
    co = cdm_table("condition_occurrence")
    idx = _chunk_index(spec, lo, hi)
    rel = event_epoch(co.c.condition_start_datetime, co.c.condition_start_date) - idx.c.index_epoch
    pred = spec.time.step_seconds * spec.time.history_steps
    return (
        select(co.c.person_id, func.min(rel))
        .select_from(co.join(idx, idx.c.person_id == co.c.person_id))
        .where(co.c.person_id >= lo, co.c.person_id <= hi, co.c.condition_concept_id.in_(concept_ids), rel >= pred)
        .group_by(co.c.person_id)
    )
