"""Misuse on a real local consortium (tests/reliability/fault_kit.py): a MALICIOUS site. What happened,
that nothing was lost, how the user was told. docs/reliability.md ("Misuse") tabulates them.

An honest FedTwin site cannot replay a manifest or lie about its count, so site_3 is restarted
(same key, same node id) as a test-only adversary: its SuperNode and executor run with
``tests/reliability/adversary/`` first on PYTHONPATH and ``FEDTWIN_TEST_ADVERSARY`` set, so that
its ``sitecustomize`` wraps FedTwin's ClientApp reply (after FedTwin trained, checked and signed,
before Flower's SecAgg+ mod quantizes and masks it). Which attack, in which round, is read from
the adversary's control folder at every fit. Product code holds no test hook.

Each attack: a 2-round study, round 1 honest (checkpoint P1), round 2 attacked; the coordinator
must refuse round 2's aggregate (halted, no checkpoint, model still P1, signed halted record); then
the site is honest again, ``launch --resume`` retries round 2 and ``fedtwin audit verify`` passes
on the whole MLflow run (the halted record is part of the verified chain).

Covered elsewhere, not duplicated: an unregistered SuperNode
(tests/test_consortium.py::test_unregistered_supernode_is_refused), an honest site with another
spec hash (tests/reliability/test_site_faults.py::test_d_...), a tampered registered model
(tests/test_registry.py::test_sqlite_register_load_predict_and_refuse_a_tampered_model) and a
tampered model file given to ``fedtwin twin whatif`` (tests/test_twin_model.py::test_whatif_refuses_a_tampered_model_file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fault_kit import (
    LogWatch,
    SITES,
    cli,
    consortium,  # noqa: F401 (pytest fixture)
    ledger_entries,
    mlflow_metric,
    node_ids,
    npz_parameters,
    restart_site,
    restored,  # noqa: F401 (pytest fixture)
    same_parameters,
    study_file,
)

pytestmark = pytest.mark.slow

ADVERSARY_DIR = Path(__file__).resolve().parent / "adversary"
EVIL = "site_3"
CLIPPING_RANGE = 8.0


@pytest.fixture(scope="module")
def adversary(consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """site_3 restarted as the test-only adversary (same key and node id); returns its control folder."""
    control = tmp_path_factory.mktemp("adversary")
    (control / "attack.json").write_text(json.dumps({"attack": "none"}))
    before = node_ids(consortium)[EVIL]
    restart_site(consortium, EVIL, extra_env={"PYTHONPATH": str(ADVERSARY_DIR), "FEDTWIN_TEST_ADVERSARY": str(control)})
    assert node_ids(consortium)[EVIL] == before
    return control


def _attack(control: Path, attack: str, rounds: list[int] | None = None) -> None:
    (control / "attack.json").write_text(json.dumps({"attack": attack, "rounds": rounds or []}))


def _applied(control: Path, training: str) -> list[dict]:
    p = control / "applied.jsonl"
    events = [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
    return [e for e in events if e["training_id"] == training]


def _attacked_round_2(root: Path, control: Path, attack: str, study_id: str, refusal: str):
    """Round 1 honest, round 2 attacked by site_3: check the coordinator refused it and nothing was
    lost; then retry round 2 honestly and audit the whole run. Returns the attacked launch's output."""
    from coordinator.launch import study_checkpoint_dir
    from coordinator.server_app import list_checkpoints, read_checkpoint
    from fedtwin.audit import verify_run
    from fedtwin.federation.config import load_study_config
    from fedtwin.provenance import KeyRing, RoundRecord, verify_chain
    from fedtwin.tracking.run_tracker import RUN_ID_FILE

    study = study_file(root, study_id, rounds=2)
    cfg = load_study_config(study)
    ckpt_dir = study_checkpoint_dir(cfg)
    final = root / f"{study_id}-final.npz"
    keys = KeyRing.from_dir(root / "keys" / "signing")
    _attack(control, attack, rounds=[2])
    watch = LogWatch(root)
    try:  # as the user runs it: `fedtwin coordinator launch --config study.toml`
        code, text = cli("launch", "--config", str(study), "--output", str(final))
    finally:
        _attack(control, "none")
    out = watch.text("superlink-executor")  # the ServerApp's output (its task processes log there)
    tid = (ckpt_dir / "training_id").read_text().strip()
    assert f"training_id={tid}" in out, out[-6000:]

    # the adversary did attack round 2 (and only round 2), from its own site process
    events = _applied(control, tid)
    assert [(e["attack"], e["round"]) for e in events] == [(attack, 2)], (events, watch.site(EVIL)[-3000:])
    assert "FEDTWIN-TEST adversary:" in watch.site(EVIL)

    # what happened: round 1 completed with 3 sites, round 2's aggregate was refused by the coordinator
    assert re.search(r"^FEDTWIN round=1 status=completed sites=3$", out, flags=re.M), out[-6000:]
    assert re.search(r"^FEDTWIN round=2 status=halted sites=0$", out, flags=re.M), out[-6000:]
    assert re.search("^" + refusal, out, flags=re.M), out[-6000:]
    assert re.search(r"^FEDTWIN provenance round=2 record=\w+ status=halted$", out, flags=re.M)
    assert not re.search(r"^FEDTWIN checkpoint round=2 ", out, flags=re.M)
    # how the user was told: launch exits 1 naming the halted round, and prints the run's last log
    # lines, which hold the coordinator's reason
    flat = " ".join(text.split())
    assert code == 1, text
    assert "round 1: completed (3 sites)" in flat and "round 2: halted (0 sites)" in flat, text
    assert "round(s) 2 halted" in flat and "last lines of the run's log" in flat, text
    assert re.search(refusal, flat), text

    # nothing lost: round 1's checkpoint is the global model; no checkpoint of round 2; the model is finite and bounded
    ckpts = list_checkpoints(ckpt_dir)
    assert [read_checkpoint(p)[0] for p in ckpts] == [1]
    p1 = read_checkpoint(ckpts[0])[2]
    saved = npz_parameters(final)
    assert same_parameters(saved, p1)
    assert all(np.all(np.isfinite(a)) and float(np.max(np.abs(a), initial=0.0)) <= CLIPPING_RANGE for a in saved)
    mlflow_id = (ckpt_dir / RUN_ID_FILE).read_text().strip()
    assert mlflow_metric(root, mlflow_id, "halted") == [(1, 0.0), (2, 1.0)]
    assert mlflow_metric(root, mlflow_id, "sites") == [(1, 3.0), (2, 0.0)]
    # the refused round has a signed record saying so (no aggregate), chained to round 1's
    folder = ckpt_dir / "provenance" / tid
    records = [RoundRecord.from_json(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert [(r.round, r.kind, r.status) for r in records] == [(1, "train", "completed"), (2, "train", "halted")]
    assert records[1].aggregate_hash is None
    report = verify_chain(records, keys)
    assert report.ok, report.summary()
    # every site trained in both rounds: the spend is in each site's own ledger (the adversary's too)
    for s in SITES:
        assert [e.round for e in ledger_entries(root, s) if e.run_id == tid and e.kind == "reservation"] == [1, 2], s

    # the site behaves again: --resume retries round 2 from P1 into the same MLflow run, and the audit passes
    code, text = cli("launch", "--config", str(study), "--resume")
    assert code == 0, text
    assert "round 2: completed (3 sites)" in text, text
    assert [read_checkpoint(p)[0] for p in list_checkpoints(ckpt_dir)] == [1, 2]
    assert (ckpt_dir / RUN_ID_FILE).read_text().strip() == mlflow_id
    assert mlflow_metric(root, mlflow_id, "halted") == [(1, 0.0), (2, 0.0), (2, 1.0)]
    records = [RoundRecord.from_json(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert [(r.round, r.kind, r.status) for r in records] == [
        (1, "train", "completed"), (2, "train", "halted"), (2, "train", "completed"), (3, "evaluate", "completed")]
    audit = verify_run(cfg.tracking.mlflow_tracking_uri, mlflow_id, keys)
    assert audit.ok, "\n".join(audit.problems)
    return out


def test_replayed_manifest_is_refused_and_the_round_halts(restored: Path, adversary: Path) -> None:
    """site_3 sends, with its honest round-2 update, its own valid signed manifest of round 1."""
    out = _attacked_round_2(
        restored, adversary, "replay", "misuse-replay",
        refusal=r"FEDTWIN provenance_error round=2 site_3: manifest does not match the round: round=1 \(expected 2\)",
    )
    assert "1 site(s) sent no valid signed manifest" in out
    assert "aggregate_error" not in out  # the update itself was honest


def test_non_finite_parameters_are_refused_by_the_coordinator(restored: Path, adversary: Path) -> None:
    """site_3 sends NaN everywhere. SecAgg+ quantization casts NaN to int32's minimum: the unmasked
    aggregate is finite but huge (~2e4); the coordinator's aggregate guard refuses it."""
    _attacked_round_2(restored, adversary, "nan", "misuse-nan",
                      refusal=r"FEDTWIN aggregate_error round=2 the aggregate reaches \|[0-9.e+]+\|, outside the \+-8")


def test_huge_parameters_are_refused_by_the_coordinator(restored: Path, adversary: Path) -> None:
    """site_3 sends 1e6 everywhere. SecAgg+ clips its weighted vector to +-8 before masking, so the
    aggregate is bounded (~+-22 with three similar sites) but outside what honest updates can give."""
    out = _attacked_round_2(restored, adversary, "huge", "misuse-huge",
                            refusal=r"FEDTWIN aggregate_error round=2 the aggregate reaches \|[0-9.e+]+\|, outside the \+-8")
    peak = float(re.search(r"aggregate_error round=2 the aggregate reaches \|([0-9.e+]+)\|", out).group(1))
    assert 8 < peak < 100, peak  # clipped by SecAgg+: bounded, not 1e6


def test_count_beyond_max_weight_is_refused_by_the_coordinator(restored: Path, adversary: Path) -> None:
    """site_3 reports 1,000,000 patients (max_weight 1000). Its SecAgg+ weight would be ~1000x an
    honest site's and dilute everyone else away; the coordinator refuses on the plaintext count."""
    out = _attacked_round_2(restored, adversary, "count", "misuse-count",
                            refusal=r"FEDTWIN aggregate_error round=2 site_3 reported num_examples=1000000, outside \[1, max_weight=1000\]")
    assert "the aggregate reaches" not in out  # the diluted aggregate looked harmless: only the count gave it away
