"""Where the DP noise hurts the outcome head: noise on every group, on the head only, on the dynamics only.

A diagnostic for docs/results.md note 4 (DP twins whose risk ranks patients backwards). Centralized
on bench/study.py's hospitals of one seed (pooled training and test splits), DP-SGD at a given epsilon
with FedTwin's group clipping (fedtwin.privacy.group_clipping); for several initial twins, the same
run with the Gaussian noise switched off on one clipping group. Switching noise off is NOT private:
it exists only here, by overriding ``GroupClippedDPOptimizer.noise_stds`` in this process.

    .venv/bin/python bench/dp_head_noise.py [--keep out/study/seed-1] [--epsilon 3] [--inits 3]

Ends with the headline: the range of death AUROC over the initial twins with noise on the head only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.outcome_clipping import held_out  # noqa: E402
from bench.study import ACCOUNTANT, DELTA, Settings, dp_plan, new_twin, prepare_seed  # noqa: E402

# run -> the clipping group (0 dynamics, 1 outcome head; fedtwin.twin.training.clip_groups) whose noise is switched off
MODES = {"noise on every group": None, "noise on the head only": 0, "noise on the dynamics only": 1}


def main(
    keep: Path = typer.Option(None, help="bench/study.py's seed folder (reused when it holds hospitals/); default: a temporary one"),
    seed: int = typer.Option(1, help="hospital seed"),
    epsilon: float = typer.Option(3.0, help="epsilon of the centralized DP-SGD run"),
    inits: int = typer.Option(3, min=1, help="initial twins (seeds 1..N)"),
) -> None:
    from fedtwin.extract.extractor import concat
    from fedtwin.privacy.group_clipping import GroupClippedDPOptimizer
    from fedtwin.twin import DPSettings, FitConfig, fit

    console = Console(width=200)
    s = Settings(seeds=(seed,))
    t0 = time.perf_counter()
    data = prepare_seed(seed, s, keep or Path(tempfile.mkdtemp(prefix="fedtwin-dp-head-noise-")))
    train, test = data.pooled_train, concat([st.test for st in data.sites])
    plan = dp_plan(train.n_patients, replace(s, rounds=1), epsilon, float(s.epochs))
    private_stds = GroupClippedDPOptimizer.noise_stds
    rows: list[tuple[int, str, dict[str, float]]] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=inits * (len(MODES) + 1))
        for init in range(1, inits + 1):
            rows.append((init, "untrained", held_out(new_twin(data.spec, init), test)))
            progress.advance(task)
            for mode, silenced in MODES.items():
                def stds(self, silenced=silenced):  # noqa: ANN001, ANN202 - diagnostic only: not private
                    out = private_stds(self)
                    if silenced is not None:
                        out[silenced] = 0.0
                    return out

                GroupClippedDPOptimizer.noise_stds = stds
                try:
                    model = new_twin(data.spec, init)
                    fit(model, train, FitConfig(batch_size=s.batch_size, lr=s.lr, seed=init),
                        DPSettings(noise_multiplier=plan["sigma"], max_grad_norm=s.clip, sample_rate=plan["sample_rate"],
                                   steps=int(plan["steps"]), accountant=ACCOUNTANT, delta=DELTA, seed=100 + init))
                finally:
                    GroupClippedDPOptimizer.noise_stds = private_stds
                rows.append((init, mode, held_out(model, test)))
                progress.advance(task)
    console.print(f"seed {seed}: {train.n_patients} training / {test.n_patients} test patients; epsilon {epsilon:g}: sigma "
                  f"{plan['sigma']:.3f}, rate {plan['sample_rate']:.4f}, {int(plan['steps'])} steps; {time.perf_counter() - t0:.0f} s")
    metrics = list(rows[0][2])
    table = Table("initial twin", "run", *metrics)
    for init, mode, r in rows:
        table.add_row(str(init), mode, *(f"{r[m]:.3f}" for m in metrics))
    console.print(table)
    head = np.array([r["auroc death"] for _, mode, r in rows if mode == "noise on the head only"])
    print(f"death AUROC with noise on the head only: {head.min():.3f}-{head.max():.3f}; range {head.max() - head.min():.3f}")


if __name__ == "__main__":
    typer.run(main)
