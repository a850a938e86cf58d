"""``fedtwin coordinator launch`` on a real 2-site consortium (SecAgg+): checkpoints, resume, MLflow.

One launch of 1 round, then ``--resume --rounds 2`` continues at round 2 from the round-1
checkpoint into the same MLflow run; the pre-run checks (missing study file, unusable MLflow
store, refused fresh launch over checkpoints, nothing left to resume) fail before anything runs.
A launch whose every round halted writes no final model, and ``consortium status`` shows its run
as ``finished:no-round-completed`` (Flower's own status says ``finished:completed``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_text, running_consortium, synthetic_site_databases
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"
N_SITES = 2


def _cli(*args: str):
    from coordinator.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)




def _write_study(root: Path, name: str, **tracking) -> Path:
    import tomli_w

    data = tomllib.loads((root / "study.toml").read_text())
    data["tracking"].update(tracking)
    p = root / name
    p.write_text(tomli_w.dumps(data))
    return p


def test_missing_study_file_is_a_clear_error(tmp_path: Path) -> None:
    res = _cli("launch", "--config", str(tmp_path / "nope.toml"))
    assert res.exit_code == 2
    assert "study file" in cli_text(res) and "does not exist" in cli_text(res)


def test_tracking_uri_checks() -> None:
    from fedtwin.tracking.run_tracker import TrackingError, check_tracking_uri

    check_tracking_uri("sqlite:////tmp/mlflow-check.db")
    for bad, why in (("sqlite:////no/such/folder/mlflow.db", "does not exist"), ("bogus://x", "unsupported scheme"), ("", "empty")):
        with pytest.raises(TrackingError, match=why):
            check_tracking_uri(bad)


class _Clock:
    """A clock the retry waits advance (no real sleeping)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Server:
    """Stands in for the MLflow server: ``up`` or not; records what reached it, in order."""

    def __init__(self) -> None:
        self.up = True
        self.got: list[str] = []

    def write(self, what: str):
        def call() -> None:
            if not self.up:
                raise ConnectionError("Connection refused")
            self.got.append(what)

        return call


def test_failed_mlflow_writes_are_kept_and_written_in_order_when_the_server_returns() -> None:
    from fedtwin.tracking.run_tracker import BufferedWrites

    clock, server, said = _Clock(), _Server(), []
    writes = BufferedWrites(said.append, first_wait=5, max_wait=60, clock=clock, sleep=clock.sleep)
    assert writes.submit("round=1 metrics", server.write("m1")) and server.got == ["m1"] and not said
    server.up = False
    assert not writes.submit("round=2 metrics", server.write("m2"))
    assert said[-1].startswith("FEDTWIN tracking_error what=round=2 metrics pending=1 retry_in=5s reason=ConnectionError: Connection refused")
    # within the back-off later writes queue without trying the server (no one failure per write)
    assert not writes.submit("round=2 checkpoint", server.write("c2")) and len(said) == 1
    server.up = True
    clock.now += 5
    assert writes.submit("round=3 metrics", server.write("m3"))
    assert server.got == ["m1", "m2", "c2", "m3"]  # in submission order
    assert said[-1].startswith("FEDTWIN tracking_recovered written=3")
    assert writes.unwritten() == [] and writes.failures == 0


def test_drain_retries_with_backoff_and_gives_up_after_its_window() -> None:
    from fedtwin.tracking.run_tracker import BufferedWrites

    clock, server, said = _Clock(), _Server(), []
    server.up = False
    writes = BufferedWrites(said.append, first_wait=5, max_wait=60, clock=clock, sleep=clock.sleep)
    writes.submit("round=1 metrics", server.write("m1"))
    writes.submit("close_run", server.write("close"))
    assert not writes.drain(200)
    waits = [int(re.search(r"retry_in=(\d+)s", line).group(1)) for line in said]
    assert waits[:6] == [5, 10, 20, 40, 60, 60]  # doubling, capped
    assert clock.now <= 200 and writes.unwritten() == ["round=1 metrics", "close_run"]
    server.up = True
    assert writes.drain(200) and server.got == ["m1", "close"]


def test_a_write_the_store_refuses_is_reported_and_skipped_not_retried() -> None:
    from fedtwin.tracking.run_tracker import BufferedWrites, unreachable

    assert unreachable(ConnectionError("Connection refused"))
    assert unreachable(RuntimeError("API request to http://h/api failed with exception HTTPConnectionPool(...): Max retries exceeded"))
    assert not unreachable(ValueError("Changing param values is not allowed"))
    clock, server, said = _Clock(), _Server(), []
    writes = BufferedWrites(said.append, clock=clock, sleep=clock.sleep)

    def refused() -> None:
        raise ValueError("Changing param values is not allowed")

    assert writes.submit("round=1 dp_params", refused) and writes.submit("round=1 metrics", server.write("m1"))
    assert server.got == ["m1"] and writes.unwritten() == []
    assert said == ["FEDTWIN warning: MLflow write round=1 dp_params failed (not retried: the store answered): "
                    "ValueError: Changing param values is not allowed"]


def test_a_site_that_died_before_replying_is_named_from_the_consortium_node_map(tmp_path: Path) -> None:
    import json

    from coordinator.launch import _progress, consortium_node_names

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "nodes.json").write_text(json.dumps({"site_1": 11, "site_3": 33}))
    names = consortium_node_names(tmp_path)
    assert names == {"11": "site_1", "33": "site_3"}
    assert consortium_node_names(tmp_path / "nowhere") == {}
    shown: list[str] = []
    on_line = _progress(shown.append, names)
    on_line("FEDTWIN site_error round=1 node=33 site=? reason=Error: Node Unavailable")
    on_line("FEDTWIN site_error round=1 node=44 site=? reason=Error: Node Unavailable")
    on_line("FEDTWIN tracking_error what=round=1 metrics pending=1 retry_in=5s reason=MlflowException: refused")
    on_line("FEDTWIN aggregate_error round=2 site_3 reported num_examples=1000000, outside [1, max_weight=1000]")
    assert shown == ["site error: round 1, site site_3: Error: Node Unavailable",
                     "site error: round 1, site node 44: Error: Node Unavailable",
                     "MLflow write failed, kept and retried: what=round=1 metrics pending=1 retry_in=5s reason=MlflowException: refused",
                     "coordinator check failed: round 2: site_3 reported num_examples=1000000, outside [1, max_weight=1000]"]


def test_a_training_with_no_completed_round_writes_no_final_model_and_says_what_to_do(tmp_path: Path, capsys) -> None:
    from coordinator.consortium.run_outcome import training_outcome
    from coordinator.server_app import _no_final_model

    out = tmp_path / "final.npz"
    _no_final_model(str(out), [1, 2], 2)
    text = capsys.readouterr().out
    assert not out.exists()
    assert (f"FEDTWIN no_final_model halted_rounds=1,2: no training round completed, so nothing was trained and no final "
            f"parameters were written to {out}. Fix: read the halted rounds' site_error / aggregate_error / provenance_error "
            f"lines above, remove their cause, then start the training again (no round was checkpointed: there is nothing "
            f"to --resume)") in text, text
    assert text.splitlines()[-1] == "FEDTWIN final rounds_completed=0 rounds=2 first_round=1 saved=- reason=no-round-completed"
    assert training_outcome(text).state == "no-round-completed"

    # a file an earlier launch left at output-path is named and left as it was
    out.write_bytes(b"earlier")
    _no_final_model(str(out), [1], 1)
    text = capsys.readouterr().out
    assert out.read_bytes() == b"earlier"
    assert f"the file already at {out} is from an earlier launch and was left as it was. Fix:" in text, text


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory):
    from coordinator.consortium import init_consortium

    work = tmp_path_factory.mktemp("launch")
    root = work / "local"
    init_consortium(root, sites=N_SITES, spec=SPEC, rounds=1, study_id="launch-study",
                    secagg={"num_shares": 1.0, "reconstruction_threshold": 1.0, "timeout": 120.0},
                    runtime={"preload": ["torch", "site_agent.client_app"]})
    synthetic_site_databases(root, work, N_SITES)
    with running_consortium(root):
        yield root


@pytest.mark.slow
def test_launch_then_resume_continues_from_the_checkpoint_in_one_mlflow_run(consortium: Path) -> None:
    from mlflow import MlflowClient

    from coordinator.consortium import load_study_config
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.tracking.run_tracker import RUN_ID_FILE
    from fedtwin.spec import load_spec, spec_hash

    study_file = consortium / "study.toml"
    study = load_study_config(study_file)
    ckpt_dir = Path(study.checkpoints.dir) / study.study.id
    h = spec_hash(load_spec(study.study.spec))

    # pre-run checks: an unusable MLflow store fails before any run starts
    bad = _write_study(consortium, "study-bad-mlflow.toml", mlflow_tracking_uri=f"sqlite:///{consortium / 'no-such-dir' / 'm.db'}")
    res = _cli("launch", "--config", str(bad))
    assert res.exit_code == 2 and "no-such-dir does not exist" in cli_text(res), cli_text(res)
    assert not list_checkpoints(ckpt_dir)
    res = _cli("launch", "--config", str(study_file), "--resume")
    assert res.exit_code == 2 and "no checkpoint" in cli_text(res), cli_text(res)

    # a halted round (both sites refuse: epsilon 0.1 per round is too little for ~100 patients) fails the
    # launch, is logged as halted and is not checkpointed
    res = _cli("launch", "--config", str(study_file), "--epsilon", "0.3")
    assert res.exit_code == 1 and "round(s) 1 halted" in cli_text(res), cli_text(res)
    assert not list_checkpoints(ckpt_dir)
    halted_run = (ckpt_dir / RUN_ID_FILE).read_text().strip()
    client = MlflowClient(tracking_uri=study.tracking.mlflow_tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(halted_run, "halted")] == [(1, 1.0)]
    assert client.get_run(halted_run).info.status == "FAILED"

    # launch: round 1
    res = _cli("launch", "--config", str(study_file), "--consortium", str(consortium))
    assert res.exit_code == 0, cli_text(res)
    assert "round 1: completed (2 sites)" in res.output
    assert [read_checkpoint(p)[:2] for p in list_checkpoints(ckpt_dir)] == [(1, h)]
    run_id = (ckpt_dir / RUN_ID_FILE).read_text().strip()
    round1 = read_checkpoint(list_checkpoints(ckpt_dir)[0])[2]

    # a fresh launch over existing checkpoints is refused
    res = _cli("launch", "--config", str(study_file))
    assert res.exit_code == 2 and "already holds checkpoints" in cli_text(res), cli_text(res)

    # resume to 2 rounds: only round 2 runs, from the round-1 parameters, into the same MLflow run
    res = _cli("launch", "--config", str(study_file), "--resume", "--rounds", "2")
    assert res.exit_code == 0, cli_text(res)
    assert "round 2: completed (2 sites)" in res.output and "round 1:" not in res.output, res.output
    ckpts = list_checkpoints(ckpt_dir)
    assert [read_checkpoint(p)[:2] for p in ckpts] == [(1, h), (2, h)]
    round2 = read_checkpoint(ckpts[1])[2]
    assert [a.shape for a in round2] == [a.shape for a in round1]
    assert any(not np.allclose(a, b) for a, b in zip(round1, round2))
    assert (ckpt_dir / RUN_ID_FILE).read_text().strip() == run_id
    # `consortium status`: the resumed launch ran round 2 only, and completed it
    from coordinator.consortium.consortium import status

    resumed = next(r for r in status(consortium).runs if r["run_id"] == int(re.search(r"ok run (\d+):", res.output).group(1)))
    assert (resumed["state"], resumed["rounds_completed"], resumed["rounds"], resumed["first_round"]) == ("finished:completed", 1, 2, 2)

    assert run_id != halted_run
    exp = client.get_experiment_by_name(study.study.id)
    assert sorted(r.info.run_id for r in client.search_runs([exp.experiment_id])) == sorted([run_id, halted_run])
    assert client.get_run(run_id).info.status == "FINISHED"
    run = client.get_run(run_id)
    assert run.data.params["spec_hash"] == h and run.data.params["min_sites"] == "2" and run.data.params["secagg"] == "True"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "sites")) == [(1, 2.0), (2, 2.0)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "halted")) == [(1, 0.0), (2, 0.0)]
    eps = [k for k in run.data.metrics if k.startswith("epsilon_spent.")]
    assert len(eps) == N_SITES
    for k in eps:
        hist = sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)
        assert [m.step for m in hist] == [1, 2] and 0 < hist[0].value < hist[1].value
    assert [m.step for m in client.get_metric_history(run_id, "round_seconds")] == [1, 2]

    # nothing left to resume
    res = _cli("launch", "--config", str(study_file), "--resume", "--rounds", "2")
    assert res.exit_code == 2 and "nothing left to run" in cli_text(res), cli_text(res)


@pytest.mark.slow
def test_a_launch_whose_every_round_halted_leaves_no_final_model_and_status_says_so(consortium: Path) -> None:
    """Both sites refuse both rounds: the study's spec is not the one they hold (spec-hash mismatch)."""
    import shutil

    import tomli_w

    from coordinator.consortium.cli import app as consortium_app
    from coordinator.consortium import load_study_config
    from coordinator.consortium.consortium import status
    from coordinator.launch import study_checkpoint_dir

    data = tomllib.loads((consortium / "study.toml").read_text())
    data["study"]["id"] = "launch-all-halted"
    data["study"]["spec"] = "specs/hypertension-bp.yaml"
    shutil.copyfile(REPO / "specs" / "hypertension-bp.yaml", consortium / "specs" / "hypertension-bp.yaml")
    study_file = consortium / "study-all-halted.toml"
    study_file.write_text(tomli_w.dumps(data))
    ckpt_dir = study_checkpoint_dir(load_study_config(study_file))

    res = _cli("launch", "--config", str(study_file), "--rounds", "2")
    text = cli_text(res)
    assert res.exit_code == 1 and "round(s) 1, 2 halted" in text and "is not the site's spec hash" in text, text
    assert not (ckpt_dir / "final.npz").exists() and not list(ckpt_dir.glob("*.npz")), sorted(ckpt_dir.iterdir())
    said = ("FEDTWIN no_final_model halted_rounds=1,2: no training round completed, so nothing was trained and no final "
            f"parameters were written to {ckpt_dir / 'final.npz'}.")
    assert "".join(said.split()) in "".join(text.split()), text  # whitespace aside: the console folds long paths
    assert "there is nothing to --resume" in text, text
    assert "FEDTWIN final rounds_completed=0 rounds=2 first_round=1 saved=- reason=no-round-completed" in text, text
    run_id = int(re.search(r"Error: run (\d+):", text).group(1))

    # Flower says finished:completed (the ServerApp exited normally); status says what the training did
    runs = {r["run_id"]: r for r in status(consortium).runs}
    assert (runs[run_id]["status"], runs[run_id]["sub_status"]) == ("finished", "completed")
    assert runs[run_id]["state"] == "finished:no-round-completed"
    assert (runs[run_id]["rounds_completed"], runs[run_id]["rounds"], runs[run_id]["first_round"]) == (0, 2, 1)
    shown = CliRunner().invoke(consortium_app, ["status", str(consortium)])
    row = next((line for line in shown.output.splitlines() if str(run_id) in line), "")
    assert "finished:no-round-completed" in row and "0 of 2" in row, shown.output
