"""A local consortium on loopback: ``init``, ``up``, ``down``, ``status`` and ``run_app``.

``init`` writes a self-contained folder (CA + SuperLink TLS certificate, SuperNode
authentication keys, Ed25519 signing keys, SuperExec secrets, site and study configs, free
ports). ``up`` starts a SuperLink and one SuperNode per site (plus FedTwin's fork executors) as
real processes on 127.0.0.1 with TLS and SuperNode authentication, registers the sites' keys and
waits until every SuperNode is online. ``run_app`` submits a Flower app with ``flwr run``.
``down`` stops everything, leaving no process behind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from coordinator.consortium import processes
from fedtwin.federation import commands
from fedtwin.federation.commands import ProcessSpec, Render, SiteRender
from fedtwin.federation.config import (
    ConsortiumManifest,
    ManifestSite,
    SiteConfig,
    StudyConfig,
    load_manifest,
    load_site_config,
    load_study_config,
    validate_toml_data,
    write_toml,
)
from fedtwin.federation.errors import ConsortiumError
from coordinator.consortium.layout import COORDINATOR, Layout, free_ports, port_is_free
from coordinator.consortium.node_keys import generate_signing_key, generate_superexec_secret, generate_supernode_key
from coordinator.consortium.pki import create_ca, issue_server_certificate, write_certificate, write_private_key

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = REPO_ROOT / "specs" / "hypertension-bp.yaml"
GENERATED = ("consortium.toml", "study.toml", "sites", "specs", "pki", "keys", "flwr_home", "state", "run", "logs")
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1", "superlink")


# ------------------------------------------------------------------------------------------ init


@dataclass(frozen=True)
class InitResult:
    root: Path
    manifest: ConsortiumManifest
    files: list[Path]


def init_consortium(
    out: str | Path,
    sites: int = 2,
    *,
    force: bool = False,
    name: str = "fedtwin-local",
    study_id: str = "local-study",
    spec: str | Path | None = None,
    rounds: int = 3,
    strategy: str = "fedavg",
    proximal_mu: float = 0.0,
    min_sites: int | None = None,
    secagg: dict[str, Any] | None = None,
    epsilon: float = 8.0,
    delta: float = 1e-5,
    suppression_threshold: int = 10,
    server_names: tuple[str, ...] = (),
    public_address: str | None = None,
    runtime: dict[str, Any] | None = None,
) -> InitResult:
    """Create a local consortium folder at ``out`` with ``sites`` sites (see module docs)."""
    if sites < 1:
        raise ConsortiumError(f"--sites {sites}: a consortium needs at least one site", "use --sites 2 or more")
    layout = Layout.at(out)
    spec_src = Path(spec).expanduser().resolve() if spec else DEFAULT_SPEC
    if not spec_src.is_file():
        raise ConsortiumError(f"twin spec {spec_src} does not exist", "give an existing spec with --spec (e.g. specs/hypertension-bp.yaml)")

    site_names = [f"site_{k}" for k in range(1, sites + 1)]
    ports = free_ports(1 + sites)
    sl_port, rt_ports = ports[0], ports[1:]
    if public_address is not None and ":" not in public_address:
        raise ConsortiumError(f"--public-address {public_address!r} is not HOST:PORT", "e.g. --public-address coordinator.example.org:9092")
    public_host = public_address.rpartition(":")[0].strip("[]") if public_address else None
    names = list(dict.fromkeys([*DEFAULT_SERVER_NAMES, *server_names, *([public_host] if public_host else [])]))
    secagg = dict(secagg or {})
    if sites < 2:
        secagg.setdefault("enabled", False)  # SecAgg+ needs 2 sites or more
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    from flwr.supercore.version import package_version

    # Validate the options first: a bad one must fail before anything is written.
    study = validate_toml_data(
        StudyConfig,
        {
            "study": {"id": study_id, "spec": f"specs/{spec_src.name}", "rounds": rounds, "min_sites": min_sites or min(sites, 2)},
            "strategy": {"name": strategy, "proximal_mu": proximal_mu},
            "secagg": secagg,
            "tracking": {"mlflow_tracking_uri": f"sqlite:///{layout.tracking_dir / 'mlflow.db'}", "experiment": study_id},
            "checkpoints": {"dir": "checkpoints"},
        },
        "study options",
    )
    study.check_against_sites(sites)
    manifest = validate_toml_data(
        ConsortiumManifest,
        {
            "consortium": {"name": name, "created": created, "flower_version": package_version, "federation": name},
            "superlink": {"port": sl_port, "server_names": names},
            "runtime": dict(runtime or {}),
            "sites": [{"name": s, "config": f"sites/{s}.toml", "runtime_api_port": p} for s, p in zip(site_names, rt_ports)],
        },
        "consortium options",
    )
    site_cfgs = [
        validate_toml_data(
            SiteConfig,
            {
                "site": {"name": s, "index": k, "consortium": name},
                "data": {"database": f"../data/{s}.omop.sqlite", "spec": f"../specs/{spec_src.name}"},
                "privacy": {"epsilon": epsilon, "delta": delta, "ledger": f"../privacy/{s}.ledger.sqlite", "suppression_threshold": suppression_threshold},
                "audit": {"outbox": f"../outbox/{s}"},
                "keys": {
                    "supernode_private_key": f"../keys/supernode/{s}.key",
                    "supernode_public_key": f"../keys/supernode/{s}.pub",
                    "signing_private_key": f"../keys/signing/{s}.ed25519.pem",
                    "signing_public_key": f"../keys/signing/{s}.ed25519.pub.pem",
                },
                "trust": {
                    "superlink_address": public_address or f"127.0.0.1:{sl_port}",
                    "ca_certificate": "../pki/ca.pem",
                    "coordinator_signing_public_key": f"../keys/signing/{COORDINATOR}.ed25519.pub.pem",
                },
                "supernode": {"runtime_api_port": rt},
            },
            f"{s} options",
        )
        for k, (s, rt) in enumerate(zip(site_names, rt_ports), start=1)
    ]
    _prepare_folder(layout, force)

    files: list[Path] = []
    for d in (layout.sites_dir, layout.specs_dir, layout.data_dir, layout.privacy_dir, layout.checkpoints_dir, layout.tracking_dir,
              layout.state_dir, layout.run_dir, layout.logs_dir, layout.flwr_home):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_src, layout.specs_dir / spec_src.name)
    files.append(layout.specs_dir / spec_src.name)
    for plan in sorted((spec_src.parent / "plans").glob("*.yaml")):  # what-if plans registered with the final twin
        (layout.specs_dir / "plans").mkdir(exist_ok=True)
        shutil.copyfile(plan, layout.specs_dir / "plans" / plan.name)
        files.append(layout.specs_dir / "plans" / plan.name)

    # PKI: one CA, one server certificate for the SuperLink.
    ca = create_ca(f"{name} CA")
    write_certificate(layout.ca_cert, ca.certificate)
    write_private_key(layout.ca_key, ca.key)
    cert, key = issue_server_certificate(ca, "superlink", names)
    write_certificate(layout.server_cert, cert)
    write_private_key(layout.server_key, key)
    files += [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key]

    # Keys: coordinator signing key, SuperExec secret of the SuperLink, then per site.
    generate_signing_key(layout.signing_key(COORDINATOR), layout.signing_pub(COORDINATOR))
    generate_superexec_secret(layout.superexec_secret("superlink"))
    files += [layout.signing_key(COORDINATOR), layout.signing_pub(COORDINATOR), layout.superexec_secret("superlink")]
    for s in site_names:
        generate_supernode_key(layout.supernode_key(s), layout.supernode_pub(s), comment=f"{name}/{s}")
        generate_signing_key(layout.signing_key(s), layout.signing_pub(s))
        generate_superexec_secret(layout.superexec_secret(s))
        files += [layout.supernode_key(s), layout.supernode_pub(s), layout.signing_key(s), layout.signing_pub(s), layout.superexec_secret(s)]

    for s, cfg in zip(site_names, site_cfgs):
        write_toml(
            layout.site_config(s), cfg,
            f"FedTwin site configuration of {s} in consortium {name} (written by `fedtwin consortium init`).\n"
            "Paths are relative to this file's folder. `database` is a placeholder: point it at the site's OMOP\n"
            "database (SQLite path or postgresql+psycopg:// URL). The SuperNode passes this file's path to the\n"
            "ClientApp as node config `site-config`.",
        )
        files.append(layout.site_config(s))
    write_toml(
        layout.study, study,
        f"FedTwin study configuration of consortium {name} (written by `fedtwin consortium init`).\n"
        "Paths are relative to this file's folder. secagg.* are Flower's SecAggPlusWorkflow parameters;\n"
        "an int num_shares must be > 2 (a float is a fraction of the sampled sites).",
    )
    write_toml(
        layout.manifest, manifest,
        "FedTwin local consortium (written by `fedtwin consortium init`): ports chosen at init, sites, runtime tuning.\n"
        "`fedtwin consortium up/down/status` read this file. runtime.executor: fork (FedTwin's fork executor,\n"
        "Flower --isolation process) or flower (Flower's --isolation subprocess). runtime.poll_interval caps\n"
        "Flower's 3 s polls (0 = Flower's own).",
    )
    files += [layout.study, layout.manifest]
    # Read everything back: what init wrote must load.
    load_manifest(layout.manifest)
    load_study_config(layout.study)
    for s in site_names:
        load_site_config(layout.site_config(s))
    return InitResult(layout.root, manifest, files)


def _prepare_folder(layout: Layout, force: bool) -> None:
    root = layout.root
    if root.exists() and not root.is_dir():
        raise ConsortiumError(f"{root} exists and is not a folder", "choose another --out")
    if not root.exists() or not any(root.iterdir()):
        root.mkdir(parents=True, exist_ok=True)
        return
    is_consortium = layout.manifest.exists()
    if not force:
        what = "a consortium" if is_consortium else "a non-empty folder"
        raise ConsortiumError(
            f"{root} already holds {what}; refusing to overwrite it",
            "choose another --out, or pass --force to replace the consortium (keys and certificates are regenerated)",
        )
    if not is_consortium:
        raise ConsortiumError(
            f"{root} is a non-empty folder without consortium.toml; --force only replaces a consortium",
            "choose an empty or new folder",
        )
    running = [r.name for r in processes.records(layout) if r.alive()]
    if running:
        raise ConsortiumError(f"the consortium in {root} is running ({', '.join(running)})", f"stop it first: fedtwin consortium down {root}")
    for name in GENERATED:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ---------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Consortium:
    layout: Layout
    manifest: ConsortiumManifest

    @classmethod
    def load(cls, root: str | Path) -> Consortium:
        layout = Layout.at(root)
        if not layout.manifest.exists():
            raise ConsortiumError(f"{layout.root} is not a consortium folder (no consortium.toml)", "create one: fedtwin consortium init --sites 2 --out DIR")
        return cls(layout, load_manifest(layout.manifest))

    @property
    def federation(self) -> str:
        return self.manifest.consortium.federation

    @property
    def address(self) -> str:
        return f"{self.manifest.consortium.host}:{self.manifest.superlink.port}"

    def render(self) -> Render:
        rt = self.manifest.runtime
        L = self.layout
        return Render(
            python=sys.executable,
            bin_dir=commands.local_bin_dir(),
            superlink_host=self.manifest.consortium.host,
            superlink_port=str(self.manifest.superlink.port),
            superlink_address=self.address,
            ca_cert=str(L.ca_cert),
            server_cert=str(L.server_cert),
            server_key=str(L.server_key),
            superlink_db=self.superlink_database(),
            superlink_secret=str(L.superexec_secret("superlink")),
            executor=rt.executor,
            **commands.runtime_settings(rt),
        )

    def superlink_database(self) -> str:
        db = self.manifest.superlink.database
        if db == ":memory:":
            from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

            return FLWR_IN_MEMORY_DB_NAME
        return str((self.layout.root / db).resolve())

    def site_render(self, site: ManifestSite) -> SiteRender:
        L = self.layout
        return SiteRender(
            name=site.name,
            site_config=str((L.root / site.config).resolve()),
            supernode_key=str(L.supernode_key(site.name)),
            runtime_host="127.0.0.1",
            runtime_port=str(site.runtime_api_port),
            secret=str(L.superexec_secret(site.name)),
        )

    def _env(self, flwr_home: Path) -> dict[str, str]:
        # Flower starts flower-superexec / flwr-clientapp / flwr-serverapp by name: the venv's bin first on PATH
        path = os.pathsep.join([commands.local_bin_dir(), os.environ.get("PATH", os.defpath)])
        return {**commands.common_env(self.render()), "FLWR_HOME": str(flwr_home), "PATH": path}

    def coordinator_env(self) -> dict[str, str]:
        return self._env(self.layout.flwr_home)

    def site_env(self, site: str) -> dict[str, str]:
        return self._env(self.layout.site_flwr_home(site))

    def write_flwr_config(self) -> Path:
        L = self.layout
        L.flwr_home.mkdir(parents=True, exist_ok=True)
        path = L.flwr_home / "config.toml"
        path.write_text(commands.flwr_config_toml(self.federation, self.address, str(L.ca_cert)))
        return path

    def control(self):  # -> control.Control
        from coordinator.consortium.control import Control

        return Control(self.address, self.layout.ca_cert)


# ------------------------------------------------------------------------------------------ up


@dataclass
class UpResult:
    records: list[processes.ProcessRecord]
    nodes: dict[str, int]  # site -> SuperLink node id
    seconds: float
    restarted: list[str] = field(default_factory=list)  # processes of a start whose SuperLink had died, stopped first


def _stop_orphans(L: Layout, running: list[str]) -> list[str]:
    """Stop what is left of a start whose SuperLink is gone; returns the names stopped.

    Why: the SuperLink holds the consortium's state (in memory by default: the sites'
    registrations, node ids, runs). When it dies, its executor stops and the ServerApp with it, but
    the SuperNodes keep retrying (Flower retries for up to 2 h) against a SuperLink that, once
    started again, no longer knows them. Nothing in them is worth keeping (a site's data, ledger
    and keys are on disk), so ``up`` stops them and starts the whole consortium again: one
    command, instead of an "already running" error that hides the dead SuperLink.
    """
    if "superlink" not in {r.name for r in processes.records(L)} or "superlink" in running:
        return []
    down(L.root)
    return running


def up(root: str | Path, *, timeout: float = 90.0, extra_env: dict[str, str] | None = None) -> UpResult:
    """Start the SuperLink, register the sites' keys, start the SuperNodes; wait until all are online.

    If the SuperLink of the last start has died while other processes of that start still run
    (``restarted`` names them), those are stopped first and everything starts again: the way back
    after a SuperLink crash (then ``fedtwin coordinator launch --resume``).

    On any failure everything started so far is stopped and a :class:`ConsortiumError` names the
    log file to read (with its last lines).
    """
    t0 = time.monotonic()
    c = Consortium.load(root)
    L = c.layout
    running = [r.name for r in processes.records(L) if r.alive()]
    restarted = _stop_orphans(L, running)
    if restarted:
        running = [r.name for r in processes.records(L) if r.alive()]
    if running:
        raise ConsortiumError(f"the consortium in {L.root} is already running ({', '.join(running)})", f"see `fedtwin consortium status {L.root}`, or stop it: `fedtwin consortium down {L.root}`")
    for r in processes.records(L):
        processes.forget(L, r.name)
    strays = processes.stray_processes(L.root)
    if strays:
        raise ConsortiumError(
            f"processes of a previous start of {L.root} are still alive: " + "; ".join(f"{p} {c_[:80]}" for p, c_ in strays[:5]),
            f"run `fedtwin consortium down {L.root}` first",
        )
    ports = [("SuperLink", c.manifest.superlink.port)] + [(f"{s.name} Runtime API", s.runtime_api_port) for s in c.manifest.sites]
    busy = [f"{what} port {p}" for what, p in ports if not port_is_free(p, c.manifest.consortium.host)]
    if busy:
        raise ConsortiumError(
            f"port(s) already in use on {c.manifest.consortium.host}: {', '.join(busy)}",
            f"free them, or re-create the consortium with new ports (`fedtwin consortium init --force --out {L.root}`), or edit consortium.toml",
        )
    study = load_study_config(L.study)
    study.check_against_sites(len(c.manifest.sites))
    site_cfgs = {s.name: load_site_config(L.root / s.config) for s in c.manifest.sites}
    c.write_flwr_config()
    base_env = dict(os.environ)
    base_env.update(extra_env or {})
    r = c.render()
    started: list[processes.ProcessRecord] = []
    try:
        # 1. SuperLink
        sl = processes.start(L, ProcessSpec("superlink", commands.superlink_argv(r), c.coordinator_env()), base_env)
        started.append(sl)
        deadline = t0 + timeout
        _wait_superlink(c, sl, deadline)
        # 2. register the sites' public keys (flwr supernode register), idempotent
        nodes = _register_sites(c, site_cfgs, base_env, deadline)
        # 3. the ServerApp executor
        argv = commands.superlink_executor_argv(r, watch_pid=sl.pid)
        if argv:
            started.append(processes.start(L, ProcessSpec("superlink-executor", argv, c.coordinator_env()), base_env))
        # 4. SuperNodes and their executors
        for s in c.manifest.sites:
            sr = c.site_render(s)
            L.site_flwr_home(s.name).mkdir(parents=True, exist_ok=True)
            sn = processes.start(L, ProcessSpec(f"{s.name}-supernode", commands.supernode_argv(r, sr), c.site_env(s.name)), base_env)
            started.append(sn)
            argv = commands.supernode_executor_argv(r, sr, watch_pid=sn.pid)
            if argv:
                started.append(processes.start(L, ProcessSpec(f"{s.name}-executor", argv, c.site_env(s.name)), base_env))
        # 5. every SuperNode online, every executor ready
        _wait_online(c, nodes, started, deadline)
        for rec in started:
            if rec.name.endswith("executor"):
                _wait_marker(rec, started, "] ready in", deadline)
        _check_alive(started)
    except BaseException:
        for rec in reversed(started):
            processes.stop(rec, timeout=5)
            processes.forget(L, rec.name)
        processes.kill_strays(L.root)
        raise
    (L.state_dir / "up.json").write_text(json.dumps({"started_at": time.time(), "nodes": nodes}, indent=2))
    return UpResult(started, nodes, time.monotonic() - t0, restarted)


def _fail(rec: processes.ProcessRecord, problem: str) -> ConsortiumError:
    return ConsortiumError(
        f"{problem}\n--- last lines of {rec.log} ---\n{processes.log_tail(rec.log)}",
        f"read {rec.log} (and the other logs in {Path(rec.log).parent})",
    )


def _check_alive(recs: list[processes.ProcessRecord]) -> None:
    for rec in recs:
        if not rec.alive():
            code = processes.exit_code(rec)
            raise _fail(rec, f"{rec.name} (pid {rec.pid}) exited" + (f" with code {code}" if code is not None else "") + " during start-up")


def _wait_superlink(c: Consortium, sl: processes.ProcessRecord, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        _check_alive([sl])
        try:
            with c.control() as ctl:
                ctl.nodes()
            return
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last = exc
        time.sleep(0.2)
    raise _fail(sl, f"the SuperLink did not answer on {c.address} within the timeout (last error: {last!r})")


def _register_sites(c: Consortium, site_cfgs: dict[str, SiteConfig], base_env: dict[str, str], deadline: float) -> dict[str, int]:
    from coordinator.consortium.control import flower_public_key_bytes

    with c.control() as ctl:
        existing = {n.public_key: n for n in ctl.nodes() if n.status != "unregistered"}
    nodes: dict[str, int] = {}
    todo = []
    for name, cfg in site_cfgs.items():
        pk = flower_public_key_bytes(cfg.keys.supernode_public_key)
        if pk in existing:
            nodes[name] = existing[pk].node_id
        else:
            todo.append((name, cfg))
    env = {**base_env, **c.coordinator_env(), processes.TAG: str(c.layout.root)}

    def register(item: tuple[str, SiteConfig]) -> tuple[str, int]:
        name, cfg = item
        argv = [str(Path(commands.local_bin_dir()) / "flwr"), "supernode", "register", str(cfg.keys.supernode_public_key),
                c.federation, "--name", name, "--format", "json"]
        left = max(5.0, deadline - time.monotonic())
        try:
            p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=left, cwd=c.layout.root)
        except subprocess.TimeoutExpired:
            raise ConsortiumError(f"`{' '.join(argv)}` did not finish in {left:.0f} s", f"read {c.layout.log('superlink')}") from None
        m = re.search(r'"node-id"\s*:\s*(\d+)', p.stdout)
        if p.returncode != 0 or not m:
            raise ConsortiumError(
                f"registering {name}'s SuperNode key failed (exit {p.returncode}): {(p.stdout + p.stderr).strip()[-800:]}",
                f"read {c.layout.log('superlink')}",
            )
        return name, int(m.group(1))

    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        for name, node_id in pool.map(register, todo):
            nodes[name] = node_id
    c.layout.nodes_file.write_text(json.dumps(nodes, indent=2))
    return nodes


def _wait_marker(rec: processes.ProcessRecord, started: list[processes.ProcessRecord], marker: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if marker in processes.log_since_start(rec):
            return
        _check_alive(started)
        time.sleep(0.1)
    raise _fail(rec, f"{rec.name} did not report ready within the timeout")


def _wait_online(c: Consortium, nodes: dict[str, int], started: list[processes.ProcessRecord], deadline: float) -> None:
    want = {v: k for k, v in nodes.items()}
    online: set[int] = set()
    while time.monotonic() < deadline:
        _check_alive(started)
        try:
            with c.control() as ctl:
                online = {n.node_id for n in ctl.nodes() if n.status == "online"}
        except Exception:  # noqa: BLE001
            pass
        if set(want) <= online:
            return
        time.sleep(0.2)
    missing = [want[n] for n in want if n not in online]
    rec = next(r for r in started if r.name == f"{missing[0]}-supernode")
    raise _fail(rec, f"SuperNode(s) of {', '.join(missing)} did not come online within the timeout")


# ---------------------------------------------------------------------------------------- down


@dataclass
class DownResult:
    stopped: list[tuple[str, str]] = field(default_factory=list)  # (name, what happened)
    strays: list[tuple[int, str]] = field(default_factory=list)


def down(root: str | Path, *, timeout: float = 10.0) -> DownResult:
    """Stop every process of the consortium (SIGTERM, SIGKILL after ``timeout``), then any stray."""
    layout = Layout.at(root)
    if not layout.manifest.exists():
        raise ConsortiumError(f"{layout.root} is not a consortium folder (no consortium.toml)", "give the folder created by `fedtwin consortium init`")
    result = DownResult()
    recs = processes.records(layout)
    # Executors (and the task processes they forked) first, then the SuperNodes, each phase in
    # parallel, then the SuperLink, so that nothing talks to a process already gone.
    phases = [
        [r for r in recs if r.name.endswith("-executor")],
        [r for r in recs if r.name != "superlink" and not r.name.endswith("-executor")],
    ]
    for phase in phases:
        if not phase:
            continue
        with ThreadPoolExecutor(max_workers=len(phase)) as pool:
            for rec, how in zip(phase, pool.map(lambda r: processes.stop(r, timeout=timeout), phase)):
                result.stopped.append((rec.name, how))
                processes.forget(layout, rec.name)
    for rec in (r for r in recs if r.name == "superlink"):
        # `flwr run --stream` clients (tagged, not recorded) hold connections that would keep the
        # SuperLink's graceful shutdown waiting: stop them first.
        result.strays += processes.kill_strays(layout.root, exclude_groups=frozenset({rec.pgid}))
        result.stopped.append((rec.name, processes.stop(rec, timeout=timeout)))
        processes.forget(layout, rec.name)
    result.strays += processes.kill_strays(layout.root)
    return result


# -------------------------------------------------------------------------------------- status


@dataclass
class ProcessStatus:
    name: str
    pid: int
    running: bool
    log: str
    uptime_s: float | None


@dataclass
class Status:
    root: Path
    address: str
    federation: str
    processes: list[ProcessStatus]
    superlink_reachable: bool
    nodes: list[dict[str, Any]]
    runs: list[dict[str, Any]]

    @property
    def running(self) -> bool:
        return any(p.running for p in self.processes)


def status(root: str | Path) -> Status:
    c = Consortium.load(root)
    now = time.time()
    procs = [
        ProcessStatus(r.name, r.pid, r.alive(), r.log, (now - r.started_at) if r.alive() else None)
        for r in processes.records(c.layout)
    ]
    reachable, nodes, runs = False, [], []
    if any(p.running and p.name == "superlink" for p in procs):
        try:
            names = json.loads(c.layout.nodes_file.read_text()) if c.layout.nodes_file.exists() else {}
            by_id = {v: k for k, v in names.items()}
            with c.control() as ctl:
                nodes = [
                    {"node_id": n.node_id, "site": by_id.get(n.node_id, n.name or "?"), "status": n.status}
                    for n in ctl.nodes() if n.status != "unregistered"
                ]
                runs = [_run_entry(ctl, r) for r in ctl.runs()]
            reachable = True
        except Exception:  # noqa: BLE001 - report unreachable
            reachable = False
    return Status(c.layout.root, c.address, c.federation, procs, reachable, nodes, runs)


def _run_entry(ctl, run) -> dict[str, Any]:
    """One run of ``status``: Flower's ``status``/``sub_status``, and ``state``, what the run's training did.

    Why: Flower says ``finished:completed`` whenever the ServerApp exited normally, also when every
    round halted; the ``FEDTWIN final`` line of the run's log says how many training rounds
    completed (:mod:`coordinator.consortium.run_outcome`). ``rounds_completed``, ``rounds`` and
    ``first_round`` are None for a run that printed no such line (another app, or a failed run).
    """
    from coordinator.consortium.run_outcome import run_state, training_outcome

    outcome = None
    if (run.status, run.sub_status) == ("finished", "completed"):
        try:
            outcome = training_outcome(ctl.run_log(run.run_id))
        except Exception:  # noqa: BLE001 - the log is extra detail: without it the run keeps Flower's status
            outcome = None
    return {
        "run_id": run.run_id, "status": run.status, "sub_status": run.sub_status, "fab_id": run.fab_id,
        "state": run_state(run.status, run.sub_status, outcome),
        "rounds_completed": outcome.rounds_completed if outcome else None,
        "rounds": outcome.rounds if outcome else None,
        "first_round": outcome.first_round if outcome else None,
    }


# ------------------------------------------------------------------------------------- run_app


@dataclass
class RunResult:
    returncode: int  # of `flwr run`; -1 on timeout
    output: str  # stdout + stderr of `flwr run` (with --stream: the ServerApp's log)
    run_id: int | None
    status: str | None  # finished | running | ... (from the SuperLink)
    sub_status: str | None  # completed | failed | stopped
    seconds: float
    argv: list[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.sub_status == "completed"


def run_app(
    consortium_dir: str | Path,
    app_dir: str | Path,
    run_config: dict[str, Any] | None = None,
    stream: bool = True,
    timeout: float = 600.0,
    *,
    extra_env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> RunResult:
    """Run a Flower app on the consortium: ``flwr run APP_DIR FEDERATION [--run-config k=v]... --stream``.

    ``FLWR_HOME`` points at the consortium's ``flwr_home`` (its ``config.toml`` names the
    SuperLink and the CA). Returns the exit code, the captured output, the run id and the run's
    final status according to the SuperLink (``flwr run --stream`` exits 0 even if the ServerApp
    failed, so check :attr:`RunResult.ok`). On timeout the run is stopped on the SuperLink.
    ``on_line`` sees every output line as it arrives (progress); an error in it is ignored.
    """
    c = Consortium.load(consortium_dir)
    app = Path(app_dir).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise ConsortiumError(f"{app} has no pyproject.toml", "give the folder of a Flower app ([tool.flwr.app] in pyproject.toml)")
    if not any(r.name == "superlink" and r.alive() for r in processes.records(c.layout)):
        raise ConsortiumError(f"the consortium in {c.layout.root} is not running", f"start it: fedtwin consortium up {c.layout.root}")
    c.write_flwr_config()
    argv = commands.flwr_run_argv(commands.local_bin_dir(), str(app), c.federation, run_config, stream)
    env = {**os.environ, **(extra_env or {}), **c.coordinator_env(), processes.TAG: str(c.layout.root)}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=app, start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                try:
                    on_line(line.rstrip("\n"))
                except Exception:  # noqa: BLE001 - progress display must not break the run
                    pass

    reader = threading.Thread(target=pump, name="flwr-run-output", daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        code = -1
    reader.join(timeout=30)
    out = "".join(lines)
    seconds = time.monotonic() - t0
    m = re.search(r"Successfully started run (\d+)", out or "")
    run_id = int(m.group(1)) if m else None
    st = sub = None
    if run_id is not None:
        try:
            with c.control() as ctl:
                if code == -1:
                    ctl.stop_run(run_id)
                views = ctl.runs(run_id)
            if views:
                st, sub = views[0].status, views[0].sub_status
        except Exception:  # noqa: BLE001 - the SuperLink may be gone; report what we have
            pass
    return RunResult(code, out or "", run_id, st, sub, seconds, argv)


def wait_run(consortium_dir: str | Path, run_id: int, timeout: float = 600.0) -> tuple[str, str]:
    """Wait until run ``run_id`` is finished; return (status, sub_status)."""
    c = Consortium.load(consortium_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with c.control() as ctl:
            v = ctl.runs(run_id)
        if v and v[0].status == "finished":
            return v[0].status, v[0].sub_status
        time.sleep(0.5)
    raise ConsortiumError(f"run {run_id} did not finish within {timeout:.0f} s", f"see `FLWR_HOME={c.layout.flwr_home} flwr log {run_id}`")
