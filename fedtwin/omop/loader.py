"""Load an OMOP CDM CSV export (folder, .zip, .csv / .csv.gz files) into SQLite or PostgreSQL.

What :func:`load_omop_csv` does, in ONE transaction (any failure leaves nothing written):

1. finds the table files of the source (:mod:`fedtwin.omop.csv_source`); files that are not CDM
   5.4 tables are reported and skipped;
2. creates the CDM 5.4 tables that do not exist yet (omop-cdm's definitions, no foreign keys);
3. refuses tables that already hold rows, unless ``mode`` is ``"append"`` or ``"replace"``;
4. streams every file row by row, parsing each value by its omop-cdm column type (an empty field
   is NULL), and writes in bulk through :func:`fedtwin.omop.bulk.bulk_insert` (COPY on
   PostgreSQL, executemany on SQLite). Columns are matched by name, case-insensitively, so a CDM
   5.3 export loads into the 5.4 tables where names agree; the rest is reported;
5. checks, with set-based SQL, which concepts referenced by the tables FedTwin reads are absent
   from ``concept`` (Eunomia ships only a vocabulary shard).

The result is a :class:`LoadReport`. Row counts of ``person`` and ``death`` are person counts and
are shown through :func:`fedtwin.privacy.suppression.suppress_count` in everything printed.
"""

from __future__ import annotations

import math
import re
import sqlite3
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Iterator, Literal

from sqlalchemy import BigInteger, Column, Date, DateTime, Integer, Numeric, String, exists, func, inspect, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex, CreateSchema, DropIndex

from fedtwin.errors import DatabaseError, FedTwinError
from fedtwin.omop.bulk import analyze, bulk_insert
from fedtwin.omop.csv_source import SourceError, SourceFile, open_source, read_csv
from fedtwin.omop.database import OmopDatabase, open_database
from fedtwin.omop.schema import FEDTWIN_TABLES, cdm_table, cdm_tables, create_cdm_schema
from fedtwin.privacy.suppression import suppress_count

Mode = Literal["fail", "append", "replace"]
OnDuplicate = Literal["skip", "fail"]

CDM_VERSION = "5.4"
# Tables with one row per person: their row counts are person counts, suppressed when shown.
PERSON_COUNT_TABLES = frozenset({"person", "death"})
# The clinical tables FedTwin reads, whose *_concept_id columns are checked against `concept`.
CONCEPT_CHECK_TABLES: tuple[str, ...] = tuple(t for t in FEDTWIN_TABLES if t != "concept")
# CDM 5.4 tables that omop-cdm 0.7.0 does not model (FedTwin does not read them).
_NOT_MODELLED = frozenset({"cohort", "cohort_definition"})
# Tables of CDM 5.3 that 5.4 dropped.
_CDM53_ONLY = frozenset({"cohort_attribute", "attribute_definition"})
# SQLite page cache for the load connection (negative = KiB): 256 MiB, so index B-trees stay in memory.
_SQLITE_LOAD_CACHE_KIB = -262144
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


class LoadError(FedTwinError):
    """A value or file of the export cannot be loaded; nothing was written."""


# --------------------------------------------------------------------------------------- report


@dataclass
class TableLoad:
    """One file loaded into one table."""

    table: str
    file: str
    rows: int = 0
    extra_columns: list[str] = field(default_factory=list)  # in the file, not in the table: not loaded
    missing_columns: list[str] = field(default_factory=list)  # in the table, not in the file: NULL
    filled_columns: list[str] = field(default_factory=list)  # required *_concept_id absent: set to 0
    duplicate_rows: int = 0  # rows repeating the primary key of an earlier row: not loaded
    duplicate_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def shown_rows(self) -> int | str:
        """The row count as it may be printed (person counts suppressed)."""
        return suppress_count(self.rows) if self.table in PERSON_COUNT_TABLES else self.rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = self.shown_rows
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class MissingConcepts:
    """Distinct non-zero concept ids in ``table.column`` that are not in ``concept``."""

    table: str
    column: str
    missing: int
    referenced: int  # distinct non-zero ids in the column
    examples: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SkippedFile:
    file: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadReport:
    source: str
    database: str
    cdm_schema: str | None
    mode: str
    cdm_version: str | None = None  # as written in cdm_source.cdm_version
    tables: list[TableLoad] = field(default_factory=list)
    skipped_files: list[SkippedFile] = field(default_factory=list)
    tables_without_file: list[str] = field(default_factory=list)
    tables_created: list[str] = field(default_factory=list)
    concepts_in_vocabulary: int = 0
    missing_concepts: list[MissingConcepts] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cdm_version_detected(self) -> str | None:
        """``"5.4"``, ``"5.3"`` ... from ``cdm_version``; None when the export has no cdm_source row."""
        return _major_minor(self.cdm_version)

    @property
    def version_mismatch(self) -> bool:
        return self.cdm_version_detected is not None and self.cdm_version_detected != CDM_VERSION

    def rows(self, table: str) -> int:
        """Rows loaded into ``table`` (raw; print :attr:`TableLoad.shown_rows` instead for people)."""
        return sum(t.rows for t in self.tables if t.table == table)

    def missing_concept(self, table: str, column: str) -> MissingConcepts | None:
        return next((m for m in self.missing_concepts if (m.table, m.column) == (table, column)), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "database": self.database,
            "cdm_schema": self.cdm_schema,
            "mode": self.mode,
            "cdm_version": self.cdm_version,
            "cdm_version_detected": self.cdm_version_detected,
            "cdm_version_expected": CDM_VERSION,
            "version_mismatch": self.version_mismatch,
            "tables": [t.to_dict() for t in self.tables],
            "skipped_files": [s.to_dict() for s in self.skipped_files],
            "tables_without_file": list(self.tables_without_file),
            "tables_created": list(self.tables_created),
            "concepts_in_vocabulary": self.concepts_in_vocabulary,
            "missing_concepts": [m.to_dict() for m in self.missing_concepts],
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }


def _major_minor(version: str | None) -> str | None:
    if not version:
        return None
    m = re.search(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else None


# ------------------------------------------------------------------------------- value parsing


def _parse_int(s: str, lo: int, hi: int) -> int:
    try:
        v = int(s)
    except ValueError:
        try:
            f = float(s)  # "8507.0", as pandas and R write integer columns
        except ValueError:
            raise ValueError("is not an integer") from None
        if not f.is_integer():
            raise ValueError("is not an integer") from None
        v = int(f)
    if not lo <= v <= hi:
        raise ValueError(f"is out of range for this column ({lo}..{hi})")
    return v


def _parse_decimal(s: str) -> Decimal:
    try:
        v = Decimal(s)
    except InvalidOperation:
        raise ValueError("is not a number") from None
    if not v.is_finite():
        raise ValueError("is not a finite number")
    return v


def _parse_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise ValueError("is not a number") from None
    if not math.isfinite(v):
        raise ValueError("is not a finite number")
    return v


def _parse_datetime(s: str) -> datetime:
    """``2013-05-17``, ``1998-04-09 00:00:00``, ``1963-12-31T00:00:00Z`` (offsets -> naive UTC)."""
    try:
        v = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError("is not a date-time (expected YYYY-MM-DD[ HH:MM:SS[.ffffff]][Z|+HH:MM])") from None
    if v.tzinfo is not None:
        v = v.astimezone(timezone.utc).replace(tzinfo=None)
    return v


def _parse_date(s: str) -> date:
    """``2013-05-17`` or ``20130517``; a date-time (``2013-05-17 00:00:00``) gives its date."""
    try:
        return date.fromisoformat(s)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(s).date()
    except ValueError:
        raise ValueError("is not a date (expected YYYY-MM-DD)") from None


def _converter(col: Column, dialect: Any) -> Callable[[str], Any]:
    """A function from the CSV text to the value bound for ``col`` ('' -> None; ValueError if bad).

    The common cases (a plain integer, a ``YYYY-MM-DD`` date) take a fast path: this runs once per
    value, millions of times for a vocabulary.
    """
    typ = col.type
    bind = typ.dialect_impl(dialect).bind_processor(dialect)
    parse: Callable[[str], Any]
    if isinstance(typ, Integer):
        lo, hi = _INT64 if isinstance(typ, BigInteger) else _INT32

        def conv_int(s: str) -> int | None:
            try:
                v = int(s)
            except ValueError:
                s = s.strip()
                if not s:
                    return None
                return _parse_int(s, lo, hi)
            if lo <= v <= hi:
                return v
            raise ValueError(f"is out of range for this column ({lo}..{hi})")

        return conv_int
    if isinstance(typ, String):
        length = typ.length

        def conv_str(s: str) -> str | None:
            if s == "":
                return None
            if length is not None and len(s) > length:
                raise ValueError(f"is {len(s)} characters long; the column allows {length}")
            return s

        return conv_str
    if isinstance(typ, Date) and dialect.name == "sqlite":
        # SQLAlchemy stores a SQLite DATE as the text YYYY-MM-DD: a valid such value is kept as is.
        def conv_sqlite_date(s: str) -> str | None:
            if len(s) == 10 and s[4] == "-" and s[7] == "-":
                try:
                    date.fromisoformat(s)
                except ValueError:
                    raise ValueError("is not a date (expected YYYY-MM-DD)") from None
                return s
            s = s.strip()
            return bind(_parse_date(s)) if s else None  # type: ignore[misc]

        return conv_sqlite_date
    if isinstance(typ, Numeric):
        # PostgreSQL NUMERIC keeps Decimal exactly; SQLite stores REAL (its bind processor floats it).
        parse = _parse_decimal if dialect.name == "postgresql" else _parse_float
    elif isinstance(typ, DateTime):
        parse = _parse_datetime
    elif isinstance(typ, Date):
        parse = _parse_date
    else:  # pragma: no cover - omop-cdm uses only the types above
        raise TypeError(f"{col.table.name}.{col.name}: unsupported column type {typ!r}")

    if bind is None:

        def conv(s: str) -> Any:
            s = s.strip()
            return parse(s) if s else None

    else:

        def conv(s: str) -> Any:
            s = s.strip()
            return bind(parse(s)) if s else None

    return conv


def _show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


# ------------------------------------------------------------------------------ source layout


@dataclass
class _Plan:
    tables: dict[str, SourceFile]
    skipped: list[SkippedFile]


def _plan(files: list[SourceFile], source: str) -> _Plan:
    known = cdm_tables()
    tables: dict[str, SourceFile] = {}
    skipped: list[SkippedFile] = []
    for f in files:
        if not f.is_data:
            skipped.append(SkippedFile(f.name, "not a CSV file"))
        elif f.stem in known:
            if f.stem in tables:
                raise SourceError(
                    f"two files in {source} are the same CDM table {f.stem}: {tables[f.stem].name} and {f.name}",
                    "keep one file per table",
                )
            tables[f.stem] = f
        elif f.stem in _NOT_MODELLED:
            skipped.append(SkippedFile(f.name, f"{f.stem} is a CDM 5.4 table that omop-cdm does not model; FedTwin does not read it"))
        elif f.stem in _CDM53_ONLY:
            skipped.append(SkippedFile(f.name, f"{f.stem} is a CDM 5.3 table that CDM 5.4 dropped"))
        else:
            skipped.append(SkippedFile(f.name, "not an OMOP CDM 5.4 table name"))
    if not tables:
        names = ", ".join(f.name for f in files[:8]) + (" ..." if len(files) > 8 else "")
        raise SourceError(
            f"no OMOP CDM table files in {source}" + (f" (found: {names})" if files else " (it is empty)"),
            "the source must hold files named after CDM tables: PERSON.csv, measurement.csv.gz ...",
        )
    return _Plan(tables, skipped)


# ------------------------------------------------------------------------------------ the load


def load_omop_csv(
    source: str | Path,
    db: OmopDatabase | str,
    *,
    cdm_schema: str | None = None,
    mode: Mode = "fail",
    on_duplicate: OnDuplicate = "skip",
    encoding: str = "utf-8-sig",
    concept_examples: int = 5,
    progress: Callable[[str], None] | None = None,
) -> LoadReport:
    """Load the OMOP CSV export ``source`` into ``db`` in one transaction; return the report.

    ``mode``: ``"fail"`` (default) refuses when a table the export has a file for already holds
    rows; ``"append"`` adds the rows; ``"replace"`` deletes that table's rows first (in the same
    transaction, so a failed load restores them). Tables without a file are never touched.
    ``on_duplicate``: a file row repeating the primary key of an earlier row of the file (the
    GiBleed OBSERVATION.csv has six) is skipped and reported (``"skip"``, default) or fails the
    load (``"fail"``). Raises :class:`FedTwinError` (nothing written) on any problem.
    """
    if mode not in ("fail", "append", "replace"):
        raise ValueError(f"mode must be fail, append or replace, not {mode!r}")
    if on_duplicate not in ("skip", "fail"):
        raise ValueError(f"on_duplicate must be skip or fail, not {on_duplicate!r}")
    if isinstance(db, str):
        db = open_database(db, cdm_schema=cdm_schema)
    elif cdm_schema is not None and cdm_schema != db.cdm_schema:
        raise ValueError("pass cdm_schema to open_database, or the same value to both")
    if db.is_sqlite and db.cdm_schema not in (None, "main"):
        raise DatabaseError(
            f"--cdm-schema {db.cdm_schema!r} is for PostgreSQL; a SQLite database has a single schema",
            "leave --cdm-schema out for SQLite",
        )
    say = progress or (lambda _msg: None)
    t_start = perf_counter()
    source_text = str(source)
    report = LoadReport(source=source_text, database=db.display_url, cdm_schema=db.cdm_schema, mode=mode)

    with open_source(source) as files:
        plan = _plan(files, source_text)
        report.skipped_files = plan.skipped
        report.tables_without_file = [t for t in cdm_tables() if t not in plan.tables]
        sqlite_file = _sqlite_file(db)
        created_file = sqlite_file is not None and not sqlite_file.exists()
        if sqlite_file is not None and sqlite_file.exists() and sqlite_file.is_dir():
            raise DatabaseError(f"--db {sqlite_file} is a directory", "pass a SQLite file path, e.g. site.db")
        try:
            with _transaction(db) as conn:
                _load_all(conn, db, plan, report, mode, on_duplicate, encoding, concept_examples, say)
        except BaseException:
            if created_file:
                _remove_sqlite(db, sqlite_file)  # type: ignore[arg-type]
            raise
    report.seconds = perf_counter() - t_start
    return report


def _sqlite_file(db: OmopDatabase) -> Path | None:
    if not db.is_sqlite:
        return None
    path = make_url(db.url).database
    return Path(path) if path and path != ":memory:" else None


def _remove_sqlite(db: OmopDatabase, path: Path) -> None:
    """Delete the SQLite file this load created, so a failed load leaves nothing behind."""
    db.dispose()
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def _transaction(db: OmopDatabase) -> Iterator[Connection]:
    """``db.begin(create=True)``, with the DDL inside the transaction on SQLite too, and database
    errors (unreachable server, a file that is not a database) turned into :class:`DatabaseError`."""
    try:
        with db.begin(create=True) as conn:  # DDL included: a failed load leaves no empty tables
            yield conn
    except FedTwinError:
        raise
    except Exception as exc:
        if _is_db_error(exc):
            raise _db_error(db, exc) from None
        raise


def _is_db_error(exc: BaseException) -> bool:
    if isinstance(exc, (SQLAlchemyError, sqlite3.Error)):
        return True
    try:
        import psycopg

        return isinstance(exc, psycopg.Error)
    except ImportError:  # pragma: no cover
        return False


def _db_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    return "; ".join(lines[:3]) or type(exc).__name__


def _db_error(db: OmopDatabase, exc: BaseException) -> DatabaseError:
    msg = _db_message(exc)
    if "file is not a database" in msg:
        return DatabaseError(
            f"{db.display_url} is not a SQLite database ({msg})",
            "pass --db a SQLite database file, or a path where a new one can be created",
        )
    return DatabaseError(
        f"loading into {db.display_url} failed: {msg}",
        "check the database URL, that the server is running, and that the user may create tables",
    )


def _load_all(
    conn: Connection,
    db: OmopDatabase,
    plan: _Plan,
    report: LoadReport,
    mode: Mode,
    on_duplicate: OnDuplicate,
    encoding: str,
    concept_examples: int,
    say: Callable[[str], None],
) -> None:
    if db.cdm_schema and not db.is_sqlite:
        conn.execute(CreateSchema(db.cdm_schema, if_not_exists=True))
    existing = set(inspect(conn).get_table_names(schema=db.cdm_schema))
    _check_existing_layout(conn, db, existing & set(plan.tables))
    report.tables_created = create_cdm_schema(conn)
    _check_rows_present(conn, db, plan, mode)

    # Bulk-load practice: the indexes of tables created by this load are built after their rows
    # are in (same definitions, same transaction), which is several times faster than updating
    # them row by row. Indexes of pre-existing tables are left alone.
    deferred = [ix for t in report.tables_created if t in plan.tables for ix in cdm_table(t).indexes]
    for ix in deferred:
        conn.execute(DropIndex(ix))
    previous_cache = None
    if db.is_sqlite:
        previous_cache = conn.exec_driver_sql("PRAGMA cache_size").scalar()
        conn.exec_driver_sql(f"PRAGMA cache_size={_SQLITE_LOAD_CACHE_KIB}")
    try:
        for table in sorted(plan.tables):
            file = plan.tables[table]
            say(f"loading {file.name} -> {table}")
            report.tables.append(_load_file(conn, db, table, file, encoding, on_duplicate))
        if deferred:
            say(f"building {len(deferred)} indexes")
        for ix in deferred:
            conn.execute(CreateIndex(ix))
    finally:
        if previous_cache is not None:
            conn.exec_driver_sql(f"PRAGMA cache_size={int(previous_cache)}")

    analyze(conn, plan.tables)
    _detect_version(conn, plan, report)
    _warn(report, plan)
    report.concepts_in_vocabulary = conn.execute(select(func.count()).select_from(cdm_table("concept"))).scalar_one()
    say("checking concept ids against the concept table")
    report.missing_concepts = _missing_concepts(conn, concept_examples)
    if report.concepts_in_vocabulary == 0:
        report.warnings.append(
            "the concept table is empty, so every referenced concept is reported missing: "
            "load the vocabulary (CONCEPT.csv, e.g. from OHDSI Athena) too"
        )


def _where(db: OmopDatabase) -> str:
    return db.display_url + (f" (schema {db.cdm_schema})" if db.cdm_schema else "")


def _check_existing_layout(conn: Connection, db: OmopDatabase, tables: set[str]) -> None:
    """A pre-existing table we write into must have every column of the CDM 5.4 table."""
    insp = inspect(conn)
    for name in sorted(tables):
        have = {c["name"].lower() for c in insp.get_columns(name, schema=db.cdm_schema)}
        lacking = [c.name for c in cdm_table(name).c if c.name not in have]
        if lacking:
            raise DatabaseError(
                f"{_where(db)}: table {name} exists but is not the OMOP CDM 5.4 {name} table "
                f"(it has no column {', '.join(lacking[:6])}{' ...' if len(lacking) > 6 else ''})",
                "load into a new database or schema (--db / --cdm-schema), or migrate that table to CDM 5.4",
            )


def _check_rows_present(conn: Connection, db: OmopDatabase, plan: _Plan, mode: Mode) -> None:
    full = [t for t in sorted(plan.tables) if conn.execute(select(exists().select_from(cdm_table(t)))).scalar()]
    if not full:
        return
    if mode == "fail":
        raise LoadError(
            f"{_where(db)} already has rows in {', '.join(full)}; nothing was loaded",
            "load into a new database, or pass --replace (delete those tables' rows first) "
            "or --append (add to them)",
        )
    if mode == "replace":
        for t in full:
            conn.execute(cdm_table(t).delete())


class _DuplicateKey(Exception):
    """A primary key repeated within the file (or already in the table): handled by the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _is_unique_violation(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc)
    try:
        import psycopg.errors

        return isinstance(exc, psycopg.errors.UniqueViolation)
    except ImportError:  # pragma: no cover
        return False


def _load_file(
    conn: Connection, db: OmopDatabase, table: str, file: SourceFile, encoding: str, on_duplicate: OnDuplicate
) -> TableLoad:
    """Load one file. A file whose primary keys repeat is rolled back to a savepoint and, with
    ``on_duplicate="skip"``, read a second time keeping the first row of each key (the key set is
    held in memory only on that second pass, only for that file)."""
    try:
        with conn.begin_nested():
            return _load_file_once(conn, table, file, encoding, dedup=False)
    except _DuplicateKey as dup:
        if on_duplicate == "fail":
            raise LoadError(
                f"loading {file.name} into {table} failed: {dup.message}",
                "the file repeats a primary key, or the table already holds these rows; fix the export, "
                "or pass --on-duplicate-key skip to keep the first row of each key",
            ) from None
    try:
        return _load_file_once(conn, table, file, encoding, dedup=True)
    except _DuplicateKey as dup:  # the keys are unique within the file: they clash with existing rows
        raise LoadError(
            f"loading {file.name} into {table} failed: {dup.message}",
            "the table already holds rows with these keys (--append adds to existing rows): "
            "use --replace, or a new database",
        ) from None


def _load_file_once(conn: Connection, table: str, file: SourceFile, encoding: str, dedup: bool) -> TableLoad:
    t0 = perf_counter()
    model = cdm_table(table)
    with read_csv(file, encoding) as stream:
        header = [h.strip().strip('"').lower() for h in stream.header]
        seen: set[str] = set()
        for h in header:
            if h in seen and h:
                raise LoadError(f"{file.name}: column {h} appears twice in the header", "fix the file's header")
            seen.add(h)
        present = [c for c in model.c if c.name in seen]
        missing = [c for c in model.c if c.name not in seen]
        extra = [h for h in header if h and h not in model.c]
        filled = [c.name for c in missing if not c.nullable and c.name.endswith("_concept_id")]
        fatal = [c.name for c in missing if not c.nullable and not c.name.endswith("_concept_id")]
        result = TableLoad(
            table=table,
            file=file.name,
            extra_columns=extra,
            missing_columns=[c.name for c in missing],
            filled_columns=filled,
        )
        index = {h: i for i, h in enumerate(header)}
        plan = [(index[c.name], _converter(c, conn.dialect), c.name) for c in present]
        columns = [c.name for c in present] + filled
        key = [columns.index(c.name) for c in model.primary_key if c.name in columns] if dedup else None
        rows = _rows(stream.records, plan, len(header), len(filled), file.name, table, fatal, key, result)
        if not columns:
            for _ in rows:  # raises on the first row: required columns are missing
                pass
            result.seconds = perf_counter() - t0
            return result
        try:
            result.rows = bulk_insert(conn, table, columns, rows)
        except FedTwinError:
            raise
        except Exception as exc:
            if not _is_db_error(exc):
                raise
            if _is_unique_violation(exc):
                raise _DuplicateKey(_db_message(exc)) from None
            raise LoadError(
                f"loading {file.name} into {table} failed: {_db_message(exc)}",
                "check the file; the whole load was rolled back",
            ) from None
    result.seconds = perf_counter() - t0
    return result


def _rows(
    records: Iterator[tuple[int, int, list[str]]],
    plan: list[tuple[int, Callable[[str], Any], str]],
    width: int,
    n_filled: int,
    file: str,
    table: str,
    fatal_missing: list[str],
    key: list[int] | None,
    result: TableLoad,
) -> Iterator[list[Any]]:
    """Parsed rows of one file; with ``key`` (positions of the primary key), later repeats of a key
    are dropped and counted in ``result``."""
    pairs = [(i, conv) for i, conv, _ in plan]
    fill = [0] * n_filled
    keys: set[tuple] = set()
    names = [name for _, _, name in plan]
    for recno, line, fields in records:
        if not pairs and not fill:
            raise LoadError(
                f"{file} has rows but none of the columns of the CDM table {table}",
                "check the file's header (column names must be the CDM 5.4 names)",
            )
        if fatal_missing:
            raise LoadError(
                f"{file} has no column {', '.join(fatal_missing)}, which CDM 5.4 requires in {table}",
                "add the column to the export (this load wrote nothing)",
            )
        if len(fields) != width:
            raise LoadError(
                f"{file} row {recno} (line {line}) has {len(fields)} fields but the header has {width}",
                "fix the row (unquoted delimiter or a truncated line?); nothing was written",
            )
        try:
            row = [conv(fields[i]) for i, conv in pairs]
        except (ValueError, ArithmeticError, TypeError):
            for i, conv, name in plan:
                try:
                    conv(fields[i])
                except (ValueError, ArithmeticError, TypeError) as exc:
                    raise LoadError(
                        f"{file} row {recno} (line {line}), column {name}: value {_show(fields[i])} {exc}",
                        f"fix that value ({table}.{name} is {cdm_table(table).c[name].type}); nothing was written",
                    ) from None
            raise  # pragma: no cover - the loop above always finds the culprit
        if fill:
            row.extend(fill)
        if key is not None:
            k = tuple(row[i] for i in key)
            if k in keys:
                result.duplicate_rows += 1
                if len(result.duplicate_examples) < 5:
                    shown = ", ".join(f"{(names + ['?'] * n_filled)[i]}={v}" for i, v in zip(key, k))
                    result.duplicate_examples.append(f"row {recno} (line {line}): {shown}")
                continue
            keys.add(k)
        yield row


def _detect_version(conn: Connection, plan: _Plan, report: LoadReport) -> None:
    if "cdm_source" not in plan.tables:
        return
    t = cdm_table("cdm_source")
    versions = sorted({v for (v,) in conn.execute(select(t.c.cdm_version).distinct()) if v})
    report.cdm_version = ", ".join(versions) if versions else None


def _warn(report: LoadReport, plan: _Plan) -> None:
    w = report.warnings
    if report.cdm_version is None:
        w.append("CDM version unknown (no cdm_source row with cdm_version); loaded as CDM 5.4 by column name")
    elif report.version_mismatch:
        extra = sum(len(t.extra_columns) for t in report.tables)
        w.append(
            f"the export is CDM {report.cdm_version} but FedTwin's tables are CDM {CDM_VERSION}: loaded by "
            f"column name; {extra} column(s) with no 5.4 counterpart of that name were not loaded "
            "(see extra_columns; some were renamed in 5.4, e.g. admitting_source_concept_id -> admitted_from_concept_id)"
        )
    for t in report.tables:
        if t.duplicate_rows:
            w.append(
                f"{t.file}: {t.duplicate_rows} row(s) repeat the primary key of an earlier row and were not loaded "
                f"(e.g. {t.duplicate_examples[0]})"
            )
        for c in t.filled_columns:
            if t.rows:
                w.append(f"{t.table}.{c} is required by CDM 5.4 but absent from {t.file}: set to 0 (no matching concept)")
    absent = [t for t in CONCEPT_CHECK_TABLES if t not in plan.tables]
    if absent:
        w.append(f"no file for {', '.join(absent)}, which FedTwin reads: those tables are empty")


def _missing_concepts(conn: Connection, examples: int) -> list[MissingConcepts]:
    """Per *_concept_id column of the tables FedTwin reads: distinct ids absent from ``concept``."""
    concept = cdm_table("concept")
    out = []
    for name in CONCEPT_CHECK_TABLES:
        t = cdm_table(name)
        for col in t.c:
            if not col.name.endswith("_concept_id"):
                continue
            nonzero = (col.is_not(None), col != 0)
            referenced = conn.execute(select(func.count(col.distinct())).where(*nonzero)).scalar_one()
            if not referenced:
                continue
            absent = select(col.label("concept_id")).where(
                *nonzero, ~exists().where(concept.c.concept_id == col)
            ).distinct()
            n = conn.execute(select(func.count()).select_from(absent.subquery())).scalar_one()
            if n:
                ids = conn.execute(absent.order_by(col).limit(examples)).scalars().all()
                out.append(MissingConcepts(name, col.name, n, referenced, [int(i) for i in ids]))
    return out
