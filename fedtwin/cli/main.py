"""Entry point of the ``fedtwin`` console script.

Sub-command groups owned by ``site_agent`` and ``coordinator`` are discovered through the
``fedtwin.commands`` entry-point group, so this shared library never imports them.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer
from rich.console import Console

from fedtwin.errors import FedTwinError

app = typer.Typer(
    name="fedtwin",
    help="Federated training of hybrid patient digital twins on OMOP CDM data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _register() -> None:
    from fedtwin.cli import omop_cmd, spec_cmd, synth_cmd

    app.add_typer(omop_cmd.app, name="omop")
    app.add_typer(spec_cmd.app, name="spec")
    app.command(name="synth")(synth_cmd.synth)
    for ep in entry_points(group="fedtwin.commands"):
        app.add_typer(ep.load(), name=ep.name)


def main() -> None:
    _register()
    try:
        app()
    except FedTwinError as exc:
        err_console.print(f"[bold red]Error:[/] {exc.problem}", highlight=False, markup=True)
        if exc.fix:
            err_console.print(f"[bold]Fix:[/] {exc.fix}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
