"""``fedtwin demo``'s summary: what the MLflow run and the sites' privacy ledgers hold, printed as tables.

Written against what is *in* the run, not a fixed list of keys: the ServerApp's per-round metrics
grow (evaluation metrics, site names), so every key logged per round is read with
``MlflowClient.get_metric_history`` and a few headline ones are shown (RMSE, AUROC, NLL, ...
when present, then the rest up to a limit; the others are named below the table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADLINE = ("rmse", "auroc", "nll", "coverage", "loss")  # preferred metric-name fragments, in order
BOOKKEEPING = ("sites", "halted")  # shown as the status and sites rows (from the launch's round lines)
MAX_ROWS = 10
EVAL_RE = re.compile(r"FEDTWIN evaluation round=(\d+)")


@dataclass
class RunMetrics:
    run_id: str
    status: str
    by_step: dict[int, dict[str, float]] = field(default_factory=dict)  # step (round) -> key -> value

    @property
    def keys(self) -> list[str]:
        return sorted({k for m in self.by_step.values() for k in m})


def read_run_metrics(tracking_uri: str, run_id: str) -> RunMetrics:
    """Every metric of the run, per step (the ServerApp logs step = round)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    out = RunMetrics(run_id, run.info.status)
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.by_step.setdefault(int(m.step), {})[key] = float(m.value)
    return out


def find_run_id(tracking_uri: str, experiment: str) -> str | None:
    """The latest run of the experiment (when the launch output did not name it)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def choose_columns(keys: list[str], limit: int = MAX_ROWS) -> tuple[list[str], list[str]]:
    """(metric keys to show, the other keys): headline fragments first, per-site epsilons last,
    confidence bounds (``*.ci_low``/``*.ci_high``) never (the value's key is shown)."""
    candidates = [k for k in keys if k not in BOOKKEEPING]

    def rank(k: str) -> tuple[int, int, str]:
        low = k.lower()
        pos = next((i for i, h in enumerate(HEADLINE) if h in low), len(HEADLINE))
        bound = 1 if low.endswith((".ci_low", ".ci_high")) else 0
        site_level = 1 if low.startswith(("epsilon_spent.", "fair.")) else 0  # gaps: in the card, not this table
        return (bound, site_level, pos, k)

    ordered = sorted(candidates, key=rank)
    shown = [k for k in ordered if not k.endswith((".ci_low", ".ci_high"))][:limit]
    return shown, [k for k in ordered if k not in shown]


def round_table(rounds: list, metrics: RunMetrics | None, output: str = "") -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and the keys not shown, for the per-round table (one column per MLflow step).

    ``rounds``: the launch's ``RoundOutcome`` list (round, status, sites). Steps that only MLflow
    knows get their own column (step 0: evaluation metrics of the initial model). Rows: status,
    sites, then the chosen metrics (rounds are few, metric keys long: hence one column per step).
    """
    by_round = {o.round: o for o in rounds}
    steps = sorted(set(by_round) | set(metrics.by_step if metrics else {}))
    chosen, rest = choose_columns(metrics.keys if metrics else [])
    header = ["MLflow step (round)", *(f"{s} (initial model)" if s == 0 and s not in by_round else str(s) for s in steps)]
    status, sites = ["status"], ["sites"]
    for s in steps:
        m = metrics.by_step.get(s, {}) if metrics else {}
        o = by_round.get(s)
        status.append(o.status if o else "-")
        sites.append(str(o.sites) if o else (_num(m["sites"]) if "sites" in m else "-"))
    rows = [status, sites]
    for key in chosen:
        rows.append([key, *(_num(metrics.by_step.get(s, {}).get(key)) for s in steps)])
    return header, rows, rest


def evaluation_note(launch_result, output: str = "") -> str | None:
    """One line about the final evaluation-only round, if the ServerApp ran one."""
    ev = getattr(launch_result, "evaluation", None)
    if ev is not None:
        return (f"final evaluation round {ev.round}: {ev.status} ({ev.sites} sites); its metrics are logged at the step of the "
                "model it scored")
    found = EVAL_RE.findall(output or "")
    return f"final evaluation round {found[-1]} (see the run's log)" if found else None


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 1e6:
        return f"{v:g}"
    return f"{v:.4g}"


@dataclass
class LedgerRow:
    site: str
    ledger: Path
    budget_epsilon: float
    delta: float
    spent_epsilon: float
    rounds: int
    runs: int

    @property
    def within_budget(self) -> bool:
        return self.spent_epsilon <= self.budget_epsilon + 1e-9


def read_ledgers(site_cfgs: dict[str, Any]) -> list[LedgerRow]:
    """Each site's ledger ([privacy] ledger of its site config), read-only: budget and composed spend."""
    from fedtwin.privacy.ledger import PrivacyLedger

    rows = []
    for name, cfg in site_cfgs.items():
        path = Path(cfg.privacy.ledger)
        if not path.is_file():
            rows.append(LedgerRow(name, path, cfg.privacy.epsilon, cfg.privacy.delta, 0.0, 0, 0))
            continue
        with PrivacyLedger.open(path, read_only=True) as ledger:
            for st in ledger.statuses():
                rows.append(LedgerRow(name, path, st.budget.epsilon, st.budget.delta, st.spent_epsilon, st.rounds, st.runs))
    return rows


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that opens the run in MLflow's UI (mlflow is installed in FedTwin's .venv)."""
    import shlex
    import shutil
    import sys

    exe = Path(sys.executable).parent / "mlflow"
    mlflow = "mlflow" if shutil.which("mlflow") == str(exe) or not exe.exists() else str(exe)
    return f"{shlex.quote(mlflow)} ui --backend-store-uri {shlex.quote(tracking_uri)}"


# ---------------------------------------------------------------------------------- printing


def print_launch(console, res) -> None:  # noqa: ANN001
    from rich.markup import escape

    if res.ok:
        console.print(f"[green]ok[/] {escape(res.message)}", highlight=False)
        return
    console.print(f"[bold red]the federated run failed:[/] {escape(res.message)}", highlight=False)
    tail = "\n".join(res.output.splitlines()[-25:])
    if tail:
        console.print(f"[dim]last lines of the run's log:[/]\n{escape(tail)}", highlight=False)


def print_summary(console, result, federated_ledgers: list) -> None:  # noqa: ANN001
    from rich.markup import escape
    from rich.table import Table

    from coordinator import demo_compare

    header, rows, rest = round_table(result.launch.rounds, result.metrics, result.launch.output)
    t = Table(title=f"federated rounds as logged in MLflow run {result.metrics.run_id if result.metrics else '-'}")
    for i, h in enumerate(header):
        t.add_column(escape(h), overflow="fold", justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*map(escape, r))
    console.print(t)
    note = evaluation_note(result.launch, result.launch.output)
    if note:
        console.print(escape(note), highlight=False)
    rest = [k for k in rest if not k.endswith((".ci_low", ".ci_high"))]  # bounds of the values: implied
    if rest:
        more = ", ".join(rest[:6]) + (f" and {len(rest) - 6} more" if len(rest) > 6 else "")
        console.print(f"also in the run (with confidence bounds *.ci_low/*.ci_high): {escape(more)}", highlight=False)

    fed = {r.site: r.spent_epsilon for r in federated_ledgers}
    t = Table(title="epsilon spent per site (each site's privacy ledger)")
    for h in ("site", "rounds", "spent: federation", "spent: now", "budget", "delta", "within budget"):
        t.add_column(h)
    for r in result.ledgers:
        t.add_row(r.site, str(r.rounds), f"{fed.get(r.site, 0.0):.3f}", f"{r.spent_epsilon:.3f}", f"{r.budget_epsilon:g}",
                  f"{r.delta:g}", "yes" if r.within_budget else "NO")
    console.print(t)

    cmp = result.comparison
    t = Table(title=f"global (federated) vs local-only twin at {cmp.site}, the smallest hospital, on its held-out patients")
    t.add_column("metric")
    for name in cmp.reports:
        t.add_column(name)
    keys = cmp.headline_keys()
    for k in keys:
        t.add_row(escape(k), *(escape(demo_compare.format_cell(rep["metrics"].get(k))) for rep in cmp.reports.values()))
    console.print(t)
    console.print(
        f"local-only twin: DP-SGD at {cmp.site} alone with epsilon {cmp.local_epsilon:.3f} (what the federation spent there), "
        "recorded in the same ledger; lower RMSE and higher AUROC are better; 'suppressed' = too few patients or events to show.",
        highlight=False,
    )
    print_audit(console, result)
    console.print(f"done in {result.seconds:.0f} s. Open the MLflow run:\n  {escape(mlflow_ui_command(result.tracking_uri))}",
                  highlight=False, soft_wrap=True)


def print_audit(console, result) -> None:  # noqa: ANN001
    """One line per audit check, then the commands an auditor runs by hand."""
    from rich.markup import escape

    audit = result.audit
    if audit is None:
        return
    for c in audit.checks:
        mark = "[green]ok[/]" if c.ok else f"[red]FAILED[/] {escape('; '.join(c.problems[:3]))}"
        console.print(f"audit {c.name}: {mark} ({escape(c.detail)})", highlight=False, soft_wrap=True)
    base = f"fedtwin audit {{}} --tracking-uri {result.tracking_uri} --run-id {audit.run_id}"
    console.print("verify it yourself, and read the model card:\n"
                  f"  {escape(base.format('verify'))} --keys {escape(str(result.keys_dir))}\n"
                  f"  {escape(base.format('card'))} --format html > model-card.html",
                  highlight=False, soft_wrap=True)
