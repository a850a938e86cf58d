"""``fedtwin train``: local training at a site (DP, ledger) and pooled training for benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(help="Train twins: at one site with DP (local), or pooled for benchmarks (central).", no_args_is_help=True)


class _Bars:
    """Rich progress bars handed to the trainer as ``progress(label, total) -> advance(n)``."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress

    def __call__(self, label: str, total: int | None) -> Callable[[int], None]:
        task = self.p.add_task(label, total=total)
        return lambda n: self.p.advance(task, n)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))


@app.command("local")
def local(
    db: str = typer.Option(..., "--db", help="the site's OMOP database (SQLite path or PostgreSQL URL)"),
    spec: Path = typer.Option(..., "--spec", help="YAML twin spec"),
    out: Path = typer.Option(..., "--out", help="new folder for model.pt, config.json, metrics.json, privacy.json"),
    epsilon: float | None = typer.Option(None, "--epsilon", help="epsilon this run may spend (composed on top of what the ledger holds)"),
    delta: float | None = typer.Option(None, "--delta", help="delta of the dataset's budget (default: the ledger's)"),
    ledger: Path | None = typer.Option(None, "--ledger", help="the site's privacy ledger (SQLite)"),
    budget_epsilon: float | None = typer.Option(None, "--budget-epsilon", help="total epsilon the site allows on this dataset (sets it on first use)"),
    no_dp: bool = typer.Option(False, "--no-dp", help="train without differential privacy (for comparison only)"),
    epochs: float = typer.Option(3.0, "--epochs", min=0.1),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm"),
    seed: int = typer.Option(0, "--seed"),
    cdm_schema: str | None = typer.Option(None, "--cdm-schema"),
) -> None:
    """Train a twin on this site's data with DP-SGD inside the site's privacy budget."""
    from fedtwin.errors import FedTwinError
    from fedtwin.omop import open_database
    from fedtwin.spec import load_spec
    from fedtwin.training.local import LocalTrainingConfig, train_local
    from fedtwin.training.privacy_plan import DPRequest

    if no_dp and epsilon is not None:
        raise FedTwinError("--no-dp and --epsilon contradict each other", "pass one of them")
    if not no_dp and epsilon is None:
        raise FedTwinError("--epsilon is required for DP training", "pass --epsilon E (what this run may spend), or --no-dp")
    s = load_spec(spec)
    request = None if no_dp else DPRequest(epsilon=epsilon, delta=delta, budget_epsilon=budget_epsilon,
                                           max_grad_norm=max_grad_norm, batch_size=batch_size, epochs=epochs)
    with _progress() as p:
        result = train_local(open_database(db, cdm_schema=cdm_schema), s, out,
                             LocalTrainingConfig(dp=request, ledger=ledger, seed=seed), progress=_Bars(p))
    console = Console()
    console.print(f"model written to [bold]{result.out}[/] ({result.fit.steps} steps, {result.fit.seconds:.1f} s)")
    if result.privacy:
        pl = result.privacy
        console.print(
            f"DP-SGD: noise multiplier {pl.noise_multiplier:.3f}, sample rate {pl.sample_rate:.4f}, {pl.steps} steps, "
            f"clip {pl.max_grad_norm:g}; epsilon spent on this dataset now {result.epsilon_spent_total:.3f} "
            f"of {pl.budget_epsilon:g} (delta {pl.delta:g}, {pl.accountant} accountant)"
        )
        if pl.target_epsilon < pl.spent_before + request.epsilon - 1e-9:
            console.print(
                f"[yellow]--epsilon {request.epsilon:g} did not fit: it would have brought the composed total to "
                f"{pl.spent_before + request.epsilon:.3f}, above the budget {pl.budget_epsilon:g}; the noise was calibrated "
                "for a total of the budget instead[/] (no further training on this dataset without `fedtwin site budget-change`)"
            )
    else:
        console.print("[yellow]trained WITHOUT differential privacy (comparison run)[/]")
    if result.held_out:
        console.print(f"held-out objective per patient: {result.held_out.get('loss', float('nan')):.3f}")


@app.command("central")
def central(
    db: list[str] = typer.Option(..., "--db", help="OMOP databases to POOL (repeat --db)"),
    spec: Path = typer.Option(..., "--spec"),
    out: Path = typer.Option(..., "--out"),
    epochs: int = typer.Option(3, "--epochs", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """BENCHMARK ONLY: pool several databases and train without DP.

    Pooling patient data is what FedTwin exists to avoid. This gives the upper bound a federation
    is compared with, on synthetic or otherwise shareable data; never use it on real sites.
    """
    from fedtwin.omop import open_database
    from fedtwin.spec import load_spec
    from fedtwin.training.central import train_central
    from fedtwin.twin import FitConfig

    s = load_spec(spec)
    with _progress() as p:
        report, held_out = train_central([open_database(u) for u in db], s, out, FitConfig(epochs=epochs, seed=seed), progress=_Bars(p))
    Console().print(f"pooled model written to [bold]{out}[/] ({report.steps} steps, {report.seconds:.1f} s); "
                    f"held-out objective {held_out.get('loss', float('nan')):.3f}")
