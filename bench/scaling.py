"""Simulation at scale: seconds per federated round at 10, 25 and 50 sites (Flower simulation engine).

Runs ``coordinator.simulate.simulate`` (FedTwin's own ServerApp and ClientApp, SecAgg+ on, per-site
DP-SGD, the ICU twin: 11,478 parameters) once per size, each in a fresh output folder and its own
Ray instance, with small synthetic hospitals (``--patients``, default 60 each) and ``--parallel``
ClientApps at once (default 2: one per core here). A round is timed inside the ServerApp's
process, from Flower's ``[ROUND r]`` to FedTwin's ``FEDTWIN round=r`` line, i.e. the 4 SecAgg+
stages including every site's local training. Round 1 also pays for starting the Ray actors and
their first imports (torch, Opacus), so the figure compared across sizes is the last round
(``--rounds``, default 2: the warm round). Peak RSS is the sum over this process and every Ray
process, sampled every 0.5 s (it counts pages shared between processes more than once).

The last line is the headline: ``growth X.Xx per Yx sites`` (warm round time at the largest size
over the smallest).

    .venv/bin/python bench/scaling.py [--sizes 10,25,50] [--rounds 2] [--patients 60] [--parallel 2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.simulate import EVAL_RE, ROUND_RE, simulate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,25,50", help="comma-separated numbers of sites")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per size; the last one is the warm figure")
    ap.add_argument("--patients", type=int, default=60, help="ICU patients per synthetic hospital")
    ap.add_argument("--parallel", type=int, default=2, help="ClientApps at once (Ray CPUs)")
    ap.add_argument("--epsilon", type=float, default=8.0, help="each site's DP budget for the run")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-secagg", action="store_true", help="plain FedAvg instead of SecAgg+ (for comparison)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs' folders here (default: a temp folder, removed)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# {platform.node()} cores={os.cpu_count()} load={load[0]:.1f},{load[1]:.1f},{load[2]:.1f} "
          f"secagg={'off' if args.no_secagg else 'on'} rounds={args.rounds} patients/site={args.patients} parallel={args.parallel}",
          flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="fedtwin-scaling-") if args.keep is None else None
    base = Path(tmp.name) if tmp else args.keep
    rows = []
    stage_rows = []
    try:
        for n in sizes:
            t = time.monotonic()
            res = simulate(n, args.rounds, patients=args.patients, seed=args.seed, out=base / f"sites-{n}",
                           secagg=not args.no_secagg, epsilon=args.epsilon, parallel=args.parallel,
                           echo=lambda line, n=n: print(f"  [{n} sites] {line}", flush=True)
                           if ROUND_RE.match(line) or EVAL_RE.match(line) else None)
            if not res.ok:
                print(f"FAILED at {n} sites after {time.monotonic() - t:.1f} s: {res.message}", flush=True)
                sys.exit(1)
            first, last = res.rounds[0].seconds, res.rounds[-1].seconds
            rows.append((n, first, last, res.run_seconds, res.setup_seconds, res.peak_rss_mb, res.evaluation))
            stage_rows.append((n, res.rounds[-1].stages, last))
            print(f"  [{n} sites] round 1 {first:.1f} s, round {res.rounds[-1].round} {last:.1f} s, engine {res.run_seconds:.1f} s, "
                  f"setup {res.setup_seconds:.1f} s, peak RSS {res.peak_rss_mb or float('nan'):.0f} MB", flush=True)
    finally:
        if tmp:
            tmp.cleanup()

    print()
    print("| sites | round 1 (cold) s | last round (warm) s | warm s/site | simulation engine s | setup s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for n, first, last, engine, setup, rss, _ev in rows:
        print(f"| {n} | {first:.1f} | {last:.1f} | {last / n:.3f} | {engine:.1f} | {setup:.1f} | {rss or float('nan'):.0f} |")
    if any(ev is not None for *_, ev in rows):
        print("(the engine time also holds the ServerApp's evaluation-only round: "
              + ", ".join(f"{n} sites {ev.seconds:.1f} s" for n, *_, ev in rows if ev is not None) + ")")
    print()
    print("SecAgg+ stages of the warm round, seconds (0 keys, 1 key shares, 2 local training + masked vectors, 3 unmasking):")
    print("| sites | stage 0 | stage 1 | stage 2 | stage 3 | rest |")
    print("|---|---|---|---|---|---|")
    for n, st, last in stage_rows:
        parts = [st.get(f"stage{k}", float("nan")) for k in range(4)]
        rest = last - sum(p for p in parts if p == p)
        print(f"| {n} | " + " | ".join(f"{p:.1f}" for p in parts) + f" | {rest:.1f} |")
    if len(rows) >= 2:
        (n0, _, w0, *_), (n1, _, w1, *_) = rows[0], rows[-1]
        exponent = math.log(w1 / w0) / math.log(n1 / n0)
        print(f"warm round: {w0:.1f} s at {n0} sites -> {w1:.1f} s at {n1} sites; "
              f"{w0 / n0:.3f} -> {w1 / n1:.3f} s per site; exponent {exponent:.2f} (1 = linear in sites)")
        print(f"growth {w1 / w0:.1f}x per {n1 / n0:.3g}x sites")


if __name__ == "__main__":
    main()
