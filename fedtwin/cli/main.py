"""Entry point of the ``fedtwin`` console script.

Sub-command groups owned by ``site_agent`` and ``coordinator`` are discovered through the
``fedtwin.commands`` entry-point group, so this shared library never imports them.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer
from rich.console import Console
from rich.markup import escape

from fedtwin.errors import FedTwinError

app = typer.Typer(
    name="fedtwin",
    help="Federated training of hybrid patient digital twins on OMOP CDM data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from fedtwin.cli import omop_cmd, spec_cmd, synth_cmd, train_cmd

    app.add_typer(omop_cmd.app, name="omop")
    app.add_typer(train_cmd.app, name="train")
    app.add_typer(spec_cmd.app, name="spec")
    from fedtwin.cli import twin_cmd  # (kept apart from the shared import line above)
    app.add_typer(twin_cmd.app, name="twin")
    from fedtwin.cli import audit_cmd

    app.add_typer(audit_cmd.app, name="audit")
    app.command(name="synth")(synth_cmd.synth)
    for ep in entry_points(group="fedtwin.commands"):
        loaded = ep.load()
        if isinstance(loaded, typer.Typer):
            app.add_typer(loaded, name=ep.name)
        else:  # a single command, e.g. `fedtwin demo`
            app.command(name=ep.name)(loaded)
    _registered = True


def main() -> None:
    _register()
    try:
        app()
    except FedTwinError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(exc.problem)}", highlight=False)
        if exc.fix:
            err_console.print(f"[bold]Fix:[/] {escape(exc.fix)}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
