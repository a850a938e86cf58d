"""The README's main job, ``fedtwin demo``: the federated study end to end (small cohorts, 2 rounds).

One real run through the CLI: three synthetic hospitals, a local consortium of Flower processes,
2 SecAgg+ rounds with DP-SGD, MLflow under the output folder, the consortium down afterwards,
every site's ledger within its budget, and the global-vs-local comparison in the summary. The
output-folder checks (a previous demo, a foreign folder) are refused before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import cli_text
from typer.testing import CliRunner

ROUNDS = 2


def _invoke(*args: str):
    from fedtwin.cli import main

    main._register()
    return CliRunner().invoke(main.app, ["demo", *args])




def test_out_folder_that_is_not_a_demo_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep me")
    for extra in ((), ("--force",)):
        res = _invoke("--out", str(foreign), *extra)
        assert res.exit_code == 2, cli_text(res)
        assert "not a previous FedTwin demo" in cli_text(res) and "--out NEW_FOLDER" in cli_text(res), cli_text(res)
    assert sorted(p.name for p in foreign.iterdir()) == ["chapter1.tex"]


def test_budget_must_hold_the_comparison(tmp_path: Path) -> None:
    res = _invoke("--out", str(tmp_path / "d"), "--epsilon", "3", "--budget-epsilon", "4")
    assert res.exit_code == 2 and "--budget-epsilon 6 or more" in cli_text(res), cli_text(res)
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_runs_the_federation_end_to_end(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from coordinator.consortium import processes
    from coordinator.consortium.layout import Layout
    from coordinator.demo_setup import STUDY_ID
    from fedtwin.federation.config import load_site_config, load_study_config
    from fedtwin.privacy.ledger import PrivacyLedger

    out = tmp_path / "demo"
    res = _invoke("--out", str(out), "--patients", "150", "--rounds", str(ROUNDS))
    text = cli_text(res)
    assert res.exit_code == 0, text

    # the consortium is down: no process record alive, nothing carrying its tag or path
    root = out / "consortium"
    assert not [r.name for r in processes.records(Layout.at(root)) if r.alive()]
    assert not processes.stray_processes(Layout.at(root).root, by_cmdline=True)

    # the site configs point at the synthesized hospitals
    for k in (1, 2, 3):
        site = load_site_config(root / "sites" / f"site_{k}.toml")
        assert Path(site.data.database) == (out / "hospitals" / f"site_{k}.db").resolve()

    # MLflow (SQLite under the output folder) holds a finished run with every round
    study = load_study_config(root / "study.toml")
    uri = study.tracking.mlflow_tracking_uri
    assert uri == f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(STUDY_ID)
    assert exp is not None and exp.artifact_location.startswith((out / "mlflow").resolve().as_uri())
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rounds = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "sites"))
    assert rounds[:ROUNDS] == list(range(1, ROUNDS + 1)), rounds
    assert runs[0].info.run_id in text  # the summary names the run it read

    # every site's ledger recorded the federated rounds, within its budget
    for k in (1, 2, 3):
        site = load_site_config(root / "sites" / f"site_{k}.toml")
        with PrivacyLedger.open(site.privacy.ledger, read_only=True) as ledger:
            (st,) = ledger.statuses()
        assert st.rounds >= ROUNDS, (k, st.rounds)  # one ledger entry per federated round (at least)
        assert 0 < st.spent_epsilon <= st.budget.epsilon == site.privacy.epsilon, (k, st.spent_epsilon, st.budget)
        assert st.open_reservations == 0

    # the summary: rounds, epsilon per site, global vs local-only at the smallest site, the MLflow command
    assert "global (federated) vs local-only twin" in text
    row = re.search(r"rmse\.map\.all\.twin\W+(\d+\.\d+ \[[^]]*\]|suppressed)\W+(\d+\.\d+ \[[^]]*\]|suppressed)", text)
    assert row, text  # federated, then local-only (each a value with its CI, or suppressed)
    assert "epsilon spent per site" in text and text.count("completed") >= ROUNDS
    assert f"ui --backend-store-uri {uri}" in text
    assert (out / "local-only").is_dir() and list((out / "local-only").glob("site_*/model.pt"))

    # governance: the card and the registered twin are in MLflow, and the demo's own audit passed
    run_id = runs[0].info.run_id
    arts = {a.path for a in client.list_artifacts(run_id, "card")}
    assert arts == {"card/model-card.json", "card/model-card.md", "card/model-card.html"}, arts
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.name == f"fedtwin-{STUDY_ID}"
    for check in ("chain", "attachments", "model", "card", "metrics"):
        assert f"audit {check}: ok" in text, text
    assert f"fedtwin audit verify --tracking-uri {uri} --run-id {run_id}" in text

    # a second run into the same folder is refused (it is a previous demo: --force would replace it)
    again = _invoke("--out", str(out), "--patients", "150", "--rounds", str(ROUNDS))
    assert again.exit_code == 2 and "already holds a previous FedTwin demo" in cli_text(again) and "--force" in cli_text(again)
