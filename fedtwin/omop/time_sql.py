"""Dialect-portable SQL for time, so binning and date checks run inside the database.

SQLite stores dates and datetimes as text, PostgreSQL as DATE/TIMESTAMP. Both reduce here to
"seconds since the Unix epoch", a calendar day, or an integer bin index, one construct each.
"""

from __future__ import annotations

from sqlalchemy import Float, Integer, String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement, func

SECONDS_PER_YEAR = 365.25 * 86400.0


class epoch_seconds(FunctionElement):
    """Seconds since 1970-01-01 00:00 (naive datetimes read as UTC) of a DATE or DATETIME column."""

    type = Float()
    inherit_cache = True
    name = "epoch_seconds"


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element, compiler, **kw):  # noqa: ANN001 - SQLAlchemy compiler hook
    return "((julianday(%s) - 2440587.5) * 86400.0)" % compiler.process(element.clauses, **kw)


@compiles(epoch_seconds, "postgresql")
def _epoch_pg(element, compiler, **kw):  # noqa: ANN001
    return "CAST(EXTRACT(EPOCH FROM CAST(%s AS TIMESTAMP)) AS DOUBLE PRECISION)" % compiler.process(element.clauses, **kw)


class day_of(FunctionElement):
    """The calendar day of a DATE or DATETIME column, comparable with ``<`` on both dialects."""

    type = String()
    inherit_cache = True
    name = "day_of"


@compiles(day_of, "sqlite")
def _day_sqlite(element, compiler, **kw):  # noqa: ANN001
    # date() normalizes 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM:SS' and 'YYYY-MM-DDTHH:MM:SS' alike.
    return "date(%s)" % compiler.process(element.clauses, **kw)


@compiles(day_of, "postgresql")
def _day_pg(element, compiler, **kw):  # noqa: ANN001
    return "CAST(%s AS DATE)" % compiler.process(element.clauses, **kw)


class floor_int(FunctionElement):
    """floor(x) as an integer. Only used on x >= 0, where SQLite's CAST truncation equals floor."""

    type = Integer()
    inherit_cache = True
    name = "floor_int"


@compiles(floor_int, "sqlite")
def _floor_sqlite(element, compiler, **kw):  # noqa: ANN001
    return "CAST(%s AS INTEGER)" % compiler.process(element.clauses, **kw)


@compiles(floor_int, "postgresql")
def _floor_pg(element, compiler, **kw):  # noqa: ANN001
    return "CAST(FLOOR(%s) AS INTEGER)" % compiler.process(element.clauses, **kw)


def event_epoch(datetime_col: ColumnElement, date_col: ColumnElement) -> ColumnElement:
    """The event time: its datetime when recorded, else midnight of its date (OMOP convention)."""
    return func.coalesce(epoch_seconds(datetime_col), epoch_seconds(date_col))


def birth_epoch(person) -> ColumnElement:  # noqa: ANN001 - the person Table
    """Birth time: birth_datetime, else mid-year of year_of_birth (exact age is checked later)."""
    return func.coalesce(epoch_seconds(person.c.birth_datetime), (person.c.year_of_birth - 1970 + 0.5) * SECONDS_PER_YEAR)
