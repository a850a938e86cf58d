"""``fedtwin site check``: the data-quality gate a hospital runs before it trains."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def check(
    db: str = typer.Option(..., "--db", help="OMOP database: SQLite path or postgresql+psycopg:// URL"),
    spec: Path = typer.Option(..., "--spec", help="YAML twin spec"),
    json_out: bool = typer.Option(False, "--json", help="print the JSON report to stdout instead of the table"),
    suppression_threshold: int | None = typer.Option(
        None, "--suppression-threshold", min=1, help="counts below it show as <N (default: the spec's)"
    ),
    cdm_schema: str | None = typer.Option(None, "--cdm-schema", help="PostgreSQL schema holding the CDM"),
    vocabulary_schema: str | None = typer.Option(
        None, "--vocabulary-schema", help="PostgreSQL schema holding the vocabulary (default: the CDM schema)"
    ),
) -> None:
    """Check DB against what SPEC reads: DQD-style conformance, completeness and plausibility checks.

    Counts below the suppression threshold are shown as <N. Exits non-zero when a blocking check
    fails (docs/data-quality.md lists every check, its threshold and how to fix it).
    """
    from fedtwin.omop import open_database
    from fedtwin.quality import render_report, run_quality_checks
    from fedtwin.spec import load_spec

    s = load_spec(spec)
    database = open_database(db, cdm_schema=cdm_schema, vocabulary_schema=vocabulary_schema)
    try:
        report = run_quality_checks(database, s, suppression_threshold)
    finally:
        database.dispose()
    if json_out:
        typer.echo(report.to_json())
    else:
        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 150)  # piped or captured: do not squeeze the table
        render_report(report, console)
    report.raise_for_blocking()
