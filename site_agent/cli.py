"""``fedtwin site ...``: what a hospital's data team runs on its own OMOP database."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from site_agent.approval_command import approvals, approve, revoke
from site_agent.budget_command import budget, budget_change
from site_agent.check_command import check

app = typer.Typer(
    help=(
        "Site commands: check data quality, summarize the cohort, manage the privacy budget, approve studies, "
        "run the site's SuperNode."
    ),
    no_args_is_help=True,
)
app.command("check")(check)
app.command("budget")(budget)
app.command("budget-change")(budget_change)
app.command("approve")(approve)
app.command("approvals")(approvals)
app.command("revoke")(revoke)


@app.command("run")
def run(
    config: Path = typer.Option(..., "--config", help="the site config (sites/site_<k>.toml from `fedtwin consortium init`)"),
    executor: str = typer.Option("fork", "--executor", help="fork (FedTwin's fork executor) or flower (Flower's subprocess isolation)"),
    flwr_home: Path | None = typer.Option(None, "--flwr-home", help="Flower's state folder for this SuperNode (default: beside the config)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the config and print the command lines, start nothing"),
) -> None:
    """Run this site's SuperNode with FedTwin's ClientApp until Ctrl-C: it trains in the consortium's rounds."""
    import shlex

    from site_agent.run_command import plan_site, run_site

    plan = plan_site(config, executor=executor, flwr_home=flwr_home)
    console = Console()
    if dry_run:
        console.print(shlex.join(plan.supernode), highlight=False)
        if plan.executor:
            console.print(shlex.join([*plan.executor, "--watch-pid", "<SuperNode pid>"]), highlight=False)
        plan.discard_secret()
        return
    console.print(f"site {plan.site}: SuperNode connecting to {plan.superlink_address} (Ctrl-C stops it)", highlight=False)
    code = run_site(plan, echo=lambda m: console.print(m, highlight=False))
    raise typer.Exit(code)


@app.command("summary")
def summary(
    db: str = typer.Option(..., "--db", help="OMOP database: SQLite path or postgresql+psycopg:// URL"),
    spec: Path = typer.Option(..., "--spec", help="YAML twin spec"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    suppression_threshold: int | None = typer.Option(None, "--suppression-threshold", min=1, help="default: the spec's"),
    cdm_schema: str | None = typer.Option(None, "--cdm-schema", help="PostgreSQL schema holding the CDM"),
) -> None:
    """Cohort statistics for SPEC on DB, with small-cell suppression (counts below the threshold show as <N)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedtwin.extract.extractor import Extractor
    from fedtwin.extract.summary import summarize
    from fedtwin.omop import open_database
    from fedtwin.spec import load_spec

    s = load_spec(spec)
    database = open_database(db, cdm_schema=cdm_schema)
    threshold = suppression_threshold or s.suppression_threshold
    ex = Extractor(database, s)
    console = Console(stderr=json_out)
    # no running count on the bar: on a small cohort it would show a number below the threshold
    with Progress(TextColumn("extracting cohort"), BarColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        bar.add_task("extract", total=None)
        tensors = ex.extract()
    report = summarize(tensors, ex.stats, threshold)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_summary(console, s.name, report)


def _print_summary(console: Console, name: str, r: dict) -> None:
    c = r["cohort"]
    console.print(
        f"[bold]{name}[/] cohort: {c['patients']} patients ({c['candidates']} candidates; excluded: age {c['excluded_age']}, "
        f"died in history {c['excluded_died_in_history']}, too few observations {c['excluded_few_observations']}); "
        f"counts below {r['suppression_threshold']} are shown as <{r['suppression_threshold']}"
    )
    t = Table(title="state variables")
    for col in ("variable", "patients measured", "measurements", "bins observed", "mean", "sd"):
        t.add_column(col)
    for k, v in r["state_variables"].items():
        t.add_row(k, *(str(v[x]) for x in ("patients_measured", "measurements", "bins_observed_share", "mean", "sd")))
    console.print(t)
    t = Table(title="interventions")
    for col in ("intervention", "patients exposed", "mean amount per exposed patient"):
        t.add_column(col)
    for k, v in r["interventions"].items():
        t.add_row(k, str(v["patients_exposed"]), str(v["mean_amount_per_exposed_patient"]))
    console.print(t)
    t = Table(title="outcomes and subgroups")
    t.add_column("what")
    t.add_column("count")
    for k, v in r["outcomes"].items():
        t.add_row(f"outcome {k}", f"{v['events']} (rate {v['rate']})")
    for attr, groups in r["subgroups"].items():
        for g, n in groups.items():
            t.add_row(f"{attr} = {g}", str(n))
    console.print(t)
