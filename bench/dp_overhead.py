"""DP-SGD overhead of the twin: Opacus step time / non-private step time, same model and batch.

Usage: python bench/dp_overhead.py [--patients 2000] [--batch 256] [--reps 20] [--threads 1]

Two copies of the same initial model (ICU spec: 24 + 12 hourly bins, 5 variables, 4
interventions, 2 outcomes) take turns on the same batch of patients: one plain Adam step, one
DP-Adam step through Opacus (per-patient gradients by hooks, clipping, noise, accounting),
alternating so that load from other processes hits both alike. Medians are reported; the last
line is ``ratio X.XX`` (DP step / non-private step).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fedtwin.extract.extractor import static_names
from fedtwin.extract.tensors import CohortTensors
from fedtwin.spec import load_spec, spec_hash
from fedtwin.twin import DPSettings, TwinModel
from fedtwin.twin.batch import prepare_batch
from fedtwin.twin.parameters import project_parameters
from fedtwin.twin.training import PrivateTrainer

SPEC = Path(__file__).resolve().parents[1] / "specs" / "icu-hemodynamics.yaml"


def synthetic_cohort(n: int, seed: int = 0) -> CohortTensors:
    """Random but plausible ICU-shaped tensors (timing does not depend on the values)."""
    spec = load_spec(SPEC)
    rng = np.random.default_rng(seed)
    h, f = spec.time.history_steps, spec.time.horizon_steps
    t, v, d = h + f, len(spec.state_variables), len(spec.interventions)
    typical = np.array([90.0, 75.0, 140.0, 1.2, 2.0])[:v]
    walk = np.cumsum(rng.normal(0, 0.03, (n, t, v)), axis=1) + rng.normal(0, 0.2, (n, 1, v))
    values = typical * np.exp(walk)
    rates = np.array([0.95, 0.95, 0.3, 0.15, 0.2])[:v]
    mask = rng.random((n, t, v)) < rates
    mask[:, 0, 0] = True
    doses = (rng.random((n, t, d)) < 0.3) * rng.uniform(1, 500, (n, t, d))
    event = rng.random((n, len(spec.outcomes))) < 0.1
    when = np.where(event, rng.uniform(0, 48, event.shape), np.nan)
    ts = np.zeros((n, t, v), np.float32)
    return CohortTensors(
        spec_hash=spec_hash(spec), state_names=spec.state_names, intervention_names=spec.intervention_names,
        outcome_names=spec.outcome_names, static_names=static_names(spec), history_steps=h, horizon_steps=f,
        step_seconds=spec.time.step_seconds, person_ids=np.arange(n, dtype=np.int64),
        values=np.where(mask, values, 0).astype(np.float32), mask=mask, counts=mask.astype(np.int16),
        time_since=ts, doses=doses.astype(np.float32), outcome_event=event, outcome_time=when.astype(np.float32),
        static=np.stack([rng.uniform(18, 90, n), rng.integers(0, 2, n)], 1).astype(np.float32),
        index_epoch=np.zeros(n),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = load_spec(SPEC)
    tensors = synthetic_cohort(args.patients)
    plain = TwinModel(spec)
    private = copy.deepcopy(plain)
    batch = prepare_batch(tensors, spec, plain.norm).select(torch.arange(args.batch))
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=args.batch / args.patients, steps=10**6, seed=0)
    trainer = PrivateTrainer(private, args.patients, dp, lr=1e-3)

    def plain_step() -> tuple[float, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = plain(batch).mean()
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        project_parameters(plain)  # as fit() and PrivateTrainer.step do
        return t1 - t0, time.perf_counter() - t0

    def private_step() -> float:
        t0 = time.perf_counter()
        trainer.step(batch)
        return time.perf_counter() - t0

    def private_fwd_bwd() -> float:
        trainer.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = trainer.module(batch).sum() / batch.size
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        dt = time.perf_counter() - t0
        trainer.optimizer.zero_grad(set_to_none=True)
        return dt

    for _ in range(3):  # warm-up
        plain_step()
        private_step()
    p_fb, p_step, d_step, d_fb = [], [], [], []
    for _ in range(args.reps):
        fb, st = plain_step()
        p_fb.append(fb)
        p_step.append(st)
        d_step.append(private_step())
        d_fb.append(private_fwd_bwd())
    trainer.close()

    med = statistics.median
    n_params = sum(p.numel() for p in plain.parameters())
    print(f"twin on {spec.name}: {args.batch} patients x {spec.time.total_steps} bins x {len(spec.state_variables)} variables, "
          f"{len(spec.interventions)} interventions; {n_params} parameters; torch threads {args.threads}; {args.reps} reps (medians)")
    print(f"non-private forward+backward  {1000 * med(p_fb):8.1f} ms")
    print(f"non-private step (+Adam)      {1000 * med(p_step):8.1f} ms")
    print(f"DP-SGD forward+backward       {1000 * med(d_fb):8.1f} ms   (with per-sample gradients)")
    print(f"DP-SGD step (+clip/noise/Adam){1000 * med(d_step):8.1f} ms")
    print(f"epsilon after {trainer.steps} steps (prv, delta=1e-5, q={dp.sample_rate:.3f}, sigma=1.0): {trainer.epsilon():.2f}")
    print(f"ratio {med(d_step) / med(p_step):.2f}")


if __name__ == "__main__":
    main()
