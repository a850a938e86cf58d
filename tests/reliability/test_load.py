"""Load (issue "Evidence", part 3): many sites in simulation, many rounds in deployment.

(a) 50 simulated hospitals x 10 rounds with SecAgg+ in Flower's simulation engine
    (:func:`coordinator.simulate.simulate`, Ray): every round completes with all 50 sites, the
    memory stays under a generous ceiling, and once ``simulate`` returns no process it started
    (Ray's GCS server, raylet, workers) is left.
(b) 20 rounds in deployment with 5 sites: a real local consortium (SuperLink + 5 SuperNodes +
    their executors on 127.0.0.1, TLS, SuperNode authentication, SecAgg+), one ``launch`` of 20
    rounds: every round completes with all 5 sites, each consortium process's RSS is sampled
    through the run (peak per process, and at rounds 5 and 20 for the long-lived ones: bounded
    growth), no ClientApp/ServerApp task process outlives the run, nothing is left after ``down``.

Processes are found through ``/proc`` (psutil is not installed): everything a test starts carries
an environment marker (simulation: ``FEDTWIN_LOAD_MARK``; consortium: ``FEDTWIN_CONSORTIUM``,
set by ``up``), which children inherit, including orphans. The figures are printed (``pytest -s``)
and written to docs/reliability.md by hand. The machine (2 cores) is shared with other jobs while
these run, so times are pessimistic.

Run: ``.venv/bin/python -m pytest tests/reliability/test_load.py -s``.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from fault_kit import SPEC, study_file, wait_for

pytestmark = pytest.mark.slow

MARK = "FEDTWIN_LOAD_MARK"
SIM_SITES, SIM_ROUNDS, SIM_PATIENTS = 50, 10, 60  # the ICU spec's cohort.min_patients is 50: fewer and sites refuse
SIM_RSS_CEILING_MB = 8000.0  # measured 2.6-3.5 GB for 50 sites (docs/simulation.md); a leak per round would blow through it
DEP_SITES, DEP_ROUNDS, DEP_PATIENTS = 5, 20, 150  # fewer patients and 20 rounds of DP noise swamp learning: sites refuse
DEP_PROCESS_CEILING_MB = 2000.0  # per long-lived consortium process
DEP_GROWTH = (1.25, 64.0)  # RSS at round 20 <= 1.25 x RSS at round 5 + 64 MB, for every long-lived process


# ------------------------------------------------------------------------------------ /proc helpers


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def _rss_kb(pid: int) -> int:
    v = _status(pid).get("VmRSS", "0 kB").split()
    return int(v[0]) if v else 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def marked_processes(tag: bytes) -> dict[int, str]:
    """Live (non-zombie) processes whose environment holds ``tag`` (``NAME=value``), with their command line."""
    me = os.getpid()
    out: dict[int, str] = {}
    for pid in _pids():
        if pid == me:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if tag in env.split(b"\0"):
            cmd = _cmdline(pid)
            if cmd and _status(pid).get("State", "").split()[:1] != ["Z"]:
                out[pid] = cmd
    return out


def descendants(root: int) -> dict[int, str]:
    """Live descendants of ``root`` (zombies included, marked ``<zombie>``)."""
    parent = {p: int(_status(p).get("PPid", "0") or 0) for p in _pids()}
    out: dict[int, str] = {}
    for pid in parent:
        p, hops = parent.get(pid, 0), 0
        while p and p != root and hops < 64:
            p, hops = parent.get(p, 0), hops + 1
        if p == root and pid != root:
            out[pid] = _cmdline(pid) or "<zombie>"
    return out


@dataclass
class RssSampler:
    """Samples the RSS of the processes ``find()`` returns (pid -> kind) every ``interval`` s.

    Keeps each pid's peak (with its kind) and, on :meth:`mark`, a labelled snapshot. A process is
    counted alone: pages shared after fork (the executors' preloaded torch in their ClientApps)
    count in each process that maps them.
    """

    find: Callable[[], dict[int, str]]
    interval: float = 0.5
    peak: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (kind, peak kB)
    marks: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)
    max_alive: dict[str, int] = field(default_factory=dict)  # kind -> most processes of that kind alive at once

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="load-rss", daemon=True)

    def sample(self) -> dict[int, tuple[str, int]]:
        now = {pid: (kind, _rss_kb(pid)) for pid, kind in self.find().items()}
        with self._lock:
            counts: dict[str, int] = {}
            for pid, (kind, kb) in now.items():
                counts[kind] = counts.get(kind, 0) + 1
                if kb > self.peak.get(pid, (kind, -1))[1]:
                    self.peak[pid] = (kind, kb)
            for kind, n in counts.items():
                self.max_alive[kind] = max(self.max_alive.get(kind, 0), n)
        return now

    def mark(self, label: str) -> None:
        self.marks[label] = self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def peak_by_kind(self) -> dict[str, tuple[int, float]]:
        """kind -> (processes seen, largest peak RSS in MB)."""
        out: dict[str, tuple[int, float]] = {}
        for kind, kb in self.peak.values():
            n, mb = out.get(kind, (0, 0.0))
            out[kind] = (n + 1, max(mb, kb / 1024.0))
        return out


def _report(title: str, lines: list[str]) -> None:
    print(f"\n=== LOAD {title}")
    for line in lines:
        print(f"    {line}")


# ------------------------------------------------------------------------------ (a) simulation


def _sim_kind(cmd: str) -> str:
    exe = os.path.basename(cmd.split()[0]) if cmd else ""
    if exe in ("gcs_server", "raylet"):
        return f"ray {exe}"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "ray worker (ClientApp actor)"
    if "dashboard/agent.py" in cmd or "runtime_env/agent" in cmd:
        return "ray agents"
    return f"other ({exe})"


@pytest.mark.timeout(1800)  # ~8 min on a quiet machine; the 2-core machine is shared with other jobs
def test_fifty_simulated_sites_ten_rounds_with_secagg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.simulate import simulate

    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)  # inherited by Ray's processes (gcs_server, raylet, workers), even if orphaned
    tag = f"{MARK}={mark}".encode()
    me = os.getpid()
    before = set(descendants(me))

    def find() -> dict[int, str]:
        out = {pid: _sim_kind(cmd) for pid, cmd in marked_processes(tag).items()}
        out[me] = "pytest (ServerApp + engine)"
        return out

    t0 = time.monotonic()
    with RssSampler(find) as sampler:
        res = simulate(SIM_SITES, SIM_ROUNDS, patients=SIM_PATIENTS, seed=5, out=tmp_path / "sim", secagg=True, parallel=2)
    wall = time.monotonic() - t0
    log = res.log_path.read_text()[-5000:] if res.log_path and res.log_path.is_file() else ""

    # no leaked processes: Ray is shut down when simulate returns; its processes may take a moment to exit
    def left() -> dict[int, str]:
        return {**marked_processes(tag), **{p: c for p, c in descendants(me).items() if p not in before}}

    try:
        wait_for(lambda: not left(), 120, "every process the simulation started to exit", poll=0.5)
    finally:
        leaked = left()
    per_kind = sampler.peak_by_kind()
    rounds = [(r.round, r.status, r.sites) for r in res.rounds]
    secs = [r.seconds for r in res.rounds]
    _report(
        f"simulation: {SIM_SITES} sites x {SIM_ROUNDS} rounds, SecAgg+ (11 shares, threshold 7), {SIM_PATIENTS} patients/site, 2 ClientApps at once",
        [
            f"ok={res.ok} message={res.message}",
            f"wall {wall:.1f} s (setup {res.setup_seconds:.1f} s, engine {res.run_seconds:.1f} s incl. Ray start/stop and the evaluation round)",
            "rounds: " + ", ".join(f"{r}:{st}/{n}" for r, st, n in rounds),
            f"round seconds: first {secs[0]:.1f}, rest mean {sum(secs[1:]) / max(1, len(secs) - 1):.1f}, max {max(secs):.1f}" if secs else "no rounds",
            f"evaluation round: {res.evaluation}",
            f"peak RSS summed over this process and its descendants (simulate's sampler): {res.peak_rss_mb:.0f} MB",
            *[f"peak RSS per process, {kind}: {mb:.0f} MB (largest of {n} process(es))" for kind, (n, mb) in sorted(per_kind.items())],
            f"leaked processes after return: {len(leaked)} {sorted(leaked.values())[:5]}",
        ],
    )
    assert res.ok, f"{res.message}\n{log}"
    assert rounds == [(r, "completed", SIM_SITES) for r in range(1, SIM_ROUNDS + 1)], f"{rounds}\n{log}"
    assert res.peak_rss_mb is not None and res.peak_rss_mb < SIM_RSS_CEILING_MB, res.peak_rss_mb
    assert not leaked, leaked


# ------------------------------------------------------------------------------ (b) deployment


def _dep_kind(name: str) -> str:
    return re.sub(r"site_\d+", "site", name)


@pytest.mark.timeout(2400)
def test_twenty_rounds_in_deployment_with_five_sites(tmp_path_factory: pytest.TempPathFactory) -> None:
    from conftest import running_consortium, synthetic_site_databases

    from coordinator.consortium import init_consortium, processes
    from coordinator.consortium.layout import Layout
    from coordinator.launch import launch

    work = tmp_path_factory.mktemp("load")
    root = work / "local"
    t_setup = time.monotonic()
    init_consortium(
        root, sites=DEP_SITES, spec=SPEC, rounds=DEP_ROUNDS, study_id="load",
        secagg={"num_shares": DEP_SITES, "reconstruction_threshold": 3, "timeout": 180.0},
        epsilon=1000.0, runtime={"preload": ["torch", "site_agent.client_app"]},
    )
    synthetic_site_databases(root, work, DEP_SITES, patients=DEP_PATIENTS)
    study = study_file(root, "load-20", rounds=DEP_ROUNDS, local_epochs=0.5, epsilon_per_site=50.0)
    layout = Layout.at(root)
    round_re = re.compile(r"^round (\d+): (\w+)")

    with running_consortium(root):
        up_seconds = time.monotonic() - t_setup
        recs = {r.pid: r.name for r in processes.records(layout)}
        executors = {pid for pid, name in recs.items() if name.endswith("executor")}
        assert len(recs) == 2 + 2 * DEP_SITES, recs

        def find() -> dict[int, str]:
            out = {pid: _dep_kind(name) for pid, name in recs.items()}
            for pid, ex in ((p, e) for e in executors for p in descendants(e)):
                out[pid] = "ServerApp task" if recs[ex] == "superlink-executor" else "ClientApp task"
            return out

        with RssSampler(find) as sampler:
            sampler.mark("start")

            def echo(line: str) -> None:
                m = round_re.match(line)
                if m:
                    sampler.mark(f"round {m.group(1)}")

            t0 = time.monotonic()
            res = launch(study, timeout=2400.0, echo=echo)
            run_seconds = time.monotonic() - t0
            # the run is over: every task process (the ServerApp's, each ClientApp's) must exit
            wait_for(lambda: not [p for e in executors for p in descendants(e)], 120, "every task process to exit", poll=0.5)
            tasks_left = [p for e in executors for p in descendants(e)]
            sampler.mark("end")
        dead_before_down = [r.name for r in processes.records(layout) if not r.alive()]
    # running_consortium's `down` asserted that no process tagged with this consortium is left
    leaked = processes.stray_processes(root, by_cmdline=True)

    long_lived = sorted(recs)
    r5, r20 = sampler.marks.get("round 5", {}), sampler.marks.get(f"round {DEP_ROUNDS}", {})
    per_kind = sampler.peak_by_kind()
    lines = [
        f"ok={res.ok} message={res.message}",
        "rounds: " + ", ".join(f"{o.round}:{o.status}/{o.sites}" for o in res.rounds) + f"; evaluation {res.evaluation}",
        f"setup + up {up_seconds:.1f} s; launch of {DEP_ROUNDS} rounds {run_seconds:.1f} s ({run_seconds / DEP_ROUNDS:.1f} s/round incl. the evaluation round)",
    ]
    for pid in long_lived:
        kind, kb = sampler.peak.get(pid, (recs[pid], 0))
        a = r5.get(pid, ("", 0))[1] / 1024.0
        b = r20.get(pid, ("", 0))[1] / 1024.0
        lines.append(f"{recs[pid]:<22} peak {kb / 1024.0:7.0f} MB   round 5 {a:7.0f} MB   round {DEP_ROUNDS} {b:7.0f} MB")
    for kind in ("ServerApp task", "ClientApp task"):
        n, mb = per_kind.get(kind, (0, 0.0))
        lines.append(f"{kind:<22} peak {mb:7.0f} MB over {n} processes sampled, at most {sampler.max_alive.get(kind, 0)} alive at once")
    lines.append(f"task processes left after the run: {len(tasks_left)}; consortium processes dead before down: {dead_before_down}; "
                 f"left after down: {len(leaked)}")
    _report(f"deployment: {DEP_SITES} sites x {DEP_ROUNDS} rounds, SecAgg+ ({DEP_SITES} shares, threshold 3), {DEP_PATIENTS} patients/site", lines)

    assert res.ok, f"{res.message}\n{res.output[-5000:]}"
    assert [(o.round, o.status, o.sites) for o in res.rounds] == [(r, "completed", DEP_SITES) for r in range(1, DEP_ROUNDS + 1)], res.output[-5000:]
    assert not tasks_left and not leaked and not dead_before_down, (tasks_left, leaked, dead_before_down)
    assert r5 and r20, sorted(sampler.marks)
    for pid in long_lived:
        peak_mb = sampler.peak[pid][1] / 1024.0
        assert peak_mb < DEP_PROCESS_CEILING_MB, (recs[pid], peak_mb)
        a, b = r5[pid][1] / 1024.0, r20[pid][1] / 1024.0
        assert b <= DEP_GROWTH[0] * a + DEP_GROWTH[1], f"{recs[pid]}: RSS {a:.0f} MB at round 5, {b:.0f} MB at round {DEP_ROUNDS}"
    # task processes do not pile up: at most one per site (plus the ServerApp's) at a time, give or take one ending
    assert sampler.max_alive.get("ClientApp task", 0) <= 2 * DEP_SITES, sampler.max_alive
