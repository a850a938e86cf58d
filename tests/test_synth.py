"""Synthetic hospitals (``fedtwin synth``) on real SQLite files and a real PostgreSQL server.

One small federation (3 preset sites, ~450 patients, 1% defects) is generated once per module
and checked from the databases and the ground-truth files, including against the real extractor.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from fedtwin.errors import DatabaseError, FedTwinError
from fedtwin.extract.extractor import extract_cohort
from fedtwin.omop import open_database
from fedtwin.omop.schema import cdm_tables
from fedtwin.spec import load_spec
from fedtwin.synth import SynthRequest, synthesize
from fedtwin.synth import concepts as C
from fedtwin.synth.ground_truth import KEY_DOCS, load_site_truth
from fedtwin.synth.plans import PLAN_NAMES

REPO = Path(__file__).resolve().parents[1]
SPEC = load_spec(REPO / "specs" / "icu-hemodynamics.yaml")
SITES, PATIENTS, SEED, DEFECTS = 3, 150, 7, 0.01
STATE = {n: i for i, n in enumerate(C.STATE_NAMES)}
DRUG = {n: i for i, n in enumerate(C.DRUG_NAMES)}
PLAN = {n: i for i, n in enumerate(PLAN_NAMES)}


def _request(out: Path, **kw) -> SynthRequest:
    args = dict(sites=SITES, patients=PATIENTS, seed=SEED, out=out, defects=DEFECTS, workers=2)
    args.update(kw)
    return SynthRequest(**args)


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    """The federation under test, generated with the process pool (2 workers)."""
    out = tmp_path_factory.mktemp("fed") / "out"
    synthesize(_request(out))
    return out


def _sqlite(out: Path, k: int) -> sqlite3.Connection:
    return sqlite3.connect(out / f"site_{k}.db")


def _truth(out: Path, k: int) -> tuple[dict[str, np.ndarray], dict]:
    return load_site_truth(out / "ground_truth" / f"site_{k}")


def _table_rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every non-empty table of a SQLite site, in insertion (rowid) order."""
    con = sqlite3.connect(path)
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    out = {n: rows for n in names if (rows := con.execute(f'SELECT * FROM "{n}" ORDER BY rowid').fetchall())}
    con.close()
    return out


# --- the spec and the vocabulary -----------------------------------------------------------------


def test_simulator_constants_match_the_spec_yaml() -> None:
    assert [v.name for v in SPEC.state_variables] == list(C.STATE_NAMES)
    for var, ours in zip(SPEC.state_variables, C.STATE_VARIABLES):
        assert var.concept_ids == [ours.concept_id]
        assert var.canonical_unit == ours.canonical_unit
        assert tuple(var.plausible_range) == C.PLAUSIBLE_RANGE[var.name]
        for code, unit in C.UNITS[var.name].items():
            conv = var.conversion_for(unit.concept_id)
            assert conv is not None and conv.code == code and conv.factor == unit.factor
    assert [i.name for i in SPEC.interventions] == list(C.DRUG_NAMES)
    for iv, drug in zip(SPEC.interventions, C.DRUGS):
        assert iv.concept_ids == [drug.concept_id] and iv.kind == drug.kind
        assert iv.canonical_unit == drug.canonical_unit and iv.dose_units == drug.dose_units
    assert SPEC.cohort.visit_concept_ids == [C.INTENSIVE_CARE] and SPEC.cohort.min_age == C.MIN_AGE
    assert SPEC.cohort.min_history_observations == C.MIN_HISTORY_OBSERVATIONS
    assert (SPEC.time.step_seconds, SPEC.time.history_steps, SPEC.time.horizon_steps) == (
        C.STEP_SECONDS, C.HISTORY_STEPS, C.HORIZON_STEPS,
    )
    assert [o.name for o in SPEC.outcomes] == list(C.OUTCOME_NAMES)
    assert SPEC.outcomes[1].concept_ids == [C.AKI]
    assert {o.within_steps for o in SPEC.outcomes} == {C.OUTCOME_WINDOW_STEPS}


def test_every_concept_id_used_is_in_concept(fed: Path) -> None:
    for k in range(1, SITES + 1):
        con = _sqlite(fed, k)
        concept_ids = {r[0] for r in con.execute("SELECT concept_id FROM concept")}
        used: set[int] = set()
        for name, table in cdm_tables().items():
            cols = [c.name for c in table.c if c.name.endswith("concept_id")]
            for col in cols:
                used |= {r[0] for r in con.execute(f'SELECT DISTINCT "{col}" FROM "{name}" WHERE "{col}" IS NOT NULL')}
        assert used, "no concept ids found"
        assert used <= concept_ids, f"site {k}: concept ids without a concept row: {sorted(used - concept_ids)}"
        # ... and every vocabulary, domain and class a concept row names has its row
        for col, table in (("vocabulary_id", "vocabulary"), ("domain_id", "domain"), ("concept_class_id", "concept_class")):
            named = {r[0] for r in con.execute(f"SELECT DISTINCT {col} FROM concept")}
            present = {r[0] for r in con.execute(f"SELECT {col} FROM {table}")}
            assert named <= present, (table, named - present)
        loinc = dict(con.execute("SELECT concept_id, concept_code FROM concept WHERE vocabulary_id = 'LOINC'").fetchall())
        assert loinc == {3027018: "8867-4", 3027598: "8478-0", 3004501: "2345-7", 3016723: "2160-0", 3047181: "32693-4"}
        assert con.execute("SELECT cdm_version, cdm_version_concept_id FROM cdm_source").fetchall() == [("5.4", 756265)]
        con.close()


# --- site heterogeneity ------------------------------------------------------------------------------


def test_units_and_local_codes_follow_each_sites_convention(fed: Path) -> None:
    def units(k: int, concept: int) -> set[tuple[int, str]]:
        con = _sqlite(fed, k)
        rows = set(con.execute(
            "SELECT DISTINCT unit_concept_id, unit_source_value FROM measurement WHERE measurement_concept_id = ?", (concept,)
        ).fetchall())
        con.close()
        return rows

    def dose_units(k: int, concept: int) -> set[str]:
        con = _sqlite(fed, k)
        rows = {r[0] for r in con.execute("SELECT DISTINCT dose_unit_source_value FROM drug_exposure WHERE drug_concept_id = ?", (concept,))}
        con.close()
        return rows

    assert units(1, C.GLUCOSE) == {(C.MG_DL, "mg/dL")} and units(2, C.GLUCOSE) == {(C.MMOL_L, "mmol/L")}
    assert units(1, C.CREATININE) == {(C.MG_DL, "mg/dL")} and units(2, C.CREATININE) == {(C.UMOL_L, "umol/L")}
    assert units(3, C.CREATININE) == {(C.UMOL_L, "umol/L")}
    assert dose_units(1, C.NOREPINEPHRINE) == {"ug"} and dose_units(2, C.NOREPINEPHRINE) == {"mg"}
    assert dose_units(1, C.INSULIN) == {"[iU]"} and dose_units(2, C.INSULIN) == {"U"}
    assert dose_units(1, C.SODIUM_CHLORIDE) == {"mL"} and dose_units(2, C.SODIUM_CHLORIDE) == {"L"}
    assert dose_units(3, C.FUROSEMIDE) <= {"mg"}
    # every dose unit is one the spec accepts
    for k in range(1, SITES + 1):
        for iv in SPEC.interventions:
            assert dose_units(k, iv.concept_ids[0]) <= set(iv.dose_units)
    # local source codes differ per site
    codes = []
    for k in range(1, SITES + 1):
        con = _sqlite(fed, k)
        sql = "SELECT DISTINCT measurement_source_value FROM measurement WHERE measurement_concept_id = ?"
        codes.append({r[0] for r in con.execute(sql, (C.HEART_RATE,))})
        con.close()
    assert codes[0] == {"HR_MON"} and codes[1] == {"VS.PULSE"} and codes[2] == {"HR"}
    # sites are of unequal size, with mean --patients
    sizes = [json.loads((fed / "ground_truth" / f"site_{k}" / "manifest.json").read_text())["counts"]["persons"] for k in range(1, SITES + 1)]
    assert sum(sizes) == SITES * PATIENTS and len(set(sizes)) == SITES


def test_sicker_patients_are_measured_more_often(fed: Path) -> None:
    """Informative missingness: lab readings per ICU hour rise with the latent acuity."""
    a, _ = _truth(fed, 1)
    con = _sqlite(fed, 1)
    rows = con.execute(
        """SELECT m.person_id, count(*) / ((julianday(v.visit_end_datetime) - julianday(v.visit_start_datetime)) * 24.0)
           FROM measurement m JOIN visit_occurrence v ON v.visit_occurrence_id = m.visit_occurrence_id
           WHERE v.visit_concept_id = 32037 AND m.measurement_concept_id IN (?, ?)
             AND julianday(v.visit_end_datetime) - julianday(v.visit_start_datetime) > 0.5
           GROUP BY m.person_id""",
        (C.LACTATE, C.GLUCOSE),
    ).fetchall()
    con.close()
    pid = np.array([r[0] for r in rows])
    rate = np.array([r[1] for r in rows])
    # acuity during the first day: mean latent inflammation (the state staff react to)
    acuity = a["latent_inflammation"][np.searchsorted(a["person_id"], pid), :24].mean(axis=1)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = np.corrcoef(rank(acuity), rank(rate))[0, 1]
    assert rho > 0.25, rho
    low, high = np.quantile(acuity, [1 / 3, 2 / 3])
    assert rate[acuity >= high].mean() > 1.3 * rate[acuity <= low].mean()


def test_minority_subgroup_is_concentrated_at_one_site(fed: Path) -> None:
    per_site = []
    for k in range(1, SITES + 1):
        con = _sqlite(fed, k)
        per_site.append(con.execute("SELECT count(*) FROM person WHERE race_concept_id = ?", (C.AMERICAN_INDIAN,)).fetchone()[0])
        con.close()
    assert per_site[2] > 0.5 * sum(per_site), per_site


# --- ground truth ----------------------------------------------------------------------------------


def test_ground_truth_is_complete_and_outside_the_omop_database(fed: Path) -> None:
    top = json.loads((fed / "ground_truth" / "manifest.json").read_text())
    assert [s["site"] for s in top["sites"]] == [1, 2, 3] and top["plans"] == list(PLAN_NAMES)
    cdm_names = set(cdm_tables())
    for k in range(1, SITES + 1):
        a, m = _truth(fed, k)
        assert set(a) == set(KEY_DOCS) == set(m["arrays"])
        for key, info in m["arrays"].items():
            assert list(a[key].shape) == info["shape"] and str(a[key].dtype) == info["dtype"]
        n = a["person_id"].size
        assert np.all(np.diff(a["person_id"]) > 0)
        assert a["plan_states"].shape == (n, len(PLAN_NAMES), C.HORIZON_STEPS, 5)
        assert a["plan_doses"].shape == (n, len(PLAN_NAMES), C.HORIZON_STEPS, 4)
        assert a["plan_risk"].shape == (n, len(PLAN_NAMES), 2) and np.all((a["plan_risk"] >= 0) & (a["plan_risk"] <= 1))
        assert m["database"] == {"backend": "sqlite", "location": f"site_{k}.db"}
        con = _sqlite(fed, k)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        db_persons = [r[0] for r in con.execute("SELECT person_id FROM person ORDER BY person_id")]
        con.close()
        assert tables <= cdm_names, f"non-CDM tables in the OMOP database: {tables - cdm_names}"
        assert db_persons == a["person_id"].tolist()
        # outcome rates give enough events to score discrimination
        coh = a["in_cohort"]
        assert 0.03 < a["outcome_event"][coh, 0].mean() < 0.35 and 0.03 < a["outcome_event"][coh, 1].mean() < 0.35


def test_extractor_reproduces_cohort_doses_and_labels(fed: Path) -> None:
    """The spec's extractor, run on a synthetic site, sees exactly the ground truth's cohort."""
    a, _ = _truth(fed, 1)
    ct = extract_cohort(open_database(str(fed / "site_1.db")), SPEC)
    assert np.array_equal(ct.person_ids, a["person_id"][a["in_cohort"]])
    rows = np.searchsorted(a["person_id"], ct.person_ids)
    np.testing.assert_allclose(ct.doses, a["recorded_doses"][rows], atol=1e-3)
    assert np.array_equal(ct.outcome_event, a["outcome_event"][rows])
    np.testing.assert_allclose(ct.outcome_time, a["outcome_time"][rows], atol=1e-3)
    # duplicates only add readings; every clean reading is binned where the truth says
    assert np.all(ct.counts >= a["measurement_counts"][rows])
    err = np.abs(ct.values - a["latent_states"][rows])[ct.mask[..., STATE["map"]]][:, STATE["map"]]
    assert err.mean() < 5.0  # observation noise around the latent MAP


def test_counterfactual_plans_move_states_the_expected_way(fed: Path) -> None:
    a, _ = _truth(fed, 1)
    coh = a["in_cohort"]
    ps, pd = a["plan_states"][coh].astype(np.float64), a["plan_doses"][coh]
    rec = ps[:, PLAN["recorded"]]
    # plan arrays replace exactly the named intervention
    assert np.all(pd[:, PLAN["no_vasopressor"], :, DRUG["norepinephrine"]] == 0)
    np.testing.assert_allclose(pd[:, PLAN["double_insulin"], :, DRUG["insulin"]], 2 * pd[:, 0, :, DRUG["insulin"]])
    np.testing.assert_allclose(pd[:, PLAN["fluid_bolus_1l"], 0, DRUG["fluids"]], pd[:, 0, 0, DRUG["fluids"]] + 1000)
    assert np.all(pd[:, PLAN["furosemide_40mg"], 0, DRUG["furosemide"]] == 40)
    for j, drug in ((PLAN["no_vasopressor"], "insulin"), (PLAN["double_insulin"], "norepinephrine")):
        np.testing.assert_array_equal(pd[:, j, :, DRUG[drug]], pd[:, 0, :, DRUG[drug]])
    # the recorded plan is the factual latent trajectory, and its doses are the database's for
    # every patient alive through the horizon
    np.testing.assert_allclose(rec, a["latent_states"][coh][:, C.HISTORY_STEPS:], rtol=1e-5, atol=1e-4)
    alive = ~(a["outcome_time"][coh, 0] < C.HORIZON_STEPS)
    np.testing.assert_array_equal(pd[alive, 0], a["recorded_doses"][coh][alive, C.HISTORY_STEPS:])
    # no vasopressor: lower MAP wherever norepinephrine was given
    ne = pd[:, 0, :, DRUG["norepinephrine"]].sum(axis=1) > 0
    assert ne.sum() >= 10
    d_map = ps[ne, PLAN["no_vasopressor"], 1:, STATE["map"]] - rec[ne, 1:, STATE["map"]]
    assert d_map.mean() < -2.0 and np.mean(d_map <= 1e-6) > 0.99
    assert np.all(ps[~ne, PLAN["no_vasopressor"]] == rec[~ne])  # nothing to remove: no change
    # double insulin: lower glucose where insulin was given
    ins = pd[:, 0, :, DRUG["insulin"]].sum(axis=1) > 0
    d_glu = ps[ins, PLAN["double_insulin"], 1:, STATE["glucose"]] - rec[ins, 1:, STATE["glucose"]]
    assert d_glu.mean() < -2.0 and np.mean(d_glu <= 1e-6) > 0.99
    # a litre of fluid raises MAP and lowers lactate; furosemide lowers MAP and raises creatinine
    d = ps[:, PLAN["fluid_bolus_1l"], 1] - rec[:, 1]
    assert np.all(d[:, STATE["map"]] > 0) and d[:, STATE["lactate"]].mean() < 0
    d = ps[:, PLAN["furosemide_40mg"], 1:] - rec[:, 1:]
    assert d[..., STATE["map"]].mean() < 0 and d[..., STATE["creatinine"]].mean() > 0
    # the outcome risk moves with the trajectory: without vasopressor, risk is not lower
    risk = a["plan_risk"][coh]
    assert risk[ne, PLAN["no_vasopressor"], 0].mean() > risk[ne, 0, 0].mean()


def test_injected_defects_match_the_manifest(fed: Path) -> None:
    totals = []
    for k in range(1, SITES + 1):
        _, m = _truth(fed, k)
        want = m["defects"]["counts"]
        con = _sqlite(fed, k)
        implausible = 0
        for var in SPEC.state_variables:
            lo, hi = var.plausible_range
            for u in var.units:
                implausible += con.execute(
                    "SELECT count(*) FROM measurement WHERE measurement_concept_id = ? AND unit_concept_id = ? "
                    "AND (value_as_number * ? + ? < ? OR value_as_number * ? + ? > ?)",
                    (var.concept_ids[0], u.concept_id, u.factor, u.offset, lo, u.factor, u.offset, hi),
                ).fetchone()[0]
        duplicates = con.execute(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM measurement GROUP BY person_id, "
            "measurement_concept_id, measurement_date, measurement_datetime, value_as_number, unit_concept_id HAVING n > 1)"
        ).fetchone()[0]
        orphans = con.execute("SELECT count(*) FROM measurement WHERE person_id NOT IN (SELECT person_id FROM person)").fetchone()[0]
        outside = con.execute(
            "SELECT count(*) FROM measurement m WHERE m.person_id IN (SELECT person_id FROM person) AND NOT EXISTS ("
            "SELECT 1 FROM observation_period o WHERE o.person_id = m.person_id AND "
            "date(m.measurement_date) BETWEEN date(o.observation_period_start_date) AND date(o.observation_period_end_date))"
        ).fetchone()[0]
        clean = m["counts"]["rows"]["measurement"] - 4 * want["duplicate_row"]
        con.close()
        assert {"implausible_value": implausible, "duplicate_row": duplicates, "orphan_row": orphans,
                "outside_observation_period": outside} == want
        assert want["duplicate_row"] == round(DEFECTS * m["profile"]["defect_weight"] * clean)
        totals.append(want["orphan_row"])
    assert totals[1] > totals[0] > totals[2] > 0  # site weights 2, 1, 0.5


# --- determinism -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_rows_and_ground_truth(fed: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthesize(_request(again, workers=1))  # serial this time: the pool must not matter
    for k in range(1, SITES + 1):
        assert _table_rows(fed / f"site_{k}.db") == _table_rows(again / f"site_{k}.db")
        for name in ("truth.npz", "manifest.json"):
            assert (fed / "ground_truth" / f"site_{k}" / name).read_bytes() == (again / "ground_truth" / f"site_{k}" / name).read_bytes()
    assert (fed / "ground_truth" / "manifest.json").read_bytes() == (again / "ground_truth" / "manifest.json").read_bytes()
    other = tmp_path / "other"
    synthesize(_request(other, sites=1, seed=SEED + 1, workers=1))
    assert _table_rows(fed / "site_1.db")["measurement"] != _table_rows(other / "site_1.db")["measurement"]


# --- the command line and its errors ---------------------------------------------------------------

_CLI_READY = False


def _cli():
    """``fedtwin.cli.main.app`` with its commands registered once (as ``fedtwin`` does)."""
    global _CLI_READY
    import fedtwin.cli.main as main

    if not _CLI_READY:
        try:
            main._register()
        except ModuleNotFoundError as exc:  # a sibling command group not yet in this checkout
            if "omop_cmd" not in str(exc):
                raise
            from fedtwin.cli import spec_cmd, synth_cmd

            main.app.add_typer(spec_cmd.app, name="spec")
            main.app.command(name="synth")(synth_cmd.synth)
        _CLI_READY = True
    return main.app


def test_cli_writes_sites_and_ground_truth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    out = tmp_path / "cli"
    args = ["synth", "--sites", "2", "--sizes", "30,12", "--seed", "3", "--out", str(out), "--workers", "1"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "synthetic hospitals" in result.output
    for k, n in ((1, 30), (2, 12)):
        assert (out / f"site_{k}.db").is_file() and (out / "ground_truth" / f"site_{k}" / "truth.npz").is_file()
        assert json.loads((out / "ground_truth" / f"site_{k}" / "manifest.json").read_text())["counts"]["persons"] == n
    assert json.loads((out / "ground_truth" / "manifest.json").read_text())["arguments"]["sizes"] == [30, 12]


def test_cli_refuses_a_file_as_out_and_writes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    target = tmp_path / "not_a_folder.txt"
    target.write_text("keep me")
    result = CliRunner().invoke(_cli(), ["synth", "--sites", "1", "--patients", "5", "--out", str(target)])
    assert isinstance(result.exception, FedTwinError), result.output
    assert "is a file, not a folder" in result.exception.problem and result.exception.fix
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder.txt"]


def test_unreachable_postgresql_gives_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "pg_down"
    template = "postgresql+psycopg://postgres@127.0.0.1:1/fedtwin_site_{site}"  # nothing listens on port 1
    with pytest.raises(DatabaseError) as err:
        synthesize(SynthRequest(sites=2, patients=5, seed=1, out=out, db_url_template=template))
    assert "cannot connect" in err.value.problem and "--db-url-template" in err.value.fix
    assert not out.exists()


def test_template_without_site_placeholder_is_refused_for_several_sites(tmp_path: Path) -> None:
    with pytest.raises(FedTwinError, match="placeholder"):
        synthesize(SynthRequest(sites=2, patients=5, seed=1, out=tmp_path / "x", db_url_template="postgresql+psycopg://u@h/db"))
    assert not (tmp_path / "x").exists()


def test_a_site_with_persons_is_never_overwritten(fed: Path, tmp_path: Path) -> None:
    before = (fed / "site_1.db").stat().st_size, (fed / "ground_truth" / "site_1" / "truth.npz").read_bytes()
    with pytest.raises(FedTwinError, match="already holds an OMOP person table"):
        synthesize(_request(fed))
    assert (fed / "site_1.db").stat().st_size == before[0]
    assert (fed / "ground_truth" / "site_1" / "truth.npz").read_bytes() == before[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_site_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    import fedtwin.synth.hospitals as hospitals

    real = hospitals.write_site

    def flaky(db, profile, tables, on_table=None, **kw):  # noqa: ANN001, ANN003, ANN202
        if profile.site == 2:
            def boom(name: str, n: int) -> None:
                if name == "measurement":
                    raise OSError(28, "No space left on device")
            return real(db, profile, tables, boom, **kw)
        return real(db, profile, tables, on_table, **kw)

    monkeypatch.setattr(hospitals, "write_site", flaky)
    out = tmp_path / "fails"
    with pytest.raises(FedTwinError, match="No space left") as err:
        synthesize(SynthRequest(sites=2, patients=10, seed=1, out=out, workers=workers))
    assert err.value.fix  # problem and fix survive the process pool
    assert not out.exists()  # site 1 (complete) and site 2 (rolled back) are both removed


def test_a_failure_rolls_back_a_pre_existing_empty_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database this run did not create is kept, but the failed transaction leaves no rows."""
    import fedtwin.synth.hospitals as hospitals

    real = hospitals.write_site

    def failing(db, profile, tables, on_table=None, **kw):  # noqa: ANN001, ANN003, ANN202
        def boom(name: str, n: int) -> None:
            if name == "drug_exposure":
                raise OSError(28, "No space left on device")
        return real(db, profile, tables, boom, **kw)

    monkeypatch.setattr(hospitals, "write_site", failing)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "site_1.db").touch()  # an empty SQLite database the user made
    with pytest.raises(FedTwinError, match="No space left"):
        synthesize(SynthRequest(sites=1, patients=10, seed=1, out=out, workers=1))
    con = sqlite3.connect(out / "site_1.db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    rows = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    con.close()
    assert sum(rows.values()) == 0, {t: n for t, n in rows.items() if n}
    assert not (out / "ground_truth" / "site_1").exists()


# --- PostgreSQL ------------------------------------------------------------------------------------


def _template(admin_url: str, prefix: str) -> str:
    """``<server>/<prefix>_{site}`` (built as text: URL rendering would escape the braces)."""
    return make_url(admin_url).set(database=f"{prefix}_SITE").render_as_string(hide_password=False).replace("_SITE", "_{site}")


@pytest.mark.postgres
def test_postgresql_site_in_an_existing_empty_database(pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "pg"
    synthesize(SynthRequest(sites=1, patients=40, seed=5, out=out, db_url_template=pg_url, defects=0.01))
    db = open_database(pg_url)
    assert set(db.table_names()) <= set(cdm_tables())
    a, m = _truth(out, 1)
    assert m["database"]["backend"] == "postgresql"
    ct = extract_cohort(db, SPEC)
    assert np.array_equal(ct.person_ids, a["person_id"][a["in_cohort"]])
    np.testing.assert_allclose(ct.doses, a["recorded_doses"][np.searchsorted(a["person_id"], ct.person_ids)], atol=1e-3)
    with db.connect() as conn:
        n_before = conn.execute(text("SELECT count(*) FROM measurement")).scalar()
    with pytest.raises(FedTwinError, match="already holds"):
        synthesize(SynthRequest(sites=1, patients=40, seed=5, out=tmp_path / "pg2", db_url_template=pg_url))
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM measurement")).scalar() == n_before
    db.dispose()


@pytest.mark.postgres
def test_postgresql_databases_are_created_and_match_sqlite(pg_admin_url: str, tmp_path: Path) -> None:
    prefix = f"fedtwin_test_synth_{uuid.uuid4().hex[:8]}"
    template = _template(pg_admin_url, prefix)
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        synthesize(SynthRequest(sites=2, patients=30, seed=9, out=tmp_path / "pg", db_url_template=template, workers=2))
        synthesize(SynthRequest(sites=2, patients=30, seed=9, out=tmp_path / "lite", workers=1))
        with admin.connect() as conn:
            names = {r[0] for r in conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": prefix + "%"})}
        assert names == {f"{prefix}_1", f"{prefix}_2"}
        for k in (1, 2):
            pg = open_database(template.replace("{site}", str(k)))
            lite = open_database(str(tmp_path / "lite" / f"site_{k}.db"))
            q = text("SELECT measurement_concept_id, count(*), sum(value_as_number) FROM measurement GROUP BY 1 ORDER BY 1")
            with pg.connect() as a, lite.connect() as b:
                ra, rb = a.execute(q).all(), b.execute(q).all()
                assert [(r[0], r[1]) for r in ra] == [(r[0], r[1]) for r in rb]
                np.testing.assert_allclose([float(r[2]) for r in ra], [float(r[2]) for r in rb], rtol=1e-9)
                persons = select(text("count(*)")).select_from(text("person"))
                assert a.execute(persons).scalar() == b.execute(persons).scalar()
            pg.dispose()
            lite.dispose()
            pg_truth = (tmp_path / "pg" / "ground_truth" / f"site_{k}" / "truth.npz").read_bytes()
            assert pg_truth == (tmp_path / "lite" / "ground_truth" / f"site_{k}" / "truth.npz").read_bytes()
    finally:
        with admin.connect() as conn:
            for k in (1, 2):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{prefix}_{k}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.postgres
def test_postgresql_failure_drops_the_databases_it_created(pg_admin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtwin.synth.hospitals as hospitals

    real = hospitals.write_site

    def flaky(db, profile, tables, on_table=None, **kw):  # noqa: ANN001, ANN003, ANN202
        if profile.site == 2:
            raise FedTwinError("simulated failure", "none")
        return real(db, profile, tables, on_table, **kw)

    monkeypatch.setattr(hospitals, "write_site", flaky)
    prefix = f"fedtwin_test_synth_{uuid.uuid4().hex[:8]}"
    template = _template(pg_admin_url, prefix)
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with pytest.raises(FedTwinError, match="simulated failure"):
            synthesize(SynthRequest(sites=2, patients=10, seed=1, out=tmp_path / "pg", db_url_template=template, workers=1))
        with admin.connect() as conn:
            left = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": prefix + "%"}).all()
        assert left == []
        assert not (tmp_path / "pg").exists()
    finally:
        with admin.connect() as conn:
            for k in (1, 2):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{prefix}_{k}" WITH (FORCE)'))
        admin.dispose()
