"""Fixed cost of a deployment round on a local consortium (real processes, loopback, TLS + auth).

Runs FedTwin's probe Flower app (tests/flower_probe: a 4-float model, a trivial local step) on a
fresh local consortium with N sites (default 3), first as plain FedAvg rounds, then as SecAgg+
rounds, and reports seconds per round: the cost of process spawns, imports and messaging, since
the local step itself takes microseconds.

Modes (``--modes``, default ``fast,fast-db,stock``):

* ``fast``: what ``fedtwin consortium init`` sets up: Flower ``--isolation process`` with
  FedTwin's fork executor (Flower imported once, one forked child per message), and Flower's 3 s
  polls / 1 s object-pull backoff capped at ``--poll-interval``.
* ``fast-db``: the same with the SuperLink's state in an SQLite file (``--database``) instead
  of memory, as in the compose deployment.
* ``stock``: Flower 1.41's defaults: ``--isolation subprocess`` (a fresh ``flwr-clientapp``
  process per message), 3 s polls, 1 s SuperExec task poll.

A round is measured inside the ServerApp, from ``configure_fit`` to ``aggregate_fit`` (for
SecAgg+ that spans its 4 stages); the first round also pays one-off costs (FAB download and
install, first imports), so the figure reported is the median of rounds 2..R. For comparison
with "total / rounds" figures, the whole ``flwr run`` time per round is printed as well.

The last line is ``seconds_per_round X.XX``: the SecAgg+ round with N sites in the fast mode.

    .venv/bin/python bench/round_overhead.py [--sites 3] [--rounds 4] [--modes fast,stock]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.consortium.consortium import down, init_consortium, run_app, up  # noqa: E402
from coordinator.consortium.layout import Layout  # noqa: E402

PROBE = REPO / "tests" / "flower_probe"
MODES = {
    "fast": None,  # what `fedtwin consortium init` writes (in-memory SuperLink state)
    "fast-db": {"database": "state/superlink.db"},  # the same with a persistent (SQLite file) SuperLink state
    "stock": {"executor": "flower", "poll_interval": 0.0, "task_poll_interval": 1.0},  # Flower 1.41's defaults
}
SPAWNS = {"plain": 1, "secagg": 4}  # ClientApp processes per site per round (1 train message; 4 SecAgg+ stages)
ROUND_RE = re.compile(r"PROBE round=(\d+) seconds=([\d.]+) results=(\d+) failures=(\d+)")
SN_RE = re.compile(r"^INFO (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):\s+(Receiving|Received successfully|Sending|Sent successfully)")


def import_cost(n: int = 3) -> float:
    """Seconds to import what a fresh flwr-clientapp process imports (median of n fresh interpreters)."""
    code = "import time; t=time.perf_counter(); import flwr.supernode.runtime.run_clientapp, flwr.client.mod, numpy; print(time.perf_counter()-t)"
    out = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) for _ in range(n)]
    return statistics.median(out)


def supernode_breakdown(log: Path, since: float, until: float) -> dict[str, list[float]]:
    """Per message at one SuperNode: pull (SuperLink->SuperNode), clientapp (task incl. child
    start), push (SuperNode->SuperLink), wait (after sending until the next message arrives:
    the other sites + the ServerApp + the SuperNode's poll)."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        m = SN_RE.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if since <= t <= until:
                events.append((t, m.group(2)))
    out: dict[str, list[float]] = {"pull": [], "clientapp": [], "push": [], "wait": []}
    last_sent = None
    for (t0, a), (t1, b) in zip(events, events[1:]):
        key = {("Receiving", "Received successfully"): "pull", ("Received successfully", "Sending"): "clientapp",
               ("Sending", "Sent successfully"): "push", ("Sent successfully", "Receiving"): "wait"}.get((a, b))
        if key:
            out[key].append(t1 - t0)
    del last_sent
    return out


def cpu_seconds(layout: Layout) -> dict[str, float]:
    """CPU seconds (user+system, own and reaped children) of each consortium process, grouped:
    the SuperLink, the SuperNodes, the executors themselves, the ClientApp task processes (reaped
    children of the site executors), the ServerApp (reaped child of the SuperLink executor)."""
    import os

    from coordinator.consortium.processes import records

    tick = os.sysconf("SC_CLK_TCK")
    out = {"superlink": 0.0, "supernodes": 0.0, "executors": 0.0, "clientapp tasks": 0.0, "serverapp": 0.0}
    for rec in records(layout):
        try:
            raw = Path(f"/proc/{rec.pid}/stat").read_text()
        except FileNotFoundError:
            continue
        f = raw[raw.rindex(")") + 2 :].split()
        own, kids = (int(f[11]) + int(f[12])) / tick, (int(f[13]) + int(f[14])) / tick
        if rec.name == "superlink":
            out["superlink"] += own + kids
        elif rec.name == "superlink-executor":
            out["executors"] += own
            out["serverapp"] += kids
        elif rec.name.endswith("-executor"):
            out["executors"] += own
            out["clientapp tasks"] += kids
        else:
            out["supernodes"] += own + kids
    return out


def task_lifetimes(log: Path, run_id: int | None) -> list[float]:
    if run_id is None or not log.exists():
        return []
    pat = re.compile(rf"run {run_id}\) exited with 0 after ([\d.]+) s")
    return [float(m.group(1)) for m in pat.finditer(log.read_text(errors="replace"))]


def bench_mode(mode: str, sites: int, rounds: int, workdir: Path, timeout: float) -> dict:
    root = workdir / mode
    runtime = dict(MODES[mode] or {})
    database = runtime.pop("database", None)
    init_consortium(root, sites=sites, force=root.exists(), runtime=runtime)
    if database:  # a SuperLink setting, not a runtime one: edit consortium.toml as a user would
        import tomllib

        import tomli_w

        manifest = root / "consortium.toml"
        data = tomllib.loads(manifest.read_text())
        data["superlink"]["database"] = database
        manifest.write_text(tomli_w.dumps(data))
    layout = Layout.at(root)
    res: dict = {"mode": mode}
    t0 = time.monotonic()
    try:
        u = up(root, timeout=180)
        res["up_s"] = u.seconds
        for secagg in (False, True):
            cpu0 = cpu_seconds(layout)
            start = time.time()
            r = run_app(root, PROBE, {"num-rounds": rounds, "secagg": secagg, "min-nodes": sites}, timeout=timeout)
            end = time.time()
            time.sleep(1.0)  # let the executors reap the last task processes
            cpu1 = cpu_seconds(layout)
            per = [(int(m.group(1)), float(m.group(2)), int(m.group(3)), int(m.group(4))) for m in ROUND_RE.finditer(r.output)]
            if not r.ok or len(per) != rounds or any(f or n != sites for _, _, n, f in per):
                tail = "\n".join(r.output.splitlines()[-30:])
                raise SystemExit(f"{mode} secagg={secagg}: run failed (rc {r.returncode}, {r.status}/{r.sub_status}):\n{tail}")
            secs = [s for _, s, _, _ in per]
            key = "secagg" if secagg else "plain"
            res[key] = {
                "rounds": secs,
                "steady": statistics.median(secs[1:]) if len(secs) > 1 else secs[0],
                "run_total_per_round": r.seconds / rounds,
                "run_s": r.seconds,
                "cpu_per_round": {k: (cpu1[k] - cpu0[k]) / rounds for k in cpu0},
            }
            if mode.startswith("fast"):
                bd: dict[str, list[float]] = {"pull": [], "clientapp": [], "push": [], "wait": []}
                for k in range(1, sites + 1):
                    for part, vals in supernode_breakdown(layout.log(f"site_{k}-supernode"), start, end).items():
                        bd[part] += vals
                res[key]["breakdown"] = {p: statistics.median(v) for p, v in bd.items() if v}
                life = []
                for k in range(1, sites + 1):
                    life += task_lifetimes(layout.log(f"site_{k}-executor"), r.run_id)
                res[key]["tasks_per_site_per_round"] = len(life) / sites / rounds
                res[key]["task_lifetime_median"] = statistics.median(life) if life else float("nan")
    finally:
        down(root)
    res["wall_s"] = time.monotonic() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--modes", default="fast,fast-db,stock")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--workdir", type=Path, help="keep the consortia here (default: a temporary folder)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if "fast" not in modes:
        raise SystemExit("--modes must include fast (the figure reported on the last line)")
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"round overhead: {args.sites} sites, {args.rounds} rounds, probe app (4 floats), loopback, TLS + SuperNode auth")
    print(f"load average before: {' '.join(load)} (timings on a busy machine are noisy)")
    imp = import_cost()
    print(f"import cost of a fresh flwr-clientapp process (flwr + numpy): {imp:.2f} s (median of 3)")
    with tempfile.TemporaryDirectory(prefix="fedtwin-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = {m: bench_mode(m, args.sites, args.rounds, workdir, args.timeout) for m in modes}
    print()
    print(f"{'mode':6} {'round':7} {'median s/round (2..R)':>22} {'all rounds':>32} {'flwr run s/round':>17}")
    for m, res in results.items():
        for key in ("plain", "secagg"):
            r = res[key]
            rounds = " ".join(f"{x:.2f}" for x in r["rounds"])
            print(f"{m:6} {key:7} {r['steady']:>22.2f} {rounds:>32} {r['run_total_per_round']:>17.2f}")
    fast = results["fast"]
    for key in ("plain", "secagg"):
        r = fast[key]
        if "breakdown" in r:
            b = r["breakdown"]
            parts = ", ".join(f"{p} {b[p]:.2f}" for p in ("pull", "clientapp", "push", "wait") if p in b)
            print(
                f"fast {key}: {r['tasks_per_site_per_round']:.0f} ClientApp process(es) per site per round, "
                f"median lifetime {r['task_lifetime_median']:.2f} s; per message at a SuperNode (median s): {parts}"
            )
    for m, res in results.items():
        for key in ("plain", "secagg"):
            c = res[key]["cpu_per_round"]
            if m == "stock":  # Flower's SuperExec never reaps its task processes: their CPU is not measurable here
                c = {k: c[k] for k in ("superlink", "supernodes")}
                print(f"{m} {key}: CPU s per round: " + ", ".join(f"{k} {v:.2f}" for k, v in c.items())
                      + f"; plus {SPAWNS[key]} fresh flwr-clientapp process(es) per site (~{imp:.1f} s of imports each)")
                continue
            total = sum(c.values())
            print(f"{m} {key}: CPU s per round (whole run / rounds): " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()) + f"; total {total:.2f}")
    if "stock" in results:
        s, f = results["stock"]["secagg"]["steady"], fast["secagg"]["steady"]
        print(f"SecAgg+ round: stock {s:.2f} s -> fast {f:.2f} s ({s / f:.1f}x)")
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"seconds_per_round {fast['secagg']['steady']:.2f}")


if __name__ == "__main__":
    main()
