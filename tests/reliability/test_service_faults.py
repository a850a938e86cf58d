"""Coordinator-side services failing during a round, on a real local consortium
(tests/reliability/fault_kit.py): the SuperLink restarted (v1), the MLflow tracking server down (v2).
What happened, that nothing was lost, how the user was told; docs/reliability.md tabulates them.

Every test uses its own study id (own checkpoints, own MLflow experiment).
"""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path

import pytest
from fault_kit import (
    SITES,
    LogWatch,
    cli,
    launch_in_background,
    mlflow_metric,
    mlflow_run,
    node_status,
    rounds_of,
    same_parameters,
    study_file,
    wait_for,
)
from fault_kit import consortium, restored  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow


def _records(root: Path) -> dict:
    from coordinator.consortium import processes
    from coordinator.consortium.layout import Layout

    return {r.name: r for r in processes.records(Layout.at(root))}


def _chain(ckpt_dir: Path, keys_dir: Path, final_params) -> tuple[list[tuple[int, str, str]], object]:
    """The training's signed round records (round, kind, status) and the chain check."""
    from fedtwin.provenance import KeyRing, RoundRecord, parameters_digest, verify_chain

    folder = ckpt_dir / "provenance" / (ckpt_dir / "training_id").read_text().strip()
    records = [RoundRecord.from_json(p.read_text()) for p in sorted(folder.glob("*.json"))]
    report = verify_chain(records, KeyRing.from_dir(keys_dir), final_parameters_hash=parameters_digest(final_params))
    return [(r.round, r.kind, r.status) for r in records], report


def test_k_superlink_killed_mid_run_up_restarts_the_consortium_and_resume_continues(restored: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.consortium.cli import app as consortium_app
    from coordinator.launch import study_checkpoint_dir
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.audit import verify_run
    from fedtwin.federation.config import load_study_config
    from fedtwin.provenance import KeyRing
    from fedtwin.tracking.run_tracker import RUN_ID_FILE

    root = restored
    study = study_file(root, "fault-superlink", rounds=2)
    ckpt_dir = study_checkpoint_dir(load_study_config(study))
    watch = LogWatch(root)
    bg = launch_in_background(study)
    _, run_id = wait_for(watch.serverapp, 180, "the ServerApp task to start")
    wait_for(lambda: list_checkpoints(ckpt_dir), 300, "round 1's checkpoint")
    wait_for(lambda: all(watch.client_tasks(s, run_id) >= 7 for s in SITES), 300, "round 2 training at every site")
    p1 = read_checkpoint(list_checkpoints(ckpt_dir)[0])[2]
    mlflow_id = (ckpt_dir / RUN_ID_FILE).read_text().strip()
    recs = _records(root)
    os.killpg(recs["superlink"].pgid, signal.SIGKILL)
    res = bg.result()

    # what happened: flwr run --stream lost the SuperLink at once; the SuperLink's executor (it
    # watches the SuperLink's pid) stopped, and with it the ServerApp; the SuperNodes stay up,
    # retrying the SuperLink (Flower retries for up to 2 h)
    assert "Connection to the SuperLink is unavailable" in res.output, res.output[-3000:]
    wait_for(lambda: not recs["superlink-executor"].alive(), 60, "the SuperLink's executor to stop")
    assert "is gone: stopping" in watch.text("superlink-executor")
    wait_for(lambda: all("Connection attempt failed" in watch.text(f"{s}-supernode") for s in SITES), 120,
             "every SuperNode to retry the SuperLink")
    assert all(recs[f"{s}-supernode"].alive() and recs[f"{s}-executor"].alive() for s in SITES)
    # how the user was told: launch fails, saying the SuperLink stopped and what to run
    assert not res.ok and rounds_of(res) == [(1, "completed", 3)], res.output[-3000:]
    assert "the SuperLink stopped during the run" in res.message and f"fedtwin consortium up {root}" in res.message, res.message
    assert "launch --config" in res.message and "--resume" in res.message, res.message
    # nothing lost: round 1's checkpoint, record and MLflow metrics; nothing of round 2 was written
    assert [read_checkpoint(p)[0] for p in list_checkpoints(ckpt_dir)] == [1]
    assert mlflow_metric(root, mlflow_id, "sites") == [(1, 3.0)]

    # the way back: `fedtwin consortium up` stops what is left (the SuperNodes and their
    # executors), starts the consortium again and registers the sites' keys anew
    up = CliRunner().invoke(consortium_app, ["up", str(root), "--timeout", "300"], catch_exceptions=False)
    assert up.exit_code == 0, up.output
    assert "the SuperLink of the last start was not running" in up.output and "--resume" in up.output, up.output
    assert all(node_status(root).get(s) == "online" for s in SITES)
    # ... then the study resumes from round 1's checkpoint into the same MLflow run
    code, out = cli("launch", "--config", str(study), "--resume")
    assert code == 0, out
    assert "round 2: completed (3 sites)" in out and "round 1:" not in out, out
    ckpts = list_checkpoints(ckpt_dir)
    assert [read_checkpoint(p)[0] for p in ckpts] == [1, 2]
    assert same_parameters(read_checkpoint(ckpts[0])[2], p1)
    assert (ckpt_dir / RUN_ID_FILE).read_text().strip() == mlflow_id
    assert mlflow_metric(root, mlflow_id, "sites") == [(1, 3.0), (2, 3.0)]
    run = mlflow_run(root, mlflow_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    kinds, report = _chain(ckpt_dir, root / "keys" / "signing", read_checkpoint(ckpts[1])[2])
    assert kinds == [(1, "train", "completed"), (2, "train", "completed"), (3, "evaluate", "completed")], kinds
    assert report.ok, report.summary()
    audit = verify_run(load_study_config(study).tracking.mlflow_tracking_uri, mlflow_id, KeyRing.from_dir(root / "keys" / "signing"))
    assert audit.ok, "\n".join(audit.problems)


def _study_with_tracking(root: Path, study_id: str, uri: str, rounds: int) -> Path:
    import tomli_w

    p = study_file(root, study_id, rounds=rounds)
    data = tomllib.loads(p.read_text())
    data["tracking"]["mlflow_tracking_uri"] = uri
    p.write_text(tomli_w.dumps(data))
    return p


def test_l_mlflow_server_down_during_a_round_its_records_are_written_when_it_returns(restored: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server

    from coordinator.launch import study_checkpoint_dir
    from coordinator.server_app import list_checkpoints
    from fedtwin.audit import verify_run
    from fedtwin.federation.config import load_study_config
    from fedtwin.provenance import KeyRing

    root = restored
    backend = f"sqlite:///{tmp_path / 'mlflow-server.db'}"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, backend, port)
    try:
        study = _study_with_tracking(root, "fault-mlflow-down", uri, rounds=2)
        ckpt_dir = study_checkpoint_dir(load_study_config(study))
        watch = LogWatch(root)
        bg = launch_in_background(study)
        _, run_id = wait_for(watch.serverapp, 180, "the ServerApp task to start")
        wait_for(lambda: all(watch.client_tasks(s, run_id) >= 3 for s in SITES), 300, "round 1 training at every site")
        stop_mlflow_server(server, kill=True)  # SIGKILL: the tracking server vanishes mid-round

        lines = bg.box["lines"]
        failed = wait_for(lambda: [x for x in lines if x.startswith("MLflow write failed, kept and retried: what=round=1 ")], 300,
                          "round 1's MLflow write to fail")
        # the round itself is safe on disk before MLflow is written: checkpoint and signed record
        assert [p.name for p in list_checkpoints(ckpt_dir)] == ["round-0001.npz"]
        assert "reason=" in failed[0] and "retry_in=" in failed[0], failed
        server = start_mlflow_server(tmp_path, backend, port)  # back, same port and stores
        res = bg.result()

        # what happened: the training went on; the held-back writes were written when the server returned
        assert res.ok, res.message
        assert rounds_of(res) == [(1, "completed", 3), (2, "completed", 3)], res.output[-5000:]
        assert any(x.startswith("MLflow reachable again: written=") for x in lines), lines
        assert "FEDTWIN tracking_lost" not in res.output
        # nothing lost: every round's metrics, the checkpoints and records in MLflow; the run FINISHED; the audit passes
        client = MlflowClient(tracking_uri=uri)
        mlflow_id = res.mlflow_run_id
        assert sorted((m.step, m.value) for m in client.get_metric_history(mlflow_id, "sites")) == [(1, 3.0), (2, 3.0)]
        assert sorted((m.step, m.value) for m in client.get_metric_history(mlflow_id, "halted")) == [(1, 0.0), (2, 0.0)]
        assert client.get_run(mlflow_id).info.status == "FINISHED"
        models = {f.path for f in client.list_artifacts(mlflow_id, "models")}
        assert {"models/round-0001.npz", "models/round-0002.npz"} <= models, models
        audit = verify_run(uri, mlflow_id, KeyRing.from_dir(root / "keys" / "signing"))
        assert audit.ok, "\n".join(audit.problems)
    finally:
        stop_mlflow_server(server)
