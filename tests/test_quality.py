"""Data-quality gate (``fedtwin site check``) on small, real OMOP databases (SQLite and PostgreSQL).

Each database is built row by row with :class:`TinyOmop`: a clean ICU site that passes, and a
dirty one whose every injected defect has a known count, which the checks must find exactly.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
import yaml
from rich.console import Console
from sqlalchemy import event, func, select, text
from typer.testing import CliRunner

from fedtwin.errors import DatabaseError, DataQualityError, SpecError
from fedtwin.omop import OmopDatabase, cdm_table
from fedtwin.omop.bulk import bulk_insert
from fedtwin.quality import CHECKS, render_report, required_tables, run_quality_checks
from fedtwin.spec import spec_hash
from fedtwin.spec.io import spec_from_dict
from site_agent.check_command import check

REPO = Path(__file__).resolve().parents[1]

HR, GLU, ICU, AKI = 3027018, 3004501, 32037, 197320
PER_MIN, MG_DL, MMOL_L, KG = 8541, 8840, 8753, 9529
NOREPI, INSULIN = 1321341, 1596977

SPEC = {
    "name": "tiny_icu",
    "time": {"step": "1h", "history_steps": 4, "horizon_steps": 2},
    "cohort": {"anchor": "visit", "visit_concept_ids": [ICU], "min_age": 18, "min_patients": 20},
    "state_variables": [
        {"name": "heart_rate", "concept_ids": [HR], "canonical_unit": "/min",
         "units": [{"concept_id": PER_MIN, "code": "/min"}], "plausible_range": [20, 250]},
        {"name": "glucose", "concept_ids": [GLU], "canonical_unit": "mg/dL",
         "units": [{"concept_id": MG_DL, "code": "mg/dL"}, {"concept_id": MMOL_L, "code": "mmol/L", "factor": 18.016}],
         "plausible_range": [10, 1500]},
    ],
    "interventions": [
        {"name": "norepinephrine", "concept_ids": [NOREPI], "kind": "infusion", "canonical_unit": "ug",
         "dose_units": {"ug": 1.0, "mg": 1000.0}, "affects": ["heart_rate"]},
        {"name": "insulin", "concept_ids": [INSULIN], "kind": "bolus", "canonical_unit": "[iU]",
         "dose_units": {"U": 1.0}, "affects": ["glucose"]},
    ],
    "outcomes": [
        {"name": "death", "kind": "death", "within_steps": 48},
        {"name": "aki", "kind": "condition", "concept_ids": [AKI], "within_steps": 48},
    ],
    "suppression_threshold": 10,
}

T0 = dt.datetime(2020, 3, 1, 8, 0)


def _spec(**changes) -> object:
    data = copy.deepcopy(SPEC)
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return spec_from_dict(data)


def _h(base: dt.datetime, hours: float) -> dt.datetime:
    return base + dt.timedelta(hours=hours)


@dataclass
class TinyOmop:
    """Rows of a tiny OMOP database, to be edited by a test (defects injected) and then written."""

    persons: list[tuple] = field(default_factory=list)       # (person_id, year_of_birth)
    periods: list[tuple] = field(default_factory=list)       # (person_id, start date, end date)
    visits: list[tuple] = field(default_factory=list)        # (person_id, concept, start datetime)
    measurements: list[tuple] = field(default_factory=list)  # (person_id, concept, datetime, value, unit)
    drugs: list[tuple] = field(default_factory=list)         # (person_id, concept, start, end, quantity, unit)
    conditions: list[tuple] = field(default_factory=list)    # (person_id, concept, start datetime)
    deaths: list[tuple] = field(default_factory=list)        # (person_id, datetime)
    concepts: set[int] = field(default_factory=set)

    @classmethod
    def clean(cls, n: int = 30) -> "TinyOmop":
        """``n`` adult ICU patients, each fully observed: 2 heart rates, 2 glucoses (one in mmol/L),
        one insulin bolus and one norepinephrine infusion; everything inside observation periods."""
        db = cls(concepts={HR, GLU, ICU, AKI, PER_MIN, MG_DL, MMOL_L, NOREPI, INSULIN})
        for p in range(1, n + 1):
            t = _h(T0, 24 * p)
            db.persons.append((p, 1950 + p % 20))
            db.periods.append((p, dt.date(2019, 1, 1), dt.date(2021, 12, 31)))
            db.visits.append((p, ICU, t))
            db.measurements += [
                (p, HR, _h(t, 1), 80.0 + p % 7, PER_MIN),
                (p, HR, _h(t, 2), 90.0 + p % 5, PER_MIN),
                (p, GLU, _h(t, 1), 100.0 + p, MG_DL),
                (p, GLU, _h(t, 3), 5.5, MMOL_L),
            ]
            db.drugs += [
                (p, INSULIN, _h(t, 2), _h(t, 2), 4.0, "U"),
                (p, NOREPI, _h(t, 1), _h(t, 3), 2.0, "mg"),
            ]
        db.conditions += [(1, AKI, _h(T0, 40)), (2, AKI, _h(T0, 70))]
        db.deaths.append((3, _h(T0, 100)))
        return db

    def write(self, url: str, cdm_schema: str | None = None) -> OmopDatabase:
        db = OmopDatabase(url, cdm_schema=cdm_schema)
        if cdm_schema:
            with db.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{cdm_schema}"'))
        db.create_schema()
        with db.begin() as conn:
            bulk_insert(conn, "person", ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id", "ethnicity_concept_id"],
                        [(p, 8507, y, 8527, 0) for p, y in self.persons])
            bulk_insert(conn, "observation_period",
                        ["observation_period_id", "person_id", "observation_period_start_date", "observation_period_end_date",
                         "period_type_concept_id"],
                        [(i, p, s, e, 32817) for i, (p, s, e) in enumerate(self.periods, 1)])
            bulk_insert(conn, "visit_occurrence",
                        ["visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date", "visit_start_datetime",
                         "visit_end_date", "visit_type_concept_id"],
                        [(i, p, c, t.date(), t, t.date(), 32817) for i, (p, c, t) in enumerate(self.visits, 1)])
            bulk_insert(conn, "measurement",
                        ["measurement_id", "person_id", "measurement_concept_id", "measurement_date", "measurement_datetime",
                         "measurement_type_concept_id", "value_as_number", "unit_concept_id"],
                        [(i, p, c, t.date(), t, 32817, v, u) for i, (p, c, t, v, u) in enumerate(self.measurements, 1)])
            bulk_insert(conn, "drug_exposure",
                        ["drug_exposure_id", "person_id", "drug_concept_id", "drug_exposure_start_date",
                         "drug_exposure_start_datetime", "drug_exposure_end_date", "drug_exposure_end_datetime",
                         "drug_type_concept_id", "quantity", "dose_unit_source_value"],
                        [(i, p, c, s.date(), s, e.date(), e, 32817, q, u) for i, (p, c, s, e, q, u) in enumerate(self.drugs, 1)])
            bulk_insert(conn, "condition_occurrence",
                        ["condition_occurrence_id", "person_id", "condition_concept_id", "condition_start_date",
                         "condition_start_datetime", "condition_type_concept_id"],
                        [(i, p, c, t.date(), t, 32817) for i, (p, c, t) in enumerate(self.conditions, 1)])
            bulk_insert(conn, "death", ["person_id", "death_date", "death_datetime", "death_type_concept_id"],
                        [(p, t.date(), t, 32817) for p, t in self.deaths])
            bulk_insert(conn, "concept",
                        ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "concept_code",
                         "valid_start_date", "valid_end_date"],
                        [(c, f"concept {c}", "Measurement", "LOINC", "Lab Test", f"C{c}", dt.date(1970, 1, 1),
                          dt.date(2099, 12, 31)) for c in sorted(self.concepts | {KG})])
        return db


# Every defect injected into the dirty site, with its exact count (all below 10, so suppressed).
EXPECTED = {
    "measurement_value_plausible.heart_rate": 3,
    "measurement_unit_known.glucose": 4,
    "measurement_value_present.heart_rate": 2,
    "measurement_duplicate": 5,
    "person_exists.measurement": 6,
    "measurement_in_observation_period": 7,
    "concept_in_vocabulary": 1,
    "drug_quantity_not_negative.insulin": 2,
    "drug_dose_unit_known.insulin": 3,
    "drug_quantity_present.norepinephrine": 1,
    "drug_start_before_end": 2,
    "person_exists.drug_exposure": 2,
    "drug_in_observation_period": 1,
    "person_has_observation_period": 1,
    "person_exists.visit_occurrence": 1,
    "variable_recorded.glucose": 2,
}


def dirty_site() -> TinyOmop:
    db = TinyOmop.clean()
    t = lambda p: _h(T0, 24 * p)  # noqa: E731 - each person's ICU admission
    db.measurements += [(p, HR, _h(t(p), 4), 400.0, PER_MIN) for p in (1, 2, 3)]          # implausible
    db.measurements += [(p, GLU, _h(t(p), 5), 90.0, KG) for p in (6, 7, 8, 9)]            # unknown unit
    db.measurements += [(p, HR, _h(t(p), 6), None, PER_MIN) for p in (10, 11)]            # no value
    glucose_rows = [m for m in db.measurements if m[1] == GLU and m[0] in (12, 13, 14, 15)]
    db.measurements += glucose_rows[:3] + [glucose_rows[3], glucose_rows[3]]              # 5 extra copies
    db.measurements += [(999, HR, _h(T0, k), 70.0, PER_MIN) for k in range(6)]            # orphans
    db.measurements += [(p, HR, dt.datetime(2018, 6, 1, 9), 75.0, PER_MIN) for p in range(16, 23)]  # before the period
    db.concepts.discard(AKI)                                                              # absent concept
    db.drugs += [(p, INSULIN, _h(t(p), 5), _h(t(p), 5), -4.0, "U") for p in (1, 2)]       # negative dose
    db.drugs += [(p, INSULIN, _h(t(p), 6), _h(t(p), 6), 3.0, "puffs") for p in (3, 4, 5)]  # unknown dose unit
    db.drugs += [(6, NOREPI, _h(t(6), 7), _h(t(6), 9), None, "mg")]                       # no quantity
    db.drugs += [(p, NOREPI, _h(t(p), 9), _h(t(p), 8), 1.0, "mg") for p in (7, 8)]        # ends before it starts
    db.drugs += [(998, NOREPI, _h(T0, 1), _h(T0, 2), 1.0, "mg")] * 2                      # orphans
    db.drugs += [(9, INSULIN, dt.datetime(2022, 2, 1, 9), dt.datetime(2022, 2, 1, 9), 2.0, "U")]  # after the period
    db.persons.append((31, 1990))                                                         # no observation period
    db.persons += [(32, 2010), (33, 2012)]                                                # children: not in the cohort
    db.periods += [(32, dt.date(2019, 1, 1), dt.date(2021, 12, 31)), (33, dt.date(2019, 1, 1), dt.date(2021, 12, 31))]
    db.visits += [(32, ICU, T0), (33, ICU, T0), (997, ICU, T0)]                           # + an orphan visit
    db.measurements = [m for m in db.measurements if not (m[1] == GLU and m[0] in (29, 30))]  # glucose never measured
    return db


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request, tmp_path: Path):
    """Returns ``make(site) -> OmopDatabase`` on SQLite, or on PostgreSQL in a non-default schema."""
    made: list[OmopDatabase] = []

    def make(site: TinyOmop) -> OmopDatabase:
        if request.param == "sqlite":
            db = site.write(str(tmp_path / f"site_{uuid.uuid4().hex[:6]}.db"))
        else:
            db = site.write(request.getfixturevalue("pg_url"), cdm_schema="site_cdm")
        made.append(db)
        return db

    yield make
    for db in made:
        db.dispose()


def _cli(*args: str):
    app = typer.Typer()
    app.command()(check)
    return CliRunner().invoke(app, list(args))


def _spec_file(tmp_path: Path, spec_dict: dict | None = None) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec_dict or SPEC))
    return p


def _row(output: str, key: str) -> str:
    lines = [ln for ln in output.splitlines() if re.search(rf"\b{re.escape(key)}\b", ln) and "│" in ln]
    assert len(lines) == 1, f"{key} rows: {lines}"
    return lines[0]


# --- clean and dirty sites -----------------------------------------------------------------------


def test_clean_site_passes(backend) -> None:
    db = backend(TinyOmop.clean())
    report = run_quality_checks(db, _spec())
    assert report.status == "PASS", [(r.key, r.failing, r.checked) for r in report.results if r.status != "PASS"]
    assert report.passed
    for r in report.results:
        if r.failing is not None:
            assert r.failing == 0, r.key
    assert report.cohort_persons == 30
    assert report.result("cohort_size").checked == 30
    assert report.result("measurement_unit_known.glucose").checked == 60
    assert report.result("measurement_duplicate").checked == 120
    assert report.result("person_exists.drug_exposure").checked == 60
    d = report.to_dict()
    assert d["database"]["dialect"] == db.engine.dialect.name
    assert d["spec"]["hash"] == spec_hash(_spec())
    assert {c["key"] for c in d["checks"]} >= set(EXPECTED)
    report.raise_for_blocking()  # no error


def test_dirty_site_every_defect_counted_exactly(backend) -> None:
    db = backend(dirty_site())
    report = run_quality_checks(db, _spec())
    found = {k: report.result(k).failing for k in EXPECTED}
    assert found == EXPECTED
    # ... and nothing else fails: defects do not leak into other checks
    others = {r.key: r.failing for r in report.results if r.key not in EXPECTED and r.failing}
    assert others == {}
    assert report.cohort_persons == 30  # two children and an orphan visit do not count
    unit = report.result("measurement_unit_known.glucose")
    assert unit.details["unknown_units"] == [{"unit_concept_id": KG, "code": f"C{KG}", "rows": "<10"}]
    missing = report.result("concept_in_vocabulary").details["missing_concept_ids"]
    assert missing == [{"concept_id": AKI, "used_as": ["outcome aki"]}]
    # Denominators: all rows of the spec's concepts (orphans, duplicates included).
    assert report.result("measurement_duplicate").checked == 120 - 4 + 3 + 4 + 2 + 5 + 6 + 7
    # Status from the share failing: e.g. 3 of 78 heart rates implausible (3.8 %) passes at 5 %,
    # 4 of 65 glucoses in an unknown unit (6.2 %) fails; 6 orphans of 143 rows (4.2 %) pass,
    # 7 of 143 rows outside periods (4.9 %) stay under 5 %, 5 duplicates of 143 (3.5 %) warn at 1 %.
    assert {r.key for r in report.blocking_failures} == {
        "concept_in_vocabulary", "measurement_unit_known.glucose",
        "drug_quantity_not_negative.insulin", "drug_dose_unit_known.insulin",
    }
    assert {r.key for r in report.warnings} == {"measurement_duplicate", "person_has_observation_period"}


def test_small_counts_suppressed_in_rich_and_json(backend) -> None:
    db = backend(dirty_site())
    report = run_quality_checks(db, _spec())
    console = Console(record=True, width=200)
    render_report(report, console)
    out = console.export_text()
    data = json.loads(report.to_json())
    for key, n in EXPECTED.items():
        row = _row(out, key)
        cells = [c.strip() for c in row.split("│")]
        assert "<10" in cells, row
        assert str(n) not in cells, row
        entry = next(c for c in data["checks"] if c["key"] == key)
        assert entry["failing"] == "<10"
        assert entry["failing_pct"] == "suppressed"  # a share would reveal the small count
    plausible = next(c for c in data["checks"] if c["key"] == "measurement_value_plausible.heart_rate")
    assert plausible["checked"] == 78  # a large denominator is shown
    # With a threshold of 1 the same counts are shown, with their percentages.
    exact = run_quality_checks(db, _spec(), suppression_threshold=1).to_dict()
    entry = next(c for c in exact["checks"] if c["key"] == "measurement_value_plausible.heart_rate")
    assert (entry["failing"], entry["checked"], entry["failing_pct"]) == (3, 78, 3.85)
    assert exact["suppression_threshold"] == 1


def test_cli_suppresses_and_prints_json(tmp_path: Path) -> None:
    db = dirty_site().write(str(tmp_path / "dirty.db"))
    spec = str(_spec_file(tmp_path))
    res = _cli("--db", db.url, "--spec", spec)
    assert isinstance(res.exception, DataQualityError)
    row = _row(res.stdout, "measurement_value_plausible.heart_rate")
    assert "<10" in row and " 3 " not in row
    assert "FAIL: 4 blocking check(s) failed" in res.stdout
    res = _cli("--db", db.url, "--spec", spec, "--json")
    assert isinstance(res.exception, DataQualityError)  # JSON first, then the non-zero exit
    data = json.loads(res.stdout)
    assert data["status"] == "FAIL" and data["summary"]["failed"] == 4
    entry = next(c for c in data["checks"] if c["key"] == "drug_quantity_not_negative.insulin")
    assert entry["failing"] == "<10" and entry["checked"] == 36 and entry["failing_pct"] == "suppressed"
    res = _cli("--db", db.url, "--spec", spec, "--json", "--suppression-threshold", "1")
    entry = next(c for c in json.loads(res.stdout)["checks"] if c["key"] == "drug_quantity_not_negative.insulin")
    assert (entry["failing"], entry["checked"], entry["failing_pct"]) == (2, 36, 5.56)


def test_complementary_suppression_of_denominators(tmp_path: Path) -> None:
    """glucose has 5 rows (hidden); the table total and heart rate's count would give it away."""
    site = TinyOmop.clean()
    kept = [m for m in site.measurements if m[1] == GLU][:5]
    site.measurements = [m for m in site.measurements if m[1] != GLU] + kept
    report = run_quality_checks(site.write(str(tmp_path / "c.db")), _spec())
    d = {c["key"]: c for c in report.to_dict()["checks"]}
    assert d["measurement_duplicate"]["checked"] == 65
    assert d["measurement_unit_known.glucose"]["checked"] == "<10"
    assert d["measurement_unit_known.heart_rate"]["checked"] == "suppressed"
    assert d["measurement_value_plausible.heart_rate"]["failing_pct"] == "suppressed"


# --- blocking failures ----------------------------------------------------------------------------


def test_blocking_failure_raises_after_printing(tmp_path: Path) -> None:
    db = dirty_site().write(str(tmp_path / "dirty.db"))
    res = _cli("--db", db.url, "--spec", str(_spec_file(tmp_path)))
    assert res.exit_code != 0
    assert isinstance(res.exception, DataQualityError)
    assert "concept_in_vocabulary" in res.stdout and "FAIL" in res.stdout  # the table came first
    err = res.exception
    assert "concept_in_vocabulary (table concept): <10 of" in err.problem
    assert str(AKI) in err.fix and "vocabulary" in err.fix
    assert "[" not in err.problem + err.fix  # the CLI prints errors with rich markup


def test_cohort_too_small_blocks(tmp_path: Path) -> None:
    db = TinyOmop.clean(n=12).write(str(tmp_path / "small.db"))
    report = run_quality_checks(db, _spec())
    r = report.result("cohort_size")
    assert (r.checked, r.min_count, r.status) == (12, 20, "FAIL")
    with pytest.raises(DataQualityError) as exc:
        report.raise_for_blocking()
    assert "cohort_size (table visit_occurrence): 12 persons qualify, the spec needs at least 20" in exc.value.problem
    # 12 persons at a threshold of 15: the count itself is hidden everywhere.
    small = run_quality_checks(db, _spec(), suppression_threshold=15)
    assert small.to_dict()["cohort"]["persons"] == "<15"
    with pytest.raises(DataQualityError) as exc:
        small.raise_for_blocking()
    assert "<15 persons qualify" in exc.value.problem and "12" not in exc.value.problem


def test_many_implausible_values_block(tmp_path: Path) -> None:
    site = TinyOmop.clean()
    site.measurements = [(p, c, t, v * 1000 if c == HR else v, u) for p, c, t, v, u in site.measurements]  # a unit error
    report = run_quality_checks(site.write(str(tmp_path / "x1000.db")), _spec())
    r = report.result("measurement_value_plausible.heart_rate")
    assert (r.failing, r.checked, r.status) == (60, 60, "FAIL")
    assert report.to_dict()["checks"][[c.key for c in report.results].index(r.key)]["failing_pct"] == 100.0
    err = report.blocking_error()
    assert err is not None and "measurement_value_plausible.heart_rate (table measurement): 60 of 60 rows fail (100.0%" in err.problem


def test_anchors_and_thresholds(tmp_path: Path) -> None:
    db = dirty_site().write(str(tmp_path / "d.db"))
    for anchor, expected in (("first_measurement", 30), ("observation_period", 30)):
        spec = _spec(cohort={"anchor": anchor, "min_age": 18, "min_patients": 20})
        assert run_quality_checks(db, spec).cohort_persons == expected
    spec = _spec(cohort={"anchor": "condition", "condition_concept_ids": [AKI], "min_patients": 2})
    assert run_quality_checks(db, spec).cohort_persons == 2
    # Without min_age the children count.
    assert run_quality_checks(db, _spec(cohort={"anchor": "visit", "visit_concept_ids": [ICU]})).cohort_persons == 32
    # Thresholds can be overridden per check id or per key.
    default = run_quality_checks(db, _spec())
    assert default.result("measurement_duplicate").status == "WARN"
    assert default.result("measurement_value_plausible.heart_rate").status == "PASS"
    report = run_quality_checks(db, _spec(), thresholds={"measurement_duplicate": 10, "measurement_value_plausible.heart_rate": 1})
    assert report.result("measurement_duplicate").status == "PASS"
    assert report.result("measurement_value_plausible.heart_rate").status == "FAIL"
    assert report.result("measurement_value_plausible.glucose").threshold_pct == 5.0
    with pytest.raises(ValueError, match="no percentage threshold"):
        run_quality_checks(db, _spec(), thresholds={"cohort_size": 1})


def test_report_hash_is_stable_and_canonical(tmp_path: Path) -> None:
    db = dirty_site().write(str(tmp_path / "d.db"))
    a, b = run_quality_checks(db, _spec()), run_quality_checks(db, _spec())
    b.generated_at = "2000-01-01T00:00:00+00:00"
    assert a.report_hash == b.report_hash and len(a.report_hash) == 64
    d = a.to_dict()
    body = {k: v for k, v in d.items() if k not in ("generated_at", "report_hash")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert d["report_hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert run_quality_checks(db, _spec(), suppression_threshold=1).report_hash != a.report_hash


# --- structure: not OMOP, missing tables and columns ---------------------------------------------


def test_missing_tables(tmp_path: Path) -> None:
    db = OmopDatabase(str(tmp_path / "partial.db"))
    db.create_schema(tables=["person", "observation_period", "measurement", "concept"])
    with pytest.raises(DatabaseError, match="missing tables: visit_occurrence, condition_occurrence, drug_exposure, death"):
        run_quality_checks(db, _spec())
    # A spec that reads only those tables needs nothing more.
    spec = _spec(cohort={"anchor": "first_measurement", "min_patients": 1}, interventions=[], outcomes=[])
    assert required_tables(spec) == ("person", "observation_period", "measurement", "concept")
    assert run_quality_checks(db, spec).result("cohort_size").checked == 0


def test_missing_columns(tmp_path: Path) -> None:
    db = OmopDatabase(str(tmp_path / "cols.db"))
    db.create_schema(tables=[t for t in required_tables(_spec()) if t != "measurement"])
    with db.begin() as conn:
        conn.execute(text("CREATE TABLE measurement (measurement_id INTEGER, person_id INTEGER, "
                          "measurement_concept_id INTEGER, measurement_date DATE, measurement_datetime DATETIME)"))
    with pytest.raises(DatabaseError) as exc:
        run_quality_checks(db, _spec())
    assert "measurement.value_as_number, measurement.unit_concept_id" in exc.value.problem


def test_not_omop(tmp_path: Path) -> None:
    other = OmopDatabase(str(tmp_path / "app.db"))
    with other.begin(create=True) as conn:
        conn.execute(text("CREATE TABLE users (id INTEGER, name TEXT)"))
    with pytest.raises(DatabaseError, match="does not look like an OMOP CDM database"):
        run_quality_checks(other, _spec())
    notes = tmp_path / "notes.db"
    notes.write_text("this is not a database, just text\n" * 100)
    with pytest.raises(DatabaseError, match="not a SQLite database|cannot be read as an OMOP CDM database"):
        run_quality_checks(OmopDatabase(str(notes)), _spec())
    with pytest.raises(DatabaseError, match="does not exist"):
        run_quality_checks(OmopDatabase(str(tmp_path / "absent.db")), _spec())


# --- hostile input ----------------------------------------------------------------------------------


def test_hostile_names_rejected_by_the_spec() -> None:
    with pytest.raises(SpecError):
        _spec(name="x; DROP TABLE person")
    bad = copy.deepcopy(SPEC)
    bad["state_variables"][0]["name"] = "hr'); DROP TABLE measurement; --"
    with pytest.raises(SpecError):
        spec_from_dict(bad)
    bad = copy.deepcopy(SPEC)
    bad["state_variables"][0]["concept_ids"] = ["3027018 OR 1=1"]
    with pytest.raises(SpecError):
        spec_from_dict(bad)


def test_sql_looking_data_and_bound_parameters(tmp_path: Path) -> None:
    site = TinyOmop.clean()
    hostile = "mg'); DROP TABLE person; --"
    site.drugs += [(p, INSULIN, _h(T0, 24 * p + 5), _h(T0, 24 * p + 5), 1.0, hostile) for p in range(1, 13)]  # 12 rows
    site.drugs += [(p, INSULIN, _h(T0, 24 * p + 6), _h(T0, 24 * p + 6), 1.0, "[bold red]puffs") for p in (1, 2)]
    site.drugs += [(3, INSULIN, _h(T0, 24 * 3 + 7), _h(T0, 24 * 3 + 7), 1.0, None)]
    db = site.write(str(tmp_path / "h.db"))
    statements: list[tuple[str, object]] = []
    event.listen(db.engine, "before_cursor_execute", lambda c, cur, stmt, params, ctx, many: statements.append((stmt, params)))
    report = run_quality_checks(db, _spec())
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(cdm_table("person"))).scalar() == 30
    r = report.result("drug_dose_unit_known.insulin")
    assert r.failing == 15
    # The frequent spelling is listed, verbatim, for the fix; the rare one (2 rows) is not.
    assert r.details["unknown_dose_units"] == [{"value": hostile, "rows": 12}]
    assert r.details["rows_with_rare_unknown_dose_units"] == "<10"
    assert r.details["rows_without_dose_unit"] == "<10"
    assert "puffs" not in report.to_json()
    console = Console(record=True, width=250)
    render_report(report, console)
    out = console.export_text()
    assert hostile in out and "puffs" not in out
    # Spec numbers reached SQL as parameters, never as text.
    sql = "\n".join(s for s, _ in statements)
    for literal in (str(HR), str(INSULIN), str(ICU), "18.016", "1500", "'U'", "'mg'"):
        assert literal not in sql, literal
    params = " ".join(str(p) for _, p in statements)
    assert str(HR) in params and "18.016" in params


@pytest.mark.postgres
def test_postgres_url_password_never_shown(pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    db = TinyOmop.clean(n=12).write(url)
    report = run_quality_checks(db, _spec())
    console = Console(record=True, width=200)
    render_report(report, console)
    text_out = console.export_text() + report.to_json()
    err = report.blocking_error()
    assert err is not None  # cohort of 12 < 20
    text_out += str(err)
    assert "s3cret-pw" not in text_out
    assert report.to_dict()["database"] == {
        "dialect": "postgresql", "cdm_schema": None, "vocabulary_schema": None, "tables": list(required_tables(_spec())),
    }
    db.dispose()


def test_docs_cover_every_check() -> None:
    doc = (REPO / "docs" / "data-quality.md").read_text()
    for cid, d in CHECKS.items():
        assert f"`{cid}`" in doc, cid
        thr = "minimum" if d.threshold_pct is None else f"{d.threshold_pct:g}%"
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"| `{cid}`"))
        assert thr in line and ("blocking" if d.blocking else "warning") in line and d.category in line, line
