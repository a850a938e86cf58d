"""Extraction on a hand-built OMOP database whose every expected bin is worked out by hand,
on real SQLite and real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from fedtwin.errors import DatabaseError, FedTwinError
from fedtwin.extract.extractor import Extractor, time_since_last
from fedtwin.extract.summary import summarize
from fedtwin.omop import open_database
from fedtwin.omop.bulk import bulk_insert
from fedtwin.spec.io import spec_from_dict
from conftest import shared_path

SPEC = {
    "name": "tiny_icu",
    "time": {"step": "1h", "history_steps": 4, "horizon_steps": 2},
    "cohort": {"anchor": "visit", "visit_concept_ids": [32037], "min_age": 18, "min_history_observations": 1},
    "state_variables": [
        {"name": "heart_rate", "concept_ids": [3027018], "canonical_unit": "/min",
         "units": [{"concept_id": 8541, "code": "/min"}], "plausible_range": [20, 250]},
        {"name": "glucose", "concept_ids": [3004501], "canonical_unit": "mg/dL",
         "units": [{"concept_id": 8840, "code": "mg/dL"}, {"concept_id": 8753, "code": "mmol/L", "factor": 18.016}],
         "plausible_range": [10, 1500]},
    ],
    "interventions": [
        {"name": "norepinephrine", "concept_ids": [1321341], "kind": "infusion", "canonical_unit": "ug",
         "dose_units": {"ug": 1.0, "mg": 1000.0}, "affects": ["heart_rate"]},
        {"name": "insulin", "concept_ids": [1596977], "kind": "bolus", "canonical_unit": "[iU]",
         "dose_units": {"U": 1.0}, "affects": ["glucose"]},
    ],
    "outcomes": [
        {"name": "death", "kind": "death", "within_steps": 48},
        {"name": "aki", "kind": "condition", "concept_ids": [197320], "within_steps": 48},
    ],
    "static_covariates": ["age", "sex"],
    "fairness": {"age_bands": [18, 65]},
    "suppression_threshold": 2,
}

T0 = dt.datetime(2020, 1, 1, 10, 0)
T2 = dt.datetime(2020, 2, 1, 0, 0)


def _h(base: dt.datetime, hours: float) -> dt.datetime:
    return base + dt.timedelta(hours=hours)


def build_tiny_omop(url: str) -> None:
    db = open_database(url)
    db.create_schema()
    persons = [  # id, gender, year, race
        (1, 8507, 1960, 8527), (2, 8532, 1950, 8516), (3, 8507, 2010, 8527), (4, 8507, 1940, 8527), (5, 8532, 1970, 8527),
    ]
    visits = [(i, i, 32037, (T2 if i == 2 else T0)) for i in range(1, 6)]
    hr, glu = 3027018, 3004501
    meas = [
        (1, hr, _h(T0, 0.25), 80.0, 8541), (1, hr, _h(T0, 0.75), 90.0, 8541),  # bin 0 -> mean 85, n 2
        (1, hr, _h(T0, 2.5), 100.0, 8541),                                     # bin 2
        (1, glu, _h(T0, 1.1667), 5.0, 8753),                                   # bin 1 -> 90.08 mg/dL
        (1, glu, _h(T0, 3.0), 5000.0, 8840),                                   # implausible: dropped
        (1, hr, _h(T0, 3.3), 70.0, 999),                                       # unknown unit: dropped
        (1, hr, _h(T0, -1.0), 60.0, 8541),                                     # before index: dropped
        (1, hr, _h(T0, 6.2), 60.0, 8541),                                      # after the window: dropped
        *[(2, hr, _h(T2, h + 0.5), 70.0 + h, 8541) for h in range(4)],        # bins 0..3
        (3, hr, _h(T0, 0.5), 99.0, 8541),                                      # a child: excluded
        (4, hr, _h(T0, 0.5), 99.0, 8541),                                      # dies in history: excluded
    ]
    drugs = [  # person, concept, start, end, quantity, unit
        (1, 1321341, _h(T0, 1.5), _h(T0, 3.5), 2.0, "mg"),   # 2000 ug over 2 h: 500 / 1000 / 500
        (1, 1596977, _h(T0, 4.0833), _h(T0, 4.0833), 10.0, "U"),  # bolus in bin 4
        (1, 1596977, _h(T0, 4.5), _h(T0, 4.5), 3.0, "puffs"),     # unknown unit: dropped, counted
    ]
    with db.begin() as conn:
        bulk_insert(conn, "person", ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id", "ethnicity_concept_id"],
                    [(p, g, y, r, 0) for p, g, y, r in persons])
        bulk_insert(conn, "visit_occurrence",
                    ["visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date", "visit_start_datetime",
                     "visit_end_date", "visit_type_concept_id"],
                    [(v, p, c, t.date(), t, t.date(), 32817) for v, p, c, t in visits])
        bulk_insert(conn, "measurement",
                    ["measurement_id", "person_id", "measurement_concept_id", "measurement_date", "measurement_datetime",
                     "measurement_type_concept_id", "value_as_number", "unit_concept_id"],
                    [(i, p, c, t.date(), t, 32817, v, u) for i, (p, c, t, v, u) in enumerate(meas, 1)])
        bulk_insert(conn, "drug_exposure",
                    ["drug_exposure_id", "person_id", "drug_concept_id", "drug_exposure_start_date",
                     "drug_exposure_start_datetime", "drug_exposure_end_date", "drug_exposure_end_datetime",
                     "drug_type_concept_id", "quantity", "dose_unit_source_value"],
                    [(i, p, c, s.date(), s, e.date(), e, 32817, q, u) for i, (p, c, s, e, q, u) in enumerate(drugs, 1)])
        bulk_insert(conn, "death", ["person_id", "death_date", "death_datetime", "death_type_concept_id"],
                    [(1, T0.date(), _h(T0, 6.5), 32817), (4, T0.date(), _h(T0, 2.0), 32817)])
        bulk_insert(conn, "condition_occurrence",
                    ["condition_occurrence_id", "person_id", "condition_concept_id", "condition_start_date",
                     "condition_start_datetime", "condition_type_concept_id"],
                    [(1, 2, 197320, T2.date(), _h(T2, 5.0), 32817), (2, 2, 197320, T2.date(), _h(T2, 1.0), 32817)])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def tiny_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = str(tmp_path / "tiny.db")
    else:
        url = request.getfixturevalue("pg_url")
    build_tiny_omop(url)
    return url


def test_bins_units_plausibility_doses_outcomes(tiny_url: str) -> None:
    spec = spec_from_dict(SPEC)
    ex = Extractor(open_database(tiny_url), spec, chunk_size=2)  # chunks of 2 persons: streaming path
    t = ex.extract()
    t.validate()
    assert t.person_ids.tolist() == [1, 2]
    hr, glu = 0, 1
    p1, p2 = 0, 1
    np.testing.assert_allclose(t.values[p1, :, hr], [85, 0, 100, 0, 0, 0], rtol=1e-6)
    assert t.counts[p1, :, hr].tolist() == [2, 0, 1, 0, 0, 0]
    np.testing.assert_allclose(t.values[p1, :, glu], [0, 5.0 * 18.016, 0, 0, 0, 0], rtol=1e-5)
    assert t.mask[p1, :, glu].tolist() == [False, True, False, False, False, False]  # 5000 mg/dL dropped
    assert t.time_since[p1, :, hr].tolist() == [0, 1, 0, 1, 2, 3]
    assert t.time_since[p1, 0, glu] == -1
    np.testing.assert_allclose(t.doses[p1, :, 0], [0, 500, 1000, 500, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(t.doses[p1, :, 1], [0, 0, 0, 0, 10, 0], rtol=1e-5)
    assert ex.stats.drug_rows_unknown_unit == 1
    # death 6.5 h after index = 2.5 h after the prediction time (index + 4 h)
    assert t.outcome_event[p1].tolist() == [True, False]
    assert t.outcome_time[p1, 0] == pytest.approx(2.5)
    # AKI at +5 h counts (1 h after prediction); the one at +1 h is before prediction and does not
    assert t.outcome_event[p2].tolist() == [False, True]
    assert t.outcome_time[p2, 1] == pytest.approx(1.0)
    assert ex.stats.excluded_died_in_history == 1 and ex.stats.excluded_few_observations == 1
    assert ex.stats.excluded_age == 0  # person 3 never qualifies as an adult: not even a candidate
    assert t.subgroups["sex"].tolist() == ["M", "F"]
    assert t.subgroups["age"].tolist() == ["18-65", "65+"]
    assert t.static_names == ["age", "sex_female"]
    assert t.static[p1, 0] == pytest.approx(59.5, abs=0.6)


def test_summary_suppresses_small_counts(tiny_url: str) -> None:
    spec = spec_from_dict({**SPEC, "suppression_threshold": 10})
    ex = Extractor(open_database(tiny_url), spec)
    report = summarize(ex.extract(), ex.stats, threshold=10)
    assert report["cohort"]["patients"] == "<10"
    assert report["state_variables"]["heart_rate"]["mean"] == "suppressed"
    assert report["outcomes"]["death"] == {"events": "<10", "rate": "suppressed"}
    # no raw small count anywhere in the report
    for leaf in _leaves(report):
        if isinstance(leaf, int) and not isinstance(leaf, bool):
            assert leaf >= 10, leaf


def _leaves(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("bins_per_patient", "history_bins", "suppression_threshold", "step_seconds"):
                yield from _leaves(v)
    else:
        yield obj


def test_time_since_last_never_imputes() -> None:
    mask = np.array([[[False], [True], [False], [False], [True]]])
    assert time_since_last(mask)[0, :, 0].tolist() == [-1, 0, 1, 2, 0]


def test_missing_table_and_empty_cohort(tmp_path: Path) -> None:
    url = str(tmp_path / "partial.db")
    open_database(url).create_schema(["person", "measurement", "concept"])
    with pytest.raises(DatabaseError, match="missing tables: visit_occurrence"):
        Extractor(open_database(url), spec_from_dict(SPEC)).extract()
    open_database(url).create_schema()
    with pytest.raises(FedTwinError, match="cohort of spec 'tiny_icu' is empty"):
        Extractor(open_database(url), spec_from_dict(SPEC)).extract()


def test_not_omop_and_missing_file(tmp_path: Path) -> None:
    import sqlite3

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE invoices (id INTEGER)").connection.commit()
    with pytest.raises(DatabaseError, match="does not look like an OMOP CDM"):
        Extractor(open_database(str(other)), spec_from_dict(SPEC)).extract()
    with pytest.raises(DatabaseError, match="does not exist"):
        Extractor(open_database(str(tmp_path / "nope.db")), spec_from_dict(SPEC)).extract()
    assert not (tmp_path / "nope.db").exists()


def test_refused_postgres_connection() -> None:
    db = open_database("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(DatabaseError, match="cannot connect to .*127.0.0.1:1"):
        Extractor(db, spec_from_dict(SPEC)).extract()


@pytest.fixture(scope="module")
def synthea_db(tmp_path_factory) -> str:
    from fedtwin.omop import load_omop_csv

    src = shared_path("omop", "eunomia", "Synthea27Nj", "Synthea27Nj_5.4.zip")
    url = str(tmp_path_factory.mktemp("synthea") / "synthea.db")
    load_omop_csv(src, url)
    return url


def test_hypertension_spec_on_synthea27nj(synthea_db: str) -> None:
    from fedtwin.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / "hypertension-bp.yaml")
    ex = Extractor(open_database(synthea_db), spec)
    t = ex.extract()
    t.validate()
    # 28 persons; the adults with a blood pressure measured as adults qualify
    assert 15 <= t.n_patients <= 28
    assert np.all(t.static[:, 0] >= 18)
    sbp = t.values[:, :, 0][t.mask[:, :, 0]]
    dbp = t.values[:, :, 1][t.mask[:, :, 1]]
    assert 90 < sbp.mean() < 160 and 50 < dbp.mean() < 100 and sbp.mean() > dbp.mean()
    assert t.doses.max() <= 1.0 + 1e-6  # exposure fractions
    assert (t.doses > 0).any()  # Synthea's antihypertensives are picked up
    report = summarize(t, ex.stats, threshold=spec.suppression_threshold)
    for name in spec.intervention_names:  # only a handful of patients take each drug
        assert report["interventions"][name]["patients_exposed"] == "<10"
    assert report["outcomes"]["death"]["events"] == "<10"
