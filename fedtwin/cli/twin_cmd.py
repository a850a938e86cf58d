"""``fedtwin twin``: score a trained twin against baselines, and ask it what-if questions.

``evaluate`` prints aggregate metrics only (small cells suppressed, see docs/evaluation.md).
``whatif`` shows ONE patient's own trajectory, forecasts and calibrated parameters to the site's
clinician; it runs at the site and nothing of it leaves the site.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtwin.errors import FedTwinError

app = typer.Typer(help="Score a trained twin against baselines; simulate what-if plans for one patient.", no_args_is_help=True)


@app.callback()
def _twin() -> None:
    """Score a trained twin against baselines; simulate what-if plans for one patient."""


class Split(str, Enum):
    all = "all"
    test = "test"


def _fail(exc: FedTwinError) -> None:
    err = Console(stderr=True)
    err.print(f"[bold red]Error:[/] {escape(exc.problem)}", highlight=False, soft_wrap=True)
    if exc.fix:
        err.print(f"[bold]Fix:[/] {escape(exc.fix)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _guard(fn: Callable[[], None]) -> None:
    try:
        fn()
    except FedTwinError as exc:
        _fail(exc)


def _load(model: Path, spec: Path):  # noqa: ANN202 - (TwinSpec, TwinModel)
    from fedtwin.spec import load_spec
    from fedtwin.twin import load_model

    s = load_spec(spec)
    return s, load_model(model, s)  # a model of another spec: FedTwinError naming both hashes


def _extract(db: str, spec, cdm_schema: str | None):  # noqa: ANN001, ANN202
    from fedtwin.extract.extractor import Extractor
    from fedtwin.omop import open_database

    database = open_database(db, cdm_schema=cdm_schema)
    with Console(stderr=True).status(f"extracting the cohort of {spec.name} ..."):
        return database, Extractor(database, spec).extract()


# ---- evaluate ---------------------------------------------------------------------------------


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., "--model", help="trained twin (model.pt written by fedtwin train)"),
    db: str = typer.Option(..., "--db", help="OMOP database to score (SQLite path or PostgreSQL URL)"),
    spec: Path = typer.Option(..., "--spec", help="YAML twin spec the model was trained for"),
    ground_truth: Path | None = typer.Option(None, "--ground-truth", help="synthetic ground truth (`fedtwin synth --out` folder): adds what-if effect errors"),
    split: Split = typer.Option(Split.all, "--split", help="all: the whole cohort, for a database the model did not train on (baselines cross-fitted); test: the held-out split of the database the model trained on (baselines fitted on its train split)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (flat metric keys, e.g. rmse.map.h03.twin)"),
    cdm_schema: str | None = typer.Option(None, "--cdm-schema", help="PostgreSQL schema of the CDM tables"),
    baselines: str = typer.Option("mechanistic_only,residual_only,persistence,population_mean", "--baselines", help="comma-separated baselines to score next to the twin ('none' for the twin alone)"),
    samples: int = typer.Option(32, "--samples", min=1, help="posterior draws per patient"),
    residual_epochs: int = typer.Option(20, "--residual-epochs", min=1, help="training epochs of the residual-only baseline"),
    out: Path | None = typer.Option(None, "--out", help="also write the JSON report to this file"),
) -> None:
    """Score a trained twin on patients it did not train on, next to baselines (aggregate, suppressed)."""
    _guard(lambda: _evaluate(model, db, spec, ground_truth, split, as_json, cdm_schema, baselines, samples, residual_epochs, out))


def _evaluate(model: Path, db: str, spec: Path, ground_truth: Path | None, split: Split, as_json: bool, cdm_schema: str | None,
              baselines: str, samples: int, residual_epochs: int, out: Path | None) -> None:
    from fedtwin.evaluation import EvaluationConfig, EvaluationLayout, GroundTruth, evaluate_site, evaluation_report
    from fedtwin.evaluation.layout import MODEL_NAMES
    from fedtwin.training.split import train_test_split
    from fedtwin.twin import FitConfig

    chosen = [] if baselines.strip().lower() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in MODEL_NAMES[1:]]
    if unknown:
        raise FedTwinError(f"unknown baselines {unknown}", f"choose from {', '.join(MODEL_NAMES[1:])}, or 'none'")
    s, m = _load(model, spec)
    truth = GroundTruth.load(ground_truth) if ground_truth is not None else None
    if truth is not None:
        truth.check_spec(s)
    database, tensors = _extract(db, s, cdm_schema)
    layout = EvaluationLayout.for_spec(s, models=("twin", *chosen), plans=truth.alternatives if truth else ())
    config = EvaluationConfig(n_samples=samples, residual_fit=FitConfig(epochs=residual_epochs, batch_size=128))
    with Console(stderr=True).status("scoring the twin and the baselines ..."):
        if split == Split.test:
            train, test = train_test_split(tensors)
            stats = evaluate_site(m, test, train=train, ground_truth=truth, layout=layout, config=config)
            fitted_on = "fitted on the train split of this database (the scored patients are its held-out split)"
        else:
            stats = evaluate_site(m, tensors, ground_truth=truth, layout=layout, config=config)
            fitted_on = f"cross-fitted: {config.crossfit_folds} folds by person-id hash, each fold scored by baselines fitted on the other folds"
        report = evaluation_report(stats, suppression_threshold=s.suppression_threshold)
    report = {
        **{k: report[k] for k in ("format", "layout_fingerprint", "spec_hash")},
        "spec": s.name,
        "model": str(model),
        "database": database.display_url,
        "split": split.value,
        "baselines": fitted_on if len(layout.models) > 1 else None,
        **{k: v for k, v in report.items() if k not in ("format", "layout_fingerprint", "spec_hash")},
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_evaluation(report, s, Console())


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    a = abs(float(x))
    if a >= 1000:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if a >= 0.001 or a == 0 else f"{x:.2e}"


def _value(cell: Any, ci: bool = False) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return cell
    v = _fmt(cell.get("value"))
    if ci and cell.get("ci") and all(c is not None for c in cell["ci"]):
        lo, hi = cell["ci"]
        v += f" [{_fmt(lo)}, {_fmt(hi)}]"
    return v


def print_evaluation(report: dict[str, Any], spec, console: Console) -> None:  # noqa: ANN001 - TwinSpec
    """Rich tables of an evaluation report (only what the report holds: suppressed stays suppressed)."""
    M = report["metrics"]
    models = report["models"]
    units = {v.name: v.canonical_unit for v in spec.state_variables}
    cohort = report["cohort"]
    console.print(
        f"[bold]Twin evaluation[/] of {escape(report['model'])} ({escape(report['spec'])}) on {escape(report['database'])}, "
        f"split {report['split']}: {cohort['n_patients']} patients; metrics with "
        f"{report['ci_level']:.0%} CIs; cells under {report['suppression']['threshold']} patients/events suppressed",
        highlight=False,
    )
    if report.get("baselines"):
        console.print(f"baselines: {report['baselines']}", highlight=False)
    t = Table(title="Forecast RMSE of the predictive mean, pooled over the horizon (canonical units)")
    t.add_column("variable")
    for mo in models:
        t.add_column(mo, justify="right")
    for v in report["variables"]:
        t.add_row(escape(f"{v} [{units.get(v, '')}]"), *[_value(M.get(f"rmse.{v}.all.{mo}")) for mo in models])
    console.print(t)
    t = Table(title="Predictive distribution: 90% / 50% interval coverage and NLL (nats, canonical units)")
    t.add_column("variable")
    for mo in models:
        t.add_column(mo, justify="right")
    for v in (*report["variables"], "all"):
        t.add_row(v, *[f"{_value(M.get(f'coverage90.{v}.all.{mo}'))} / {_value(M.get(f'coverage50.{v}.all.{mo}'))} / {_value(M.get(f'nll.{v}.all.{mo}'))}" for mo in models])
    console.print(t)
    ref = "persistence" if "persistence" in models else None
    t = Table(title="RMSE by horizon bin: twin" + (" (persistence)" if ref else ""))
    t.add_column("bin")
    for v in report["variables"]:
        t.add_column(v, justify="right")
    for k in range(1, report["horizon"] + 1):
        step = f"h{k:0{max(2, len(str(report['horizon'])))}d}"
        row = []
        for v in report["variables"]:
            cell = _value(M.get(f"rmse.{v}.{step}.twin"))
            if ref:
                cell += f" ({_value(M.get(f'rmse.{v}.{step}.{ref}'))})"
            row.append(cell)
        t.add_row(step, *row)
    console.print(t)
    risk_models = [mo for mo in models if any(k.startswith("auroc.") and k.endswith(f".{mo}") for k in M)]
    if report["outcomes"] and risk_models:
        t = Table(title="Outcomes (risk from the prospective default plan; never from recorded future doses)")
        t.add_column("metric")
        for o in report["outcomes"]:
            for mo in risk_models:
                t.add_column(f"{o} {mo}", justify="right")
        for metric in ("auroc", "auprc", "brier", "ece", "calibration_slope", "calibration_intercept", "oe_ratio"):
            t.add_row(metric, *[_value(M.get(f"{metric}.{o}.{mo}"), ci=True) for o in report["outcomes"] for mo in risk_models])
        t.add_row("events", *[str(cohort["n_events"].get(o)) for o in report["outcomes"] for _ in risk_models])
        console.print(t)
    if report["plans"]:
        effect_models = [mo for mo in models if any(k.startswith("effect_rmse.") and k.endswith(f".{mo}") for k in M)]
        t = Table(title="What-if effect error vs ground truth: RMSE of (predicted - true) effect, pooled over the horizon")
        t.add_column("plan")
        t.add_column("variable")
        for mo in effect_models:
            t.add_column("no effect (persistence)" if mo == "persistence" else mo, justify="right")
        for plan in report["plans"]:
            for v in report["variables"]:
                t.add_row(plan, v, *[_value(M.get(f"effect_rmse.{plan}.{v}.all.{mo}")) for mo in effect_models])
        console.print(t)
    groups = report.get("subgroups") or {}
    if groups:
        t = Table(title="Twin by subgroup (pooled over the horizon; intersections in --json)")
        t.add_column("subgroup")
        t.add_column("patients", justify="right")
        t.add_column("coverage90", justify="right")
        for o in report["outcomes"]:
            t.add_column(f"AUROC {o}", justify="right")
        for v in report["variables"]:
            t.add_column(f"RMSE {v}", justify="right")
        for g, row in groups.items():
            if "&" in g:
                continue
            gm = row["metrics"]
            t.add_row(
                escape(g), str(row["n_patients"]), _value(gm.get("coverage90.all.all.twin")),
                *[_value(gm.get(f"auroc.{o}.twin")) for o in report["outcomes"]],
                *[_value(gm.get(f"rmse.{v}.all.twin")) for v in report["variables"]],
            )
        console.print(t)


# ---- whatif -----------------------------------------------------------------------------------


@app.command("whatif")
def whatif_cmd(
    model: Path = typer.Option(..., "--model", help="trained twin"),
    db: str = typer.Option(..., "--db", help="the site's OMOP database"),
    spec: Path = typer.Option(..., "--spec", help="YAML twin spec the model was trained for"),
    person_id: int = typer.Option(..., "--person-id", help="OMOP person_id of the patient (must be in the spec's cohort)"),
    plan: Path = typer.Option(..., "--plan", help="YAML plan: {interventions: {drug: dose per bin, or a list of one dose per horizon bin}}"),
    out: Path | None = typer.Option(None, "--out", help="PNG plot to write (default whatif-<person_id>.png)"),
    samples: int = typer.Option(64, "--samples", min=1, help="posterior draws"),
    cdm_schema: str | None = typer.Option(None, "--cdm-schema", help="PostgreSQL schema of the CDM tables"),
    expect_digest: str | None = typer.Option(None, "--expect-digest", help="the model's parameters digest from its model card or registry tag (at least 12 hex digits): refuse a model file whose parameters differ"),
) -> None:
    """Simulate one patient under an alternative intervention plan vs the recorded one (site-local)."""
    _guard(lambda: _whatif(model, db, spec, person_id, plan, out, samples, cdm_schema, expect_digest))


def _band(mean: float, lo: float, hi: float) -> str:
    return f"{_fmt(mean)} ({_fmt(lo)}-{_fmt(hi)})"


def check_expected_digest(model: Path, got: str, expected: str | None) -> None:
    """Refuse a model whose parameters digest is not the one the user was given (a file's own digests
    cannot stop someone who rewrites them; a digest from the model card or the registry can)."""
    if expected is None:
        return
    want = expected.strip().lower()
    if len(want) < 12 or any(ch not in "0123456789abcdef" for ch in want):
        raise FedTwinError(f"--expect-digest {expected!r} is not a digest prefix of at least 12 hex digits",
                           "copy the parameters digest from the model card or the registry tag fedtwin.parameters_digest")
    if not got.startswith(want):
        raise FedTwinError(
            f"model file {model} has parameters digest {got}, not the expected {want}",
            "this is not the model you were given (tampered, or another version): do not use it; get the released model again",
        )


def _whatif(model: Path, db: str, spec: Path, person_id: int, plan: Path, out: Path | None, samples: int, cdm_schema: str | None,
            expect_digest: str | None = None) -> None:
    import numpy as np

    from fedtwin.evaluation import load_plan
    from fedtwin.twin import explain, forecast, plot_what_if, what_if
    from fedtwin.twin.io import model_parameters_digest

    s, m = _load(model, spec)  # a file whose content no longer matches its recorded digests is refused here
    digest = model_parameters_digest(m)
    check_expected_digest(model, digest, expect_digest)
    checked = load_plan(plan, s)  # before the (slower) extraction: a bad plan fails fast
    _, tensors = _extract(db, s, cdm_schema)
    rows = np.flatnonzero(np.asarray(tensors.person_ids) == person_id)
    if rows.size == 0:
        raise FedTwinError(
            f"person {person_id} is not in the cohort of spec {s.name!r} in this database",
            "check the person_id; only patients who meet the spec's cohort definition (age, anchor visit, "
            "history observations, alive at the prediction time) can be simulated",
        )
    one = tensors.select(rows[:1])  # from here on only this patient's data is used
    with Console(stderr=True).status("simulating ..."):
        wi = what_if(m, one, checked, n_samples=samples)
        prospective = forecast(m, one, n_samples=samples)
        expl = explain(m, one, n_samples=samples)[0] if m.config.mechanism else None
    png = out if out is not None else Path(f"whatif-{person_id}.png")
    plot_what_if(wi, png)
    print_whatif(wi, prospective, expl, s, one, Console())
    Console().print(f"model {escape(str(model))}: parameters digest {digest[:16]}", highlight=False)
    Console().print(f"plot written to {escape(str(png))}", highlight=False)


def _hours(step_seconds: float) -> Iterator[str]:
    k = 1
    while True:
        yield f"+{k * step_seconds / 3600:g} h" if step_seconds < 2 * 86400 else f"+{k * step_seconds / 86400:g} d"
        k += 1


def print_whatif(wi, prospective, expl, spec, one, console: Console) -> None:  # noqa: ANN001
    """One patient's what-if: per horizon bin and affected variable, recorded vs alternative."""
    pid = int(wi.person_ids[0])
    t0 = float(one.index_epoch[0]) + spec.time.history_steps * spec.time.step_seconds if len(one.index_epoch) else math.nan
    when = datetime.fromtimestamp(t0, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if math.isfinite(t0) else "n/a"
    plan_txt = "; ".join(f"{k}: {', '.join(_fmt(x) for x in v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in wi.plan.items())
    console.print(f"[bold]What-if for patient {pid}[/] (prediction time {when}); plan: {escape(plan_txt)}", highlight=False)
    names = wi.affected or wi.state_names
    t = Table(title="Forecast under the recorded plan vs the alternative: mean (90% band)")
    t.add_column("bin")
    for d in wi.plan:
        t.add_column(escape(f"{d} [{spec.interventions[spec.intervention_names.index(d)].canonical_unit}] recorded -> plan"), justify="right")
    for v in names:
        unit = wi.units[wi.state_names.index(v)]
        t.add_column(escape(f"{v} [{unit}] recorded"), justify="right")
        t.add_column(f"{v} alternative", justify="right")
    labels = _hours(spec.time.step_seconds)
    for k in range(wi.recorded.mean.shape[1]):
        row = [next(labels)]
        for d in wi.plan:
            j = wi.intervention_names.index(d)
            row.append(f"{_fmt(float(wi.doses_recorded[0, k, j]))} -> {_fmt(float(wi.doses_alternative[0, k, j]))}")
        for v in names:
            j = wi.state_names.index(v)
            r, a = wi.recorded, wi.alternative
            row.append(_band(float(r.mean[0, k, j]), float(r.lower90[0, k, j]), float(r.upper90[0, k, j])))
            row.append(_band(float(a.mean[0, k, j]), float(a.lower90[0, k, j]), float(a.upper90[0, k, j])))
        t.add_row(*row)
    console.print(t)
    if wi.outcome_names:
        r = Table(title="Risk within each outcome's window")
        r.add_column("outcome")
        r.add_column("recorded plan", justify="right")
        r.add_column("alternative plan", justify="right")
        r.add_column(f"prospective default ({prospective.risk_plan})", justify="right")
        for k, o in enumerate(wi.outcome_names):
            r.add_row(o, f"{100 * wi.risk_recorded[0, k]:.1f}%", f"{100 * wi.risk_alternative[0, k]:.1f}%", f"{100 * prospective.risk[0, k]:.1f}%")
        console.print(r)
        console.print(
            "The recorded-plan risk is conditional on the doses actually given after the prediction time, which can "
            "reflect the outcome; the prospective default uses only what was known at the prediction time.",
            highlight=False,
        )
    if expl is not None:
        e = Table(title=f"Calibrated parameters of patient {pid} (posterior median, 90% credible interval)")
        for c in ("parameter", "estimate", "90% interval", "population", "unit"):
            e.add_column(c, justify="right" if c in ("estimate", "population") else "left")
        for p in expl.parameters:
            e.add_row(p.description, _fmt(p.estimate), f"{_fmt(p.lower90)} - {_fmt(p.upper90)}", _fmt(p.population), escape(p.unit))
        console.print(e)
        shares = ", ".join(f"{v} {'n/a' if math.isnan(sh) else f'{100 * sh:.0f}%'}" for v, sh in expl.mechanism_share.items())
        console.print(f"forecast movement explained by the mechanism (rest: learned residual): {shares}", highlight=False)
