"""``fedtwin audit``: verify a federated training's MLflow run, print its model card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtwin.errors import FedTwinError

app = typer.Typer(help="Audit a federated training: verify its signed evidence, print its model card.", no_args_is_help=True)
KEYS_TAG = "fedtwin.trusted_keys"

URI = typer.Option(..., "--tracking-uri", help="MLflow tracking URI, e.g. sqlite:////ABS/PATH/mlflow.db or http://127.0.0.1:5000")
RUN = typer.Option(..., "--run-id", help="the training's MLflow run id (the demo and `coordinator launch` print it)")


def _check_run(tracking_uri: str, run_id: str):  # -> mlflow Run
    """The run, or a clear error: an SQLite store that does not exist is never created by looking."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
        if not db.is_file():
            raise FedTwinError(f"no MLflow store at {db} (from --tracking-uri {tracking_uri})",
                               "give the store the coordinator logged to, e.g. sqlite:////ABS/PATH/mlflow.db (four slashes for an absolute path)")
    try:
        return MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for an unknown run or store
        raise FedTwinError(f"MLflow run {run_id} cannot be read from {tracking_uri}: {' '.join(str(exc).split())[:300]}",
                           "check --run-id (the demo and `coordinator launch` print it; `mlflow runs list` shows them)") from None


def _keys(tracking_uri: str, run_id: str, keys: Path | None, console: Console):
    from fedtwin.provenance import KeyRing

    if keys is None:
        recorded = _check_run(tracking_uri, run_id).data.tags.get(KEYS_TAG)
        if not recorded:
            raise FedTwinError("no --keys given and the run records no key folder", "pass --keys CONSORTIUM/keys/signing (your own copy of the public keys)")
        keys = Path(recorded)
        console.print(f"[yellow]trusting the public keys in {escape(str(keys))}, the folder the coordinator recorded; "
                      "pass --keys with your own copy to trust nothing the coordinator says[/]")
    ring = KeyRing.from_dir(keys)
    console.print(f"trusted keys: {', '.join(f'{k.name} ({k.key_id})' for k in ring)}")
    return ring


@app.command("verify")
def verify(
    tracking_uri: str = URI,
    run_id: str = RUN,
    keys: Path | None = typer.Option(None, "--keys", help="folder of trusted *.ed25519.pub.pem files (consortium keys/signing)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Verify signatures, the hash chain, documents, the registered model, the card and the logged metrics."""
    from fedtwin.audit import verify_run

    console = Console(stderr=as_json)
    ring = _keys(tracking_uri, run_id, keys, console)
    _check_run(tracking_uri, run_id)
    report = verify_run(tracking_uri, run_id, ring)
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        table = Table(title=f"audit of MLflow run {run_id}")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail")
        for c in report.checks:
            table.add_row(c.name, "[green]ok[/]" if c.ok else f"[red]FAILED ({len(c.problems)})[/]", escape(c.detail))
        console.print(table)
        for p in report.problems:
            console.print(f"[red]-[/] {escape(p)}", soft_wrap=True)
        console.print("[green]verified: nothing was altered[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]")
    if not report.ok:
        raise typer.Exit(1)


@app.command("card")
def card(
    tracking_uri: str = URI,
    run_id: str = RUN,
    fmt: str = typer.Option("md", "--format", help="md, html (self-contained, plots embedded) or json"),
) -> None:
    """Write the run's model card to stdout (as published; `audit verify` checks it against the records)."""
    from fedtwin.audit.evidence import CARD_FILES, load_run

    if fmt not in CARD_FILES:
        raise FedTwinError(f"--format {fmt!r} is not a card format", "use md, html or json")
    _check_run(tracking_uri, run_id)
    arts = load_run(tracking_uri, run_id)
    text = arts.card_texts.get(fmt)
    if text is None:
        raise FedTwinError(f"MLflow run {run_id} has no card/{CARD_FILES[fmt]}",
                           "the card is published after the final evaluation round of a completed training")
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
