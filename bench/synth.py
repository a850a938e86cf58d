"""Benchmark ``fedtwin synth``: 10 sites x 2,000 patients into SQLite (the issue's target: < 60 s).

Run: ``.venv/bin/python bench/synth.py [--sites 10] [--patients 2000] [--workers 2] [--keep DIR]``.
Prints per-site stage timings, throughput (patients/s, measurement rows/s), wall and CPU time,
and the machine's load average (other jobs on a 2-core machine inflate wall time; CPU time is
the load-independent figure). The last line is the headline: ``seconds <wall>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtwin.synth import SiteSummary, SynthRequest, synthesize  # noqa: E402


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defects", type=float, default=0.0)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep the output (default: a temp dir)")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="fedtwin-bench-synth-"))
    out = root / "out" if args.keep is None else args.keep
    load_before = os.getloadavg()
    done: list[SiteSummary] = []
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    try:
        synthesize(
            SynthRequest(sites=args.sites, patients=args.patients, seed=args.seed, out=out, defects=args.defects, workers=args.workers),
            on_site_done=done.append,
        )
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    done.sort(key=lambda s: s.site)
    print(f"{'site':>4} {'patients':>8} {'meas rows':>10} {'simulate':>9} {'plans':>7} {'records':>8} {'write':>7} {'total':>7}")
    for s in done:
        t = s.timings
        print(
            f"{s.site:>4} {s.persons:>8,} {s.rows['measurement']:>10,} {t['simulate']:>8.2f}s {t['counterfactuals']:>6.2f}s "
            f"{t['records']:>7.2f}s {t['write']:>6.2f}s {s.seconds:>6.2f}s"
        )
    patients = sum(s.persons for s in done)
    meas = sum(s.rows["measurement"] for s in done)
    rows = sum(sum(s.rows.values()) for s in done)
    print(f"sites {len(done)}, workers {args.workers}, patients {patients:,}, measurement rows {meas:,}, all rows {rows:,}")
    print(f"output {size / 1e6:,.0f} MB (databases + ground truth)")
    print(f"patients/s {patients / wall:,.0f}")
    print(f"measurement rows/s {meas / wall:,.0f}")
    print(f"cpu seconds {cpu:.1f} (all processes)")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"seconds {wall:.1f}")


if __name__ == "__main__":
    main()
