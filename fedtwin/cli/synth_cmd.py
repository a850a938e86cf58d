"""``fedtwin synth``: generate synthetic hospitals (OMOP CDM 5.4) and their ground truth.

Registered by :mod:`fedtwin.cli.main` as ``app.command(name="synth")(synth_cmd.synth)``. Heavy
imports (numpy, SQLAlchemy, the simulator) happen inside the command so ``fedtwin --help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_sizes(sizes: str | None) -> list[int] | None:
    from fedtwin.errors import FedTwinError

    if sizes is None:
        return None
    try:
        return [int(s) for s in sizes.replace(" ", "").split(",") if s]
    except ValueError:
        raise FedTwinError(f"--sizes {sizes!r} is not a comma-separated list of integers", "use e.g. --sizes 800,400,200") from None


def synth(
    sites: int = typer.Option(3, "--sites", min=1, max=200, help="number of hospitals"),
    patients: int = typer.Option(500, "--patients", min=1, max=500_000, help="mean ICU patients per hospital (sizes vary by site)"),
    seed: int = typer.Option(0, "--seed", min=0, help="random seed; the same seed gives identical databases and ground truth"),
    out: Path = typer.Option(..., "--out", help="output folder: site_<k>.db files (SQLite) and ground_truth/"),
    db_url_template: str | None = typer.Option(
        None, "--db-url-template",
        help="write each site to this database URL instead of SQLite, {site} = site number, e.g. "
        "postgresql+psycopg://postgres@127.0.0.1:5432/fedtwin_site_{site} (created if missing)",
    ),
    sizes: str | None = typer.Option(None, "--sizes", help="patients per site, comma-separated; overrides --patients"),
    defects: float = typer.Option(
        0.0, "--defects", min=0.0, max=0.2,
        help="inject data defects: this fraction of measurement rows per defect kind, times each site's weight",
    ),
    workers: int = typer.Option(2, "--workers", min=1, max=32, help="sites generated in parallel"),
) -> None:
    """Generate N synthetic ICU hospitals as OMOP CDM 5.4 databases, with ground truth beside them.

    Each site is written in one transaction. Its ground truth goes to OUT/ground_truth/site_<k>/, never into the OMOP database.

    The ground truth holds latent parameters, counterfactual trajectories under alternative drug plans, outcome risks and injected defects; docs/synthetic-hospitals.md describes the simulator and the files.
    """
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fedtwin.synth import SiteProfile, SiteSummary, SynthRequest, synthesize

    console = Console()
    request = SynthRequest(
        sites=sites, patients=patients, seed=seed, out=out, db_url_template=db_url_template,
        sizes=_parse_sizes(sizes), defects=defects, workers=workers,
    )
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("patients"),
        TimeElapsedColumn(), console=console,
    )
    task = progress.add_task("synthesizing hospitals", total=None)

    def on_start(profiles: list[SiteProfile]) -> None:
        # Shown only once every target has been checked, so a refused run prints just its error.
        progress.update(task, total=sum(p.n_patients for p in profiles))
        progress.start()

    def on_done(s: SiteSummary) -> None:
        progress.update(task, advance=s.persons, description=f"site {s.site} written")

    try:
        summaries = synthesize(request, on_site_done=on_done, on_start=on_start)
        progress.update(task, description="done")
    finally:
        progress.stop()

    table = Table(title=f"synthetic hospitals (seed {seed})")
    for col in ("site", "name", "patients", "cohort", "deaths 48h", "AKI 48h", "measurements", "drug rows", "defect rows"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for s in summaries:
        table.add_row(
            str(s.site), s.name, f"{s.persons:,}", f"{s.cohort:,}", f"{s.deaths_in_window:,}", f"{s.aki_in_window:,}",
            f"{s.rows.get('measurement', 0):,}", f"{s.rows.get('drug_exposure', 0):,}", f"{sum(s.defects.values()):,}",
        )
    console.print(table)
    where = "; ".join(f"site {s.site}: {s.database}" for s in summaries)
    console.print(f"databases: {where}", highlight=False, soft_wrap=True)
    console.print(
        f"ground truth: {request.out.expanduser().resolve() / 'ground_truth'}  ({time.perf_counter() - started:.1f} s)",
        highlight=False, soft_wrap=True,
    )
