"""``fedtwin site budget``: what the site's privacy ledger says has been spent, per dataset.

Read-only by construction (the ledger is opened with SQLite ``mode=ro``), so looking at the
budget can never change it. Register with ``app.command("budget")(budget)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ledger pulls in Opacus/torch: import it only when the command runs
    from fedtwin.privacy.ledger import DatasetStatus

LAST_ENTRIES = 5


def budget(
    ledger: Path = typer.Option(..., "--ledger", help="the site's privacy ledger (SQLite file)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Privacy budget per dataset: budget, composed spend, remaining, runs/rounds/steps, last entries."""
    from fedtwin.privacy.accounting import secure_rng_status
    from fedtwin.privacy.ledger import PrivacyLedger

    with PrivacyLedger.open(ledger, read_only=True) as led:
        statuses = led.statuses()
    rng = secure_rng_status()
    if json_out:
        report = {
            "ledger": str(ledger),
            "secure_rng": rng,
            "datasets": [s.to_dict(last=LAST_ENTRIES) for s in statuses],
        }
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    _print(console, ledger, statuses, rng)


def _print(console: Console, path: Path, statuses: list[DatasetStatus], rng: dict[str, object]) -> None:
    """One key/value table per dataset (fits a narrow terminal), then its last entries."""
    if not statuses:
        console.print(f"privacy ledger {path}: no datasets yet (no budget has been set)", highlight=False)
    for s in statuses:
        t = Table(title=f"dataset {s.dataset_id}", show_header=False, title_justify="left")
        t.add_column("what", style="bold")
        t.add_column("value")
        remaining = f"{s.remaining_epsilon:.3f}" + (" [red](over budget)[/]" if s.remaining_epsilon < 0 else "")
        t.add_row("budget", f"ε {s.budget.epsilon:g}, δ {s.budget.delta:g} ({len(s.budget_events) - 1} approved change(s))")
        t.add_row("spent (composed)", f"ε {s.spent_epsilon:.3f}")
        t.add_row("remaining", remaining)
        t.add_row("accountant", s.accountant)
        t.add_row("runs / rounds / steps", f"{s.runs} / {s.rounds} / {s.steps}")
        t.add_row("open reservations", f"{s.open_reservations} (counted in full until settled)")
        console.print(t)
        if not s.entries:
            continue
        last = s.entries[-LAST_ENTRIES:]
        e_t = Table(title=f"last {len(last)} of {len(s.entries)} entries", title_justify="left")
        for col in ("#", "UTC", "kind", "run", "rnd", "σ", "q", "steps", "ε alone", "ε total"):
            e_t.add_column(col, no_wrap=True)
        for e in last:
            kind = "spend" if e.kind == "spend" else ("reserve" if e.settles is None else f"settle #{e.settles}")
            e_t.add_row(
                str(e.id), e.ts[5:16].replace("T", " "), kind, e.run_id, "" if e.round is None else str(e.round),
                f"{e.noise_multiplier:.3f}", f"{e.sample_rate:g}", str(e.steps),
                f"{e.epsilon_entry:.3f}", f"{e.epsilon_composed:.3f}",
            )
        console.print(e_t)
        for e in last:
            if e.note:
                console.print(f"  #{e.id}: {e.note}", highlight=False)
    state = "available" if rng["available"] else "NOT available"
    console.print(f"secure RNG (Opacus secure_mode) {state}: {rng['reason']}", highlight=False)


def budget_change(
    ledger: Path = typer.Option(..., "--ledger", help="the site's privacy ledger (SQLite file)"),
    epsilon: float = typer.Option(..., "--epsilon", help="the dataset's new total epsilon budget"),
    reason: str = typer.Option(..., "--reason", help="why the budget changes (recorded in the ledger)"),
    approved_by: str = typer.Option(..., "--approved-by", help="who in the site's data governance approved it (recorded)"),
    dataset: str | None = typer.Option(None, "--dataset", help="dataset id as `fedtwin site budget` shows it (needed if the ledger has several)"),
    delta: float | None = typer.Option(None, "--delta", help="new delta (default: the current one)"),
) -> None:
    """Change a dataset's privacy budget: an approved, recorded event; what was spent stays spent.

    The only way a budget changes. The ledger keeps the old budget, the new one, the reason and the
    approver as a budget event (``fedtwin site budget`` counts them), so an auditor can see every
    change; nothing already spent is forgotten, and a budget lowered below the spend shows as over
    budget (no further training).
    """
    from fedtwin.errors import FedTwinError
    from fedtwin.privacy.ledger import PrivacyLedger

    if not epsilon > 0:
        raise FedTwinError(f"--epsilon {epsilon:g}: a budget must be positive", "pass the new total epsilon, e.g. --epsilon 8")
    for option, value in (("--reason", reason), ("--approved-by", approved_by)):
        if not value.strip():
            raise FedTwinError(f"{option} must not be empty: a budget change is recorded with why and who approved it",
                               f"pass {option} TEXT")
    if delta is not None and not 0 < delta < 1:
        raise FedTwinError(f"--delta {delta:g}: must be between 0 and 1", "omit --delta to keep the current one")
    with PrivacyLedger.open(ledger) as led:
        datasets = led.datasets()
        if dataset is None:
            if len(datasets) != 1:
                raise FedTwinError(
                    f"the ledger {ledger} holds {len(datasets)} datasets; which budget changes is ambiguous",
                    "pass --dataset ID (the ids `fedtwin site budget --ledger ...` shows)",
                )
            dataset = datasets[0]
        if dataset not in datasets:
            raise FedTwinError(
                f"the ledger {ledger} has no dataset {dataset}",
                "pass one of: " + (", ".join(datasets) or "(none: a budget is set by the site's first training)"),
            )
        old = led.budget(dataset)
        new = led.change_budget(dataset, epsilon=epsilon, delta=old.delta if delta is None else delta,
                                reason=reason, approved_by=approved_by)
        spent = led.status(dataset).spent_epsilon
    console = Console()
    console.print(
        f"dataset {dataset}: budget epsilon {old.epsilon:g} -> {new.epsilon:g}, delta {old.delta:g} -> {new.delta:g} "
        f"(approved by {approved_by}: {reason}); spent so far epsilon {spent:.3f}, remaining {new.epsilon - spent:.3f}",
        highlight=False,
    )
    if new.epsilon <= spent:
        console.print("the new budget is not above what is already spent: no further training on this dataset", highlight=False)
