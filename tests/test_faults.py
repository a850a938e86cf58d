"""Bad input and faults on a real local consortium: what happened, that nothing was lost, how the user was told.

One consortium (SuperLink + 3 SuperNodes on 127.0.0.1, TLS, SuperNode authentication, fork
executors) with synthetic OMOP ICU hospitals is shared by the module; SecAgg+ runs with
``num_shares = 3, reconstruction_threshold = 2`` (one site may drop out of a round, two may not)
and a bounded stage timeout. Every test uses its own study id (own checkpoints, own MLflow
experiment), and the ``restored`` fixture puts the consortium back as it was around each test
(site configs, every site's SuperNode and executor alive and online).

Faults are real: processes are SIGKILLed (a site's SuperNode and executor process groups, the
ServerApp task process), site configs and ledgers are real files the ClientApp reads. No mocks.

Timing: a SuperNode killed without saying goodbye stays "online" at the SuperLink until its
heartbeat expires (Flower 1.41: 2 x 30 s after its last heartbeat), and a killed ServerApp's run
is failed when its task heartbeat expires (also <= 60 s). Until then the SuperLink refuses a
restarted SuperNode with the same key (``activate_node`` needs the node offline), so a restart
first waits for the node to show "offline". Everything waits on log lines or API state, never on
fixed sleeps.

Fault (g), a missing MLflow store, is covered by tests/test_launch.py
(``test_launch_then_resume_continues_from_the_checkpoint_in_one_mlflow_run``: exit 2 naming the
missing folder before any run, no checkpoint; ``test_tracking_uri_checks``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import running_consortium, synthetic_site_databases

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"
SITES = ("site_1", "site_2", "site_3")
SECAGG_TIMEOUT = 90.0  # seconds per SecAgg+ stage: bounds a round whose site vanished without an error reply
LAUNCH_TIMEOUT = 600.0

SITE_ERROR_RE = re.compile(r"FEDTWIN site_error round=(\d+) node=(\d+)(?: site=\S+)? reason=(.*)$", re.M)
SERVERAPP_TASK_RE = re.compile(r"started task process (\d+) for flwr-serverapp task \d+ run (\d+)")
RESUME_RE = re.compile(r"FEDTWIN resume checkpoint=(\S+) round=(\d+)")

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------ helpers


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); fail saying ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class LogWatch:
    """What the consortium's processes wrote to ``logs/`` since this watch was made."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "logs"
        self.offsets = {p.name: p.stat().st_size for p in self.dir.glob("*.log")}

    def text(self, name: str) -> str:
        p = self.dir / f"{name}.log"
        if not p.exists():
            return ""
        with open(p, "rb") as fh:
            fh.seek(self.offsets.get(p.name, 0))
            return fh.read().decode(errors="replace")

    def site(self, site: str) -> str:
        """The site's SuperNode log, then its executor's (ClientApp task processes log there)."""
        return self.text(f"{site}-supernode") + "\n" + self.text(f"{site}-executor")

    def client_tasks(self, site: str, run_id: int | str) -> int:
        """ClientApp task processes the site's executor started for ``run_id`` (4 per SecAgg+ round)."""
        return len(re.findall(rf"started task process \d+ for flwr-clientapp task \d+ run {run_id}\b", self.text(f"{site}-executor")))

    def serverapp(self) -> tuple[int, int] | None:
        """(pid, run id) of the first ServerApp task process started since the watch was made."""
        m = SERVERAPP_TASK_RE.search(self.text("superlink-executor"))
        return (int(m.group(1)), int(m.group(2))) if m else None


def node_ids(root: Path) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads((root / "state" / "nodes.json").read_text()).items()}


def node_status(root: Path) -> dict[str, str]:
    """site -> status at the SuperLink (online, offline, registered...)."""
    from coordinator.consortium.consortium import Consortium

    by_id = {v: k for k, v in node_ids(root).items()}
    with Consortium.load(root).control() as ctl:
        return {by_id.get(n.node_id, str(n.node_id)): n.status for n in ctl.nodes()}


def site_records(root: Path, site: str) -> list:
    from coordinator.consortium import processes
    from coordinator.consortium.layout import Layout

    return [r for r in processes.records(Layout.at(root)) if r.name in (f"{site}-supernode", f"{site}-executor")]


def kill_site(root: Path, site: str) -> None:
    """SIGKILL the process groups of the site's SuperNode and executor (and the ClientApps it forked)."""
    recs = site_records(root, site)
    assert len(recs) == 2, recs
    for rec in recs:
        try:
            os.killpg(rec.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for rec in recs:
        wait_for(lambda: not rec.alive(), 30, f"{rec.name} (pid {rec.pid}) to die after SIGKILL")


def restart_site(root: Path, site: str, timeout: float = 180.0) -> None:
    """Start the site's SuperNode and executor again, exactly as ``up`` does, once the SuperLink has
    noticed the old node is gone; wait until the node is online and the executor ready."""
    from coordinator.consortium import processes
    from fedtwin.federation import commands
    from fedtwin.federation.commands import ProcessSpec
    from coordinator.consortium.consortium import Consortium

    c = Consortium.load(root)
    for rec in site_records(root, site):
        if rec.alive():
            os.killpg(rec.pgid, signal.SIGKILL)
            wait_for(lambda: not rec.alive(), 30, f"{rec.name} to die")
        processes.forget(c.layout, rec.name)
    # Flower 1.41 only activates a node that is offline: wait for the old heartbeat to expire (<= 60 s)
    wait_for(lambda: node_status(root).get(site) != "online", timeout, f"the SuperLink to mark {site} offline", poll=1.0)
    s = next(s for s in c.manifest.sites if s.name == site)
    r, sr = c.render(), c.site_render(s)
    base_env = dict(os.environ)
    sn = processes.start(c.layout, ProcessSpec(f"{site}-supernode", commands.supernode_argv(r, sr), c.site_env(site)), base_env)
    ex = processes.start(
        c.layout, ProcessSpec(f"{site}-executor", commands.supernode_executor_argv(r, sr, watch_pid=sn.pid), c.site_env(site)), base_env
    )
    wait_for(lambda: "] ready in" in processes.log_since_start(ex) or not ex.alive(), timeout, f"{site}'s executor to be ready")
    assert ex.alive(), processes.log_since_start(ex)[-2000:]
    wait_for(lambda: node_status(root).get(site) == "online" or not sn.alive(), timeout, f"{site} to come back online", poll=0.5)
    assert sn.alive(), processes.log_since_start(sn)[-2000:]


def site_alive(root: Path, site: str) -> bool:
    recs = site_records(root, site)
    return len(recs) == 2 and all(r.alive() for r in recs)


def study_file(root: Path, study_id: str, rounds: int = 1, name: str | None = None, **training: Any) -> Path:
    """A copy of the consortium's study.toml with its own study id (own checkpoints, MLflow experiment)
    and optional ``[training]`` overrides."""
    import tomli_w

    data = tomllib.loads((root / "study.toml").read_text())
    data["study"]["id"] = study_id
    data["study"]["rounds"] = rounds
    data["tracking"]["experiment"] = study_id
    if training:
        data.setdefault("training", {}).update(training)
    p = root / f"study-{name or study_id}.toml"
    p.write_text(tomli_w.dumps(data))
    return p


def edit_site_config(root: Path, site: str, **tables: dict[str, Any]) -> None:
    """Change fields of ``sites/<site>.toml`` (e.g. ``privacy={"epsilon": 1.0}``); ``restored`` puts it back."""
    import tomli_w

    p = root / "sites" / f"{site}.toml"
    data = tomllib.loads(p.read_text())
    for table, fields in tables.items():
        data[table].update(fields)
    p.write_text(tomli_w.dumps(data))


def site_dataset(root: Path, site: str) -> tuple[Path, str]:
    """(ledger path, dataset id) the site's ClientApp uses, from its site config."""
    from fedtwin.federation.config import load_site_config
    from fedtwin.omop.database import open_database
    from fedtwin.privacy.ledger import dataset_id_for_database

    cfg = load_site_config(root / "sites" / f"{site}.toml")
    db = open_database(cfg.data.database, cfg.data.cdm_schema)
    return cfg.privacy.ledger, dataset_id_for_database(db.url, db.cdm_schema)


def ledger_entries(root: Path, site: str) -> list:
    """Every entry of the site's privacy ledger for its dataset (empty if there is no ledger yet)."""
    from fedtwin.privacy.ledger import PrivacyLedger

    path, ds = site_dataset(root, site)
    if not path.exists():
        return []
    with PrivacyLedger.open(path, read_only=True) as ledger:
        return ledger.entries(ds) if ds in ledger.datasets() else []


def training_id(output: str) -> str:
    """The training id the ServerApp announced (sites tag their ledger entries with it)."""
    m = re.search(r"FEDTWIN start .*\btraining_id=(\S+)", output)
    assert m, output[-3000:]
    return m.group(1)


def run_entries(entries: list, output: str) -> list:
    """The ledger entries of the training whose ServerApp output is ``output``."""
    tid = training_id(output)
    return [e for e in entries if e.run_id == tid]


def epsilon_sites(root: Path, mlflow_run_id: str) -> set[str]:
    """Sites with an ``epsilon_spent.<site>`` metric in the MLflow run (node ids mapped to site names)."""
    by_id = {str(v): k for k, v in node_ids(root).items()}
    keys = [k.split(".", 1)[1] for k in mlflow_run(root, mlflow_run_id).data.metrics if k.startswith("epsilon_spent.")]
    return {by_id.get(k, k) for k in keys}


def npz_parameters(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in sorted(k for k in z.files if re.fullmatch(r"p\d{4}", k))]


def same_parameters(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x.astype(np.float64), y.astype(np.float64)) for x, y in zip(a, b))


def rounds_of(res) -> list[tuple[int, str, int]]:
    return [(o.round, o.status, o.sites) for o in res.rounds]


def site_errors(output: str) -> list[tuple[int, int, str]]:
    """The ServerApp's ``FEDTWIN site_error round=R node=N reason=...`` lines."""
    return [(int(r), int(n), why) for r, n, why in SITE_ERROR_RE.findall(output)]


def mlflow_metric(root: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    from fedtwin.federation.config import load_study_config

    client = MlflowClient(tracking_uri=load_study_config(root / "study.toml").tracking.mlflow_tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def mlflow_run(root: Path, run_id: str):
    from mlflow import MlflowClient

    from fedtwin.federation.config import load_study_config

    return MlflowClient(tracking_uri=load_study_config(root / "study.toml").tracking.mlflow_tracking_uri).get_run(run_id)


@dataclass
class Background:
    """``launch`` running in a thread while the test injects a fault."""

    thread: threading.Thread
    box: dict

    def result(self, timeout: float = LAUNCH_TIMEOUT + 60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "launch did not return"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]


def launch_in_background(study: Path, **kw) -> Background:
    from coordinator.launch import launch

    box: dict = {"lines": []}

    def target() -> None:
        try:
            box["result"] = launch(study, timeout=LAUNCH_TIMEOUT, echo=box["lines"].append, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return Background(t, box)


def cli(*args: str):
    """``fedtwin coordinator ...`` as the user runs it (exit code, printed output)."""
    from typer.testing import CliRunner

    from coordinator.cli import app

    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    out = res.output
    try:
        out += res.stderr
    except ValueError:  # stderr mixed into output
        pass
    return res.exit_code, out


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory):
    from coordinator.consortium import init_consortium

    work = tmp_path_factory.mktemp("faults")
    root = work / "local"
    init_consortium(
        root, sites=len(SITES), spec=SPEC, rounds=1, study_id="faults",
        secagg={"num_shares": 3, "reconstruction_threshold": 2, "timeout": SECAGG_TIMEOUT},
        epsilon=1000.0,  # site budgets that the module's many trainings cannot exhaust (test c exhausts one on purpose)
        runtime={"preload": ["torch", "site_agent.client_app"]},
    )
    synthetic_site_databases(root, work, len(SITES))
    with running_consortium(root):
        yield root


@pytest.fixture
def restored(consortium: Path):
    """The consortium as it was: site configs restored, every site's processes alive and online (before and after)."""
    root = consortium
    saved = {s: (root / "sites" / f"{s}.toml").read_bytes() for s in SITES}

    def restore() -> None:
        for s, raw in saved.items():
            (root / "sites" / f"{s}.toml").write_bytes(raw)
        for s in SITES:
            if not site_alive(root, s):
                restart_site(root, s)
        wait_for(lambda: all(node_status(root).get(s) == "online" for s in SITES), 120, "every site online")

    restore()
    try:
        yield root
    finally:
        restore()


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
