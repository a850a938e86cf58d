"""``fedtwin demo``: FedTwin's federated main job, end to end on one machine, in a few minutes.

Three heterogeneous synthetic hospitals (SQLite) pass their data-quality gates, join a local
consortium of real Flower processes (TLS, SuperNode authentication), train the ICU twin for a few
rounds with per-site DP-SGD and SecAgg+ (``coordinator.launch``), logged to an MLflow store under
the output folder; the consortium is always brought down (also on error or Ctrl-C). The summary:
rounds and their metrics as the MLflow run holds them, the epsilon each site's ledger recorded,
and the federated twin against a local-only twin at the smallest hospital on its held-out patients.

Pieces: :mod:`coordinator.demo_setup` (folder, hospitals, checks, consortium),
:mod:`coordinator.demo_compare` (local-only twin, evaluation), :mod:`coordinator.demo_summary`
(MLflow run, ledgers). docs/demo.md describes the output.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

DEFAULT_ROUNDS = 4  # measured: 2 rounds 58 s end to end at load ~2; 3 rounds 3 min 08 s under load ~10 (docs/demo.md)
BATCH_SIZE = 64  # the federated default batch size, for a study.toml without [training]


@dataclass
class DemoOptions:
    out: Path
    patients: int = 400
    rounds: int = DEFAULT_ROUNDS
    epsilon: float = 3.0
    budget_epsilon: float = 8.0
    seed: int = 7
    force: bool = False
    timeout: float = 900.0


@dataclass
class DemoResult:
    out: Path
    consortium: Path
    tracking_uri: str
    launch: Any = None  # coordinator.launch.LaunchResult
    metrics: Any = None  # demo_summary.RunMetrics
    ledgers: list = field(default_factory=list)
    comparison: Any = None  # demo_compare.Comparison
    audit: Any = None  # fedtwin.audit.AuditReport of the run
    keys_dir: Path | None = None  # the consortium's public signing keys (what the audit trusts)
    seconds: float = 0.0


def demo(
    out: Path | None = typer.Option(None, "--out", help="where everything goes (default: a new fedtwin-demo/run-<UTC time> in the current folder)"),
    patients: int = typer.Option(400, "--patients", min=120, help="mean ICU patients per hospital (sizes differ; the smallest needs a cohort of 50)"),
    rounds: int = typer.Option(DEFAULT_ROUNDS, "--rounds", min=1, help="federated rounds (SecAgg+, DP-SGD at every site)"),
    epsilon: float = typer.Option(3.0, "--epsilon", min=0.1, help="epsilon each site spends on the federated study (spread over the rounds)"),
    budget: float = typer.Option(8.0, "--budget-epsilon", min=0.1, help="each site's privacy budget; must hold 2 x --epsilon (the local-only comparison)"),
    seed: int = typer.Option(7, "--seed", min=0),
    force: bool = typer.Option(False, "--force", help="replace a previous demo's --out folder (never any other folder)"),
    timeout: float = typer.Option(900.0, "--timeout", help="seconds before the federated run is stopped"),
) -> None:
    """Run FedTwin's federation on three synthetic hospitals: synthesize, check, federate with DP + SecAgg+, compare."""
    from rich.console import Console
    from rich.markup import escape

    from fedtwin.errors import FedTwinError

    console = Console()
    if out is None:  # a fresh folder per run, so running the demo twice just works
        import datetime as dt

        out = Path("fedtwin-demo") / dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    try:
        result = run_demo(DemoOptions(out, patients, rounds, epsilon, budget, seed, force, timeout), console)
    except FedTwinError as exc:  # printed here too, so that the command behaves the same outside fedtwin's main
        err = Console(stderr=True)
        err.print(f"[bold red]Error:[/] {escape(exc.problem)}", highlight=False)
        if exc.fix:
            err.print(f"[bold]Fix:[/] {escape(exc.fix)}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the consortium was brought down; partial results stay in the output folder")
        raise typer.Exit(130) from None
    if not result.launch.ok:
        raise typer.Exit(1)


def run_demo(opts: DemoOptions, console) -> DemoResult:  # noqa: ANN001 - rich Console
    """The whole demo (see the module docs); raises FedTwinError on bad input or a failing site."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from coordinator import demo_setup as setup
    from fedtwin.errors import FedTwinError
    from fedtwin.spec import load_spec, spec_hash

    t0 = time.monotonic()
    if opts.budget_epsilon < 2 * opts.epsilon:
        raise FedTwinError(
            f"--budget-epsilon {opts.budget_epsilon:g} cannot hold the federated study (--epsilon {opts.epsilon:g}) and the "
            "local-only comparison at the smallest site (the same epsilon again, on the same patients)",
            f"pass --budget-epsilon {2 * opts.epsilon:g} or more, or a smaller --epsilon",
        )
    paths = setup.prepare_output(opts.out, force=opts.force, options=vars(opts))
    spec = load_spec(setup.SPEC_PATH)
    console.rule("[bold]FedTwin demo: a federated ICU twin across 3 hospitals")
    console.print(
        f"spec {escape(spec.name)} (sha256 {spec_hash(spec)[:12]}); {opts.rounds} rounds, SecAgg+, DP-SGD at every site "
        f"(epsilon {opts.epsilon:g} per site over all rounds, budget {opts.budget_epsilon:g}); "
        f"output in {escape(str(paths.out))}", highlight=False,
    )
    bars = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*bars, console=console) as bar:
        task = bar.add_task("synthesizing 3 hospitals", total=setup.N_SITES)
        setup.synthesize_hospitals(paths, opts.patients, opts.seed, lambda _s: bar.advance(task))
        task = bar.add_task("data-quality gate per site", total=setup.N_SITES)
        reports = setup.check_hospitals(paths, spec, lambda: bar.advance(task))
        task = bar.add_task("consortium: keys, certificates, site configs, MLflow store", total=1)
        root = setup.init_demo_consortium(paths, rounds=opts.rounds, epsilon=opts.epsilon, budget_epsilon=opts.budget_epsilon)
        bar.advance(task)
    result = DemoResult(paths.out, root, paths.tracking_uri)

    from coordinator.consortium import down, up
    from fedtwin.federation.config import load_site_config, load_study_config

    site_cfgs = {f"site_{k}": load_site_config(root / "sites" / f"site_{k}.toml") for k in range(1, setup.N_SITES + 1)}
    try:
        with Progress(*bars, console=console) as bar:
            task = bar.add_task("consortium up: SuperLink + 3 SuperNodes (TLS, node auth)", total=1)
            up(root, timeout=180)
            bar.advance(task)
            task = bar.add_task(f"federated rounds (SecAgg+, DP-SGD, epsilon {opts.epsilon:g} per site)", total=opts.rounds)
            last = "federated rounds done: final evaluation round, saving the global model"

            def on_rounds(n: int) -> None:
                bar.update(task, completed=n, **({"description": last} if n >= opts.rounds else {}))

            result.launch = _launch_with_progress(root, opts, on_rounds)
    finally:
        with console.status("consortium down"):
            down(root)
    from coordinator import demo_compare, demo_summary

    demo_summary.print_launch(console, result.launch)
    if not result.launch.ok:
        result.seconds = time.monotonic() - t0
        return result

    run_id = result.launch.mlflow_run_id or demo_summary.find_run_id(paths.tracking_uri, setup.STUDY_ID)
    result.metrics = demo_summary.read_run_metrics(paths.tracking_uri, run_id) if run_id else None
    federated_ledgers = demo_summary.read_ledgers(site_cfgs)

    # the local-only twin at the smallest hospital, with the epsilon the federation spent there
    smallest = min(range(setup.N_SITES), key=lambda i: reports[i].cohort_persons)
    site = f"site_{smallest + 1}"
    spent = next(r.spent_epsilon for r in federated_ledgers if r.site == site)
    cmp = demo_compare.Comparison(site, spent)
    with Progress(*bars, console=console) as bar:
        task = bar.add_task(f"{site} (smallest): local-only twin, evaluation", total=3)
        fed_model = demo_compare.load_federated_model(Path(result.launch.run_config["output-path"]), spec)
        training = getattr(load_study_config(root / "study.toml"), "training", None)  # [training] of study.toml, when present
        _, local_model = demo_compare.train_local_only(
            site_cfgs[site], spec, paths.local_models / site, epsilon=spent,
            epochs=float(opts.rounds) * float(getattr(training, "local_epochs", 1.0)),
            batch_size=int(getattr(training, "batch_size", BATCH_SIZE)), seed=opts.seed)
        bar.advance(task)
        for name, model in (("federated", fed_model), ("local-only", local_model)):
            cmp.reports.update(demo_compare.evaluate_on_held_out(site_cfgs[site], spec, {name: model}))
            bar.advance(task)
    result.comparison = cmp
    result.ledgers = demo_summary.read_ledgers(site_cfgs)
    if run_id:  # the auditor's view: is the run's signed evidence intact?
        from fedtwin.audit import verify_run
        from fedtwin.provenance import KeyRing

        with console.status("audit: verifying signatures, hash chain, registered model, model card and metrics"):
            result.audit = verify_run(paths.tracking_uri, run_id, KeyRing.from_dir(root / "keys" / "signing"))
        result.keys_dir = root / "keys" / "signing"
    result.seconds = time.monotonic() - t0
    demo_summary.print_summary(console, result, federated_ledgers)
    return result


def _launch_with_progress(root: Path, opts: DemoOptions, on_rounds):  # noqa: ANN001, ANN202
    """``coordinator.launch.launch`` in a worker thread; the bar follows the round checkpoints it writes.

    The main thread only waits, so Ctrl-C lands there (and the caller's ``finally`` brings the
    consortium down, which also ends the run and this thread).
    """
    from coordinator import demo_setup as setup
    from coordinator.launch import launch

    box: dict[str, Any] = {}
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the demo logs to its own store, whatever the shell says

    def work() -> None:
        try:
            box["result"] = launch(root / "study.toml", root, rounds=opts.rounds, epsilon=opts.epsilon, timeout=opts.timeout)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = exc

    worker = threading.Thread(target=work, name="fedtwin-demo-launch", daemon=True)
    try:
        worker.start()
        ckpts = root / "checkpoints" / setup.STUDY_ID
        while worker.is_alive():
            worker.join(0.5)
            on_rounds(len(list(ckpts.glob("round-*.npz"))) if ckpts.is_dir() else 0)
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    if "error" in box:
        raise box["error"]
    return box["result"]
