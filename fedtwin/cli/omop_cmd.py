"""``fedtwin omop``: load an OMOP CDM CSV export into a site database."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtwin.errors import FedTwinError

app = typer.Typer(help="OMOP CDM databases: load CSV exports.", no_args_is_help=True)


@app.callback()
def _omop() -> None:
    """OMOP CDM databases: load CSV exports."""


class OnDuplicateKey(str, Enum):
    skip = "skip"
    fail = "fail"


@app.command("load")
def load(
    source: Path = typer.Option(..., "--source", help="folder, .zip or single file of OMOP CSVs (PERSON.csv, person.csv.gz ...)"),
    db: str = typer.Option(..., "--db", help="SQLite path or URL, or postgresql+psycopg://user@host:5432/dbname"),
    cdm_schema: str = typer.Option(None, "--cdm-schema", help="PostgreSQL schema for the CDM tables (created if absent); default public"),
    append: bool = typer.Option(False, "--append", help="add rows to tables that already hold rows"),
    replace: bool = typer.Option(False, "--replace", help="delete the rows of tables the export has a file for, then load"),
    on_duplicate_key: OnDuplicateKey = typer.Option(
        OnDuplicateKey.skip, "--on-duplicate-key", help="a row repeating an earlier row's primary key: skip it (reported) or fail"
    ),
    encoding: str = typer.Option("utf-8-sig", "--encoding", help="text encoding of the CSV files"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Load an OMOP CDM CSV export into a database, in one transaction (all or nothing).

    Creates the missing CDM 5.4 tables (omop-cdm's, no foreign keys); refuses tables with rows.

    Reports rows per table, non-CDM files, missing/extra columns, CDM version, absent concepts.
    """
    err = Console(stderr=True)
    try:
        if append and replace:
            raise FedTwinError("--append and --replace exclude each other", "pass one of them, or neither")
        from fedtwin.omop.loader import load_omop_csv

        mode = "append" if append else "replace" if replace else "fail"
        with err.status("loading ...") as status:
            report = load_omop_csv(
                source,
                db,
                cdm_schema=cdm_schema,
                mode=mode,
                on_duplicate=on_duplicate_key.value,
                encoding=encoding,
                progress=lambda msg: status.update(msg),
            )
    except FedTwinError as exc:
        err.print(f"[bold red]Error:[/] {escape(exc.problem)}", highlight=False, soft_wrap=True)
        if exc.fix:
            err.print(f"[bold]Fix:[/] {escape(exc.fix)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, Console())


def print_report(report, console: Console) -> None:  # noqa: ANN001 - LoadReport, imported lazily
    # Everything below that comes from the export or the user is escaped: a value such as
    # "[abc]" must print as written, not be read as Rich markup.
    version = escape(report.cdm_version or "unknown")
    if report.version_mismatch:
        version = f"[yellow]{version} (tables are CDM 5.4: loaded by column name)[/]"
    where = f"{report.source} -> {report.database}" + (f" (schema {report.cdm_schema})" if report.cdm_schema else "")
    table = Table(title=f"OMOP load: {escape(where)}")
    table.add_column("table")
    table.add_column("file")
    table.add_column("rows", justify="right")
    table.add_column("not loaded: columns not in the table")
    table.add_column("absent from the file (NULL)")
    table.add_column("notes")
    for t in report.tables:
        notes = []
        if t.filled_columns:
            notes.append(f"set to 0: {', '.join(t.filled_columns)}")
        if t.duplicate_rows:
            notes.append(f"{t.duplicate_rows} duplicate-key rows skipped")
        table.add_row(
            t.table,
            escape(t.file),
            f"{t.shown_rows:,}" if isinstance(t.shown_rows, int) else t.shown_rows,
            escape(", ".join(t.extra_columns)),
            ", ".join(t.missing_columns),
            "; ".join(notes),
        )
    console.print(table)
    console.print(f"CDM version (cdm_source): {version}")
    if report.tables_created:
        console.print(f"Tables created: {len(report.tables_created)}")
    if report.tables_without_file:
        console.print(f"CDM tables with no file (left empty): {', '.join(report.tables_without_file)}")
    for s in report.skipped_files:
        console.print(f"Not loaded: {escape(s.file)} ({s.reason})", highlight=False)
    console.print(f"Concepts in the vocabulary: {report.concepts_in_vocabulary:,}")
    if report.missing_concepts:
        mc = Table(title="Concepts referenced but absent from the concept table")
        mc.add_column("column")
        mc.add_column("missing ids", justify="right")
        mc.add_column("of referenced", justify="right")
        mc.add_column("examples")
        for m in report.missing_concepts:
            mc.add_row(f"{m.table}.{m.column}", str(m.missing), str(m.referenced), ", ".join(map(str, m.examples)))
        console.print(mc)
    for w in report.warnings:
        console.print(f"[yellow]Warning:[/] {escape(w)}", highlight=False)
    console.print(f"Loaded in {report.seconds:.1f} s")
