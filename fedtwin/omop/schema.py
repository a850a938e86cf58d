"""The OMOP CDM tables, taken from the ``omop-cdm`` package rather than written by hand.

omop-cdm declares every table under the placeholder schemas ``cdm_schema`` and
``vocabulary_schema``; :mod:`fedtwin.omop.database` maps them with SQLAlchemy's
``schema_translate_map``. We add nothing to its definitions. Two deliberate choices:

- Foreign keys are *not* created (see :func:`create_cdm_schema`): real OMOP exports, Eunomia
  included, reference type/gender/race concepts absent from their vocabulary shard, and OHDSI's
  own DDL applies constraints as a separate, optional step. The data-quality gate reports orphans
  instead of the database refusing the load.
- ``cohort``/``cohort_definition`` are absent from omop-cdm's 5.4 model; FedTwin does not read them.
"""

from __future__ import annotations

from sqlalchemy import Table
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateTable

from omop_cdm.regular.cdm54 import Base as _Cdm54Base

# The tables FedTwin reads; the conformance test checks exactly these against the OHDSI spec.
FEDTWIN_TABLES: tuple[str, ...] = (
    "person",
    "observation_period",
    "visit_occurrence",
    "measurement",
    "drug_exposure",
    "condition_occurrence",
    "death",
    "concept",
)

_METADATA = _Cdm54Base.metadata


def cdm_tables() -> dict[str, Table]:
    """All CDM 5.4 tables by plain name (``measurement``, ``concept`` ...)."""
    # Sorted by name, not by foreign-key order: the vocabulary tables reference each other in a
    # cycle, and FedTwin creates no foreign keys anyway.
    return {t.name: t for t in sorted(_METADATA.tables.values(), key=lambda t: t.name)}


def cdm_table(name: str) -> Table:
    try:
        return cdm_tables()[name]
    except KeyError:
        raise KeyError(f"{name!r} is not an OMOP CDM 5.4 table") from None


def create_cdm_schema(conn: Connection, tables: list[str] | None = None) -> list[str]:
    """Create the CDM tables (all, or ``tables``) that do not exist yet, without foreign keys.

    Returns the names created. Indexes from omop-cdm are created too, so reads by person and
    concept are fast on both SQLite and PostgreSQL.
    """
    from sqlalchemy import inspect

    existing = set(inspect(conn).get_table_names(schema=_physical_schema(conn)))
    created = []
    for table in cdm_tables().values():
        if tables is not None and table.name not in tables:
            continue
        if table.name in existing:
            continue
        conn.execute(CreateTable(table, include_foreign_key_constraints=[]))
        for index in table.indexes:
            index.create(conn)
        created.append(table.name)
    return created


def _physical_schema(conn: Connection) -> str | None:
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    return translate.get("cdm_schema")
