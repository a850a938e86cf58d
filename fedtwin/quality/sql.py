"""Interval checks for the data-quality gate, on top of :mod:`fedtwin.omop.time_sql`."""

from __future__ import annotations

from sqlalchemy.sql.expression import ColumnElement, and_, or_

from fedtwin.omop.time_sql import day_of, epoch_seconds


def ends_before_start(
    start_date: ColumnElement, start_dt: ColumnElement, end_date: ColumnElement, end_dt: ColumnElement
) -> ColumnElement:
    """True when an interval ends before it starts: datetimes compared when both are recorded,
    else calendar days (so an end date equal to a start datetime's day is not a violation)."""
    both = and_(start_dt.is_not(None), end_dt.is_not(None))
    return or_(
        and_(both, epoch_seconds(end_dt) < epoch_seconds(start_dt)),
        and_(~both, day_of(end_date) < day_of(start_date)),
    )
