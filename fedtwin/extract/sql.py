"""Dialect-portable SQL pieces for time arithmetic, so binning happens inside the database.

SQLite stores datetimes as text and PostgreSQL as timestamps; both reduce to "seconds since the
Unix epoch" here, and to an integer bin index, with one construct each.
"""

from __future__ import annotations

from sqlalchemy import Float, Integer
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement, func


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
    return "CAST(EXTRACT(EPOCH FROM %s) AS DOUBLE PRECISION)" % compiler.process(element.clauses, **kw)


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
