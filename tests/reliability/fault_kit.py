"""The fault kit: a real local consortium and the tools to break it, shared by tests/reliability/.

One consortium per test module (SuperLink + 3 SuperNodes on 127.0.0.1, TLS, SuperNode
authentication, fork executors) on synthetic OMOP ICU hospitals; SecAgg+ with ``num_shares = 3,
reconstruction_threshold = 2`` (one site may drop out of a round, two may not) and a bounded stage
timeout. ``restored`` puts the consortium back as it was around each test (site configs, every
site's SuperNode and executor alive and online). Test modules import the fixtures they use:
``from fault_kit import consortium, restored  # noqa: F401 (pytest fixtures)``.

Faults are real: processes are SIGKILLed (a site's SuperNode and executor process groups, the
ServerApp task process), site configs and ledgers are real files the ClientApp reads. No mocks.

Timing: a SuperNode killed without saying goodbye stays "online" at the SuperLink until its
heartbeat expires (2 x the heartbeat interval after its last heartbeat), and a killed ServerApp's
run is failed when its task heartbeat expires (<= 60 s). Until then the SuperLink refuses a
restarted SuperNode with the same key (``activate_node`` needs the node offline), so a restart
first waits for the node to show "offline". Everything waits on log lines or API state, never on
fixed sleeps.
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

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"
SITES = ("site_1", "site_2", "site_3")
SECAGG_TIMEOUT = 90.0  # seconds per SecAgg+ stage: bounds a round whose site vanished without an error reply
LAUNCH_TIMEOUT = 600.0

SITE_ERROR_RE = re.compile(r"FEDTWIN site_error round=(\d+) node=(\d+)(?: site=\S+)? reason=(.*)$", re.M)
SERVERAPP_TASK_RE = re.compile(r"started task process (\d+) for flwr-serverapp task \d+ run (\d+)")
RESUME_RE = re.compile(r"FEDTWIN resume checkpoint=(\S+) round=(\d+)")



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


def restart_site(root: Path, site: str, timeout: float = 180.0, extra_env: dict[str, str] | None = None) -> None:
    """Start the site's SuperNode and executor again, exactly as ``up`` does, once the SuperLink has
    noticed the old node is gone; wait until the node is online and the executor ready.

    ``extra_env`` is added to both processes' environment (``PYTHONPATH`` is prepended to, not
    replaced): a test-only altered site (tests/reliability/adversary/); restarting without it
    brings the site back as it was."""
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
    env = {**c.site_env(site), **(extra_env or {})}
    if extra_env and "PYTHONPATH" in extra_env:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_env["PYTHONPATH"], c.site_env(site).get("PYTHONPATH", ""),
                                                        os.environ.get("PYTHONPATH", "")) if p)
    base_env = dict(os.environ)
    sn = processes.start(c.layout, ProcessSpec(f"{site}-supernode", commands.supernode_argv(r, sr), env), base_env)
    ex = processes.start(c.layout, ProcessSpec(f"{site}-executor", commands.supernode_executor_argv(r, sr, watch_pid=sn.pid), env), base_env)
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
