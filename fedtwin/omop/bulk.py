"""Bulk writes into CDM tables: PostgreSQL COPY, SQLite executemany. Never per-row ORM inserts.

Both the CSV loader and the synthetic hospitals write through :func:`bulk_insert`, inside the
caller's transaction, so a failure leaves nothing half-written.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from sqlalchemy.engine import Connection

from fedtwin.omop.schema import cdm_table

_BATCH = 50_000


def _qualified(conn: Connection, table: str, schema_key: str) -> str:
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    schema = translate.get(schema_key)
    prep = conn.dialect.identifier_preparer
    return (prep.quote_schema(schema) + "." if schema else "") + prep.quote(table)


def bulk_insert(conn: Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> int:
    """Insert ``rows`` (tuples in ``columns`` order) into CDM ``table``; returns the row count.

    Table and column names are checked against the omop-cdm model before they reach SQL, so no
    caller-supplied text is ever interpolated unchecked.
    """
    t = cdm_table(table)
    unknown = [c for c in columns if c not in t.c]
    if unknown:
        raise ValueError(f"{table} has no column(s) {unknown}")
    prep = conn.dialect.identifier_preparer
    target = _qualified(conn, table, str(t.schema))
    cols = ", ".join(prep.quote(c) for c in columns)
    n = 0
    if conn.dialect.name == "postgresql":
        raw = conn.connection.driver_connection  # psycopg 3 connection, same transaction
        with raw.cursor() as cur:
            with cur.copy(f"COPY {target} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    n += 1
        return n
    raw_cur = conn.connection.driver_connection.cursor()
    sql = f"INSERT INTO {target} ({cols}) VALUES ({', '.join('?' for _ in columns)})"
    batch: list[Sequence] = []
    try:
        for row in rows:
            batch.append(row)
            if len(batch) >= _BATCH:
                raw_cur.executemany(sql, batch)
                n += len(batch)
                batch.clear()
        if batch:
            raw_cur.executemany(sql, batch)
            n += len(batch)
    finally:
        raw_cur.close()
    return n


def analyze(conn: Connection, tables: Iterable[str]) -> None:
    """Refresh planner statistics after a bulk load.

    Without them PostgreSQL plans joins on a freshly loaded table as if it were empty (a nested
    loop over a million measurement rows took minutes); SQLite's ANALYZE helps its planner too.
    """
    for table in tables:
        t = cdm_table(table)
        conn.exec_driver_sql(f"ANALYZE {_qualified(conn, table, str(t.schema))}")
