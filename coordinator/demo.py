"""``fedtwin demo``: FedTwin end to end on embedded defaults, in a few minutes.

What runs today: three heterogeneous synthetic hospitals (SQLite), each site's data-quality gate,
its cohort summary (small cells suppressed), and local DP-SGD training at every site inside its
own privacy ledger, scored on held-out patients. The federated rounds (SecAgg+) join here when
the federation lands; until then this is the local pipeline each site runs.
"""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path | None = typer.Option(
        None, "--out", help="where everything goes (created; default fedtwin-demo/run-<UTC time> in the current folder)"
    ),
    patients: int = typer.Option(400, "--patients", min=120, help="mean ICU patients per hospital (the smallest site needs a cohort of 50)"),
    epsilon: float = typer.Option(3.0, "--epsilon", min=0.1, help="epsilon each site spends on its local training"),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """Run FedTwin's pipeline on three synthetic hospitals: synthesize, check, summarize, train with DP."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fedtwin.errors import FedTwinError
    from fedtwin.extract.extractor import Extractor
    from fedtwin.extract.summary import summarize
    from fedtwin.omop import open_database
    from fedtwin.quality import run_quality_checks
    from fedtwin.spec import load_spec, spec_hash
    from fedtwin.synth import SynthRequest, synthesize
    from fedtwin.training.local import LocalTrainingConfig, train_local
    from fedtwin.training.privacy_plan import DPRequest

    if out is None:  # a fresh folder per run, so running the demo twice just works
        import datetime as dt

        out = Path("fedtwin-demo") / dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    console = Console()
    spec_path = Path(__file__).resolve().parents[1] / "specs" / "icu-hemodynamics.yaml"
    spec = load_spec(spec_path)
    if out.exists() and any(out.iterdir()):
        raise FedTwinError(f"{out} already holds files (a previous demo?)", "pass --out NEW_FOLDER or remove that folder")
    hospitals = out / "hospitals"
    console.rule("[bold]FedTwin demo")
    console.print(f"spec {spec.name} (sha256 {spec_hash(spec)[:12]}), output in {out.resolve()}")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("synthesizing 3 hospitals", total=3)
        synthesize(SynthRequest(sites=3, patients=patients, seed=seed, out=hospitals, workers=2), on_site_done=lambda _s: bar.advance(task))

    rows = []
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("per site: check, summarize, train with DP", total=3)
        for k in (1, 2, 3):
            db = open_database(str(hospitals / f"site_{k}.db"))
            quality = run_quality_checks(db, spec)
            quality.raise_for_blocking()
            ex = Extractor(db, spec)
            summary = summarize(ex.extract(), ex.stats, spec.suppression_threshold)
            result = train_local(
                db, spec, out / "models" / f"site_{k}",
                LocalTrainingConfig(
                    dp=DPRequest(epsilon=epsilon, delta=1e-5, budget_epsilon=2 * epsilon, epochs=3.0, batch_size=128),
                    ledger=out / "ledgers" / f"site_{k}.db",
                    seed=seed,
                ),
            )
            rows.append((k, quality.status, summary, result))
            bar.advance(task)

    table = Table(title="sites (counts below 10 are shown as <10)")
    for col in ("site", "data quality", "cohort", "deaths", "AKI", "DP steps", "noise multiplier", "epsilon spent / budget", "held-out NLL"):
        table.add_column(col)
    for k, status, summary, result in rows:
        pl = result.privacy
        table.add_row(
            str(k), status, str(summary["cohort"]["patients"]), str(summary["outcomes"]["death"]["events"]),
            str(summary["outcomes"]["aki"]["events"]), str(result.fit.steps), f"{pl.noise_multiplier:.2f}",
            f"{result.epsilon_spent_total:.2f} / {pl.budget_epsilon:g}", f"{result.held_out.get('forecast_nll', float('nan')):.3f}",
        )
    console.print(table)
    console.print(
        f"models: {out / 'models'}   ledgers: {out / 'ledgers'} (see `fedtwin site budget --ledger {out / 'ledgers' / 'site_1.db'}`)\n"
        "Federated rounds with SecAgg+ and MLflow tracking are not part of this demo yet."
    )
