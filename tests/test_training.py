"""Local training with DP inside the ledger's budget, and pooled (benchmark-only) training,
on real synthetic OMOP hospitals, real Opacus and a real ledger file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtwin.errors import FedTwinError
from fedtwin.omop import open_database
from fedtwin.privacy.accounting import BudgetExceededError, composed_epsilon
from fedtwin.privacy.ledger import PrivacyLedger, dataset_id_for_database
from fedtwin.spec import load_spec
from fedtwin.synth import SynthRequest, synthesize
from fedtwin.training.central import train_central
from fedtwin.training.local import LocalTrainingConfig, train_local
from fedtwin.training.privacy_plan import DPRequest, open_or_create_ledger
from fedtwin.twin import FitConfig, load_model

SPEC = Path(__file__).resolve().parents[1] / "specs" / "icu-hemodynamics.yaml"


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "hospitals"
    synthesize(SynthRequest(sites=2, patients=300, seed=5, out=out, sizes=[300, 300], workers=1))
    return out


def _cfg(ledger: Path, epsilon: float, budget: float | None = 6.0, delta: float | None = 1e-5) -> LocalTrainingConfig:
    return LocalTrainingConfig(dp=DPRequest(epsilon=epsilon, delta=delta, budget_epsilon=budget, epochs=1.0, batch_size=64), ledger=ledger)


def test_dp_runs_compose_in_the_ledger(hospitals: Path, tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    db = open_database(str(hospitals / "site_1.db"))
    ledger = tmp_path / "ledger.db"
    first = train_local(db, spec, tmp_path / "run1", _cfg(ledger, 2.0))
    assert first.privacy is not None and first.epsilon_spent_total == pytest.approx(2.0, abs=0.02)
    assert first.fit.dp is not None and first.fit.steps == first.privacy.steps
    second = train_local(db, spec, tmp_path / "run2", _cfg(ledger, 2.0, budget=None, delta=None))
    # the second run's noise is calibrated on top of the first: the composed total is 4, and
    # it equals one accountant over both runs' steps (not a sum of per-run epsilons)
    assert second.epsilon_spent_total == pytest.approx(4.0, abs=0.03)
    ds = dataset_id_for_database(db.url)
    with PrivacyLedger.open(ledger, read_only=True) as led:
        hist = led.history(ds)
        assert led.spent_epsilon(ds) == pytest.approx(composed_epsilon(hist, 1e-5, "rdp"))
    assert second.privacy.noise_multiplier < first.privacy.noise_multiplier * 1.5
    for run in ("run1", "run2"):
        files = {p.name for p in (tmp_path / run).iterdir()}
        assert files == {"model.pt", "config.json", "metrics.json", "privacy.json"}
    privacy = json.loads((tmp_path / "run2" / "privacy.json").read_text())
    assert privacy["dp"] is True and privacy["secure_rng"] is False
    assert privacy["plan"]["spent_before"] == pytest.approx(2.0, abs=0.02)
    model = load_model(tmp_path / "run2" / "model.pt", spec)
    assert model.spec.name == spec.name


def test_exhausted_budget_refuses_before_training(hospitals: Path, tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    db = open_database(str(hospitals / "site_1.db"))
    ledger = tmp_path / "ledger.db"
    train_local(db, spec, tmp_path / "run1", _cfg(ledger, 2.0, budget=2.0))
    ds = dataset_id_for_database(db.url)
    with PrivacyLedger.open(ledger, read_only=True) as led:
        entries_before = len(led.entries(ds))
    with pytest.raises(BudgetExceededError, match="exhausted|too small|exceed"):
        train_local(db, spec, tmp_path / "run2", _cfg(ledger, 1.0, budget=None, delta=None))
    assert not (tmp_path / "run2").exists()
    assert not list(tmp_path.glob(".run2.partial-*"))
    with PrivacyLedger.open(ledger, read_only=True) as led:
        assert len(led.entries(ds)) == entries_before  # a refusal spends nothing


def test_missing_ledger_and_budget_mismatch_are_refused(hospitals: Path, tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    db = open_database(str(hospitals / "site_1.db"))
    ledger = tmp_path / "ledger.db"
    with pytest.raises(FedTwinError, match="does not exist") as err:
        train_local(db, spec, tmp_path / "run", _cfg(ledger, 1.0, budget=None))
    assert "--budget-epsilon" in err.value.fix
    assert not ledger.exists() and not (tmp_path / "run").exists()
    train_local(db, spec, tmp_path / "run", _cfg(ledger, 1.0, budget=5.0))
    with pytest.raises(FedTwinError, match="differs from the budget recorded") as err:
        train_local(db, spec, tmp_path / "run2", _cfg(ledger, 1.0, budget=9.0))
    assert err.value.problem.startswith("--budget-epsilon 9 ") and err.value.fix.startswith("omit --budget-epsilon")
    # a federated site's budget comes from its site config: the refusal names the config field, not a CLI option
    site_request = replace(_cfg(ledger, 1.0, budget=9.0).dp, budget_source="[privacy] epsilon of site site_1's config")
    with pytest.raises(FedTwinError, match="differs from the budget recorded") as err:
        open_or_create_ledger(ledger, dataset_id_for_database(db.url, db.cdm_schema), site_request)
    assert err.value.fix.startswith("set [privacy] epsilon of site site_1's config to 5 ")
    with PrivacyLedger.open(ledger, read_only=True) as led:
        [first] = led.status(led.datasets()[0]).budget_events
    assert first.reason == "set by --budget-epsilon"
    with pytest.raises(FedTwinError, match="already exists"):
        train_local(db, spec, tmp_path / "run", _cfg(ledger, 1.0, budget=None, delta=None))


def test_no_dp_and_central(hospitals: Path, tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    dbs = [open_database(str(hospitals / f"site_{k}.db")) for k in (1, 2)]
    res = train_local(dbs[0], spec, tmp_path / "nodp", LocalTrainingConfig(dp=None))
    assert res.privacy is None and res.fit.dp is None
    assert json.loads((tmp_path / "nodp" / "privacy.json").read_text())["dp"] is False
    report, held_out = train_central(dbs, spec, tmp_path / "central", FitConfig(epochs=1))
    assert report.n_patients > res.n_train  # pooled two sites
    assert "loss" in held_out


def test_train_cli(hospitals: Path, tmp_path: Path) -> None:
    from fedtwin.cli import main

    main._register()
    runner = CliRunner()
    args = ["train", "local", "--db", str(hospitals / "site_2.db"), "--spec", str(SPEC), "--ledger", str(tmp_path / "l.db"),
            "--epochs", "1", "--batch-size", "64"]
    ok = runner.invoke(main.app, [*args, "--epsilon", "0.5", "--delta", "1e-5", "--budget-epsilon", "1", "--out", str(tmp_path / "a")],
                       env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "epsilon spent on this dataset now" in " ".join(ok.output.split()) and "did not fit" not in ok.output
    capped = runner.invoke(main.app, [*args, "--epsilon", "5", "--out", str(tmp_path / "c")], env={"COLUMNS": "200"})
    assert capped.exit_code == 0, capped.output  # the run that asks for more than fits is told so, not capped silently
    assert "--epsilon 5 did not fit" in " ".join(capped.output.split()) and "of 1 (delta" in capped.output
    refused = runner.invoke(main.app, [*args, "--epsilon", "1", "--out", str(tmp_path / "b")])
    assert refused.exit_code != 0 and isinstance(refused.exception, BudgetExceededError)
    help_text = runner.invoke(main.app, ["train", "central", "--help"]).output
    assert "BENCHMARK ONLY" in help_text
