"""Empirical privacy audit: membership inference against FedTwin's global twin, next to what DP promises.

Usage: .venv/bin/python bench/privacy_audit.py [--seeds 3] [--patients 100] [--no-dp-rounds 200]
                                               [--plot docs/img/privacy-audit.png] [--keep DIR] [--quick]

Protocol (docs/privacy-audit.md):

1. Every global twin comes from FedTwin's real federated pipeline, ``coordinator.simulate.simulate``:
   ``--sites`` synthetic ICU hospitals of ``--patients`` each, FedTwin's ServerApp and ClientApp in
   Flower's simulation engine, SecAgg+, DP-SGD inside each site's privacy ledger. ``epsilon`` there is
   each site's budget for the whole run. Per seed: one run at epsilon 1, 3 and 8, and one "no DP"
   run at epsilon 1e8 (FedTwin always trains with DP-SGD: clipping stays on, the noise multiplier
   the ledger calibrates is ~0.0015 at 200 rounds, printed from the ledger).
2. Small sites and as many rounds as FedTwin admits: a DP run gets the largest number of rounds
   for which every site's plan passes the ledger's checks (budget and the cohort rule
   "noise <= 0.1 x clipping norm on the averaged gradient", docs/privacy.md), computed with the
   site's own planner before the run. The no-DP run goes on longer (``--no-dp-rounds``) and its
   checkpoints after the same rounds as each DP run are the matched no-DP references.
3. Target = site 1. Members = its training split (the patients it trained on, the person-id rule of
   fedtwin.training.split), non-members = its held-out split (same hospital, never trained on).
4. Attacks, per patient, on the global twin at its posterior mean: "loss" = the twin's negative
   log-likelihood of the patient's observed values (history and horizon bins, model units),
   lower = member; "calibrated" = the mean NLL under reference twins minus the target's NLL, the
   references being the same configuration's global twins of the OTHER seeds (other patients of the
   same hospital profiles, so they never saw the audited patients): offline LiRA with a global
   variance (Carlini et al. 2022), which ranks patients like difficulty calibration (Watson et al. 2022).
5. Per model, scores pooled over seeds: AUROC with a bootstrap 95 % CI (patients resampled within
   seed and membership), TPR at 1 % FPR, and the largest AUROC (and TPR at 1 % FPR) any attack can
   reach under (epsilon, delta)-DP, for the epsilon site 1's ledger composed (the largest over seeds)
   and its delta (fedtwin.privacy.membership_bound), and "eps proven": the smallest epsilon whose
   bound admits the AUROC's CI lower end (what the attack demonstrates). Control: the initial twin
   (round 0, trained on nobody, bound 0.5).

Exits 1 with ``BUG: ...`` if a DP twin's attack AUROC has its CI lower end above the bound. Prints
only aggregates (per-patient scores stay in memory). The last line is the headline
``max_auroc_minus_bound X`` (largest AUROC - bound over the DP twins and attacks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.simulate import SPEC, STUDY_ID, simulate  # noqa: E402
from fedtwin.privacy.membership_bound import auroc, epsilon_lower_bound, max_auroc, max_tpr, roc_curve, tpr_at_fpr  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)
NO_DP_EPSILON = 1e8  # the "no DP" run: FedTwin cannot switch DP-SGD off; this budget makes its noise negligible
TARGET_SITE = 1
LOW_FPR = 0.01
ATTACKS = ("loss", "calibrated")


@dataclass(frozen=True)
class Setting:
    """The federation every run uses (only epsilon and rounds differ between configurations)."""

    sites: int
    patients: int
    seeds: tuple[int, ...]
    no_dp_rounds: int
    parallel: int
    bootstrap: int


@dataclass(frozen=True)
class Run:
    """One federated training (``simulate``) of one seed."""

    label: str  # "no DP" | "eps 8" ...
    epsilon: float  # each site's budget for the run
    rounds: int
    seed: int


@dataclass
class Model:
    """One global twin to attack, over all seeds: what it is and its per-patient scores (in memory only)."""

    label: str
    kind: str  # control | nodp | dp
    rounds: int
    epsilon_nominal: float | None
    epsilon_spent: float | None = None  # site 1's ledger, largest over seeds
    delta: float = 0.0
    sigma: float | None = None  # noise multiplier the ledger calibrated (largest over seeds)
    scores: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # attack -> seed -> (in, out)


@dataclass
class Result:
    model: Model
    attack: str
    auroc: float
    ci: tuple[float, float]
    tpr_low: float
    bound: float
    bound_tpr_low: float
    epsilon_proven: float  # smallest epsilon whose bound the AUROC's CI lower end fits under: what the attack demonstrates
    verdict: str


# ------------------------------------------------------------------------------------ planning


def training_request(epsilon: float):  # noqa: ANN201 - DPRequest
    """What a simulated site is asked per round: the study defaults ``fedtwin simulate`` writes."""
    import inspect

    from coordinator.consortium.consortium import init_consortium
    from fedtwin.federation.config import TrainingConfig
    from fedtwin.training.privacy_plan import DPRequest

    t = TrainingConfig()
    delta = float(inspect.signature(init_consortium).parameters["delta"].default)
    return DPRequest(epsilon=epsilon, delta=delta, budget_epsilon=epsilon, max_grad_norm=t.max_grad_norm,
                     batch_size=t.batch_size, epochs=t.local_epochs)


def train_sizes(setting: Setting, seed: int, scratch: Path) -> list[int]:
    """Training-split sizes of every site of a seed, from the same hospitals ``simulate`` will synthesize."""
    from fedtwin.extract.extractor import Extractor
    from fedtwin.omop import open_database
    from fedtwin.spec import load_spec
    from fedtwin.synth import SynthRequest, synthesize
    from fedtwin.training.split import train_test_split

    out = scratch / f"seed-{seed}"
    if not (out / "ground_truth").exists():  # --reuse: already synthesized
        synthesize(SynthRequest(sites=setting.sites, patients=setting.patients, seed=seed, out=out,
                                sizes=[setting.patients] * setting.sites, workers=1))
    spec = load_spec(SPEC)
    return [train_test_split(Extractor(open_database(str(out / f"site_{k}.db")), spec).extract())[0].n_patients
            for k in range(1, setting.sites + 1)]


def admissible_rounds(n_patients: int, epsilon: float, cap: int, scratch: Path) -> int:
    """Largest number of rounds (<= cap) whose first round a site of ``n_patients`` would accept.

    Runs the site's own planner (``plan_federated_round`` on a fresh ledger with the run's budget):
    it refuses when the noise calibrated for all rounds breaks the cohort rule. 0 if none fits.
    """
    from fedtwin.privacy.accounting import BudgetExceededError, CohortTooSmallError
    from fedtwin.training.privacy_plan import open_or_create_ledger, plan_federated_round

    request = training_request(epsilon)
    path = scratch / f"plan-{n_patients}-{epsilon:g}.sqlite"
    ledger = open_or_create_ledger(path, "plan", request)
    try:
        def fits(rounds: int) -> bool:
            try:
                plan_federated_round(ledger, "plan", n_patients, request, training_id="plan", rounds=rounds, server_round=1)
            except (CohortTooSmallError, BudgetExceededError):
                return False
            return True

        lo, hi = 0, cap
        while lo < hi:  # more rounds -> more noise per step: the rule is monotone in rounds
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo
    finally:
        ledger.close()


# ------------------------------------------------------------------------------------- the runs


def run_dir(base: Path, run: Run) -> Path:
    return base / f"seed-{run.seed}" / run.label.replace(" ", "-")


def checkpoint(base: Path, run: Run, rounds: int) -> Path:
    return run_dir(base, run) / "consortium" / "checkpoints" / STUDY_ID / f"round-{rounds:04d}.npz"


def ledger_figures(base: Path, run: Run, rounds: int) -> tuple[float, float, float]:
    """(composed epsilon after ``rounds`` rounds, delta, largest noise multiplier) from site 1's ledger."""
    from fedtwin.privacy.ledger import PrivacyLedger

    path = run_dir(base, run) / "consortium" / "privacy" / f"site_{TARGET_SITE}.ledger.sqlite"
    with PrivacyLedger.open(path, read_only=True) as ledger:
        (dataset,) = ledger.datasets()
        entries = [e for e in ledger.entries(dataset) if e.round is not None and e.round <= rounds]
        if not entries:
            raise RuntimeError(f"site {TARGET_SITE}'s ledger of {run.label} (seed {run.seed}) has no entry up to round {rounds}")
        return entries[-1].epsilon_composed, ledger.budget(dataset).delta, max(e.noise_multiplier for e in entries)


def completed(base: Path, run: Run) -> bool:
    """Whether ``run`` already completed in ``base`` (``--reuse``)."""
    result = run_dir(base, run) / "result.json"
    return result.is_file() and bool(json.loads(result.read_text(encoding="utf-8")).get("ok"))


def execute(runs: list[Run], base: Path, parallel: int, sites: int, patients: int, reuse: bool) -> None:
    """Run every federated training, with a rich progress bar; stop at the first failure."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stdout)  # bound now: simulate() captures sys.stdout during a run
    # Opacus (imported for planning) calls logging.basicConfig: without this, Flower's DEBUG log,
    # which simulate() sends to simulation.log, would also reach the terminal through the root logger
    logging.getLogger("flwr").propagate = False
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        overall = bar.add_task("federated trainings", total=len(runs))
        rounds = bar.add_task("", total=1)
        for run in runs:
            name = f"seed {run.seed}, {run.label}, {run.rounds} round(s)"
            if reuse and completed(base, run):
                bar.advance(overall)
                console.print(f"  {name}: reused", highlight=False)
                continue
            if reuse and run_dir(base, run).exists():  # an earlier attempt that failed: start it again
                shutil.rmtree(run_dir(base, run))
            bar.reset(rounds, total=run.rounds, description=f"  {name}: setting up")

            def on_event(kind: str, detail: str, name: str = name, total: int = run.rounds) -> None:
                if kind == "round" and int(detail) <= total:
                    bar.update(rounds, completed=int(detail) - 1, description=f"  {name}: round {detail}")
                elif kind == "round":
                    bar.update(rounds, completed=total, description=f"  {name}: final evaluation round")

            res = simulate(sites, run.rounds, patients=patients, seed=run.seed, out=run_dir(base, run),
                           epsilon=run.epsilon, parallel=parallel, on_event=on_event)
            if not res.ok:
                bar.stop()
                console.print(f"[bold red]FAILED[/] {name}: {res.message}", highlight=False)
                sys.exit(2)
            bar.advance(overall)
            console.print(f"  {name}: {res.total_seconds:.0f} s", highlight=False)


# ------------------------------------------------------------------------------------- scoring


def load_twin(path: Path, spec):  # noqa: ANN001, ANN201 - TwinSpec -> TwinModel
    """The global twin of a checkpoint written by the ServerApp."""
    from coordinator.server_app import read_checkpoint
    from fedtwin.twin import TwinModel, set_parameters

    model = TwinModel(spec)
    set_parameters(model, read_checkpoint(path)[2])
    model.eval()
    return model


def patient_nll(model, cohort) -> np.ndarray:  # noqa: ANN001 - TwinModel, CohortTensors
    """Per patient: the twin's NLL of every observed value (history + horizon), posterior mean, no sampling."""
    import torch

    from fedtwin.twin.batch import prepare_batch

    batch = prepare_batch(cohort, model.spec, model.norm)
    with torch.no_grad():
        terms = model.loss_terms(batch, sample=False)
    return (terms["forecast_nll"] + terms["history_nll"]).numpy().astype(np.float64)


def target_cohorts(base: Path, seeds: tuple[int, ...], any_run: dict[int, Run]) -> dict[int, tuple]:
    """Site 1's (members, non-members) per seed: its train and held-out splits (the hospitals of a seed are the same in every run)."""
    from fedtwin.extract.extractor import Extractor
    from fedtwin.omop import open_database
    from fedtwin.spec import load_spec
    from fedtwin.training.split import train_test_split

    spec = load_spec(SPEC)
    db = lambda s: run_dir(base, any_run[s]) / "hospitals" / f"site_{TARGET_SITE}.db"  # noqa: E731
    return {s: train_test_split(Extractor(open_database(str(db(s))), spec).extract()) for s in seeds}


def score(models: list[Model], sources: dict[str, dict[int, Path]], cohorts: dict[int, tuple]) -> None:
    """Fill every model's per-patient attack scores (higher = more likely a member).

    Each seed's twin of a configuration is scored on every seed's target cohort: on its own it is
    the attacked model, on the others' it is a reference that never saw those patients.
    """
    from fedtwin.spec import load_spec

    spec = load_spec(SPEC)
    for m in models:
        nll: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # (model seed, cohort seed) -> {"in", "out"}
        for r, path in sources[m.label].items():
            twin = load_twin(path, spec)
            for s, (members, non_members) in cohorts.items():
                nll[r, s] = {"in": patient_nll(twin, members), "out": patient_nll(twin, non_members)}
        m.scores["loss"] = {s: (-nll[s, s]["in"], -nll[s, s]["out"]) for s in cohorts}
        m.scores["calibrated"] = {
            s: tuple(np.mean([nll[r, s][k] for r in cohorts if r != s], axis=0) - nll[s, s][k] for k in ("in", "out"))
            for s in cohorts
        }


def pooled(per_seed: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([v[0] for v in per_seed.values()]), np.concatenate([v[1] for v in per_seed.values()]))


def bootstrap_ci(per_seed: dict[int, tuple[np.ndarray, np.ndarray]], reps: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile 95 % CI of the pooled AUROC, members and non-members resampled within each seed."""
    values = np.empty(reps)
    for b in range(reps):
        ins, outs = [], []
        for pos, neg in per_seed.values():
            ins.append(pos[rng.integers(0, pos.size, pos.size)])
            outs.append(neg[rng.integers(0, neg.size, neg.size)])
        values[b] = auroc(np.concatenate(ins), np.concatenate(outs))
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def evaluate(models: list[Model], reps: int, seed: int) -> list[Result]:
    """Every (model, attack): pooled AUROC, its CI, TPR at low FPR, the DP bounds and the verdict.

    The untrained control is (0, 0)-DP (it depends on no data), so its bound is 0.5; a CI above
    it is only a warning (chance, 2.5 % per attack), not a bug of the training.
    """
    rng = np.random.default_rng(seed)
    out = []
    for m in models:
        eps = 0.0 if m.kind == "control" else float(m.epsilon_spent or 0.0)
        delta = 0.0 if m.kind == "control" else m.delta
        bound, bound_low = max_auroc(eps, delta), float(max_tpr(LOW_FPR, eps, delta))
        for attack in ATTACKS:
            pos, neg = pooled(m.scores[attack])
            a = auroc(pos, neg)
            ci = bootstrap_ci(m.scores[attack], reps, rng)
            if m.kind == "dp":
                verdict = "BUG" if ci[0] > bound else "ok"
            elif m.kind == "control":
                verdict = "control?" if ci[0] > bound else "control"
            else:
                verdict = "leaks" if ci[0] > 0.5 else "reference"
            out.append(Result(m, attack, a, ci, tpr_at_fpr(pos, neg, LOW_FPR), bound, bound_low,
                              epsilon_lower_bound(ci[0], delta), verdict))
    return out


# ------------------------------------------------------------------------------------- reports


def plural(rounds: int) -> str:
    return f"{rounds} round{'' if rounds == 1 else 's'}"


def fmt_eps(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if x < 1e4 else f"{x:.0e}"


def print_table(results: list[Result], n_in: int, n_out: int, seeds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"membership inference on site {TARGET_SITE}: {n_in} members vs {n_out} held-out patients "
                        f"over {seeds} seeds (scores pooled)")
    for col in ("global twin", "rounds", "sigma", "eps spent", "attack", "AUROC [95% CI]", "bound", f"TPR@{LOW_FPR:.0%}FPR",
                "bound", "eps proven", "verdict"):
        table.add_column(col, justify="left" if col in ("global twin", "attack", "verdict") else "right")
    for r in results:
        m = r.model
        table.add_row(
            m.label, str(m.rounds), "-" if m.sigma is None else f"{m.sigma:.3g}",
            "0 (untrained)" if m.kind == "control" else fmt_eps(m.epsilon_spent), r.attack,
            f"{r.auroc:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}]", f"{r.bound:.4f}", f"{r.tpr_low:.3f}", f"{r.bound_tpr_low:.4f}",
            f"{r.epsilon_proven:.2f}", r.verdict,
        )
    Console(file=sys.stdout, width=200).print(table)


def markdown_table(results: list[Result]) -> str:
    lines = ["| global twin | rounds | sigma | epsilon spent | attack | AUROC [95 % CI] | max AUROC under DP | "
             f"TPR at {LOW_FPR:.0%} FPR | max under DP | epsilon proven | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.model
        eps = "0 (untrained)" if m.kind == "control" else fmt_eps(m.epsilon_spent)
        lines.append(f"| {m.label} | {m.rounds} | {'-' if m.sigma is None else f'{m.sigma:.3g}'} | {eps} | {r.attack} | "
                     f"{r.auroc:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}] | {r.bound:.4f} | {r.tpr_low:.3f} | {r.bound_tpr_low:.4f} | "
                     f"{r.epsilon_proven:.2f} | {r.verdict} |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    """Left: ROC curves of the calibrated attack with each epsilon's privacy region; right: AUROC vs epsilon and the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 6.2))
    colors = {1.0: "tab:green", 3.0: "tab:blue", 8.0: "tab:purple"}
    grid = np.linspace(0, 1, 801)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    for r in results:
        m = r.model
        if r.attack != "calibrated" or m.kind == "control":
            continue
        fpr, tpr = roc_curve(*pooled(m.scores[r.attack]))
        if m.kind == "dp":
            c = colors.get(float(m.epsilon_nominal or 0), "k")
            ax.plot(grid, max_tpr(grid, float(m.epsilon_spent), m.delta), color=c, ls="--", lw=1)
            ax.plot(fpr, tpr, color=c, lw=1.8, label=f"DP eps {m.epsilon_spent:.2f} ({plural(m.rounds)}): AUROC {r.auroc:.2f}")
        elif m.rounds == max(x.model.rounds for x in results):
            ax.plot(fpr, tpr, color="tab:red", lw=1.8, label=f"no DP ({plural(m.rounds)}): AUROC {r.auroc:.2f}")
    ax.set(xlabel="false-positive rate (non-members flagged)", ylabel="true-positive rate (members flagged)",
           title="calibrated attack; dashed: the most any attack can reach under the same (eps, delta)", xlim=(0, 1), ylim=(0, 1.01))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="lower right")

    xs = np.logspace(-1, math.log10(20), 200)
    delta = next((r.model.delta for r in results if r.model.kind == "dp"), 0.0)
    bx.plot(xs, [max_auroc(x, delta) for x in xs], color="k", lw=1.5, label=f"max AUROC under (eps, delta={delta:g})-DP")
    bx.axhline(0.5, color="0.7", lw=1, ls=":")
    marker = {"loss": "o", "calibrated": "s"}
    shift = {("dp", "loss"): 0.86, ("nodp", "loss"): 0.95, ("dp", "calibrated"): 1.05, ("nodp", "calibrated"): 1.16}
    nodp_by_rounds = {(r.model.rounds, r.attack): r for r in results if r.model.kind == "nodp"}
    longest = max(r.model.rounds for r in results)
    for r in results:
        m = r.model
        if m.kind != "dp":
            continue
        first = m.epsilon_nominal == EPSILONS[0]
        for kind, res, style in (("dp", r, {"color": "tab:blue"}), ("nodp", nodp_by_rounds.get((m.rounds, r.attack)), {"color": "tab:red", "mfc": "none"})):
            if res is None:
                continue
            label = (f"DP twin, {r.attack} attack" if kind == "dp" else f"no DP, same rounds, {r.attack} attack") if first else None
            bx.errorbar([float(m.epsilon_spent) * shift[kind, r.attack]], [res.auroc], yerr=[[res.auroc - res.ci[0]], [res.ci[1] - res.auroc]],
                        fmt=marker[r.attack], capsize=3, label=label, **style)
    long_ref = nodp_by_rounds.get((longest, "calibrated"))
    if long_ref is not None:
        bx.axhspan(long_ref.ci[0], long_ref.ci[1], color="tab:red", alpha=0.12, lw=0)
        bx.axhline(long_ref.auroc, color="tab:red", lw=1, ls="--",
                   label=f"no DP, {plural(longest)}, calibrated attack (95 % CI)")
    bx.set(xscale="log", xlabel="epsilon spent at site 1 (its ledger)", ylabel="attack AUROC (95 % bootstrap CI)",
           ylim=(0.3, 1.02), title="attack AUROC vs the DP bound")
    bx.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="independent federations per configuration (>= 2: each is the others' reference)")
    ap.add_argument("--first-seed", type=int, default=21, help="pilot runs on seeds below 20 chose the attacks: the default starts above them")
    ap.add_argument("--sites", type=int, default=2, help="hospitals in the federation (SecAgg+ needs 2)")
    ap.add_argument("--patients", type=int, default=100, help="patients per synthetic hospital (small: fewer patients leak more)")
    ap.add_argument("--no-dp-rounds", type=int, default=200, help="rounds of the no-DP run; also caps the DP runs' rounds")
    ap.add_argument("--parallel", type=int, default=2, help="ClientApps at once (Ray CPUs)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples per CI")
    ap.add_argument("--plot", type=Path, default=None, help="write the figure here (PNG)")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for docs/privacy-audit.md)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs here (new or empty folder; default: a temp folder, removed)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: do not train again the runs that completed there")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 80 patients, no-DP 12 rounds, 300 bootstrap resamples")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.patients, args.no_dp_rounds, args.bootstrap = 2, 80, 12, 300
    if args.seeds < 2:
        ap.error("--seeds must be at least 2: the calibrated attack uses the other seeds' twins as references")
    setting = Setting(args.sites, args.patients, tuple(range(args.first_seed, args.first_seed + args.seeds)),
                      args.no_dp_rounds, args.parallel, args.bootstrap)
    t_start = time.monotonic()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"privacy audit: {setting.sites} sites x {setting.patients} patients, seeds {list(setting.seeds)}, target site {TARGET_SITE}; "
          f"{platform.node()} cores={os.cpu_count()} load={load[0]:.1f}", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="fedtwin-privacy-audit-") if args.keep is None else None
    base = Path(tmp.name) if tmp else args.keep.resolve()
    if args.reuse and args.keep is None:
        ap.error("--reuse needs --keep DIR")
    if args.keep is not None and not args.reuse and base.exists() and any(base.iterdir()):
        ap.error(f"--keep {base}: must be a new or empty folder")
    try:
        scratch = base / "plan"
        sizes = sorted({n for s in setting.seeds for n in train_sizes(setting, s, scratch)})
        # every site must accept every round; not only the smallest binds: above 64 patients a site
        # takes 2 steps per round (sample rate < 1), so it needs more noise for the same epsilon
        rounds = {eps: min(admissible_rounds(n, eps, setting.no_dp_rounds, scratch) for n in sizes) for eps in EPSILONS}
        print(f"training splits per site: {min(sizes)}-{max(sizes)} patients; rounds FedTwin admits at every site "
              f"(cohort rule, noise calibrated for all rounds): " + ", ".join(f"eps {e:g}: {r}" for e, r in rounds.items()), flush=True)
        if any(r < 1 for r in rounds.values()):
            print("FAILED: some epsilon admits no round at this site size; raise --patients", flush=True)
            sys.exit(2)

        runs = [Run("no DP", NO_DP_EPSILON, setting.no_dp_rounds, s) for s in setting.seeds]
        runs += [Run(f"eps {e:g}", e, rounds[e], s) for e in sorted(EPSILONS, reverse=True) for s in setting.seeds]
        execute(runs, base, setting.parallel, setting.sites, setting.patients, args.reuse)

        nodp = {s: Run("no DP", NO_DP_EPSILON, setting.no_dp_rounds, s) for s in setting.seeds}
        models: list[Model] = [Model("initial twin (control)", "control", 0, None)]
        sources: dict[str, dict[int, Path]] = {"initial twin (control)": {s: checkpoint(base, nodp[s], 0) for s in setting.seeds}}
        for eps in EPSILONS:
            r = rounds[eps]
            label = f"no DP, {plural(r)}"
            if label not in sources:
                models.append(Model(label, "nodp", r, NO_DP_EPSILON))
                sources[label] = {s: checkpoint(base, nodp[s], r) for s in setting.seeds}
            dp = {s: Run(f"eps {eps:g}", eps, r, s) for s in setting.seeds}
            models.append(Model(f"DP eps {eps:g}", "dp", r, eps))
            sources[models[-1].label] = {s: checkpoint(base, dp[s], r) for s in setting.seeds}
        long_label = f"no DP, {plural(setting.no_dp_rounds)}"
        if long_label not in sources:
            models.append(Model(long_label, "nodp", setting.no_dp_rounds, NO_DP_EPSILON))
            sources[long_label] = {s: checkpoint(base, nodp[s], setting.no_dp_rounds) for s in setting.seeds}
        for m in models:
            if m.kind == "control":
                continue
            runs_of = {s: (nodp[s] if m.kind == "nodp" else Run(f"eps {m.epsilon_nominal:g}", float(m.epsilon_nominal), m.rounds, s))
                       for s in setting.seeds}
            figures = [ledger_figures(base, runs_of[s], m.rounds) for s in setting.seeds]
            m.epsilon_spent = max(f[0] for f in figures)
            m.delta = max(f[1] for f in figures)
            m.sigma = max(f[2] for f in figures)

        cohorts = target_cohorts(base, setting.seeds, nodp)
        score(models, sources, cohorts)
        results = evaluate(models, setting.bootstrap, setting.seeds[0])
    finally:
        if tmp:
            tmp.cleanup()

    n_in = sum(c[0].n_patients for c in cohorts.values())
    n_out = sum(c[1].n_patients for c in cohorts.values())
    print_table(results, n_in, n_out, len(setting.seeds))
    if args.markdown:
        print(markdown_table(results))
    if args.plot is not None:
        plot(results, args.plot)
        print(f"figure: {args.plot}")
    print(f"seconds: {time.monotonic() - t_start:.0f} (load at start {load[0]:.1f})")
    for r in results:
        if r.verdict == "control?":
            print(f"WARNING: the {r.attack} attack beats 0.5 on the untrained initial twin (CI lower end {r.ci[0]:.3f}): "
                  "chance (2.5 % per attack) or a flaw in the audit itself")
    dp = [r for r in results if r.model.kind == "dp"]
    bugs = [r for r in dp if r.verdict == "BUG"]
    for r in bugs:
        print(f"BUG: {r.model.label} ({r.model.rounds} rounds, epsilon spent {r.model.epsilon_spent:.3f}, delta {r.model.delta:g}): "
              f"{r.attack} attack AUROC {r.auroc:.3f}, CI lower end {r.ci[0]:.3f} > {r.bound:.3f}, the most (eps, delta)-DP allows: "
              "the privacy accounting or DP-SGD is broken")
    print(f"max_auroc_minus_bound {max(r.auroc - r.bound for r in dp):.3f}")
    if bugs:
        sys.exit(1)


if __name__ == "__main__":
    main()
