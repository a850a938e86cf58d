"""Flat vs group clipping of the twin's DP-SGD: what the outcome head learns (docs/privacy.md).

Centralized on one seed's synthetic hospitals (bench/study.py's, pooled training splits, pooled
test splits), the same initial twin, the same Poisson rate, steps and clipping norm; only the
clipping differs: Opacus's flat clipping of the whole gradient (``outcome_clip_share = 0``) vs
FedTwin's default, the outcome head clipped apart (fedtwin.privacy.group_clipping). Epsilon is the
same for both (same sigma, rate, steps). Each DP arm runs with several noise seeds.

    .venv/bin/python bench/outcome_clipping.py [--keep out/outcome-clipping] [--noise-seeds 3]

Prints a table (held-out AUROC per outcome, hazard NLL, forecast NLL per patient and bin) and
ends with the headline: flat / group hazard NLL at epsilon 3 (> 1: group clipping is better).
"""

from __future__ import annotations

import math
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

from bench.study import ACCOUNTANT, DELTA, NO_DP_EPSILON, Settings, dp_plan, new_twin, prepare_seed  # noqa: E402

EPSILONS = (NO_DP_EPSILON, 8.0, 3.0)


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``score`` for the events ``y`` (NaN without both classes)."""
    from fedtwin.privacy.membership_bound import auroc as mann_whitney

    return mann_whitney(score[y], score[~y]) if 0 < y.sum() < len(y) else math.nan


def held_out(model, tensors) -> dict[str, float]:  # noqa: ANN001 - TwinModel, CohortTensors
    """AUROC of each outcome's risk, and the hazard and forecast NLL at the posterior mean."""
    import torch

    from fedtwin.twin.batch import prepare_batch
    from fedtwin.twin.hazard import risk

    model.eval()
    with torch.no_grad():
        batch = prepare_batch(tensors, model.spec, model.norm)
        theta = model.posterior(batch).mu
        r = risk(model.hazard_logits(batch, theta, model.risk_rollout(batch, theta)), model.windows).numpy()
        events = (batch.haz_event.sum(dim=2) > 0).numpy()
        terms = model.loss_terms(batch, sample=False)
    out = {f"auroc {o}": auroc(r[:, j], events[:, j]) for j, o in enumerate(model.spec.outcome_names)}
    out["hazard NLL"] = float(terms["hazard_nll"].mean())
    out["forecast NLL"] = float(terms["forecast_nll"].mean()) / (model.window * model.n_vars)
    return out


def main(
    keep: Path = typer.Option(None, help="folder for the synthetic hospitals (reused when present); default: a temporary one"),
    seed: int = typer.Option(1, help="hospital and initial-twin seed (bench/study.py's seed 1)"),
    noise_seeds: int = typer.Option(3, min=1, help="DP noise and sampling seeds per DP arm"),
) -> None:
    from fedtwin.extract.extractor import concat
    from fedtwin.twin import DPSettings, FitConfig, fit

    console = Console(width=200)  # the whole table, also in a log file
    s = Settings(seeds=(seed,))
    folder = keep or Path(tempfile.mkdtemp(prefix="fedtwin-outcome-clipping-"))
    t_start = time.perf_counter()
    data = prepare_seed(seed, s, folder)
    train, test = data.pooled_train, concat([st.test for st in data.sites])
    arms: list[tuple[str, float, float | None]] = [("no DP (Adam, no clipping)", math.nan, None)]
    for eps in EPSILONS:
        arms += [("flat", eps, 0.0), ("group", eps, DPSettings.__dataclass_fields__["outcome_clip_share"].default)]
    rows: dict[tuple[str, float], list[dict[str, float]]] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=1 + (len(arms) - 1) * noise_seeds)
        for name, eps, share in arms:
            for k in range(1 if share is None else noise_seeds):
                progress.update(task, description=f"{name} eps {eps:g} noise seed {k + 1}")
                model = new_twin(data.spec, seed)
                if share is None:
                    fit(model, train, FitConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=seed))
                else:
                    plan = dp_plan(train.n_patients, replace(s, rounds=1), eps, float(s.epochs))
                    fit(model, train, FitConfig(batch_size=s.batch_size, lr=s.lr, seed=seed),
                        DPSettings(noise_multiplier=plan["sigma"], max_grad_norm=s.clip, sample_rate=plan["sample_rate"],
                                   steps=int(plan["steps"]), accountant=ACCOUNTANT, delta=DELTA, seed=100 + k, outcome_clip_share=share))
                rows.setdefault((name, eps), []).append(held_out(model, test))
                progress.advance(task)
    plan = dp_plan(train.n_patients, replace(s, rounds=1), 3.0, float(s.epochs))
    console.print(f"seed {seed}: {train.n_patients} training / {test.n_patients} test patients (pooled over {len(data.sites)} sites); "
                  f"DP arms: Poisson rate {plan['sample_rate']:.4f}, {int(plan['steps'])} steps, clip {s.clip:g}, "
                  f"{noise_seeds} noise seeds (mean, min-max); {time.perf_counter() - t_start:.0f} s")
    metrics = list(next(iter(rows.values()))[0])
    table = Table("arm", "epsilon", *metrics)
    for (name, eps), runs in rows.items():
        cells = []
        for m in metrics:
            v = np.array([r[m] for r in runs])
            cells.append(f"{v.mean():.3f}" + (f" ({v.min():.3f}-{v.max():.3f})" if len(v) > 1 else ""))
        table.add_row(name, "-" if math.isnan(eps) else ("negligible noise" if eps == NO_DP_EPSILON else f"{eps:g}"), *cells)
    console.print(table)
    ratio = np.mean([r["hazard NLL"] for r in rows[("flat", 3.0)]]) / np.mean([r["hazard NLL"] for r in rows[("group", 3.0)]])
    print(f"hazard NLL flat / group at epsilon 3: ratio {ratio:.2f}")


if __name__ == "__main__":
    typer.run(main)
