"""``fedtwin spec``: validate a twin spec and print its hash."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Validate twin specs and print their hash.", no_args_is_help=True)


@app.command("validate")
def validate(spec: Path = typer.Argument(..., help="YAML twin spec")) -> None:
    """Validate SPEC; print its variables and its sha256 (the hash used in provenance)."""
    from fedtwin.spec import load_spec, spec_hash

    s = load_spec(spec)
    console = Console()
    table = Table(title=f"{s.name} v{s.version} (step {s.time.step}, history {s.time.history_steps}, horizon {s.time.horizon_steps})")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("concepts")
    table.add_column("unit")
    for v in s.state_variables:
        table.add_row("state", v.name, ", ".join(map(str, v.concept_ids)), v.canonical_unit)
    for i in s.interventions:
        table.add_row(f"intervention ({i.kind})", i.name, ", ".join(map(str, i.concept_ids)), i.canonical_unit)
    for o in s.outcomes:
        table.add_row(f"outcome ({o.kind})", o.name, ", ".join(map(str, o.concept_ids)) or "-", f"within {o.within_steps} steps")
    console.print(table)
    console.print(f"sha256 {spec_hash(s)}")
