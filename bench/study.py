"""Consortium results: every way of training the twin, side by side on the same synthetic hospitals.

Usage::

    .venv/bin/python bench/study.py                    # the full run (3 seeds): writes docs/results.md + docs/img/results-*.png
    .venv/bin/python bench/study.py --quick            # 3-5 minute smoke run (1 seed, small sites); writes into a temp/--keep folder
    .venv/bin/python bench/study.py --seeds 1,2,3,4 --keep out/study
    .venv/bin/python bench/study.py --from-json out/study/results.json   # re-render the doc from a finished run

Why this exists: docs/benchmarks.md measures pieces (a central twin, DP overhead, SecAgg+ rounds);
a consortium wants ONE table that says what federation costs and buys against the alternatives, on
the same patients, scored the same way. Protocol (also written into the doc):

1. Per seed, ``fedtwin synth`` writes 4 hospitals of unequal size and case mix (the fixed presets of
   sites 1-4; site 3, the smallest, holds 40 % American Indian patients: most of that minority).
2. Every site splits its cohort by the fixed person-id rule (:mod:`fedtwin.training.split`), exactly
   as its site agent does in a round. Every arm is scored on the same held-out patients: each site
   scores its own split and the sites' additive statistics are ADDED, as SecAgg+ adds them
   (:func:`fedtwin.evaluation.site_statistics`, :func:`fedtwin.evaluation.evaluation_report`).
3. Arms (all twins start from the same initial parameters, ``torch.manual_seed(seed)``, and train at
   the same batch and rate; non-private twins make ``rounds x max(local_epochs)`` passes over their
   data; a federated arm with DP uses the most local epochs of ``local_epochs`` that FedTwin's
   noise-to-signal rule accepts at every site, as a consortium must):

   * ``oracle``: the simulator's own expectation (:mod:`fedtwin.evaluation.oracle`);
   * ``central``: one twin on the pooled train splits, plain Adam, no DP (the upper bound), and
     ``central_dpsgd``: the same patients through the DP-SGD code path with negligible noise
     (separates what per-patient clipping costs from what federating costs);
   * ``fed_*``: FedTwin's own ServerApp/ClientApp in Flower's simulation engine with SecAgg+
     (:func:`coordinator.simulate.simulate` on the very same databases), DP-SGD at every site with
     its ledger; ``fed_nodp`` is the same code with a per-site epsilon of 1e6, whose calibrated
     noise multiplier (read back from the sites' ledgers) is negligible while clipping stays on;
   * ``local_*``: every site trains alone on its own train split and is scored on its own held-out
     patients, without DP and with the DP-SGD noise its site would use at epsilon 3 in the federation;
   * baselines fitted on the pooled train splits: ``persistence`` and ``mechanistic_only`` (the
     central twin with its residual off).

The last printed line is the headline: ``dp3_rmse_vs_central R`` (federated epsilon 3 forecast RMSE
over centralized, geometric mean over the 5 variables, mean over seeds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is run as a script; coordinator/ lives at the repo root
    sys.path.insert(0, str(REPO))

SPEC = REPO / "specs" / "icu-hemodynamics.yaml"
DOC = REPO / "docs" / "results.md"
IMG = REPO / "docs" / "img"
DELTA = 1e-5  # init_consortium's per-site delta
ACCOUNTANT = "rdp"  # the ledger's default
NO_DP_EPSILON = 1e6  # "federated without DP": the real DP-SGD code path with negligible noise (see module docs)
MINORITY = "race=american_indian"
SUPPRESSION = 10  # the spec's threshold: what a consortium would publish
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What one run trains and scores. ``sizes[k]`` = patients at site k+1 (presets 1-4)."""

    seeds: tuple[int, ...] = (1, 2, 3)
    sizes: tuple[int, ...] = (720, 450, 300, 540)
    rounds: int = 10
    local_epochs: tuple[float, ...] = (3.0, 2.0, 1.0)  # per round; the first every site's DP plan accepts
    batch_size: int = 128
    lr: float = 3e-3
    clip: float = 1.0
    epsilons: tuple[float, ...] = (8.0, 3.0, 1.0)
    local_epsilon: float = 3.0
    samples: int = 32
    parallel: int = 2

    @property
    def epochs(self) -> int:
        """Passes over its data of every non-private twin: the federation's rounds x its most local epochs."""
        return max(1, round(self.rounds * max(self.local_epochs)))

    @property
    def smallest(self) -> int:
        """Index of the smallest site (0-based)."""
        return int(np.argmin(self.sizes))


QUICK = Settings(seeds=(1,), sizes=(200, 130, 90, 150), rounds=2, local_epochs=(1.0,), batch_size=64, epsilons=(3.0,), samples=8)


def fed_name(eps: float) -> str:
    return "fed_nodp" if eps >= NO_DP_EPSILON else f"fed_eps{eps:g}"


def arm_names(s: Settings) -> list[str]:
    """Row order of every table."""
    return (["oracle", "central", "central_dpsgd", fed_name(NO_DP_EPSILON)] + [fed_name(e) for e in sorted(s.epsilons, reverse=True)]
            + ["local_nodp", f"local_eps{s.local_epsilon:g}", "mechanistic_only", "persistence"])


LABELS = {
    "oracle": "oracle (simulator)", "central": "centralized, no DP", "central_dpsgd": "centralized, DP-SGD path, eps 1e6",
    "fed_nodp": "federated, no DP (eps 1e6)",
    "local_nodp": "local-only, no DP", "mechanistic_only": "mechanistic-only", "persistence": "persistence",
}


def label(arm: str) -> str:
    if arm in LABELS:
        return LABELS[arm]
    m = re.fullmatch(r"(fed|local)_eps([\d.]+)", arm)
    if m:
        return f"{'federated' if m.group(1) == 'fed' else 'local-only'}, DP eps {m.group(2)}"
    return arm


# --------------------------------------------------------------------------------------- one seed


@dataclass
class SiteData:
    """One hospital's cohort, split as its site agent splits it."""

    name: str
    train: Any  # CohortTensors
    test: Any
    matched: Any  # MatchedTruth of the test patients


@dataclass
class SeedData:
    seed: int
    hospitals: Path
    spec: Any
    truth: Any  # GroundTruth of all sites
    sites: list[SiteData]
    layout_twin: Any  # EvaluationLayout scoring the twin only
    layout_full: Any  # twin + mechanistic_only + persistence
    effect_pairs: list[tuple[str, str]]  # (plan, variable) the plan's drugs act on per the spec

    @property
    def pooled_train(self):  # noqa: ANN201 - CohortTensors
        from fedtwin.extract.extractor import concat

        return concat([s.train for s in self.sites])


def prepare_seed(seed: int, s: Settings, folder: Path) -> SeedData:
    """Synthesize the hospitals (or reuse them under --keep) and extract every site's split."""
    from fedtwin.evaluation import EvaluationLayout, GroundTruth, match_truth
    from fedtwin.extract.extractor import Extractor
    from fedtwin.omop import open_database
    from fedtwin.spec import load_spec
    from fedtwin.synth import SynthRequest, synthesize
    from fedtwin.training.split import train_test_split

    spec = load_spec(SPEC)
    hospitals = folder / "hospitals"
    if not (hospitals / "ground_truth" / "manifest.json").is_file():
        shutil.rmtree(hospitals, ignore_errors=True)
        synthesize(SynthRequest(sites=len(s.sizes), patients=sum(s.sizes) // len(s.sizes), seed=seed, out=hospitals,
                                sizes=list(s.sizes), workers=min(2, s.parallel)))
    truth = GroundTruth.load(hospitals)
    sites = []
    for k in range(1, len(s.sizes) + 1):
        cohort = Extractor(open_database(str(hospitals / f"site_{k}.db")), spec).extract()
        train, test = train_test_split(cohort)
        h = test.history_steps
        matched = match_truth(truth, spec, test.person_ids, np.asarray(test.doses[:, h:]), truth.alternatives)
        sites.append(SiteData(f"site_{k}", train, test, matched))
    pairs = []
    for j, plan in enumerate(truth.plan_names):
        if plan == "recorded":
            continue
        changed = np.any(truth.plan_doses[:, j] != truth.plan_doses[:, 0], axis=(0, 1))
        drugs = {spec.intervention_names[d] for d in np.flatnonzero(changed)}
        pairs += [(plan, v) for v in spec.state_names if any(v in iv.affects for iv in spec.interventions if iv.name in drugs)]
    return SeedData(
        seed, hospitals, spec, truth, sites,
        EvaluationLayout.for_spec(spec, models=("twin",), plans=truth.alternatives),
        EvaluationLayout.for_spec(spec, models=("twin", "mechanistic_only", "persistence"), plans=truth.alternatives),
        pairs,
    )


def new_twin(spec, seed: int):  # noqa: ANN001, ANN201 - TwinSpec -> TwinModel
    """The initial twin every arm starts from: what ``simulate`` writes as checkpoint round 0."""
    import torch

    from fedtwin.twin import TwinModel

    torch.manual_seed(seed)
    return TwinModel(spec)


def dp_sampling(n_train: int, s: Settings, local_epochs: float) -> tuple[float, int]:
    """(Poisson rate, total steps) a site takes over the whole federated training: the formula of
    :func:`fedtwin.training.privacy_plan.plan_federated_round` (``ceil(epochs / q)`` per round)."""
    q = min(1.0, s.batch_size / max(n_train, 1))
    return q, max(1, math.ceil(local_epochs / q)) * s.rounds


def dp_plan(n_train: int, s: Settings, epsilon: float, local_epochs: float) -> dict[str, float]:
    """What a site's ledger would calibrate for a fresh training: sigma, rate, steps, noise-to-signal."""
    from fedtwin.privacy.accounting import calibrate_noise_multiplier, noise_to_signal

    q, steps = dp_sampling(n_train, s, local_epochs)
    sigma = calibrate_noise_multiplier(prior=[], sample_rate=q, steps=steps, target_epsilon=epsilon, delta=DELTA, accountant=ACCOUNTANT)
    return {"sigma": sigma, "sample_rate": q, "steps": steps, "noise_to_signal": noise_to_signal(sigma, q * n_train)}


def local_epochs_for(d: SeedData, s: Settings, epsilon: float) -> float:
    """The most local epochs per round (of ``s.local_epochs``) whose DP plan passes FedTwin's
    noise-to-signal rule (:data:`fedtwin.privacy.accounting.MAX_NOISE_TO_SIGNAL`) at EVERY site.

    Why: at a fixed epsilon more steps need more noise, and a site refuses a round whose noise
    would swamp learning; a consortium at a small epsilon therefore has to train less. Without
    this, the smallest site would refuse every round at epsilon 1 and the row would be a
    federation without it (the run still shows refusals if no choice passes).
    """
    from fedtwin.privacy.accounting import MAX_NOISE_TO_SIGNAL

    ladder = sorted(s.local_epochs, reverse=True)
    for e in ladder:
        if all(dp_plan(st.train.n_patients, s, epsilon, e)["noise_to_signal"] <= MAX_NOISE_TO_SIGNAL for st in d.sites):
            return e
    return ladder[-1]


def train_plain(model, data, s: Settings, seed: int, epochs: int) -> float:  # noqa: ANN001
    """Non-private training (Adam, the study's batch and rate); returns seconds."""
    from fedtwin.twin import FitConfig, fit

    t0 = time.perf_counter()
    fit(model, data, FitConfig(epochs=epochs, batch_size=s.batch_size, lr=s.lr, seed=seed))
    return time.perf_counter() - t0


def train_private(model, data, s: Settings, plan: dict[str, float], seed: int) -> float:  # noqa: ANN001
    """DP-SGD with the given plan (:func:`dp_plan`): Poisson rate, steps, noise; returns seconds."""
    from fedtwin.twin import DPSettings, FitConfig, fit

    t0 = time.perf_counter()
    fit(model, data, FitConfig(batch_size=s.batch_size, lr=s.lr, seed=seed),
        DPSettings(noise_multiplier=plan["sigma"], max_grad_norm=s.clip, sample_rate=plan["sample_rate"], steps=int(plan["steps"]),
                   accountant=ACCOUNTANT, delta=DELTA, seed=seed))
    return time.perf_counter() - t0


def run_federated(d: SeedData, s: Settings, epsilon: float, local_epochs: float, out: Path,
                  on_event: Callable[[str, str], None]) -> tuple[Any, float, dict]:
    """FedTwin's federation (SecAgg+, DP-SGD per site) on the seed's hospitals; (model or None, seconds, info)."""
    from coordinator.simulate import simulate
    from fedtwin.privacy.ledger import PrivacyLedger
    from fedtwin.twin import set_parameters

    shutil.rmtree(out, ignore_errors=True)
    res = simulate(len(s.sizes), s.rounds, seed=d.seed, out=out, hospitals=d.hospitals, epsilon=epsilon, parallel=s.parallel,
                   training={"local-epochs": local_epochs, "batch-size": s.batch_size, "learning-rate": s.lr,
                             "max-grad-norm": s.clip, "evaluate": False},
                   on_event=on_event)
    sigmas: dict[str, float] = {}
    for k in range(1, len(s.sizes) + 1):
        path = out / "consortium" / "privacy" / f"site_{k}.ledger.sqlite"
        if path.is_file():
            with PrivacyLedger.open(path, read_only=True) as ledger:
                for ds in ledger.datasets():
                    blocks = ledger.history(ds)
                    if blocks:
                        sigmas[f"site_{k}"] = float(blocks[-1].noise_multiplier)
    info = {"ok": res.ok, "message": res.message, "local_epochs": local_epochs, "sites_per_round": [r.sites for r in res.rounds],
            "status": [r.status for r in res.rounds], "sigma": sigmas, "round_seconds": [round(r.seconds, 1) for r in res.rounds],
            "setup_seconds": res.setup_seconds, "engine_seconds": res.run_seconds}
    model = None
    if res.final_path is not None and res.final_path.is_file() and any(st == "completed" for st in info["status"]):
        model = new_twin(d.spec, d.seed)
        with np.load(res.final_path) as z:
            set_parameters(model, [z[k] for k in sorted(z.files)])
    return model, res.total_seconds, info


# --------------------------------------------------------------------------------------- scoring


def score_model(model, d: SeedData, s: Settings, layout, sites: Iterable[int] | None = None, baselines=None) -> list:  # noqa: ANN001
    """Per-site additive statistics of ``model`` on each site's held-out split (None for sites not scored)."""
    from fedtwin.evaluation import EvaluationConfig, site_statistics

    cfg = EvaluationConfig(n_samples=s.samples, seed=d.seed)
    keep = set(range(len(d.sites)) if sites is None else sites)
    return [site_statistics(model, st.test, layout, baselines, st.matched, cfg) if k in keep else None
            for k, st in enumerate(d.sites)]


def score_oracle(d: SeedData) -> list:
    """Per-site statistics of the simulator's expectation, through the same statistics as a twin."""
    from fedtwin.evaluation.oracle import oracle_statistics, outcome_risk

    risk = outcome_risk(d.truth, d.spec.outcome_names)
    return [oracle_statistics(d.truth, d.spec, st.test, d.layout_twin, st.matched, risk=risk) for st in d.sites]


def total(stats: list) -> Any:
    """The sum of the sites' statistics: what SecAgg+ would hand the coordinator."""
    present = [x for x in stats if x is not None]
    acc = present[0]
    for x in present[1:]:
        acc = acc + x
    return acc


def _value(metrics: dict, key: str) -> float:
    cell = metrics.get(key)
    return float(cell["value"]) if isinstance(cell, dict) and cell.get("value") is not None else math.nan


@dataclass
class Reports:
    """Reports of one arm's statistics.

    ``total``: the sites' sum, unsuppressed (threshold 1), with per-bin cells and subgroups: the
    data are synthetic, and a per-bin or small-site cell hidden by suppression would make a row's
    figure undefined. ``published``: the same sum at the spec's threshold, for the fairness summary
    a consortium would publish (worst subgroup and gap over subgroups with enough events).
    ``sites``: each site's own patients (what a site sees of its own; unsuppressed).
    """

    total: dict
    published: dict
    sites: list[dict | None]


def reports(stats_per_site: list) -> Reports:
    from fedtwin.evaluation import evaluation_report

    tot = total(stats_per_site)
    return Reports(
        evaluation_report(tot, suppression_threshold=1, subgroups=True, cells=True),
        evaluation_report(tot, suppression_threshold=SUPPRESSION, subgroups=True, cells=False),
        [evaluation_report(x, suppression_threshold=1, subgroups=False, cells=False) if x is not None else None for x in stats_per_site],
    )


def numbers(rep: dict, published: dict | None, d: SeedData, model: str, *, cells: bool) -> dict[str, Any]:
    """The flat figures the tables need, from one unsuppressed report.

    With ``published`` (the twin slot only): the worst published subgroup (any subgroup with at
    least ``SUPPRESSION`` events and non-events), the gap across published subgroups, and the
    unsuppressed AUROC of the minority subgroup (a synthetic-data diagnostic a consortium would
    not publish: too few events).
    """
    spec = d.spec
    m = rep["metrics"]
    out: dict[str, Any] = {"n": rep["cohort"]["n_patients"]}
    steps = ([f"h{h:02d}" for h in range(1, spec.time.horizon_steps + 1)] if cells else []) + ["all"]
    for v in spec.state_names:
        for step in steps:
            out[f"rmse.{v}.{step}"] = _value(m, f"rmse.{v}.{step}.{model}")
    out["nll"] = _value(m, f"nll.all.all.{model}")
    out["cov90"] = _value(m, f"coverage90.all.all.{model}")
    out["cov50"] = _value(m, f"coverage50.all.all.{model}")
    for o in spec.outcome_names:
        for k in ("auroc", "ece", "oe_ratio"):
            out[f"{k}.{o}"] = _value(m, f"{k}.{o}.{model}")
    for plan, v in d.effect_pairs:
        out[f"effect.{plan}.{v}"] = _value(m, f"effect_rmse.{plan}.{v}.all.{model}")
    if published is not None:
        for o in spec.outcome_names:
            g = published["fairness"]["auroc"][o]["any"]
            out[f"worst_auroc.{o}"] = g["worst"] if g["worst"] is not None else math.nan
            out[f"worst_group.{o}"] = g["worst_group"]
            out[f"gap.{o}"] = g["gap"] if g["gap"] is not None else math.nan
            out[f"groups.{o}"] = g["groups"]
        sub = rep["subgroups"].get(MINORITY, {})
        out["minority_n"] = sub.get("n_patients")
        for o in spec.outcome_names:
            cell = sub.get("metrics", {}).get(f"auroc.{o}.{model}")
            out[f"minority_auroc.{o}"] = float(cell["value"]) if isinstance(cell, dict) and cell.get("value") is not None else math.nan
            out[f"minority_events.{o}"] = cell.get("n_events") if isinstance(cell, dict) else None
    return out


def arm_record(reps: Reports, d: SeedData, model: str, seconds: float, info: dict | None = None) -> dict:
    """One arm of one seed: totals over the sites (fairness for the twin slot) and every scored site."""
    twin = model == "twin"
    return {
        "total": numbers(reps.total, reps.published if twin else None, d, model, cells=True),
        "sites": [numbers(r, None, d, model, cells=False) if r is not None else None for r in reps.sites],
        "seconds": seconds,
        "info": info or {},
    }


def run_seed(seed: int, s: Settings, folder: Path, advance: Callable[[str], None], on_sim: Callable[[str, str], None]) -> dict:
    """Every arm on one seed's hospitals; returns the seed's JSON-ready record."""
    from fedtwin.evaluation import EvaluationConfig, fit_baselines

    folder.mkdir(parents=True, exist_ok=True)
    t_seed = time.perf_counter()
    advance(f"seed {seed}: synthesizing and extracting the hospitals")
    d = prepare_seed(seed, s, folder)
    arms: dict[str, dict] = {}

    advance(f"seed {seed}: oracle")
    t0 = time.perf_counter()
    arms["oracle"] = arm_record(reports(score_oracle(d)), d, "twin", 0.0, {"scoring_seconds": time.perf_counter() - t0})

    pooled = d.pooled_train
    advance(f"seed {seed}: centralized twins ({s.epochs} epochs on {pooled.n_patients} patients; plain and DP-SGD path)")
    clipped = new_twin(d.spec, seed)
    plan = dp_plan(pooled.n_patients, replace(s, rounds=1), NO_DP_EPSILON, float(s.epochs))  # s.epochs passes as one "round"
    secs = train_private(clipped, pooled, s, plan, seed)
    arms["central_dpsgd"] = arm_record(reports(score_model(clipped, d, s, d.layout_twin)), d, "twin", secs, plan)
    central = new_twin(d.spec, seed)
    secs = train_plain(central, pooled, s, seed, s.epochs)
    base = fit_baselines(central, pooled, d.layout_full.models, EvaluationConfig(n_samples=s.samples, seed=seed))
    full = reports(score_model(central, d, s, d.layout_full, baselines=base))
    arms["central"] = arm_record(full, d, "twin", secs)
    arms["mechanistic_only"] = arm_record(full, d, "mechanistic_only", secs, {"note": "the centralized twin with its residual off"})
    arms["persistence"] = arm_record(full, d, "persistence", 0.0, {"note": "std per horizon bin from the pooled train splits"})

    schedule = {eps: local_epochs_for(d, s, eps) for eps in [NO_DP_EPSILON, *s.epsilons]}
    for eps in [NO_DP_EPSILON, *sorted(s.epsilons, reverse=True)]:
        name = fed_name(eps)
        advance(f"seed {seed}: {label(name)} ({s.rounds} rounds x {schedule[eps]:g} local epochs, Flower simulation, SecAgg+)")
        model, secs, info = run_federated(d, s, eps, schedule[eps], folder / name, on_sim)
        if model is None:
            arms[name] = {"total": None, "sites": [None] * len(d.sites), "seconds": secs, "info": info}
            continue
        arms[name] = arm_record(reports(score_model(model, d, s, d.layout_twin)), d, "twin", secs, info)

    for name, eps in (("local_nodp", None), (f"local_eps{s.local_epsilon:g}", s.local_epsilon)):
        advance(f"seed {seed}: {label(name)} (each site alone)")
        per_site, secs, info = [], 0.0, {}
        for k, st in enumerate(d.sites):
            model = new_twin(d.spec, seed)
            if eps is None:
                secs += train_plain(model, st.train, s, seed, s.epochs)
            else:  # exactly the site's plan in the federated arm at this epsilon
                info[st.name] = dp_plan(st.train.n_patients, s, eps, schedule.get(eps, local_epochs_for(d, s, eps)))
                secs += train_private(model, st.train, s, info[st.name], seed)
            per_site.append(score_model(model, d, s, d.layout_twin, sites=[k])[k])
        arms[name] = arm_record(reports(per_site), d, "twin", secs, info)

    return {"seed": seed, "arms": arms, "seconds": time.perf_counter() - t_seed,
            "cohort": [{"site": st.name, "train": st.train.n_patients, "test": st.test.n_patients,
                        "events_test": {o: int(np.asarray(st.test.outcome_event)[:, i].sum()) for i, o in enumerate(d.spec.outcome_names)}}
                       for st in d.sites],
            "effect_pairs": d.effect_pairs, "variables": list(d.spec.state_names), "outcomes": list(d.spec.outcome_names)}


# ---------------------------------------------------------------------------------- aggregation


def geo_ratio(a: dict, b: dict, keys: list[str]) -> float:
    """Geometric mean of a[k] / b[k]: how the benchmark pools errors in different units."""
    vals = [(a.get(k, math.nan), b.get(k, math.nan)) for k in keys]
    if not vals or any(not (math.isfinite(x) and math.isfinite(y)) or y <= 0 or x < 0 for x, y in vals):
        return math.nan
    if any(x == 0 for x, _ in vals):
        return 0.0
    return math.exp(sum(math.log(x / y) for x, y in vals) / len(vals))


def derived(seed_rec: dict, arm: str, smallest: int) -> dict[str, float] | None:
    """Figures of one arm in one seed that need another arm of the same seed (persistence, central)."""
    arms = seed_rec["arms"]
    rec = arms.get(arm)
    if rec is None or rec["total"] is None:
        return None
    t, pers, cen = rec["total"], arms["persistence"]["total"], arms["central"]["total"]
    vs = seed_rec["variables"]
    out: dict[str, float] = {k: v for k, v in t.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["rel.all"] = geo_ratio(t, pers, [f"rmse.{v}.all" for v in vs])
    for h in range(1, 13):
        out[f"rel.h{h:02d}"] = geo_ratio(t, pers, [f"rmse.{v}.h{h:02d}" for v in vs])
    out["vs_central"] = geo_ratio(t, cen, [f"rmse.{v}.all" for v in vs])
    pairs = [f"effect.{p}.{v}" for p, v in seed_rec["effect_pairs"]]
    out["effect_rel"] = geo_ratio(t, pers, pairs)
    for k, site in enumerate(rec["sites"]):
        ps = arms["persistence"]["sites"][k]
        if site is not None and ps is not None:
            out[f"site{k + 1}.rel"] = geo_ratio(site, ps, [f"rmse.{v}.all" for v in vs])
    out["seconds"] = float(rec["seconds"])
    return out


def site_ratio(seed_rec: dict, a: str, b: str, k: int) -> float:
    """RMSE of arm a over arm b on site k's held-out patients (geometric mean over variables)."""
    ra, rb = seed_rec["arms"].get(a), seed_rec["arms"].get(b)
    if not ra or not rb or ra["total"] is None or rb["total"] is None or ra["sites"][k] is None or rb["sites"][k] is None:
        return math.nan
    return geo_ratio(ra["sites"][k], rb["sites"][k], [f"rmse.{v}.all" for v in seed_rec["variables"]])


@dataclass
class Stat:
    mean: float
    sd: float
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, xs: Iterable[float]) -> "Stat":
        vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
        if not vals:
            return cls(math.nan, math.nan, 0, [])
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan, len(vals), vals)


def fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def pm(st: Stat, digits: int = 3, runs: int | None = None) -> str:
    """mean +- sd over seeds; the number of seeds when some had no value."""
    if st.n == 0:
        return "n/a"
    s = fmt(st.mean, digits) + (f" ± {fmt(st.sd, digits)}" if math.isfinite(st.sd) else "")
    return s + (f" (n={st.n})" if runs is not None and st.n < runs else "")


class Summary:
    """Mean and spread over seeds of every figure of every arm."""

    def __init__(self, results: dict) -> None:
        self.results = results
        self.settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["settings"].items()})
        self.seeds = results["seeds"]
        self.arms = arm_names(self.settings)
        self.smallest = self.settings.smallest
        self.derived = {a: [derived(sr, a, self.smallest) for sr in self.seeds] for a in self.arms}

    @property
    def runs(self) -> int:
        return len(self.seeds)

    def stat(self, arm: str, key: str) -> Stat:
        return Stat.of((x or {}).get(key, math.nan) for x in self.derived[arm])

    def raw(self, arm: str, key: str) -> list[Any]:
        return [(sr["arms"].get(arm) or {}).get("total", {}) and sr["arms"][arm]["total"].get(key) for sr in self.seeds]

    def site_ratio(self, a: str, b: str, k: int) -> Stat:
        return Stat.of(site_ratio(sr, a, b, k) for sr in self.seeds)

    def fed_arms(self) -> list[str]:
        return [a for a in self.arms if a.startswith("fed_")]

    def local_dp(self) -> str:
        return f"local_eps{self.settings.local_epsilon:g}"


# ------------------------------------------------------------------------------------------ targets


@dataclass
class Target:
    text: str
    measured: str
    met: bool | None  # None: could not be measured


def targets(sm: Summary) -> list[Target]:
    """The issue's targets, judged on the means over seeds (per-seed values in ``measured``)."""
    out: list[Target] = []
    dp = "fed_eps3" if "fed_eps3" in sm.arms else (sm.fed_arms()[-1] if sm.fed_arms() else None)
    small = sm.smallest
    outcomes = sm.seeds[0]["outcomes"]
    if dp is not None:
        r = sm.stat(dp, "vs_central")
        out.append(Target(f"{label(dp)} within 10 % of centralized on forecast RMSE (ratio <= 1.10)",
                          f"ratio {pm(r)} (seeds: {', '.join(fmt(v) for v in r.values)})",
                          None if r.n == 0 else r.mean <= 1.10))
        diffs = []
        for o in outcomes:
            dd = Stat.of((x or {}).get(f"auroc.{o}", math.nan) - (c or {}).get(f"auroc.{o}", math.nan)
                         for x, c in zip(sm.derived[dp], sm.derived["central"]))
            diffs.append((o, dd))
        out.append(Target(f"{label(dp)} within 0.02 AUROC of centralized (every outcome; fed - central >= -0.02)",
                          "; ".join(f"{o}: {fmt(dd.mean, 3)} ± {fmt(dd.sd, 3)} (fed - central)" for o, dd in diffs),
                          None if any(dd.n == 0 for _, dd in diffs) else all(dd.mean >= -0.02 for _, dd in diffs)))
    for fed, loc in (("fed_nodp", "local_nodp"), (dp, sm.local_dp())):
        if fed is None:
            continue
        r = sm.site_ratio(fed, loc, small)
        gain = Stat.of(1 - v for v in r.values)
        out.append(Target(f"{label(fed)} beats {label(loc)} at the smallest site (site {small + 1}) by >= 25 % on forecast RMSE",
                          f"RMSE reduction {pm(gain)} (fed / local RMSE {pm(r)})", None if r.n == 0 else gain.mean >= 0.25))
    if dp is not None:
        gaps = [(o, sm.stat(dp, f"gap.{o}")) for o in outcomes]
        out.append(Target(f"{label(dp)}: worst-subgroup AUROC gap <= 0.05 (published subgroups, every outcome)",
                          "; ".join(f"{o}: gap {pm(g)}" for o, g in gaps),
                          None if any(g.n == 0 for _, g in gaps) else all(g.mean <= 0.05 for _, g in gaps)))
    return out


def verdict(t: Target) -> str:
    return "**met**" if t.met else ("not measured" if t.met is None else "**not met**")


# ------------------------------------------------------------------------------------------ tables


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def forecast_table(sm: Summary) -> str:
    bins = [1, 3, 6, 12]
    head = ["arm"] + [f"RMSE rel. h{h}" for h in bins] + ["RMSE rel. 1-12 h", "RMSE / centralized", "NLL", "90 % coverage", "train wall s"]
    rows = []
    for a in sm.arms:
        st = lambda k: sm.stat(a, k)  # noqa: E731
        secs = st("seconds")
        rows.append([label(a)] + [pm(st(f"rel.h{h:02d}")) for h in bins] + [pm(st("rel.all"), runs=sm.runs), pm(st("vs_central")),
                     pm(st("nll")), pm(st("cov90")), "-" if a in ("oracle", "persistence") else f"{secs.mean:.0f}"])
    return md_table(head, rows)


def outcome_table(sm: Summary) -> str:
    outcomes = sm.seeds[0]["outcomes"]
    head = ["arm"]
    for o in outcomes:
        head += [f"AUROC {o}", f"ECE {o}", f"O/E {o}"]
    head += ["what-if effect error rel.", "worst-subgroup AUROC death", "gap death", "worst-subgroup AUROC aki", "gap aki"]
    rows = []
    for a in sm.arms:
        st = lambda k: sm.stat(a, k)  # noqa: E731
        row = [label(a)]
        for o in outcomes:
            row += [pm(st(f"auroc.{o}")), pm(st(f"ece.{o}")), pm(st(f"oe_ratio.{o}"))]
        row += [pm(st("effect_rel"))]
        for o in outcomes:
            row += [pm(st(f"worst_auroc.{o}")), pm(st(f"gap.{o}"))]
        rows.append(row)
    return md_table(head, rows)


def variable_table(sm: Summary) -> str:
    vs = sm.seeds[0]["variables"]
    units = {"heart_rate": "/min", "map": "mm[Hg]", "glucose": "mg/dL", "creatinine": "mg/dL", "lactate": "mmol/L"}
    head = ["arm"] + [f"{v} ({units.get(v, '')})" for v in vs]
    rows = [[label(a)] + [pm(sm.stat(a, f"rmse.{v}.all")) for v in vs] for a in sm.arms]
    return md_table(head, rows)


def effect_table(sm: Summary) -> str:
    pairs = sm.seeds[0]["effect_pairs"]
    shown = [a for a in sm.arms if a != "oracle"]
    head = ["plan", "variable"] + [label(a).replace("persistence", "no effect (persistence)") for a in shown]
    rows = [[p, v] + [pm(sm.stat(a, f"effect.{p}.{v}")) for a in shown] for p, v in pairs]
    return md_table(head, rows)


def fairness_table(sm: Summary) -> str:
    outcomes = sm.seeds[0]["outcomes"]
    twins = [a for a in sm.arms if a not in ("mechanistic_only", "persistence")]
    head = ["arm"] + [f"worst published group {o} (per seed)" for o in outcomes] + [f"AUROC {MINORITY} {o} (unsuppressed)" for o in outcomes] + ["minority patients / deaths / AKIs (per seed)"]
    rows = []
    for a in twins:
        row = [label(a)]
        for o in outcomes:
            row.append(", ".join(g if isinstance(g, str) else "none published" for g in sm.raw(a, f"worst_group.{o}")))
        for o in outcomes:
            row.append(pm(sm.stat(a, f"minority_auroc.{o}")))
        ns = sm.raw(a, "minority_n")
        ev = [sm.raw(a, f"minority_events.{o}") for o in outcomes]
        row.append(", ".join(f"{n}/{'/'.join(str(e[i]) for e in ev)}" for i, n in enumerate(ns)))
        rows.append(row)
    return md_table(head, rows)


def site_table(sm: Summary) -> str:
    s = sm.settings
    cmp_arms = ["local_nodp", sm.local_dp(), "fed_nodp"] + (["fed_eps3"] if "fed_eps3" in sm.arms else []) + ["central"]
    head = ["site", "patients", "train / test (seed mean)"] + [f"{label(a)}: RMSE rel." for a in cmp_arms] + ["fed no DP / local no DP", "fed DP / local DP"]
    rows = []
    dp = "fed_eps3" if "fed_eps3" in sm.arms else sm.fed_arms()[-1]
    for k, n in enumerate(s.sizes):
        tr = statistics.fmean(sr["cohort"][k]["train"] for sr in sm.seeds)
        te = statistics.fmean(sr["cohort"][k]["test"] for sr in sm.seeds)
        name = f"site {k + 1}" + (" (smallest; 40 % American Indian)" if k == s.smallest else "")
        rows.append([name, str(n), f"{tr:.0f} / {te:.0f}"] + [pm(sm.stat(a, f"site{k + 1}.rel")) for a in cmp_arms]
                    + [pm(sm.site_ratio("fed_nodp", "local_nodp", k)), pm(sm.site_ratio(dp, sm.local_dp(), k))])
    return md_table(head, rows)


def dp_table(sm: Summary) -> str:
    s = sm.settings
    head = (["arm", "per-site epsilon", "local epochs per round"] + [f"sigma site {k + 1}" for k in range(len(s.sizes))]
            + ["rounds completed (sites per round)", "s per round (mean)", "arm wall s"])
    rows = []
    for a in sm.fed_arms():
        sig = []
        for k in range(len(s.sizes)):
            vals = [((sr["arms"][a].get("info") or {}).get("sigma") or {}).get(f"site_{k + 1}") for sr in sm.seeds]
            sig.append(pm(Stat.of(v for v in vals if v is not None), 3))
        info = [sr["arms"][a].get("info") or {} for sr in sm.seeds]
        done = "; ".join(f"{sum(st == 'completed' for st in i.get('status', []))}/{s.rounds} ({','.join(map(str, i.get('sites_per_round', [])))})" for i in info)
        rsec = Stat.of(x for i in info for x in i.get("round_seconds", [])[1:])
        eps = "1e6 (no DP)" if a == "fed_nodp" else a.removeprefix("fed_eps")
        local = ", ".join(sorted({f"{i.get('local_epochs', math.nan):g}" for i in info}))
        rows.append([label(a), eps, local] + sig + [done, pm(rsec, 1), pm(sm.stat(a, "seconds"), 0)])
    loc = sm.local_dp()
    sig = []
    for k in range(len(s.sizes)):
        vals = [((sr["arms"][loc].get("info") or {}).get(f"site_{k + 1}") or {}).get("sigma") for sr in sm.seeds]
        sig.append(pm(Stat.of(v for v in vals if v is not None), 3))
    rows.append([label(loc), f"{s.local_epsilon:g}", "as its site in the federated row"] + sig + ["-", "-", pm(sm.stat(loc, "seconds"), 0)])
    cen = [((sr["arms"].get("central_dpsgd") or {}).get("info") or {}).get("sigma") for sr in sm.seeds]
    rows.append([label("central_dpsgd"), "1e6", f"{s.epochs} epochs"] + [pm(Stat.of(v for v in cen if v is not None), 4)]
                + [""] * (len(s.sizes) - 1) + ["-", "-", pm(sm.stat("central_dpsgd", "seconds"), 0)])
    return md_table(head, rows)


# ------------------------------------------------------------------------------------------- plots

COLORS = {"oracle": "#444444", "central": "#1f77b4", "fed_nodp": "#2ca02c", "fed_eps8": "#98df8a", "fed_eps3": "#ff7f0e",
          "fed_eps1": "#d62728", "local_nodp": "#9467bd", "mechanistic_only": "#8c564b", "persistence": "#7f7f7f"}


def color(arm: str) -> str:
    return COLORS.get(arm, "#c5b0d5" if arm.startswith("local") else "#bcbd22")


def plot_horizon(sm: Summary, path: Path) -> None:
    """Forecast RMSE (rel. to persistence) per horizon bin, one line per arm, +-sd band over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6))
    hs = np.arange(1, 13)
    for a in sm.arms:
        if a == "persistence":
            continue
        st = [sm.stat(a, f"rel.h{h:02d}") for h in hs]
        mu = np.array([x.mean for x in st])
        sd = np.array([x.sd if math.isfinite(x.sd) else 0.0 for x in st])
        if not np.isfinite(mu).any():
            continue
        ax.plot(hs, mu, marker="o", ms=3, label=label(a), color=color(a), ls="--" if a.startswith("local") else "-")
        ax.fill_between(hs, mu - sd, mu + sd, color=color(a), alpha=0.12)
    ax.axhline(1.0, color=color("persistence"), lw=1, ls=":", label="persistence (= 1)")
    ax.set_xlabel("hours after the prediction time (horizon bin)")
    ax.set_ylabel("RMSE / persistence RMSE (geo. mean over 5 variables)")
    ax.set_title(f"Forecast error by horizon (mean ± sd over {sm.runs} seed(s))")
    ax.set_xticks(hs)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_auroc(sm: Summary, path: Path) -> None:
    """AUROC per arm: whole cohort, worst published subgroup, and the minority (unsuppressed)."""
    import matplotlib.pyplot as plt

    outcomes = sm.seeds[0]["outcomes"]
    twins = [a for a in sm.arms if a not in ("mechanistic_only", "persistence")]
    fig, axes = plt.subplots(1, len(outcomes), figsize=(12, 5.2), sharey=True)
    x = np.arange(len(twins))
    w = 0.27
    for ax, o in zip(np.atleast_1d(axes), outcomes):
        for j, (key, name, hatch) in enumerate(((f"auroc.{o}", "whole cohort", ""), (f"worst_auroc.{o}", "worst published subgroup", ""),
                                                (f"minority_auroc.{o}", f"{MINORITY} (unsuppressed)", "//"))):
            st = [sm.stat(a, key) for a in twins]
            ax.bar(x + (j - 1) * w, [s.mean for s in st], w, yerr=[s.sd if math.isfinite(s.sd) else 0 for s in st],
                   label=name, hatch=hatch, color=["#1f77b4", "#ff7f0e", "#bbbbbb"][j], capsize=2)
        ax.axhline(0.5, color="k", lw=0.8, ls=":")
        ax.set_xticks(x)
        ax.set_xticklabels([label(a) for a in twins], fontsize=7, rotation=35, ha="right")
        ax.set_title(f"AUROC {o} (dotted: chance)")
        ax.set_ylim(0.0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sites(sm: Summary, path: Path) -> None:
    """Per site: local-only (no DP, DP) next to the federated twins and the centralized one."""
    import matplotlib.pyplot as plt

    s = sm.settings
    arms = ["local_nodp", sm.local_dp(), "fed_nodp"] + (["fed_eps3"] if "fed_eps3" in sm.arms else []) + ["central"]
    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    x = np.arange(len(s.sizes))
    w = 0.8 / len(arms)
    for j, a in enumerate(arms):
        st = [sm.stat(a, f"site{k + 1}.rel") for k in range(len(s.sizes))]
        ax.bar(x + (j - (len(arms) - 1) / 2) * w, [t.mean for t in st], w, yerr=[t.sd if math.isfinite(t.sd) else 0 for t in st],
               label=label(a), color=color(a), hatch="//" if a.startswith("local") else "", capsize=2)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([f"site {k + 1}\n{n} patients" + ("\n(smallest)" if k == s.smallest else "") for k, n in enumerate(s.sizes)], fontsize=8)
    ax.set_ylabel("RMSE / persistence RMSE on the site's held-out patients")
    ax.set_title("Local-only vs federated, per site")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    lo = min((t for a in arms for k in range(len(s.sizes)) if math.isfinite(t := sm.stat(a, f"site{k + 1}.rel").mean)), default=0.8)
    ax.set_ylim(max(0.0, lo - 0.1), None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_epsilon(sm: Summary, path: Path) -> None:
    """Per-site epsilon vs forecast RMSE (over centralized) and AUROC; 'no DP' drawn at the right."""
    import matplotlib.pyplot as plt

    feds = sm.fed_arms()
    eps = [NO_DP_EPSILON if a == "fed_nodp" else float(a.removeprefix("fed_eps")) for a in feds]
    order = np.argsort(eps)
    feds = [feds[i] for i in order]
    eps = [eps[i] for i in order]
    xs = [e if e < NO_DP_EPSILON else 30.0 for e in eps]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    st = [sm.stat(a, "vs_central") for a in feds]
    a1.errorbar(xs, [t.mean for t in st], yerr=[t.sd if math.isfinite(t.sd) else 0 for t in st], marker="o", capsize=3, label="federated")
    a1.axhline(1.0, color=color("central"), ls="--", label="centralized, no DP (= 1)")
    a1.axhline(1.1, color="k", ls=":", lw=0.8, label="target: 1.10")
    a1.set_ylabel("forecast RMSE / centralized RMSE")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels(["no DP" if e >= NO_DP_EPSILON else f"{e:g}" for e in eps])
        ax.set_xlabel("per-site epsilon (whole training)")
        ax.grid(alpha=0.3)
    for o, mk in zip(sm.seeds[0]["outcomes"], ("o", "s")):
        st = [sm.stat(a, f"auroc.{o}") for a in feds]
        line = a2.errorbar(xs, [t.mean for t in st], yerr=[t.sd if math.isfinite(t.sd) else 0 for t in st], marker=mk, capsize=3,
                           label=f"federated, {o}")
        a2.axhline(sm.stat("central", f"auroc.{o}").mean, color=line[0].get_color(), ls="--", lw=1, label=f"centralized, {o}")
    a2.set_ylabel("AUROC")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.suptitle("What differential privacy costs the federated twin")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS: dict[str, Callable[[Summary, Path], None]] = {
    "horizon": plot_horizon, "auroc": plot_auroc, "sites": plot_sites, "epsilon": plot_epsilon,
}


# --------------------------------------------------------------------------------------------- doc


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load matters: the machine is shared)."""
    import torch

    mem = ""
    try:
        kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
        mem = f"{kb / 1024 ** 2:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"cpus": os.cpu_count(), "memory": mem, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(terse=True), "commit": commit + (" + uncommitted changes" if dirty else "")}


def existing_notes(doc: Path) -> str:
    """The hand-written discussion between the notes markers, kept across reruns."""
    if doc.is_file():
        text = doc.read_text(encoding="utf-8")
        if NOTES_BEGIN in text and NOTES_END in text:
            return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    return "_No notes yet: written by hand after a full run; they refer to the run they were written for._"


def protocol(sm: Summary) -> str:
    s = sm.settings
    r = sm.results
    q_note = ", ".join(f"site {k + 1}: {n}" for k, n in enumerate(s.sizes))
    return f"""* **Hospitals.** Per seed ({', '.join(str(x['seed']) for x in sm.seeds)}), `fedtwin synth` writes {len(s.sizes)} OMOP
  databases with the fixed presets of sites 1-{len(s.sizes)} (docs/synthetic-hospitals.md): unequal size ({q_note} patients),
  case mix, units, cadence and staff policy. Site {s.smallest + 1} is the smallest and holds 40 % American Indian patients
  (the other sites 1-3 %): most of that minority is at one site.
* **Splits and scoring.** Every site splits its cohort by the fixed person-id rule (`fedtwin.training.split`, 20 % held
  out), as its site agent does. Every arm is scored on the same held-out patients: each site scores its own split
  (`fedtwin.evaluation.site_statistics`, {s.samples} posterior draws, what-if effects against the ground truth) and the
  sites' additive statistics are **added**, as SecAgg+ adds them, before `evaluation_report` computes the metrics.
  The figures come from the unsuppressed report (threshold 1: the patients are synthetic, and per-bin cells or a small
  site's cells would otherwise be hidden), except the worst-subgroup AUROC and its gap, which come from the report at the
  spec's threshold ({SUPPRESSION}): the subgroups a consortium would publish. Local-only twins are scored on their own
  site's held-out patients only (not on the other sites').
* **Training budgets.** Every trained twin starts from the same initial parameters (`torch.manual_seed(seed)`, what
  `fedtwin simulate` writes as round 0) and trains with batch {s.batch_size}, Adam, learning rate {s.lr:g} (the study
  defaults, not tuned per arm). Non-private twins make {s.epochs} passes over their training data: the federation's
  {s.rounds} rounds x {max(s.local_epochs):g} local epochs, and as many epochs for the centralized and local-only
  twins (in a pilot, the smallest site's local twin improved from 10 to 30 epochs and not from 30 to 60). At a fixed
  epsilon more steps need more noise, and a FedTwin site refuses a round whose noise would swamp learning (noise
  multiplier / expected batch > 0.1, `fedtwin.privacy.accounting.check_cohort`): each federated DP arm therefore uses
  the most local epochs per round, of {', '.join(f'{e:g}' for e in s.local_epochs)}, that passes this rule at every
  site (the DP table shows which), as a consortium would have to; local-only with DP takes exactly its site's plan
  of the federated arm at the same epsilon. No arm's intervals are conformally calibrated (that would be a further
  release under DP; docs/evaluation.md).
* **Arms.**
  * *oracle*: the simulator's own expectation (`fedtwin.evaluation.oracle`): the latent state under the recorded doses,
    the latent outcome risk, the true what-if effects; its predictive s.d. is one reading's noise (a bin averaging several
    readings has less, so its intervals over-cover). It knows each patient's future process noise: a bound, not a target.
  * *centralized, no DP*: one twin on the pooled train splits of all sites, plain Adam (global gradient-norm clip 5 for
    stability only): the upper bound. *centralized, DP-SGD path, eps 1e6*: the same patients and epochs through FedTwin's
    DP-SGD trainer (Opacus: Poisson sampling, per-patient clipping at {s.clip:g}) with the negligible noise of epsilon
    1e6: it separates what the DP-SGD path itself costs from what federating costs.
  * *federated*: FedTwin's own ServerApp and ClientApp in Flower's simulation engine (`coordinator.simulate.simulate`, Ray,
    {s.parallel} ClientApps at once), SecAgg+ on (every site a share holder, threshold 0.67), FedAvg weighted by the
    sites' coarsened patient counts, on the very same databases (`hospitals=`). Every site runs DP-SGD inside its
    privacy ledger with the noise calibrated once for the whole training (`plan_federated_round`, RDP, delta {DELTA:g},
    per-patient clip {s.clip:g}); the per-site epsilon is the budget of the whole training. The sites' own evaluation
    statistics are switched off (`evaluate = false`) so that the federated twins are scored exactly like the others.
  * *federated, no DP*: FedTwin's federation has no switch that turns DP off, and this study adds none. The row is the
    same code with a per-site epsilon of 1e6: the ledger calibrates a noise multiplier of ~0.01 (the exact
    values, read back from every site's ledger, are in the DP table below), i.e. Gaussian noise of s.d. ~0.01 x clip
    {s.clip:g} on the sum of ~{s.batch_size} clipped per-patient gradients. Per-patient clipping at {s.clip:g} stays on,
    so this row is "DP-SGD without meaningful noise", not plain SGD.
  * *local-only*: every site trains alone on its own train split with the same budget; *no DP* with plain Adam, *DP eps
    {s.local_epsilon:g}* with DP-SGD at exactly the rate, steps and noise multiplier the site uses in the federation at
    that epsilon (so the comparison with the federated eps {s.local_epsilon:g} row isolates what the other sites' data add).
  * *baselines*, fitted on the pooled train splits: *persistence* (last observed value; s.d. per horizon bin from the
    training patients' persistence errors) and *mechanistic-only* (the centralized twin with its residual switched off,
    same posterior draws).
* **Columns.** Forecast errors in different units are not pooled: "RMSE rel." is the geometric mean over the 5 variables
  of RMSE / persistence RMSE (same seed, same patients), per horizon bin or over the 12 h; "RMSE / centralized" the same
  against the centralized twin. NLL (nats per observation, canonical units) and 90 % coverage are of each model's own
  predictive distribution, pooled over variables and horizon. Outcomes (death, AKI within the window): AUROC, ECE and
  O/E of the risk under the prospective default plan. "What-if effect error rel." is the geometric mean over the
  {len(sm.seeds[0]['effect_pairs'])} (plan, variable) pairs the plans' drugs act on per the spec of effect RMSE / the
  true effect's size (persistence = predicting no effect = 1; the oracle = 0). Worst-subgroup AUROC and gap: the fairness
  summary of `fedtwin.metrics` over every published subgroup (sex, age band, race and their intersections with at least
  {SUPPRESSION} events and {SUPPRESSION} non-events in the summed statistics; gap = best - worst). Train wall time: the
  arm's training only (federated: the whole simulation, setup and Ray start included; local-only: the sites one after
  the other). Every cell is mean ± s.d. over the seeds (n = number of seeds when some seed had no value).
* **Settings**: `{json.dumps(r['settings'])}`."""


def render(results: dict, doc: Path, img_dir: Path) -> str:
    """Write the plots and return the markdown of the results doc."""
    sm = Summary(results)
    img_dir.mkdir(parents=True, exist_ok=True)
    rel_img = os.path.relpath(img_dir, doc.parent)
    for name, fn in PLOTS.items():
        fn(sm, img_dir / f"results-{name}.png")
    meta = results["meta"]
    ts = targets(sm)
    met = sum(1 for t in ts if t.met)
    dp = "fed_eps3" if "fed_eps3" in sm.arms else sm.fed_arms()[-1]
    head = sm.stat(dp, "vs_central")
    lines = [
        "# Consortium results: the federated twin against its alternatives",
        "",
        "<!-- Generated by bench/study.py: edit the code, not this file; only the notes section at the end is kept across reruns. -->",
        "",
        f"Produced by `{meta['command']}` (rerun it to regenerate this page and `docs/img/results-*.png`; "
        "`--quick` is a 3-5 minute smoke run that writes elsewhere, `--from-json FILE` re-renders a finished run).",
        "",
        f"Run {meta['started']} UTC, {meta['wall_minutes']:.1f} min wall; commit {meta['machine']['commit'] or 'unknown'}; "
        f"{meta['machine']['cpus']} cores, {meta['machine']['memory']}, Python {meta['machine']['python']}, torch {meta['machine']['torch']}, "
        f"CPU only. The machine was shared with other jobs: load average {meta['load_start']} at the start and "
        f"{meta['load_end']} at the end (1/5/15 min), so wall times are pessimistic and only comparable within this run.",
        "",
        f"Headline: federated with DP at epsilon 3 per site has **{fmt(head.mean)} x** the centralized twin's forecast RMSE "
        f"(s.d. {fmt(head.sd)} over {head.n} seeds). Targets met: **{met} of {len(ts)}**.",
        "",
        "## Targets",
        "",
    ]
    lines += [f"* {verdict(t)}: {t.text}. Measured: {t.measured}." for t in ts]
    lines += ["", "## Protocol", "", protocol(sm), ""]
    lines += ["## Forecast, intervals and wall time", "", forecast_table(sm), "",
              f"![forecast error by horizon]({rel_img}/results-horizon.png)", "",
              "Forecast RMSE per variable, pooled over the 12 h horizon (canonical units):", "", variable_table(sm), ""]
    lines += ["## Outcomes, what-if effects and subgroups", "", outcome_table(sm), "",
              f"![AUROC by arm]({rel_img}/results-auroc.png)", "",
              f"Which subgroup was worst, and the minority at site {sm.smallest + 1} (its AUROC rests on a handful of events: "
              f"suppressed in every published report, shown here because the data are synthetic):", "", fairness_table(sm), "",
              "What-if effect error per plan and variable (RMSE of predicted - true effect over the horizon; the persistence "
              "column is the size of the true effect, i.e. the error of predicting no effect):", "", effect_table(sm), ""]
    lines += ["## Local-only vs federated, per site", "", site_table(sm), "",
              f"![local vs federated per site]({rel_img}/results-sites.png)", "",
              "Ratios are RMSE of the first arm over the second on that site's held-out patients (geometric mean over variables; "
              "< 1: the federated twin is better).", ""]
    lines += ["## Differential privacy", "", dp_table(sm), "", f"![epsilon vs error]({rel_img}/results-epsilon.png)", "",
              "sigma = the noise multiplier each site's ledger calibrated (mean ± s.d. over seeds); the first round of every "
              "simulation also starts Ray and its actors (not in 's per round').", ""]
    lines += ["## Notes", "", NOTES_BEGIN, existing_notes(doc), NOTES_END, ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main


def console_summary(results: dict) -> None:
    """The main figures on the terminal (aggregates only: never a patient-level row)."""
    from rich.console import Console
    from rich.table import Table

    sm = Summary(results)
    con = Console(width=160)
    t = Table(title=f"consortium results, mean over {sm.runs} seed(s)")
    for col in ("arm", "RMSE rel.", "/ central", "NLL", "cov90", "AUROC death", "AUROC aki", "effect rel.", "worst AUROC death", "gap death", "train s"):
        t.add_column(col, justify="right" if col != "arm" else "left")
    for a in sm.arms:
        st = lambda k: fmt(sm.stat(a, k).mean)  # noqa: E731
        t.add_row(label(a), st("rel.all"), st("vs_central"), st("nll"), st("cov90"), st("auroc.death"), st("auroc.aki"),
                  st("effect_rel"), st("worst_auroc.death"), st("gap.death"), fmt(sm.stat(a, "seconds").mean, 0))
    con.print(t)
    for tg in targets(sm):
        con.print(f"{'MET    ' if tg.met else 'NOT MET' if tg.met is False else 'N/A    '} {tg.text}: {tg.measured}", highlight=False)


def run_all(s: Settings, work: Path) -> dict:
    """Every seed with a progress bar; returns the JSON-ready results."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stdout)  # bound now: simulate() captures sys.stdout while Flower runs
    per_seed = 6 + len(s.epsilons)
    seeds: list[dict] = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("starting", total=len(s.seeds) * per_seed)
        sub = bar.add_task("", total=None, visible=False)
        state = {"first": True, "what": ""}

        def advance(what: str) -> None:
            if not state["first"]:
                bar.advance(task)
            state["first"] = False
            state["what"] = what
            bar.update(task, description=what)
            bar.update(sub, visible=False)

        def on_sim(kind: str, detail: str) -> None:
            if kind == "round":
                r = int(detail)
                bar.update(sub, visible=True, description=f"  round {r}/{s.rounds}" if r <= s.rounds else "  evaluation round")
            elif kind == "setup":
                bar.update(sub, visible=True, description=f"  {detail}")
            elif kind == "stage":
                bar.update(sub, description=f"  {detail[:70]}")

        for seed in s.seeds:
            seeds.append(run_seed(seed, s, work / f"seed-{seed}", advance, on_sim))
            (work / "results.partial.json").write_text(json.dumps({"seeds": seeds}, default=str))
        bar.advance(task)
        bar.update(task, description="done")
    return {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}, "seeds": seeds}


def _json_clean(x: Any) -> Any:
    """NaN -> None so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    return x


def _json_restore(x: Any) -> Any:
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: (_json_restore(v) if not isinstance(v, (str, bool)) else v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_restore(v) if not isinstance(v, (str, bool)) else v for v in x]
    return x


def quiet_terminal() -> None:
    """Opacus calls ``logging.basicConfig`` when imported, so the root logger has a stderr handler;
    ``simulate`` turns Flower's logger to DEBUG for its own log file (``simulation.log``), and those
    records would also flood the terminal through the root logger (Flower's own console handler
    still shows its warnings). At epsilon 1e6 the RDP accountant's best order is its smallest one
    and Opacus warns about it on every calibration: expected for the no-DP row, not news."""
    import logging
    import warnings

    import opacus  # noqa: F401 - import it now, so that its handler exists before we quiet it

    for h in logging.getLogger().handlers:
        h.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2,3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, small sites, 2 rounds, epsilon 3 only (3-5 min)")
    ap.add_argument("--keep", type=Path, default=None, help="keep hospitals, simulations and results.json here (reused if present)")
    ap.add_argument("--doc", type=Path, default=None, help="markdown to write (default docs/results.md; --quick: KEEP_OR_TEMP/results.md)")
    ap.add_argument("--from-json", type=Path, default=None, help="re-render the doc from an earlier run's results.json (no training)")
    args = ap.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    s = QUICK if args.quick else Settings()
    if args.seeds:
        s = replace(s, seeds=tuple(int(x) for x in args.seeds.split(",") if x.strip()))
    tmp = None
    if args.keep is not None:
        work = args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="fedtwin-study-")
        work = Path(tmp)
    doc = args.doc or (work / "results.md" if args.quick else DOC)
    quiet_terminal()
    img = IMG if doc.resolve() == DOC.resolve() else doc.parent / "img"
    try:
        if args.from_json is not None:
            results = _json_restore(json.loads(args.from_json.read_text()))
        else:
            t0 = time.perf_counter()
            results = run_all(s, work)
            cmd = " ".join([".venv/bin/python", "bench/study.py", *sys.argv[1:]])
            results["meta"] = {"command": cmd, "started": started.strftime("%Y-%m-%d %H:%M"), "wall_minutes": (time.perf_counter() - t0) / 60,
                               "load_start": load_start, "load_end": "/".join(f"{x:.1f}" for x in os.getloadavg()), "machine": machine()}
            (work / "results.json").write_text(json.dumps(_json_clean(results), indent=1, default=str))
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render(results, doc, img), encoding="utf-8")
        console_summary(results)
        print(f"wrote {doc} and {img}/results-*.png" + (f"; raw figures in {work / 'results.json'}" if args.keep else ""))
        sm = Summary(results)
        dp = "fed_eps3" if "fed_eps3" in sm.arms else sm.fed_arms()[-1]
        print(f"dp3_rmse_vs_central {fmt(sm.stat(dp, 'vs_central').mean)}")
    finally:
        if tmp is not None and not args.quick:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
