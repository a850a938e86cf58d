"""Loading OMOP CSV exports: the real Eunomia datasets into real SQLite and PostgreSQL, and bad input."""

from __future__ import annotations

import gzip
import json
import sqlite3
import zipfile
from datetime import date, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from conftest import shared_path
from fedtwin.errors import DatabaseError, FedTwinError
from fedtwin.omop.csv_source import SourceError
from fedtwin.omop.database import OmopDatabase
from fedtwin.omop.loader import LoadError, LoadReport, load_omop_csv
from fedtwin.omop.schema import cdm_table, cdm_tables

# Row counts from shared/omop/eunomia/Synthea27Nj/README.md (all 39 tables; cohort and
# cohort_definition are not modelled by omop-cdm and are reported as skipped files).
SYNTHEA_ROWS = {
    "concept_relationship": 266_588,
    "measurement": 10_040,
    "observation": 8_099,
    "concept": 2_294,
    "visit_detail": 1_791,
    "visit_occurrence": 1_791,
    "procedure_occurrence": 1_649,
    "drug_exposure": 883,
    "condition_occurrence": 470,
    "condition_era": 469,
    "provider": 67,
    "observation_period": 28,
    "person": 28,
    "death": 3,
    "cdm_source": 1,
    "device_exposure": 1,
    "vocabulary": 1,
    **dict.fromkeys(
        "care_site concept_ancestor concept_class concept_synonym cost domain dose_era drug_era "
        "drug_strength episode episode_event fact_relationship location metadata note note_nlp "
        "payer_plan_period relationship source_to_concept_map specimen".split(),
        0,
    ),
}

# Row counts from shared/omop/eunomia/GiBleed/README.md for the tables present in the partial copy.
# OBSERVATION.csv has 1,477 rows, six of which repeat an observation_id (an upstream data error):
# 1,471 are loaded and the six are reported.
GIBLEED_ROWS = {
    "condition_era": 65_719,
    "concept_ancestor": 65_690,
    "drug_era": 52_508,
    "procedure_occurrence": 37_409,
    "observation_period": 5_343,
    "person": 2_694,
    "observation": 1_471,
    "concept_synonym": 1_064,
    "visit_occurrence": 1_037,
    "relationship": 480,
    "concept": 444,
    "vocabulary": 125,
    "domain": 45,
    "concept_relationship": 8,
    "cdm_source": 1,
    **dict.fromkeys(
        "care_site concept_class cost death device_exposure dose_era drug_strength fact_relationship "
        "location metadata note note_nlp payer_plan_period provider source_to_concept_map specimen "
        "visit_detail".split(),
        0,
    ),
}
GIBLEED_ABSENT = ("condition_occurrence", "drug_exposure", "measurement")


def synthea_zip() -> Path:
    return shared_path("omop", "eunomia", "Synthea27Nj", "Synthea27Nj_5.4.zip")


def gibleed_csv() -> Path:
    return shared_path("omop", "eunomia", "GiBleed", "csv")


def counts(url: str, tables, schema: str | None = None) -> dict[str, int]:
    db = OmopDatabase(url, cdm_schema=schema)
    try:
        with db.connect() as conn:
            return {t: conn.execute(select(func.count()).select_from(cdm_table(t))).scalar_one() for t in tables}
    finally:
        db.dispose()


def sqlite_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


PERSON_HEADER = "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id,birth_datetime\n"
CONCEPT_CSV = (
    "concept_id,concept_name,domain_id,vocabulary_id,concept_class_id,standard_concept,concept_code,"
    "valid_start_date,valid_end_date,invalid_reason\n"
    '8507,MALE,Gender,Gender,Gender,S,M,1970-01-01,2099-12-31,""\n'
    "3004249,Systolic blood pressure,Measurement,LOINC,Clinical Observation,S,8480-6,1970-01-01,2099-12-31,\n"
)


# ------------------------------------------------------------------------------ Synthea27Nj


@pytest.fixture(scope="module")
def synthea_sqlite(tmp_path_factory) -> tuple[str, LoadReport]:
    url = str(tmp_path_factory.mktemp("synthea") / "synthea.db")
    return url, load_omop_csv(synthea_zip(), url)


def test_synthea_sqlite_row_counts_match_the_readme(synthea_sqlite):
    url, report = synthea_sqlite
    assert counts(url, SYNTHEA_ROWS) == SYNTHEA_ROWS
    assert {t.table: t.rows for t in report.tables} == SYNTHEA_ROWS
    assert set(SYNTHEA_ROWS) == set(cdm_tables())  # a file for every table omop-cdm models
    assert report.tables_without_file == []


def test_synthea_sqlite_loads_well_under_a_minute(synthea_sqlite):
    _, report = synthea_sqlite
    assert report.seconds < 60, f"Synthea27Nj took {report.seconds:.1f} s to load into SQLite"


def test_synthea_report(synthea_sqlite):
    _, report = synthea_sqlite
    assert report.cdm_version == "5.4" and report.cdm_version_detected == "5.4" and not report.version_mismatch
    assert {s.file for s in report.skipped_files} == {"COHORT.csv", "COHORT_DEFINITION.csv"}  # __MACOSX/ ignored
    assert all(not t.extra_columns and not t.missing_columns and not t.duplicate_rows for t in report.tables)
    assert report.concepts_in_vocabulary == 2_294
    assert report.warnings == []

    gender = report.missing_concept("person", "gender_concept_id")
    assert gender is not None and gender.missing == 2 and gender.examples == [8507, 8532]
    assert 8527 in report.missing_concept("person", "race_concept_id").examples
    for table, column, concept in [
        ("measurement", "measurement_type_concept_id", 38000267),
        ("drug_exposure", "drug_type_concept_id", 32869),
        ("visit_occurrence", "visit_type_concept_id", 44818517),
    ]:
        assert report.missing_concept(table, column).examples == [concept]
    # The shard holds every measurement, drug and condition concept the data use.
    for table, column in [
        ("measurement", "measurement_concept_id"),
        ("drug_exposure", "drug_concept_id"),
        ("condition_occurrence", "condition_concept_id"),
    ]:
        assert report.missing_concept(table, column) is None

    d = json.loads(json.dumps(report.to_dict()))
    shown = {t["table"]: t["rows"] for t in d["tables"]}
    assert shown["person"] == 28 and shown["measurement"] == 10_040
    assert shown["death"] == "<10"  # 3 persons died: a person count below the threshold is suppressed
    assert d["cdm_version_detected"] == "5.4" and d["version_mismatch"] is False


def test_synthea_values_are_parsed_by_column_type(synthea_sqlite):
    url, _ = synthea_sqlite
    db = OmopDatabase(url)
    m, p, c = cdm_table("measurement"), cdm_table("person"), cdm_table("concept")
    with db.connect() as conn:
        row = conn.execute(select(m).where(m.c.measurement_id == 1)).one()
        person = conn.execute(select(p).where(p.c.person_id == 1)).one()
        non_standard = conn.execute(select(func.count()).where(c.c.standard_concept.is_(None))).scalar_one()
        empty_strings = conn.execute(select(func.count()).where(c.c.standard_concept == "")).scalar_one()
    db.dispose()
    assert row.measurement_date == date(2013, 5, 17)
    assert row.measurement_datetime == datetime(2013, 5, 17)
    assert float(row.value_as_number) == 48.1 and row.range_low is None and row.unit_source_value == "kg"
    assert person.birth_datetime == datetime(1998, 4, 9) and person.gender_concept_id == 8507
    assert person.location_id is None  # empty field -> NULL
    assert non_standard > 0 and empty_strings == 0  # CONCEPT.csv writes "" for non-standard concepts


@pytest.mark.postgres
def test_synthea_postgres(pg_url):
    report = load_omop_csv(synthea_zip(), pg_url)
    assert counts(pg_url, SYNTHEA_ROWS) == SYNTHEA_ROWS
    assert report.missing_concept("person", "gender_concept_id").examples == [8507, 8532]
    assert report.missing_concept("measurement", "measurement_type_concept_id").examples == [38000267]
    assert report.seconds < 60
    db = OmopDatabase(pg_url)
    m = cdm_table("measurement")
    with db.connect() as conn:
        row = conn.execute(select(m).where(m.c.measurement_id == 1)).one()
    db.dispose()
    assert row.measurement_datetime == datetime(2013, 5, 17) and str(row.value_as_number) == "48.1"


# ----------------------------------------------------------------------------------- GiBleed


def check_gibleed_report(report: LoadReport) -> None:
    assert report.cdm_version == "v5.3.1" and report.cdm_version_detected == "5.3" and report.version_mismatch
    assert any("CDM v5.3.1" in w for w in report.warnings)
    assert set(GIBLEED_ABSENT) <= set(report.tables_without_file)
    assert any("measurement" in w and "which FedTwin reads" in w for w in report.warnings)
    assert {s.file for s in report.skipped_files} == {"COHORT.csv.gz", "COHORT_ATTRIBUTE.csv.gz"}
    by_table = {t.table: t for t in report.tables}
    assert by_table["person"].file == "PERSON.csv.gz"
    visit = by_table["visit_occurrence"]
    assert "admitting_source_concept_id" in visit.extra_columns  # CDM 5.3 name
    assert "admitted_from_concept_id" in visit.missing_columns  # its CDM 5.4 name
    assert by_table["cdm_source"].filled_columns == ["cdm_version_concept_id"]
    obs = by_table["observation"]
    assert obs.duplicate_rows == 6 and obs.rows == 1_471
    assert obs.duplicate_examples[0].startswith("row 577 (line 578): observation_id=1836")
    race = report.missing_concept("person", "race_concept_id")
    assert race is not None and 8527 in race.examples and race.missing == race.referenced
    assert report.missing_concept("observation_period", "period_type_concept_id").examples == [44814724]
    assert report.missing_concept("person", "gender_concept_id") is None  # 8507/8532 are in this shard


def test_gibleed_sqlite(tmp_path):
    url = str(tmp_path / "gibleed.db")
    report = load_omop_csv(gibleed_csv(), url)
    assert counts(url, GIBLEED_ROWS) == GIBLEED_ROWS
    assert counts(url, GIBLEED_ABSENT) == dict.fromkeys(GIBLEED_ABSENT, 0)  # created, empty
    check_gibleed_report(report)
    db = OmopDatabase(url)
    p, s = cdm_table("person"), cdm_table("cdm_source")
    with db.connect() as conn:
        birth = conn.execute(select(p.c.birth_datetime).where(p.c.person_id == 6)).scalar_one()
        version_concept = conn.execute(select(s.c.cdm_version_concept_id)).scalar_one()
    db.dispose()
    assert birth == datetime(1963, 12, 31)  # '1963-12-31T00:00:00Z'
    assert version_concept == 0


@pytest.mark.postgres
def test_gibleed_postgres_in_a_schema(pg_url):
    report = load_omop_csv(gibleed_csv(), pg_url, cdm_schema="cdm")
    assert counts(pg_url, GIBLEED_ROWS, schema="cdm") == GIBLEED_ROWS
    check_gibleed_report(report)
    assert OmopDatabase(pg_url).table_names() == set()  # nothing in public


# ------------------------------------------------------------------------- existing rows


def test_refuses_tables_with_rows_then_replace_and_append(tmp_path):
    src = tmp_path / "src"
    write(src, "person.csv", PERSON_HEADER + "1,8507,1970,0,0,\n2,8532,1980,0,0,\n")
    url = str(tmp_path / "site.db")
    load_omop_csv(src, url)
    with pytest.raises(LoadError, match=r"already has rows in person.*nothing was loaded") as exc:
        load_omop_csv(src, url)
    assert "--replace" in exc.value.fix
    assert load_omop_csv(src, url, mode="replace").rows("person") == 2
    assert counts(url, ["person"]) == {"person": 2}
    # --append of the same keys clashes with the rows already there: refused, rolled back.
    with pytest.raises(LoadError, match="person"):
        load_omop_csv(src, url, mode="append")
    write(src, "person.csv", PERSON_HEADER + "3,8507,1990,0,0,\n")
    load_omop_csv(src, url, mode="append")
    assert counts(url, ["person"]) == {"person": 3}


def test_duplicate_keys_skip_or_fail(tmp_path):
    src = tmp_path / "src"
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n2,8532,1980,0,0,\n1,8532,1999,0,0,\n")
    with pytest.raises(LoadError, match=r"PERSON\.csv") as exc:
        load_omop_csv(src, str(tmp_path / "a.db"), on_duplicate="fail")
    assert "--on-duplicate-key skip" in exc.value.fix
    assert not (tmp_path / "a.db").exists()
    report = load_omop_csv(src, str(tmp_path / "b.db"))
    person = report.tables[0]
    assert person.rows == 2 and person.duplicate_rows == 1
    assert person.duplicate_examples == ["row 3 (line 4): person_id=1"]


# ------------------------------------------------------------------------------ formats


def test_file_name_case_gzip_zip_macosx_and_formats(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # lower-case file, upper-case header, gzipped, three datetime styles, a UTC offset
    with gzip.open(src / "person.csv.gz", "wt", encoding="utf-8", newline="") as f:
        f.write(PERSON_HEADER.upper())
        f.write("1,8507,1998,0,0,1998-04-09 00:00:00\n2,8532,1963,0,0,1963-12-31T00:00:00Z\n")
        f.write("3,8532,1970,0,0,1970-01-01\n4,8507,1971,0,0,1971-06-01T12:30:00+02:00\n5,8507,1972,0,0,\n")
    # Athena vocabulary download: tab-separated, unquoted, YYYYMMDD dates
    write(src, "CONCEPT.csv", "concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\t"
          "concept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason\n"
          '8507\tMALE "M"\tGender\tGender\tGender\tS\tM\t19700101\t20991231\t\n')
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(src / "person.csv.gz", "export/person.csv.gz")
        z.write(src / "CONCEPT.csv", "export/CONCEPT.csv")
        z.writestr("__MACOSX/export/._person.csv.gz", b"\x00\x05\x16\x07 resource fork")
        z.writestr("export/README.txt", "not data")
    url = str(tmp_path / "z.db")
    report = load_omop_csv(archive, url)
    assert report.rows("person") == 5 and report.rows("concept") == 1
    assert [s.file for s in report.skipped_files] == ["export/README.txt"]
    assert report.missing_concept("person", "gender_concept_id").examples == [8532]
    db = OmopDatabase(url)
    p, c = cdm_table("person"), cdm_table("concept")
    with db.connect() as conn:
        births = dict(conn.execute(select(p.c.person_id, p.c.birth_datetime)).all())
        concept = conn.execute(select(c)).one()
    db.dispose()
    assert births == {
        1: datetime(1998, 4, 9),
        2: datetime(1963, 12, 31),
        3: datetime(1970, 1, 1),
        4: datetime(1971, 6, 1, 10, 30),  # converted to UTC
        5: None,
    }
    assert concept.concept_name == 'MALE "M"' and concept.valid_start_date == date(1970, 1, 1)
    assert concept.invalid_reason is None


# --------------------------------------------------------------------------- bad input


def test_missing_source_path(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_omop_csv(tmp_path / "nowhere.zip", str(tmp_path / "x.db"))
    assert not (tmp_path / "x.db").exists()


def test_zip_without_cdm_files(tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("README.txt", "hello")
        z.writestr("patients.csv", "id,name\n1,x\n")
        z.writestr("__MACOSX/._PERSON.csv", "fork")
    with pytest.raises(SourceError, match=r"no OMOP CDM table files in .*notes\.zip \(found: README\.txt, patients\.csv\)"):
        load_omop_csv(archive, str(tmp_path / "x.db"))
    assert not (tmp_path / "x.db").exists()


def test_not_a_zip_or_csv(tmp_path):
    f = write(tmp_path, "export.xlsx", "binary")
    with pytest.raises(SourceError, match="neither a folder"):
        load_omop_csv(f, str(tmp_path / "x.db"))


@pytest.mark.parametrize(
    "person_rows, row, column, message",
    [
        ("1,8507,1970,0,0,\n2,8532,abc,0,0,\n", 2, "year_of_birth", "value 'abc' is not an integer"),
        ("1,8507,1970,0,0,1970-13-01\n", 1, "birth_datetime", "value '1970-13-01' is not a date-time"),
        ("1,8507,1970,0,0,\n2,8532,1980,0,0,\n3,99999999999,1980,0,0,\n", 3, "gender_concept_id", "out of range"),
        ("1,8507,1970,0,0,\n2,8532,1.5,0,0,\n", 2, "year_of_birth", "value '1.5' is not an integer"),
    ],
)
def test_bad_value_names_file_row_column_and_value_and_writes_nothing(tmp_path, person_rows, row, column, message):
    src = tmp_path / "src"
    write(src, "CONCEPT.csv", CONCEPT_CSV)  # loaded before PERSON.csv, then rolled back
    write(src, "PERSON.csv", PERSON_HEADER + person_rows)
    db_path = tmp_path / "site.db"
    with pytest.raises(LoadError) as exc:
        load_omop_csv(src, str(db_path))
    assert f"PERSON.csv row {row} (line {row + 1}), column {column}: " in exc.value.problem
    assert message in exc.value.problem
    assert not db_path.exists()  # the load created the file: removed again


def test_bad_value_in_an_existing_database_leaves_it_as_it_was(tmp_path):
    url = str(tmp_path / "site.db")
    good = tmp_path / "good"
    write(good, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n")
    load_omop_csv(good, url)
    bad = tmp_path / "bad"
    write(bad, "CONCEPT.csv", CONCEPT_CSV)
    write(bad, "MEASUREMENT.csv", "measurement_id,person_id,measurement_concept_id,measurement_date,"
          "measurement_type_concept_id,value_as_number\n1,1,3004249,2020-01-01,32817,120\n2,1,3004249,2020-01-02,32817,high\n")
    write(bad, "PERSON.csv", PERSON_HEADER + "7,8507,1970,0,0,\n")
    with pytest.raises(LoadError, match=r"MEASUREMENT\.csv row 2 \(line 3\), column value_as_number: value 'high' is not a number"):
        load_omop_csv(bad, url, mode="replace")
    assert counts(url, ["person", "concept", "measurement"]) == {"person": 1, "concept": 0, "measurement": 0}
    db = OmopDatabase(url)
    with db.connect() as conn:
        assert conn.execute(select(cdm_table("person").c.person_id)).scalars().all() == [1]
    db.dispose()


def test_too_long_string_and_ragged_row(tmp_path):
    src = tmp_path / "src"
    write(src, "PERSON.csv", "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id,"
          "gender_source_value\n1,8507,1970,0,0," + "M" * 51 + "\n")
    with pytest.raises(LoadError, match="column gender_source_value: value 'MMMM.* is 51 characters long; the column allows 50"):
        load_omop_csv(src, str(tmp_path / "a.db"))
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n2,8532,1980\n")
    with pytest.raises(LoadError, match=r"PERSON\.csv row 2 \(line 3\) has 3 fields but the header has 6"):
        load_omop_csv(src, str(tmp_path / "b.db"))


def test_required_column_absent(tmp_path):
    src = tmp_path / "src"
    write(src, "PERSON.csv", "gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n8507,1970,0,0\n")
    with pytest.raises(LoadError, match=r"PERSON\.csv has no column person_id, which CDM 5.4 requires in person"):
        load_omop_csv(src, str(tmp_path / "a.db"))
    # A header-only file without it is fine: there is nothing to load.
    write(src, "PERSON.csv", "gender_concept_id,year_of_birth\n")
    report = load_omop_csv(src, str(tmp_path / "b.db"))
    assert report.tables[0].rows == 0 and "person_id" in report.tables[0].missing_columns


def test_unreadable_file(tmp_path):
    src = tmp_path / "src"
    write(src, "CONCEPT.csv", CONCEPT_CSV)
    (src / "PERSON.csv.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(SourceError, match=r"cannot read PERSON\.csv\.gz"):
        load_omop_csv(src, str(tmp_path / "a.db"))
    assert not (tmp_path / "a.db").exists()
    (src / "PERSON.csv.gz").unlink()
    (src / "PERSON.csv").write_bytes(PERSON_HEADER.encode() + b"1,8507,1970,0,0,\n" + "2,8532,1980,0,0,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"cannot read PERSON\.csv") as exc:
        load_omop_csv(src, str(tmp_path / "a.db"))
    assert "--encoding" in exc.value.fix


def test_unreachable_postgres(tmp_path):
    src = tmp_path / "src"
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n")
    with pytest.raises(DatabaseError, match=r"cannot connect to postgresql\+psycopg://postgres@127\.0\.0\.1:1/"):
        load_omop_csv(src, "postgresql://postgres@127.0.0.1:1/postgres")


def test_target_is_not_a_sqlite_database(tmp_path):
    src = tmp_path / "src"
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n")
    junk = tmp_path / "notes.txt"
    junk.write_text("these are my notes, not a database\n" * 200)
    with pytest.raises(DatabaseError, match="is not a SQLite database"):
        load_omop_csv(src, str(junk))
    assert junk.read_text() == "these are my notes, not a database\n" * 200


def test_target_is_a_non_omop_sqlite_database(tmp_path):
    src = tmp_path / "src"
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n")
    app_db = tmp_path / "app.db"
    with sqlite3.connect(app_db) as c:
        c.execute("CREATE TABLE person (id INTEGER PRIMARY KEY, name TEXT)")
        c.execute("INSERT INTO person VALUES (1, 'Ada')")
    with pytest.raises(DatabaseError, match="table person exists but is not the OMOP CDM 5.4 person table"):
        load_omop_csv(src, str(app_db))
    assert sqlite_tables(app_db) == {"person"}  # no CDM table was created
    with sqlite3.connect(app_db) as c:
        assert c.execute("SELECT * FROM person").fetchall() == [(1, "Ada")]


@pytest.mark.postgres
def test_postgres_bad_value_writes_nothing(pg_url, tmp_path):
    OmopDatabase(pg_url).create_schema()
    src = tmp_path / "src"
    write(src, "CONCEPT.csv", CONCEPT_CSV)
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n2,8532,19x0,0,0,\n")
    with pytest.raises(LoadError, match=r"PERSON\.csv row 2 \(line 3\), column year_of_birth: value '19x0'"):
        load_omop_csv(src, pg_url)
    assert counts(pg_url, ["concept", "person"]) == {"concept": 0, "person": 0}
    # and a failure inside PostgreSQL itself (COPY) is reported with the file too
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,1970,0,0,\n1,8532,1980,0,0,\n")
    with pytest.raises(LoadError, match=r"loading PERSON\.csv into person failed: .*person_id"):
        load_omop_csv(src, pg_url, on_duplicate="fail")
    assert counts(pg_url, ["concept", "person"]) == {"concept": 0, "person": 0}


def test_cdm_schema_on_sqlite_is_refused(tmp_path):
    src = tmp_path / "src"
    write(src, "PERSON.csv", PERSON_HEADER)
    with pytest.raises(FedTwinError, match="--cdm-schema 'cdm' is for PostgreSQL"):
        load_omop_csv(src, str(tmp_path / "a.db"), cdm_schema="cdm")


# ---------------------------------------------------------------------------------- CLI

_CLI: tuple | None = None


def cli() -> tuple:
    """``fedtwin`` itself when every command group imports; else the ``omop`` group alone (the
    other groups are being written in parallel)."""
    global _CLI
    if _CLI is None:
        try:
            import fedtwin.cli.main as main

            main._register()
            _CLI = (main.app, ["omop", "load"])
        except ImportError:
            from fedtwin.cli import omop_cmd

            _CLI = (omop_cmd.app, ["load"])
    return _CLI


def test_cli_load_json(tmp_path):
    app, prefix = cli()
    db = tmp_path / "synthea.db"
    result = CliRunner().invoke(app, [*prefix, "--source", str(synthea_zip()), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {t["table"]: t["rows"] for t in report["tables"]}
    assert rows["measurement"] == 10_040 and rows["person"] == 28 and rows["death"] == "<10"
    assert report["cdm_version_detected"] == "5.4"
    assert {(m["table"], m["column"]) for m in report["missing_concepts"]} >= {("person", "gender_concept_id")}


def test_cli_load_table_output(tmp_path):
    app, prefix = cli()
    result = CliRunner().invoke(
        app, [*prefix, "--source", str(gibleed_csv()), "--db", str(tmp_path / "g.db")], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "OMOP load:" in out and "2,694" in out and "v5.3.1" in out
    assert "Concepts referenced but absent from the concept table" in out and "person.race_concept_id" in out
    assert "no file for measurement" in out


def test_cli_load_failure_exit_2(tmp_path):
    app, prefix = cli()
    result = CliRunner().invoke(app, [*prefix, "--source", str(tmp_path / "missing"), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2
    assert "Error:" in result.stderr and "does not exist" in result.stderr and "Fix:" in result.stderr
    result = CliRunner().invoke(app, [*prefix, "--source", str(tmp_path), "--db", "x.db", "--append", "--replace"])
    assert result.exit_code == 2 and "exclude each other" in result.stderr
    # a bad value is named as written, even one that looks like Rich markup
    src = tmp_path / "src"
    write(src, "PERSON.csv", PERSON_HEADER + "1,8507,[red]1970,0,0,\n")
    result = CliRunner().invoke(app, [*prefix, "--source", str(src), "--db", str(tmp_path / "y.db")])
    assert result.exit_code == 2
    assert "PERSON.csv row 1 (line 2), column year_of_birth: value '[red]1970' is not an integer" in result.stderr
    assert not (tmp_path / "y.db").exists()
