"""A site SIGKILLed in each SecAgg+ stage of a round (tests/reliability/fault_kit.py: 3 sites,
``num_shares = 3``, ``reconstruction_threshold = 2``): what happened, that nothing was lost, how
the user was told. docs/reliability.md tabulates them (rows s0-s3, s*).

The kill is triggered at the site: SecAgg+ sends each site one message per stage, and the site's
executor forks one ClientApp task process per message (``started task process ... run N`` in
``logs/site_3-executor.log``), so the (k+1)-th task process of the run is the site working on
stage k; it is killed as soon as that process starts. (The ServerApp's own ``[Stage k] ...`` lines
are DEBUG in Flower 1.41: they are printed nowhere, and stages 0, 1 and 3 last about a second.)
What is asserted holds wherever in the stage the kill lands, before, during or after the site's
reply:

* stages 0-2 (keys, key shares, training + masked vectors): the site's masked vector never
  reaches the aggregate (killed before sending it, or dropped by the next stage), so SecAgg+ drops
  it and reconstructs the sum of the two others: round 1 completes with 2 sites. (Stage 2 is the
  site's local training, seconds long, so the kill lands before its masked vector is sent.)
* stage 3 (unmask): the site's masked vector is already in the sum; the two survivors hold enough
  shares (threshold 2) to remove its self-mask: round 1 completes with all 3 sites' updates.

A dead site is answered for by the SuperLink (``Node Unavailable``) once its heartbeat expires
(~20 s), in the round it dies in or, if it had already answered that round's last message, in the
next (the evaluation round). A site killed while uploading its reply blocks the ServerApp's pull of
that reply until the SuperLink's object-push session expires (180 s; then ``Reply message objects
are unavailable``): the round still completes (``ErrorReportingGrid`` pulls the other sites'
replies once more instead of dropping them), ~3 minutes late.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fault_kit import (
    SITES,
    LogWatch,
    epsilon_sites,
    kill_site,
    launch_in_background,
    ledger_entries,
    mlflow_metric,
    node_ids,
    rounds_of,
    run_entries,
    site_errors,
    study_file,
    wait_for,
)
from fault_kit import consortium, restored  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

VICTIM = "site_3"
SURVIVORS = ("site_1", "site_2")
UNAVAILABLE = re.compile(r"Node Unavailable|Reply message objects are unavailable")
# sites whose update is in round 1's aggregate when the victim dies in stage k
SITES_IN_ROUND = {0: 2, 1: 2, 2: 2, 3: 3}


@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=["stage0-keys", "stage1-key-shares", "stage2-training", "stage3-unmask"])
def test_site_killed_in_a_secagg_stage_the_round_completes_and_nothing_is_lost(restored: Path, stage: int) -> None:
    from coordinator.launch import study_checkpoint_dir
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.audit import verify_run
    from fedtwin.federation.config import load_study_config
    from fedtwin.provenance import KeyRing, RoundRecord, parameters_digest, verify_chain

    root = restored
    ids = node_ids(root)
    study = study_file(root, f"fault-secagg-stage{stage}")
    ckpt_dir = study_checkpoint_dir(load_study_config(study))
    watch = LogWatch(root)
    before = ledger_entries(root, VICTIM)

    bg = launch_in_background(study)
    _, run_id = wait_for(watch.serverapp, 180, "the ServerApp task to start")
    # the victim's (stage + 1)-th task process of the run: it is working on round 1's stage k
    wait_for(lambda: watch.client_tasks(VICTIM, run_id) >= stage + 1, 300, f"{VICTIM} to receive round 1's stage {stage} message",
             poll=0.05)
    kill_site(root, VICTIM)
    res = bg.result()
    out = res.output

    # what happened: SecAgg+ dropped the dead site and reconstructed the aggregate (threshold 2 of 3)
    assert rounds_of(res) == [(1, "completed", SITES_IN_ROUND[stage])], out[-6000:]
    assert res.ok, res.message
    # how the user was told: a site_error line for the dead node, echoed by launch with its site name.
    # The reason depends on the instant: "Node Unavailable" (the SuperLink answers for it once its
    # heartbeat expired) or "Reply message objects are unavailable" (it died uploading its reply).
    # It comes in round 1, or in the evaluation round if the site had answered round 1's last message
    errors = [(r, n, why) for r, n, why in site_errors(out)]
    assert errors and {n for _, n, _ in errors} == {ids[VICTIM]}, (errors, out[-6000:])
    assert all(UNAVAILABLE.search(why) for _, _, why in errors), errors
    assert any(line.startswith(f"site error: round {errors[0][0]}, site {VICTIM}: ") for line in bg.box["lines"]), bg.box["lines"]
    if stage < 3:
        assert errors[0][0] == 1, errors  # its masked vector never reached the aggregate: dropped in round 1
    assert f"round 1: completed ({SITES_IN_ROUND[stage]} sites)" in bg.box["lines"], bg.box["lines"]

    # nothing lost: round 1 checkpointed, its MLflow record, the survivors' spend in their ledgers
    ckpts = list_checkpoints(ckpt_dir)
    assert [read_checkpoint(p)[0] for p in ckpts] == [1]
    assert mlflow_metric(root, res.mlflow_run_id, "sites") == [(1, float(SITES_IN_ROUND[stage]))]
    assert mlflow_metric(root, res.mlflow_run_id, "halted") == [(1, 0.0)]
    assert epsilon_sites(root, res.mlflow_run_id) >= set(SURVIVORS)
    for s in SURVIVORS:
        assert [e.round for e in run_entries(ledger_entries(root, s), out) if e.kind == "reservation"] == [1], s
    # whatever the dead site reserved before dying is in its own ledger (nothing removed)
    assert ledger_entries(root, VICTIM)[: len(before)] == before
    # the signed chain: round 1 (train) and the evaluation round, ending at the checkpointed model
    folder = ckpt_dir / "provenance" / (ckpt_dir / "training_id").read_text().strip()
    records = [RoundRecord.from_json(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert [(r.round, r.kind, r.status) for r in records] == [(1, "train", "completed"), (2, "evaluate", "completed")]
    assert sorted(m.site for m in records[0].manifests) == sorted(SITES if stage == 3 else SURVIVORS)
    keys = KeyRing.from_dir(root / "keys" / "signing")
    report = verify_chain(records, keys, final_parameters_hash=parameters_digest(read_checkpoint(ckpts[0])[2]))
    assert report.ok, report.summary()
    # ... and every MLflow metric equals its signed record (the auditor's check)
    audit = verify_run(load_study_config(study).tracking.mlflow_tracking_uri, res.mlflow_run_id, keys)
    assert audit.ok, "\n".join(audit.problems)
