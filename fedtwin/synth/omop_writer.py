"""Writing one synthetic site into its OMOP CDM database, all in one transaction.

The CDM schema (from omop-cdm, via :func:`fedtwin.omop.schema.create_cdm_schema`), the
vocabulary rows, ``cdm_source`` and the clinical tables are written inside a single
``OmopDatabase.begin(create=True)`` transaction through :func:`fedtwin.omop.bulk.bulk_insert`
(COPY on PostgreSQL, executemany on SQLite), so a failure leaves no half-written site. Nothing
but CDM tables ever goes into the database; the ground truth lives elsewhere.
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import Index, func, inspect, select
from sqlalchemy.engine import Connection

from fedtwin.errors import FedTwinError
from fedtwin.omop.bulk import bulk_insert
from fedtwin.omop.database import OmopDatabase
from fedtwin.omop.schema import cdm_table, create_cdm_schema
from fedtwin.synth import concepts as C
from fedtwin.synth.profiles import SiteProfile
from fedtwin.synth.records import Table

# Clinical tables in write order (vocabulary first, then persons, then their events).
CLINICAL_ORDER: tuple[str, ...] = (
    "person", "observation_period", "visit_occurrence", "condition_occurrence", "drug_exposure", "measurement", "death",
)


def person_rows(conn: Connection) -> int:
    """Rows in ``person`` (0 when the table does not exist): a site that has any is not overwritten."""
    translate = conn.get_execution_options().get("schema_translate_map") or {}
    if not inspect(conn).has_table("person", schema=translate.get("cdm_schema")):
        return 0
    return int(conn.execute(select(func.count()).select_from(cdm_table("person"))).scalar() or 0)


def _vocabulary(conn: Connection) -> dict[str, int]:
    n = {
        "concept": bulk_insert(
            conn, "concept",
            ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
             "concept_code", "valid_start_date", "valid_end_date"],
            [(*r, C.VALID_START, C.VALID_END) for r in C.concept_rows()],
        ),
        "vocabulary": bulk_insert(
            conn, "vocabulary",
            ["vocabulary_id", "vocabulary_name", "vocabulary_reference", "vocabulary_version", "vocabulary_concept_id"],
            C.vocabulary_rows(),
        ),
        "domain": bulk_insert(conn, "domain", ["domain_id", "domain_name", "domain_concept_id"], C.domain_rows()),
        "concept_class": bulk_insert(
            conn, "concept_class", ["concept_class_id", "concept_class_name", "concept_class_concept_id"], C.concept_class_rows()
        ),
    }
    return n


def _cdm_source(conn: Connection, profile: SiteProfile) -> int:
    release = f"{profile.start_year + 3}-01-01"  # after the last admission; fixed so reruns are identical
    return bulk_insert(
        conn, "cdm_source",
        ["cdm_source_name", "cdm_source_abbreviation", "cdm_holder", "source_description", "source_release_date",
         "cdm_release_date", "cdm_version", "cdm_version_concept_id", "vocabulary_version"],
        [(
            f"FedTwin synthetic hospital {profile.site}: {profile.name}",
            f"SYN{profile.site}",
            "FedTwin synthetic data (no real patients)",
            "ICU stays simulated by fedtwin.synth; see docs/synthetic-hospitals.md",
            release, release, "5.4", C.CDM_V54, C.VOCABULARY_VERSION,
        )],
    )


def write_site(
    db: OmopDatabase, profile: SiteProfile, tables: dict[str, Table], on_table: Callable[[str, int], None] | None = None,
    new_sqlite_file: bool = False,
) -> dict[str, int]:
    """Create the CDM schema and write every table of the site in one transaction.

    Returns rows written per table. Refuses (FedTwinError) a database whose ``person`` table
    already has rows, so an existing site is never mixed with a synthetic one.

    ``new_sqlite_file``: the file was created by this run (and is deleted if the run fails), so
    the load may use an in-memory rollback journal instead of WAL, which writes every page twice
    (WAL, then checkpoint). Rollback on error still works; only crash-safety of a file that would
    be deleted anyway is given up.
    """
    counts: dict[str, int] = {}
    pragmas = ("journal_mode=MEMORY", "temp_store=MEMORY", "cache_size=-200000") if new_sqlite_file else ()
    with db.begin(create=True, sqlite_pragmas=pragmas) as conn:
        existing = person_rows(conn)
        if existing:
            raise FedTwinError(
                f"{db.display_url} already holds an OMOP person table with rows; fedtwin synth writes only into empty databases",
                "drop that database (or its tables), or choose another --out / --db-url-template",
            )
        create_cdm_schema(conn)
        counts.update(_vocabulary(conn))
        counts["cdm_source"] = _cdm_source(conn, profile)
        for name in CLINICAL_ORDER:
            t = tables[name]
            deferred = _drop_indexes(conn, name) if name in DEFERRED_INDEX_TABLES else []
            counts[name] = bulk_insert(conn, name, t.columns, t.rows())
            for index in deferred:
                index.create(conn)
            if on_table:
                on_table(name, counts[name])
    return counts


# Tables loaded without their (omop-cdm) indexes, which are rebuilt once after the load: building
# an index over sorted data is several times faster than maintaining it row by row.
DEFERRED_INDEX_TABLES: frozenset[str] = frozenset({"measurement"})


def _drop_indexes(conn: Connection, name: str) -> list[Index]:
    """Drop the omop-cdm indexes of ``name`` (just created, still empty) and return them."""
    indexes = sorted(cdm_table(name).indexes, key=lambda i: i.name or "")
    for index in indexes:
        index.drop(conn)
    return indexes
