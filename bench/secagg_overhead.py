"""SecAgg+ overhead: round wall time of FedTwin's federated twin with SecAgg+ vs plain FedAvg.

Same consortium, same sites, same model, same run config, measured side by side: for each size N
(default 3 and 10 sites) a fresh local consortium (real processes on 127.0.0.1, TLS + SuperNode
authentication, fork executors) with N synthetic ICU hospitals runs FedTwin's app
(``apps/fedtwin``: DP-SGD local training of the twin in each site's ledger) ``--reps`` times in
each mode, alternating which mode goes first. The final evaluation-only round that SecAgg+ runs
add is switched off (run config ``evaluate = false``) so that both modes run the same training
rounds; SecAgg+ rounds still include what FedTwin does only under SecAgg+ (each site scores the
received model on its held-out patients and appends the encoded statistics to the masked vector),
so the figure is what a user pays for secure aggregation in FedTwin, not the bare protocol.

A round is timed inside the ServerApp (MLflow metric ``round_seconds``: ``configure_fit`` to the
round's report, i.e. all 4 SecAgg+ stages or the one plain fit message, including local training).
Round 1 of every run also pays one-off costs (FAB install, first imports), so the figure per mode
is the median of rounds 2..R over all runs of that mode. The ratio is SecAgg+ / plain.

The last line is the headline: ``ratio X.XX (N sites)`` for the largest N.

    .venv/bin/python bench/secagg_overhead.py [--sizes 3,10] [--rounds 3] [--reps 1] [--patients 150]

Timings are noisy when other jobs share the machine's cores (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.consortium.consortium import down, init_consortium, run_app, up  # noqa: E402
from coordinator.launch import APP_DIR, MLFLOW_RE, ROUND_RE, prepare  # noqa: E402

SPEC = REPO / "specs" / "icu-hemodynamics.yaml"


def synthesize_sites(root: Path, work: Path, n: int, patients: int, seed: int = 11) -> None:
    from fedtwin.synth import SynthRequest, synthesize

    out = work / "synth"
    synthesize(SynthRequest(sites=n, patients=patients, seed=seed, out=out, sizes=[patients] * n, workers=1))
    for k in range(1, n + 1):
        shutil.copyfile(out / f"site_{k}.db", root / "data" / f"site_{k}.omop.sqlite")


def round_seconds(uri: str, mlflow_run: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(mlflow_run, "round_seconds")}


def run_mode(root: Path, base: dict, mode: str, tag: str, rounds: int, n: int, timeout: float) -> dict:
    cfg = dict(base)
    cfg.update({
        "secagg": mode == "secagg",
        "evaluate": False,
        "num-rounds": rounds,
        "study-id": f"bench-{tag}",
        "checkpoint-dir": str(root / "checkpoints" / tag),
        "output-path": "",
        "resume": False,
    })
    t0 = time.monotonic()
    res = run_app(root, APP_DIR, cfg, timeout=timeout)
    wall = time.monotonic() - t0
    outcomes = [(int(r), s, int(k)) for r, s, k in ROUND_RE.findall(res.output)]
    expected = [(r, "completed", n) for r in range(1, rounds + 1)]
    if not res.ok or outcomes != expected:
        raise SystemExit(f"{tag}: run {res.run_id} {res.status}:{res.sub_status}, rounds {outcomes} (expected {expected})\n{res.output[-4000:]}")
    m = MLFLOW_RE.search(res.output)
    secs = round_seconds(cfg["mlflow-tracking-uri"], m.group(3))
    return {"mode": mode, "tag": tag, "wall": wall, "rounds": secs}


def measure(n: int, args: argparse.Namespace, work: Path) -> dict:
    root = work / f"consortium-{n}"
    t0 = time.monotonic()
    init_consortium(root, sites=n, spec=SPEC, rounds=args.rounds, study_id=f"bench{n}", epsilon=1000.0,
                    secagg={"timeout": 600.0}, runtime={"preload": ["torch", "site_agent.client_app"]})
    synthesize_sites(root, work / f"synth-{n}", n, args.patients)
    up(root, timeout=600)
    print(f"# {n} sites: consortium up in {time.monotonic() - t0:.0f} s (init + synthetic data + up)", flush=True)
    runs = []
    try:
        _, base = prepare(root / "study.toml")
        for rep in range(args.reps):
            order = ("secagg", "plain") if rep % 2 == 0 else ("plain", "secagg")
            for mode in order:
                r = run_mode(root, base, mode, f"{n}-{mode}-{rep}", args.rounds, n, args.timeout)
                runs.append(r)
                per = " ".join(f"r{k}={v:.1f}" for k, v in sorted(r["rounds"].items()))
                print(f"# {n} sites {mode:6s} rep {rep}: {per} s; run wall {r['wall']:.1f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        down(root)
    out = {"sites": n}
    for mode in ("plain", "secagg"):
        later = [v for r in runs if r["mode"] == mode for k, v in r["rounds"].items() if k >= 2]
        first = [r["rounds"][1] for r in runs if r["mode"] == mode and 1 in r["rounds"]]
        out[mode] = statistics.median(later) if later else float("nan")
        out[mode + "_first"] = statistics.median(first) if first else float("nan")
        out[mode + "_wall"] = statistics.median(r["wall"] for r in runs if r["mode"] == mode)
    out["ratio"] = out["secagg"] / out["plain"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="3,10", help="comma-separated numbers of sites")
    p.add_argument("--rounds", type=int, default=3, help="training rounds per run (round 1 is reported apart)")
    p.add_argument("--reps", type=int, default=1, help="runs per mode and size (modes alternate which goes first)")
    p.add_argument("--patients", type=int, default=150, help="synthetic ICU patients per site")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="fedtwin-secagg-bench-"))
    print(f"# {datetime.now():%Y-%m-%d %H:%M} secagg_overhead: sizes {sizes}, {args.rounds} rounds x {args.reps} rep(s) per mode, "
          f"{args.patients} patients/site, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    try:
        for n in sizes:
            results.append(measure(n, args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| sites | plain FedAvg round (s) | SecAgg+ round (s) | SecAgg+ - plain (s) | ratio | round 1 plain / SecAgg+ (s) | run wall plain / SecAgg+ (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sites']} | {r['plain']:.1f} | {r['secagg']:.1f} | {r['secagg'] - r['plain']:+.1f} | {r['ratio']:.2f} | "
              f"{r['plain_first']:.1f} / {r['secagg_first']:.1f} | {r['plain_wall']:.0f} / {r['secagg_wall']:.0f} |")
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    last = results[-1]
    print(f"ratio {last['ratio']:.2f} ({last['sites']} sites)")


if __name__ == "__main__":
    main()
