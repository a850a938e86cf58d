"""Connecting to a site's OMOP database, with errors that say what to do.

SQLite is the embedded default (a path or ``sqlite:///file.db``); PostgreSQL is the real site
database (``postgresql+psycopg://user@host:5432/db``). omop-cdm's placeholder schemas are
translated to the site's schemas here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import DatabaseError as SqlDatabaseError

from fedtwin.errors import DatabaseError
from fedtwin.omop.schema import FEDTWIN_TABLES, create_cdm_schema

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def normalize_url(url: str) -> str:
    """Accept a bare file path for SQLite; pick the psycopg 3 driver for plain postgresql URLs."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


@dataclass
class OmopDatabase:
    """A connection factory for one OMOP CDM database.

    ``cdm_schema``/``vocabulary_schema`` are the site's physical schemas (PostgreSQL); ``None``
    means the default (``public`` on PostgreSQL, the main database on SQLite).
    """

    url: str
    cdm_schema: str | None = None
    vocabulary_schema: str | None = None
    engine: Engine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = normalize_url(self.url)
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise DatabaseError(
                f"{self.url!r} is not a database URL",
                "use a SQLite path (site.db) or postgresql+psycopg://user@host:5432/dbname",
            ) from None
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise DatabaseError(
                f"database backend {parsed.get_backend_name()!r} is not supported",
                "FedTwin reads OMOP from SQLite or PostgreSQL",
            )
        translate = {"cdm_schema": self.cdm_schema, "vocabulary_schema": self.vocabulary_schema or self.cdm_schema}
        kwargs: dict = {}
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 10}
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(self.url, **kwargs).execution_options(schema_translate_map=translate)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def display_url(self) -> str:
        return redact(self.url)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection, with connection failures turned into an actionable error."""
        if self.is_sqlite:
            path = make_url(self.url).database
            if path and path != ":memory:" and not Path(path).exists():
                raise DatabaseError(
                    f"SQLite database {path} does not exist",
                    "check the path, or create one with `fedtwin synth` or `fedtwin omop load`",
                )
        try:
            conn = self.engine.connect()
            if self.is_sqlite:
                conn.exec_driver_sql("SELECT count(*) FROM sqlite_master")  # "file is not a database" shows here
                conn.rollback()  # end the probe's implicit transaction so callers can begin() their own
        except OperationalError as exc:
            raise DatabaseError(
                f"cannot connect to {self.display_url}: {str(exc.orig).strip().splitlines()[0]}",
                "check that the server is running and the host, port, user and database name are right",
            ) from None
        except SqlDatabaseError as exc:
            raise DatabaseError(
                f"{self.display_url} is not a SQLite database: {str(exc.orig).strip().splitlines()[0]}",
                "point --db at a SQLite OMOP database or a PostgreSQL URL",
            ) from None
        try:
            yield conn
        except DBAPIError as exc:
            if exc.connection_invalidated:  # the server went away or ended the session mid-read
                raise self.lost_connection(exc) from None
            raise
        finally:
            conn.close()

    def lost_connection(self, exc: DBAPIError) -> DatabaseError:
        """The error for a connection that died while in use (server restart, ``pg_terminate_backend``,
        a network cut): without it the driver's exception reaches the user as a traceback, and a
        federated site reports only "OperationalError". Only the driver's first line is kept:
        disconnect messages carry no data from the tables."""
        why = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        return DatabaseError(
            f"lost the connection to {self.display_url} in the middle of a query: {why[0] if why else type(exc).__name__}",
            "check that the database server is running and reachable (e.g. `pg_isready -h HOST -p PORT`) and that "
            "nothing ends the session (a server restart, pg_terminate_backend, a statement or idle timeout), then "
            "run again; nothing from the interrupted query is used (an interrupted write is rolled back)",
        )

    @contextmanager
    def begin(self, create: bool = False, sqlite_pragmas: tuple[str, ...] = ()) -> Iterator[Connection]:
        """A transaction: committed on success, rolled back (nothing half-written) on error.

        ``sqlite_pragmas`` run before the transaction opens (``journal_mode`` cannot change
        inside one); they are ignored on PostgreSQL.
        """
        if create and self.is_sqlite:
            path = make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).touch(exist_ok=True)
        with self.connect() as conn:
            with conn.begin():
                if self.is_sqlite:
                    for pragma in sqlite_pragmas:
                        conn.connection.driver_connection.execute(f"PRAGMA {pragma}")
                    # pysqlite opens its implicit transaction only before DML, so CREATE TABLE
                    # would autocommit; an explicit BEGIN puts DDL in the transaction too.
                    raw = conn.connection.driver_connection
                    if not raw.in_transaction:
                        raw.execute("BEGIN")
                yield conn

    def table_names(self) -> set[str]:
        with self.connect() as conn:
            return set(inspect(conn).get_table_names(schema=self.cdm_schema))

    def column_names(self, table: str) -> set[str]:
        with self.connect() as conn:
            return {c["name"] for c in inspect(conn).get_columns(table, schema=self.cdm_schema)}

    def require_tables(self, tables: tuple[str, ...] = FEDTWIN_TABLES) -> None:
        """Refuse, naming what is missing, a database that is not an OMOP CDM."""
        present = self.table_names()
        missing = [t for t in tables if t not in present]
        if missing:
            hint = (
                "this does not look like an OMOP CDM database (no person/measurement tables)"
                if {"person", "measurement"} & set(missing) == {"person", "measurement"}
                else "the OMOP CDM is incomplete"
            )
            raise DatabaseError(
                f"{self.display_url}: {hint}; missing tables: {', '.join(missing)}",
                "load an OMOP CDM export with `fedtwin omop load`, or point --db at the site's CDM schema",
            )

    def create_schema(self, tables: list[str] | None = None) -> list[str]:
        with self.begin(create=True) as conn:
            return create_cdm_schema(conn, tables)

    def ping(self) -> None:
        with self.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI objects are untyped
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def open_database(url: str, cdm_schema: str | None = None, vocabulary_schema: str | None = None) -> OmopDatabase:
    """Open an OMOP database by URL (or SQLite path). Does not connect yet."""
    try:
        return OmopDatabase(url, cdm_schema=cdm_schema, vocabulary_schema=vocabulary_schema)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot open {redact(url)}: {exc}", "check the database URL") from None
