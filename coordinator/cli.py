"""``fedtwin coordinator ...``: the coordinator's commands (``launch`` a study on a running consortium)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="The coordinator: launch a study (study.toml) on a running consortium.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _group() -> None:
    """The coordinator: launch a study (study.toml) on a running consortium."""


@app.command("launch")
def launch_cmd(
    config: Path = typer.Option(..., "--config", help="the study file (study.toml)"),
    consortium: Path | None = typer.Option(None, "--consortium", help="consortium folder (default: the study file's folder)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the study's last checkpoint (same MLflow run)"),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="total rounds (default: [study] rounds)"),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="DP epsilon each site may spend on the whole training (default: study.toml [training] epsilon_per_site)"
    ),
    output: Path | None = typer.Option(None, "--output", help="npz of the final global parameters (default: CHECKPOINTS/STUDY/final.npz)"),
    timeout: float = typer.Option(3600.0, "--timeout", help="seconds before the run is stopped"),
) -> None:
    """Run the study on the (already up) consortium; exit 1 if the run failed or a round halted."""
    from coordinator.launch import launch
    from fedtwin.errors import FedTwinError

    try:
        res = launch(config, consortium, resume=resume, rounds=rounds, epsilon=epsilon, output_path=output,
                     timeout=timeout, echo=lambda line: console.print(escape(line), highlight=False))
    except FedTwinError as exc:  # caught here too so that `app` alone (no fedtwin main) reports it the same way
        err_console.print(f"[bold red]Error:[/] {escape(exc.problem)}", highlight=False)
        if exc.fix:
            err_console.print(f"[bold]Fix:[/] {escape(exc.fix)}", highlight=False)
        raise typer.Exit(2) from None
    if not res.ok:
        err_console.print(f"[bold red]Error:[/] {escape(res.message)}", highlight=False)
        tail = "\n".join(res.output.splitlines()[-25:])
        if tail:
            err_console.print(f"[dim]last lines of the run's log:[/]\n{escape(tail)}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[bold green]ok[/] {escape(res.message)}", highlight=False)
