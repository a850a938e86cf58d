"""Evaluation of a trained twin on a synthetic ICU hospital (real extraction, real training).

One small synthetic site (fedtwin.synth, ~450 patients in the cohort) is generated and a
hybrid twin is trained on its train split once per module; the tests then check the hazard
leakage fix, the twin against persistence, what-if directions against the ground truth, the
additivity of the statistics, and the ``fedtwin twin`` commands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedtwin.cli import twin_cmd
from fedtwin.errors import FedTwinError
from fedtwin.evaluation import (
    EvaluationConfig,
    EvaluationLayout,
    GroundTruth,
    TwinEvaluationStats,
    calibrate_intervals,
    crossfit_folds,
    evaluation_report,
    fit_baselines,
    match_truth,
    parse_plan,
    site_statistics,
    twin_predictions,
)
from fedtwin.extract.extractor import Extractor
from fedtwin.extract.tensors import CohortTensors
from fedtwin.omop import open_database
from fedtwin.spec import TwinSpec, load_spec, spec_hash
from fedtwin.synth import SynthRequest, synthesize
from fedtwin.training.split import train_test_split
from fedtwin.twin import FitConfig, TwinModel, fit, forecast, load_model, save_model
from fedtwin.twin.batch import prepare_batch

REPO = Path(__file__).resolve().parents[1]
ICU = REPO / "specs" / "icu-hemodynamics.yaml"
FAST = ("twin", "mechanistic_only", "persistence", "population_mean")  # no residual-only training


@dataclass
class Site:
    out: Path
    db: Path
    spec: TwinSpec
    tensors: CohortTensors
    train: CohortTensors
    test: CohortTensors
    model: TwinModel
    model_path: Path
    truth: GroundTruth


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    out = tmp_path_factory.mktemp("eval") / "synth"
    synthesize(SynthRequest(sites=1, patients=500, seed=5, out=out, workers=1))
    spec = load_spec(ICU)
    tensors = Extractor(open_database(str(out / "site_1.db")), spec).extract()
    train, test = train_test_split(tensors)
    torch.manual_seed(0)
    model = TwinModel(spec)
    fit(model, train, FitConfig(epochs=30, batch_size=64, lr=5e-3, seed=0))
    path = save_model(model, out.parent / "twin.pt")
    return Site(out, out / "site_1.db", spec, tensors, train, test, model, path, GroundTruth.load(out))


def _value(report: dict, key: str) -> float:
    cell = report["metrics"][key]
    assert isinstance(cell, dict), (key, cell)
    return float(cell["value"])


# ---- hazard leakage -----------------------------------------------------------------------------


def test_risk_ignores_recorded_future_doses_and_outcomes(site: Site) -> None:
    """Two copies of the same patients, identical up to the prediction time, with different doses,
    measurements and outcomes after it, get the same risk; the training objective's hazard term
    does not see the horizon doses either."""
    a = site.test.select(np.arange(40))
    b = a.select(np.arange(40))
    h = a.history_steps
    b.doses = b.doses.copy()
    b.doses[:, h:] = 0.0  # treatment stopped after the prediction time (as when a patient dies)
    b.doses[:, h:, 3] = 1000.0  # ... or a litre of fluid every hour
    b.values = b.values.copy()
    b.values[:, h:] = np.where(b.mask[:, h:], b.values[:, h:] * 0.7, 0.0)
    b.outcome_event = ~b.outcome_event
    b.outcome_time = np.where(b.outcome_event, 1.5, np.nan).astype(np.float32)
    fa, fb = forecast(site.model, a, n_samples=8), forecast(site.model, b, n_samples=8)
    assert fa.risk_plan == "hold"
    np.testing.assert_array_equal(fa.risk, fb.risk)
    assert not np.allclose(fa.mean, fb.mean)  # the forecast does follow the recorded doses
    # the leak the fix closes: a risk read from the recorded-dose rollout differs between the copies
    la, lb = forecast(site.model, a, n_samples=8, risk_doses="recorded"), forecast(site.model, b, n_samples=8, risk_doses="recorded")
    assert np.abs(la.risk - lb.risk).max() > 1e-4
    # training: same targets, different horizon doses -> identical hazard term
    b_same = b.select(np.arange(40))
    b_same.outcome_event, b_same.outcome_time = a.outcome_event, a.outcome_time
    with torch.no_grad():
        ta = site.model.loss_terms(prepare_batch(a, site.spec, site.model.norm), sample=False)
        tb = site.model.loss_terms(prepare_batch(b_same, site.spec, site.model.norm), sample=False)
    torch.testing.assert_close(ta["hazard_nll"], tb["hazard_nll"], rtol=0, atol=0)
    assert not torch.allclose(ta["forecast_nll"], tb["forecast_nll"])


def test_branched_rollout_equals_a_full_rollout(site: Site) -> None:
    """The hazard's rollout under the prospective plan continues the recorded-dose rollout from
    the prediction time (TwinModel.branch); it must equal rolling the plan out from scratch."""
    model = site.model
    batch = prepare_batch(site.test.select(np.arange(32)), site.spec, model.norm)
    plan = batch.with_doses(model.prospective_doses(batch.dose))
    with torch.no_grad():
        theta = model.posterior(batch).sample(torch.Generator().manual_seed(1))
        for residual in (True, False):
            base = model.rollout(batch, theta, use_residual=residual)
            full, branched = model.rollout(plan, theta, use_residual=residual), model.branch(base, plan, theta, use_residual=residual)
            torch.testing.assert_close(branched.mean, full.mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(branched.var, full.var, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(full.mean, base.mean)


# ---- quality and what-if against the ground truth --------------------------------------------------


@pytest.fixture(scope="module")
def report(site: Site) -> dict:
    layout = EvaluationLayout.for_spec(site.spec, models=FAST, plans=site.truth.alternatives)
    config = EvaluationConfig(n_samples=16)
    baselines = fit_baselines(site.model, site.train, layout.models, config)
    h = site.test.history_steps
    truth = match_truth(site.truth, site.spec, site.test.person_ids, site.test.doses[:, h:], layout.plans)
    stats = site_statistics(site.model, site.test, layout, baselines, truth, config)
    return evaluation_report(stats, suppression_threshold=site.spec.suppression_threshold)


def test_twin_beats_persistence_on_forecast_rmse(site: Site, report: dict) -> None:
    """What is asserted: on held-out patients, the twin's RMSE (pooled over the horizon) is below
    persistence for heart rate and MAP (the densely measured, drug-driven variables) and the
    geometric mean over all variables of twin / persistence RMSE is below 1. (Lactate and
    creatinine, slow and sparsely measured, are close to persistence: see docs/evaluation.md.)"""
    ratios = []
    for v in site.spec.state_names:
        twin, pers = _value(report, f"rmse.{v}.all.twin"), _value(report, f"rmse.{v}.all.persistence")
        ratios.append(twin / pers)
        assert twin < _value(report, f"rmse.{v}.all.population_mean")
    assert _value(report, "rmse.map.all.twin") < _value(report, "rmse.map.all.persistence")
    assert _value(report, "rmse.heart_rate.all.twin") < _value(report, "rmse.heart_rate.all.persistence")
    assert np.exp(np.mean(np.log(ratios))) < 1.0, ratios
    cov = _value(report, "coverage90.all.all.twin")
    assert 0.8 < cov < 0.98, cov
    assert _value(report, "nll.all.all.twin") < _value(report, "nll.all.all.persistence")
    assert 0.5 < _value(report, "auroc.death.twin") <= 1.0


def test_what_if_follows_the_ground_truth(site: Site, report: dict) -> None:
    """no_vasopressor: the twin's predicted MAP effect correlates with the true one, and where
    the truth says MAP falls the twin mostly says so too; the effect error beats 'no effect'."""
    test = site.test
    h = test.history_steps
    truth = match_truth(site.truth, site.spec, test.person_ids, test.doses[:, h:], site.truth.alternatives)
    pred = twin_predictions(site.model, test, truth, n_samples=16)["twin"]
    p = truth.plans.index("no_vasopressor")
    j = site.spec.state_names.index("map")
    true_eff = truth.effect[:, p, :, j].mean(axis=1)
    pred_eff = pred.effect[:, p, :, j].mean(axis=1)
    on_drug = np.abs(true_eff) > 0.5  # patients who had norepinephrine in the horizon
    assert on_drug.sum() >= 10
    assert np.corrcoef(pred_eff[on_drug], true_eff[on_drug])[0, 1] > 0.3
    falls = true_eff < -0.5
    assert np.mean(pred_eff[falls] < 0) > 0.8
    assert _value(report, "effect_rmse.no_vasopressor.map.all.twin") < _value(report, "effect_rmse.no_vasopressor.map.all.persistence")
    # insulin acts on glucose only, per the spec: the mechanism alone predicts no MAP effect
    assert _value(report, "effect_rmse.double_insulin.map.all.mechanistic_only") == pytest.approx(
        _value(report, "effect_rmse.double_insulin.map.all.persistence"))


def test_interval_calibration_round_trip(site: Site, tmp_path: Path) -> None:
    model = load_model(site.model_path, site.spec)
    part = crossfit_folds(site.train.person_ids, 5)
    scale = calibrate_intervals(model, site.train.select(np.flatnonzero(part == 0)), n_samples=8)
    assert scale.shape == (5,) and np.all((scale > 0.3) & (scale < 3.0))
    again = load_model(save_model(model, tmp_path / "cal.pt"), site.spec)
    np.testing.assert_allclose(again.interval_scale.numpy(), scale, rtol=1e-6)
    one = site.test.select(np.arange(5))
    calibrated = forecast(again, one, n_samples=4).std
    again.interval_scale = None
    raw = forecast(again, one, n_samples=4).std
    moved = np.abs(scale - 1) > 1e-3
    assert np.all((calibrated > raw)[..., moved] == (scale > 1)[moved])


# ---- additive statistics ---------------------------------------------------------------------------


def test_statistics_of_two_halves_add_up_to_the_whole(site: Site) -> None:
    """With the posterior mean (n_samples=0: no Monte Carlo draws that depend on the batch), the
    statistics of two disjoint halves add up to those of the whole cohort, and so does the report."""
    layout = EvaluationLayout.for_spec(site.spec, models=FAST, plans=site.truth.alternatives)
    config = EvaluationConfig(n_samples=0)
    baselines = fit_baselines(site.model, site.train, layout.models, config)
    test = site.test
    h = test.history_steps
    truth = match_truth(site.truth, site.spec, test.person_ids, test.doses[:, h:], layout.plans)
    half = np.arange(test.n_patients) % 2 == 0
    parts = [np.flatnonzero(half), np.flatnonzero(~half)]
    whole = site_statistics(site.model, test, layout, baselines, truth, config)
    a, b = (site_statistics(site.model, test.select(i), layout, baselines, truth.select(i), config) for i in parts)
    total = a + b
    np.testing.assert_allclose(total.to_vector(), whole.to_vector(), rtol=1e-9, atol=1e-6)
    rebuilt = TwinEvaluationStats.from_vector(TwinEvaluationStats.zeros(layout), a.to_vector() + b.to_vector())
    r1 = evaluation_report(rebuilt, subgroups=False)["metrics"]
    r2 = evaluation_report(whole, subgroups=False)["metrics"]
    for key in ("rmse.map.h03.twin", "coverage90.all.all.twin", "auroc.death.twin", "effect_rmse.no_vasopressor.map.all.twin"):
        assert r1[key]["value"] == pytest.approx(r2[key]["value"], rel=1e-6)
    assert float(total.counts.patients) == test.n_patients


# ---- CLI ----------------------------------------------------------------------------------------


def _run(*args: str):  # noqa: ANN202
    return CliRunner().invoke(twin_cmd.app, list(args), env={"COLUMNS": "220"})


def test_cli_evaluate_json_keys(site: Site) -> None:
    result = _run("evaluate", "--model", str(site.model_path), "--db", str(site.db), "--spec", str(ICU),
                  "--ground-truth", str(site.out), "--split", "test", "--json", "--samples", "8",
                  "--baselines", "mechanistic_only,persistence,population_mean")
    assert result.exit_code == 0, result.output + result.stderr
    rep = json.loads(result.stdout)
    assert rep["format"] == "fedtwin-twin-evaluation/1" and rep["split"] == "test"
    assert rep["cohort"]["n_patients"] == site.test.n_patients
    assert rep["models"] == ["twin", "mechanistic_only", "persistence", "population_mean"]
    m = rep["metrics"]
    for key in ("rmse.map.h03.twin", "rmse.map.all.persistence", "nll.glucose.h12.twin", "coverage90.all.all.twin",
                "coverage50.map.all.population_mean", "auroc.death.twin", "calibration_slope.aki.twin",
                "effect_rmse.no_vasopressor.map.all.twin", "effect_bias.fluid_bolus_1l.lactate.h01.mechanistic_only"):
        assert key in m, key
    assert set(m["rmse.map.h03.twin"]) == {"value", "ci", "n_patients"}
    assert "rmse.all.all.twin" not in m  # errors in different units are not pooled
    assert "sex=F" in rep["subgroups"] and "rmse.map.all.twin" in rep["subgroups"]["sex=F"]["metrics"]


def test_cli_evaluate_tiny_cohort_is_suppressed(site: Site, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    synthesize(SynthRequest(sites=1, patients=9, seed=3, out=tiny, workers=1))
    result = _run("evaluate", "--model", str(site.model_path), "--db", str(tiny / "site_1.db"), "--spec", str(ICU),
                  "--json", "--samples", "4", "--baselines", "persistence")
    assert result.exit_code == 0, result.output + result.stderr
    rep = json.loads(result.stdout)
    assert rep["cohort"]["n_patients"] == "<10"
    assert all(v == "suppressed" for v in rep["metrics"].values())
    assert all(row["n_patients"] in ("<10", "suppressed") for row in rep["subgroups"].values())
    assert all(e == "<10" or e == "suppressed" for e in rep["cohort"]["n_events"].values())
    table = _run("evaluate", "--model", str(site.model_path), "--db", str(tiny / "site_1.db"), "--spec", str(ICU),
                 "--samples", "4", "--baselines", "persistence")
    assert table.exit_code == 0 and "<10 patients" in table.stdout and "suppressed" in table.stdout


def test_cli_model_of_another_spec_names_both_hashes(site: Site, tmp_path: Path) -> None:
    other = load_spec(REPO / "specs" / "hypertension-bp.yaml")
    path = save_model(TwinModel(other), tmp_path / "other.pt")
    result = _run("evaluate", "--model", str(path), "--db", str(site.db), "--spec", str(ICU))
    assert result.exit_code == 2
    assert spec_hash(other) in result.stderr and spec_hash(site.spec) in result.stderr and "Fix:" in result.stderr


def test_plan_validation(site: Site, tmp_path: Path) -> None:
    spec = site.spec
    assert parse_plan({"interventions": {"norepinephrine": 0}}, spec) == {"norepinephrine": [0.0] * 12}
    with pytest.raises(FedTwinError) as err:  # every problem at once
        parse_plan({"interventions": {"vasopressin": 1, "insulin": -2, "fluids": [500, 0], "furosemide": "lots"}}, spec)
    msg = err.value.problem
    assert "unknown intervention 'vasopressin'" in msg and "negative dose -2" in msg and "2 doses given, the horizon has 12" in msg
    assert "furosemide: doses must be numbers" in msg and "[iU]" in err.value.fix
    for bad in ({"interventions": {}}, {"plan": {"insulin": 1}}, [1, 2], {"interventions": {"insulin": True}}):
        with pytest.raises(FedTwinError):
            parse_plan(bad, spec)
    plan = tmp_path / "bad.yaml"
    plan.write_text("interventions:\n  norepinephrine: [0, 0]\n  heparin: 5\n")
    result = _run("whatif", "--model", str(site.model_path), "--db", str(site.db), "--spec", str(ICU),
                  "--person-id", str(int(site.test.person_ids[0])), "--plan", str(plan))
    assert result.exit_code == 2 and "heparin" in result.stderr and "2 doses given" in result.stderr
    assert result.stdout == ""



def test_cli_whatif_refuses_a_tampered_model_file(site: Site, tmp_path: Path) -> None:
    """The clinician's path: an edited model file is refused (exit 2) before any patient data is
    read; a forger who also rewrites the file's digests is stopped by --expect-digest."""
    from fedtwin.twin.io import _content_digest, model_parameters_digest

    pid = str(int(site.test.person_ids[0]))
    plan = str(REPO / "specs" / "plans" / "icu-no-vasopressor.yaml")
    payload = torch.load(site.model_path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    tampered = dict(payload, state_dict={**payload["state_dict"], name: payload["state_dict"][name] * 1.5})
    torch.save(tampered, tmp_path / "tampered.pt")
    png = tmp_path / "wi.png"
    result = _run("whatif", "--model", str(tmp_path / "tampered.pt"), "--db", str(site.db), "--spec", str(ICU),
                  "--person-id", pid, "--plan", plan, "--out", str(png))
    assert result.exit_code == 2 and result.stdout == "" and not png.exists()
    text = " ".join(result.stderr.split())
    assert f"but the file records {payload['parameters_digest']}" in text and "Fix: do not use this file" in text, text

    forged = dict(tampered)  # a forger who knows the recipe rewrites the embedded digests
    m = load_model(site.model_path)
    with torch.no_grad():
        dict(m.named_parameters())[name].mul_(1.5)
    forged["parameters_digest"] = model_parameters_digest(m)
    forged["content_digest"] = _content_digest(forged)
    torch.save(forged, tmp_path / "forged.pt")
    released = payload["parameters_digest"][:16]  # what the model card / registry tag says
    result = _run("whatif", "--model", str(tmp_path / "forged.pt"), "--db", str(site.db), "--spec", str(ICU),
                  "--person-id", pid, "--plan", plan, "--out", str(png), "--expect-digest", released)
    assert result.exit_code == 2 and result.stdout == "" and not png.exists()
    assert f"not the expected {released}" in " ".join(result.stderr.split())
    ok = _run("whatif", "--model", str(site.model_path), "--db", str(site.db), "--spec", str(ICU), "--person-id", pid,
              "--plan", plan, "--out", str(png), "--samples", "4", "--expect-digest", released)
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert f"parameters digest {released}" in ok.stdout

def test_cli_whatif_one_patient_and_unknown_person(site: Site, tmp_path: Path) -> None:
    h = site.test.history_steps
    i = int(np.flatnonzero(site.test.doses[:, h:, 0].sum(axis=1) > 0)[0])  # on norepinephrine
    pid = int(site.test.person_ids[i])
    png = tmp_path / "wi.png"
    result = _run("whatif", "--model", str(site.model_path), "--db", str(site.db), "--spec", str(ICU), "--person-id", str(pid),
                  "--plan", str(REPO / "specs" / "plans" / "icu-no-vasopressor.yaml"), "--out", str(png), "--samples", "16")
    assert result.exit_code == 0, result.output + result.stderr
    out = result.stdout
    assert f"What-if for patient {pid}" in out and "map alternative" in out and "+12 h" in out
    assert "prospective default (hold)" in out and "map set point" in out and "explained by the mechanism" in out
    assert png.stat().st_size > 10_000
    others = [str(int(p)) for p in site.tensors.person_ids if int(p) != pid]
    assert not any(o in out for o in others[:50])  # no other patient's id appears
    missing = _run("whatif", "--model", str(site.model_path), "--db", str(site.db), "--spec", str(ICU), "--person-id", "999",
                   "--plan", str(REPO / "specs" / "plans" / "icu-no-vasopressor.yaml"), "--out", str(tmp_path / "x.png"))
    assert missing.exit_code == 2 and "person 999 is not in the cohort" in missing.stderr
    assert missing.stdout == "" and not (tmp_path / "x.png").exists()
