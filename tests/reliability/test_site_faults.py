"""Site and coordinator faults on a real local consortium (tests/reliability/fault_kit.py): what
happened, that nothing was lost, how the user was told. docs/reliability.md tabulates them.

Every test uses its own study id (own checkpoints, own MLflow experiment). Fault (g), a missing
MLflow store, is covered by tests/test_launch.py
(``test_launch_then_resume_continues_from_the_checkpoint_in_one_mlflow_run``: exit 2 naming the
missing folder before any run, no checkpoint; ``test_tracking_uri_checks``).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from fault_kit import (
    LAUNCH_TIMEOUT,
    LogWatch,
    SECAGG_TIMEOUT,
    SITES,
    SPEC,
    cli,
    edit_site_config,
    epsilon_sites,
    kill_site,
    launch_in_background,
    ledger_entries,
    mlflow_metric,
    mlflow_run,
    node_ids,
    node_status,
    npz_parameters,
    restart_site,
    rounds_of,
    run_entries,
    same_parameters,
    site_dataset,
    site_errors,
    study_file,
    wait_for,
)
from fault_kit import consortium, restored  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------- the faults


def test_a_site_dies_mid_round_and_the_round_completes_with_the_others(restored: Path) -> None:
    root = restored
    ids = node_ids(root)
    study = study_file(root, "fault-site-dies")
    watch = LogWatch(root)
    before = {s: ledger_entries(root, s) for s in SITES}

    bg = launch_in_background(study)
    # round 1 is running: site_3 received the global model and is training (3rd SecAgg+ stage)
    _, run_id = wait_for(watch.serverapp, 180, "the ServerApp task to start")
    wait_for(lambda: watch.client_tasks("site_3", run_id) >= 3, 240, "site_3 to start training in round 1")
    kill_site(root, "site_3")
    res = bg.result()

    # how the coordinator was told: the SuperLink answers for the vanished node (its heartbeat expired)
    # and the ServerApp prints it as that site's error
    errors = [(n, why) for r, n, why in site_errors(res.output) if r == 1]
    assert any("Node Unavailable" in why for _, why in errors), (errors, res.output[-5000:])
    assert [n for n, why in errors if "Node Unavailable" in why] == [ids["site_3"]], errors
    # what happened: SecAgg+ reconstructed the sum of the two sites left (threshold 2 of 3)
    assert rounds_of(res) == [(1, "completed", 2)], res.output[-5000:]
    assert res.ok, res.message
    # nothing lost: the round is checkpointed and logged, the survivors' spend is in their ledgers
    from coordinator.launch import study_checkpoint_dir
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.federation.config import load_study_config

    ckpts = list_checkpoints(study_checkpoint_dir(load_study_config(study)))
    assert [read_checkpoint(p)[0] for p in ckpts] == [1]
    assert mlflow_metric(root, res.mlflow_run_id, "sites") == [(1, 2.0)]
    assert mlflow_metric(root, res.mlflow_run_id, "halted") == [(1, 0.0)]
    assert epsilon_sites(root, res.mlflow_run_id) == {"site_1", "site_2"}
    for s in ("site_1", "site_2"):
        assert [e.round for e in run_entries(ledger_entries(root, s), res.output) if e.kind == "reservation"] == [1]
    # how the user was told: the launch reports the round with 2 sites
    assert "round 1: completed (2 sites)" in bg.box["lines"]
    # the site comes back under the same identity (its registered key): same node id
    restart_site(root, "site_3")
    assert node_ids(root)["site_3"] == ids["site_3"] and node_status(root)["site_3"] == "online"
    # site_3's interrupted round may have reserved budget; whatever it reserved is in its own ledger
    assert len(ledger_entries(root, "site_3")) >= len(before["site_3"])


def test_b_two_sites_die_the_round_halts_and_is_retried_from_the_same_parameters(restored: Path) -> None:
    from coordinator.launch import study_checkpoint_dir
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.tracking.run_tracker import RUN_ID_FILE
    from fedtwin.federation.config import load_study_config

    root = restored
    study = study_file(root, "fault-two-die", rounds=2)
    ckpt_dir = study_checkpoint_dir(load_study_config(study))

    # round 1 completes normally: the global model P1 is checkpointed
    code, out = cli("launch", "--config", str(study), "--rounds", "1")
    assert code == 0, out
    (ckpt1,) = list_checkpoints(ckpt_dir)
    p1 = read_checkpoint(ckpt1)[2]
    mlflow_id = (ckpt_dir / RUN_ID_FILE).read_text().strip()

    # round 2: two of the three sites die while training; one site is below the threshold of 2
    watch = LogWatch(root)
    final = root / "fault-two-die-final.npz"
    bg = launch_in_background(study, resume=True, output_path=final)
    _, run_id = wait_for(watch.serverapp, 180, "the ServerApp task to start")
    wait_for(lambda: all(watch.client_tasks(s, run_id) >= 3 for s in ("site_2", "site_3")), 240, "sites 2 and 3 training in round 2")
    kill_site(root, "site_2")
    kill_site(root, "site_3")
    # the ServerApp reports the halted round while the sites are down
    wait_for(lambda: re.search(r"^FEDTWIN round=2 status=halted ", watch.text("superlink-executor"), flags=re.M),
             SECAGG_TIMEOUT + 120, "round 2 to be reported halted")
    # the sites come back (the run's evaluation round waits for min_sites available sites)
    restart_site(root, "site_2")
    restart_site(root, "site_3")
    res = bg.result()

    # what happened: round 2 halted, as the ServerApp said
    assert rounds_of(res)[:1] and rounds_of(res)[0][:2] == (2, "halted") and rounds_of(res)[0][2] < 2, res.output[-5000:]
    # nothing lost: no checkpoint for round 2, the global model is still P1, round 1's checkpoint untouched
    assert [read_checkpoint(p)[0] for p in list_checkpoints(ckpt_dir)] == [1]
    assert same_parameters(npz_parameters(final), p1)
    assert same_parameters(read_checkpoint(ckpt1)[2], p1)
    assert mlflow_metric(root, mlflow_id, "halted") == [(1, 0.0), (2, 1.0)]
    # how the user was told: launch fails, naming the halted round
    assert not res.ok and "round(s) 2 halted" in res.message, res.message

    # retried: round 2 trains again from the same global parameters (round 1's checkpoint), into the same MLflow run
    code, out = cli("launch", "--config", str(study), "--resume")
    assert code == 0, out
    assert "round 2: completed (3 sites)" in out, out

    ckpts = list_checkpoints(ckpt_dir)
    assert [read_checkpoint(p)[0] for p in ckpts] == [1, 2]
    assert not same_parameters(read_checkpoint(ckpts[1])[2], p1)
    assert (ckpt_dir / RUN_ID_FILE).read_text().strip() == mlflow_id
    assert mlflow_metric(root, mlflow_id, "halted") == [(1, 0.0), (2, 0.0), (2, 1.0)]  # (step, value), sorted
    assert (2, 3.0) in mlflow_metric(root, mlflow_id, "sites")
    assert mlflow_run(root, mlflow_id).info.status == "FINISHED"
    # the signed chain holds the first launch's evaluation round, the halted round, its retry and
    # the final evaluation round, and verifies (the interrupted launch skipped its evaluation round:
    # there was no final model to score)
    from fedtwin.provenance import KeyRing, RoundRecord, parameters_digest, verify_chain

    folder = ckpt_dir / "provenance" / (ckpt_dir / "training_id").read_text().strip()
    records = [RoundRecord.from_json(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert [(r.round, r.kind, r.status) for r in records] == [
        (1, "train", "completed"), (2, "evaluate", "completed"), (2, "train", "halted"), (2, "train", "completed"),
        (3, "evaluate", "completed")]
    report = verify_chain(records, KeyRing.from_dir(root / "keys" / "signing"),
                          final_parameters_hash=parameters_digest(read_checkpoint(ckpts[1])[2]))
    assert report.ok, report.summary()
    # ... and the whole MLflow run passes the audit: two registered versions (the 1-round training,
    # then the extended one), the card of the newest, every metric in its record
    from fedtwin.audit import verify_run
    from fedtwin.federation.config import load_study_config

    uri = load_study_config(study).tracking.mlflow_tracking_uri
    audit = verify_run(uri, mlflow_id, KeyRing.from_dir(root / "keys" / "signing"))
    assert audit.ok, "\n".join(audit.problems)


def _refusing_site_round(root: Path, study_id: str, site: str, reason: str, why_in_log: str) -> None:
    """Launch one round in which ``site`` refuses; check the refusal reached the site's own logs and
    the coordinator, the refusing site's ledger is untouched, and the round counts the other two."""
    from coordinator.launch import launch

    ids = node_ids(root)
    before = {s: ledger_entries(root, s) for s in SITES}
    watch = LogWatch(root)
    lines: list[str] = []
    res = launch(study_file(root, study_id), timeout=LAUNCH_TIMEOUT, echo=lines.append)
    others = [s for s in SITES if s != site]

    # how the site was told: its own logs (ClientApp task processes log to the site's executor log)
    site_log = watch.site(site)
    assert "ClientApp raised an exception" in site_log and why_in_log in site_log, site_log[-4000:]
    # how the coordinator was told: the ServerApp's site_error line carries the site's reason
    errors = [(n, why) for r, n, why in site_errors(res.output) if r == 1]
    assert any(n == ids[site] and reason in why for n, why in errors), (errors, res.output[-5000:])
    assert all(n == ids[site] for n, _ in errors), errors
    # nothing lost at the refusing site: its ledger gained no spend
    assert ledger_entries(root, site) == before[site]
    # what happened: the round went on without the refusing site, which it does not count
    assert rounds_of(res) == [(1, "completed", 2)], res.output[-5000:]
    assert res.ok, res.message
    assert "round 1: completed (2 sites)" in lines
    for s in others:
        new = run_entries(ledger_entries(root, s), res.output)
        assert [e.round for e in new if e.kind == "reservation"] == [1], new
    assert epsilon_sites(root, res.mlflow_run_id) == set(others)
    assert mlflow_metric(root, res.mlflow_run_id, "sites") == [(1, 2.0)]


def test_c_site_with_exhausted_budget_refuses_and_spends_nothing(restored: Path) -> None:
    from fedtwin.privacy.ledger import PrivacyLedger

    root = restored
    # site_3's governance gave this dataset epsilon 1, and earlier training already spent it
    ledger_path = root / "privacy" / "site_3-exhausted.ledger.sqlite"
    edit_site_config(root, "site_3", privacy={"epsilon": 1.0, "ledger": "../privacy/site_3-exhausted.ledger.sqlite"})
    _, ds = site_dataset(root, "site_3")
    ledger = PrivacyLedger.create(ledger_path)
    try:
        ledger.set_budget(ds, epsilon=1.0, delta=1e-5, note="fault test: small budget")
        ledger.record_spend(ds, run_id="an-earlier-study", noise_multiplier=0.8, sample_rate=0.4, steps=200, max_grad_norm=1.0,
                            note="fault test: budget already spent")
        assert ledger.spent_epsilon(ds) > 1.0
    finally:
        ledger.close()
    _refusing_site_round(root, "fault-budget", "site_3", reason="privacy budget", why_in_log="is exhausted")


def test_d_site_with_another_spec_hash_refuses_over_the_network(restored: Path) -> None:
    from fedtwin.spec import load_spec, spec_hash

    root = restored
    # site_3 holds a spec that differs from the coordinator's by one cohort rule: another hash
    text = SPEC.read_text().replace("min_age: 18", "min_age: 21")
    assert text != SPEC.read_text()
    (root / "specs" / "icu-hemodynamics-site3.yaml").write_text(text)
    edit_site_config(root, "site_3", data={"spec": "../specs/icu-hemodynamics-site3.yaml"})
    theirs, ours = spec_hash(load_spec(SPEC)), spec_hash(load_spec(root / "specs" / "icu-hemodynamics-site3.yaml"))
    assert theirs != ours
    _refusing_site_round(root, "fault-spec", "site_3", reason=f"is not the site's spec hash {ours[:12]}",
                         why_in_log=f"spec hash {theirs[:12]} is not the site's spec hash {ours[:12]}")


def test_e_diverged_update_is_refused_before_masking(restored: Path) -> None:
    """A learning rate of 1e4 makes the sites' training blow up. A site whose loss went non-finite
    (or whose parameters did) refuses to send its update before masking (check_training /
    check_update); parameters are bounded by projection, so a site may also end with a finite but
    useless update, which it sends. Here at least two of three refuse, the round falls below the
    threshold of 2 and halts with nothing aggregated: the global model is unchanged."""
    from coordinator.launch import launch, study_checkpoint_dir
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.federation.config import load_study_config

    root = restored
    ids = node_ids(root)
    study = study_file(root, "fault-diverge", rounds=2)
    ckpt_dir = study_checkpoint_dir(load_study_config(study))
    code, out = cli("launch", "--config", str(study), "--rounds", "1")  # round 1 as usual: the global model P1
    assert code == 0, out
    (ckpt1,) = list_checkpoints(ckpt_dir)
    p1 = read_checkpoint(ckpt1)[2]
    # the same study resumed with a learning rate that makes local training diverge
    diverging = study_file(root, "fault-diverge", rounds=2, name="fault-diverge-lr", learning_rate=1e4)
    final = root / "fault-diverge-final.npz"
    watch = LogWatch(root)
    res = launch(diverging, resume=True, output_path=final, timeout=LAUNCH_TIMEOUT)

    # how each refusing site was told: its ClientApp refused before the update was masked
    refused = [s for s in SITES if "refusing to send the update" in watch.site(s)]
    assert len(refused) >= 2, {s: watch.site(s)[-2000:] for s in SITES}
    # how the coordinator was told: one site_error line per refusing site with the reason
    errors = [(n, why) for r, n, why in site_errors(res.output) if r == 2]
    assert sorted(n for n, why in errors if "refusing to send the update" in why) == sorted(ids[s] for s in refused), (errors, res.output[-5000:])
    # what happened: fewer than the threshold (2) sent an update; round 2 halted; launch says so
    assert rounds_of(res) == [(2, "halted", len(SITES) - len(refused))], res.output[-5000:]
    assert not res.ok and "round(s) 2 halted" in res.message and "refusing to send the update" in res.message, res.message
    # nothing lost: no checkpoint for round 2, the global model is still P1; the steps the sites took are in their ledgers
    assert [read_checkpoint(p)[0] for p in list_checkpoints(ckpt_dir)] == [1]
    assert same_parameters(npz_parameters(final), p1)
    for s in SITES:
        assert [e.round for e in run_entries(ledger_entries(root, s), res.output) if e.kind == "reservation"] == [1, 2]


def test_f_coordinator_killed_mid_run_resumes_from_the_last_checkpoint(restored: Path) -> None:
    from coordinator.launch import study_checkpoint_dir
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.tracking.run_tracker import RUN_ID_FILE
    from fedtwin.federation.config import load_study_config

    root = restored
    study = study_file(root, "fault-coordinator", rounds=2)
    ckpt_dir = study_checkpoint_dir(load_study_config(study))
    watch = LogWatch(root)
    bg = launch_in_background(study)
    pid, run_id = wait_for(watch.serverapp, 180, "the ServerApp task to start")
    # round 1 checkpointed, round 2 under way (the sites train: 3rd stage of round 2 = 7th task)
    wait_for(lambda: list_checkpoints(ckpt_dir), 240, "round 1's checkpoint")
    wait_for(lambda: all(watch.client_tasks(s, run_id) >= 7 for s in SITES), 240, "round 2 training at every site")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: f"task process {pid} " in watch.text("superlink-executor") and "exited with -9" in watch.text("superlink-executor"),
             30, "the executor to see the ServerApp die")
    mlflow_id = (ckpt_dir / RUN_ID_FILE).read_text().strip()
    res = bg.result()

    # what happened, and how the user was told: the run failed after round 1 (the SuperLink fails a
    # run whose ServerApp stopped sending heartbeats), and launch says so
    assert not res.ok and "failed" in res.message, res.message
    assert rounds_of(res) == [(1, "completed", 3)], res.output[-5000:]
    # nothing lost: round 1's checkpoint and MLflow record are intact; nothing of round 2 was written
    assert [read_checkpoint(p)[0] for p in list_checkpoints(ckpt_dir)] == [1]
    p1 = read_checkpoint(list_checkpoints(ckpt_dir)[0])[2]
    assert mlflow_metric(root, mlflow_id, "sites") == [(1, 3.0)]

    # fedtwin coordinator launch --resume continues at round 2 from round 1's checkpoint, same MLflow run
    code, out = cli("launch", "--config", str(study), "--resume")
    assert code == 0, out
    assert "round 2: completed (3 sites)" in out and "round 1:" not in out, out
    ckpts = list_checkpoints(ckpt_dir)
    assert [read_checkpoint(p)[0] for p in ckpts] == [1, 2]
    assert same_parameters(read_checkpoint(ckpts[0])[2], p1) and not same_parameters(read_checkpoint(ckpts[1])[2], p1)
    assert (ckpt_dir / RUN_ID_FILE).read_text().strip() == mlflow_id
    assert mlflow_metric(root, mlflow_id, "sites") == [(1, 3.0), (2, 3.0)]
    run = mlflow_run(root, mlflow_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
