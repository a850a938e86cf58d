"""Twin quality on synthetic ICU hospitals: hybrid twin vs baselines, with and without DP.

Usage: python bench/twin_quality.py [--patients 2000] [--sites 3] [--seed 11] [--epochs 60]
                                    [--dp-epochs 30] [--samples 32] [--keep DIR]

Protocol (docs/evaluation.md):

1. ``fedtwin synth`` writes ``--sites`` OMOP databases (``--patients`` in total, fixed seed) with
   their ground truth; the spec's extractor reads each site's cohort.
2. Every site splits its cohort by the fixed person-id rule (fedtwin.training.split, 20 % test).
   The POOLED train splits of all sites (a central benchmark: the upper bound a federation is
   compared with) are divided by a salted person-id hash into a fitting part (80 %) and an
   interval-calibration part (20 %). The twin is trained on the fitting part without DP, and
   its 90 % intervals are calibrated on the calibration part (split conformal,
   fedtwin.evaluation.calibrate_intervals); "twin_uncal" is the same model before that step.
   DP-SGD twins at epsilon 1, 3 and 8 (delta 1e-5, RDP accountant; the noise multiplier is
   calibrated for the planned steps with fedtwin.privacy.accounting.calibrate_noise_multiplier;
   Poisson rate = batch / N; clip 1.0) train on the same fitting part and are NOT interval-
   calibrated (that would be a further, unaccounted release of the private data).
3. The baselines use the same patients: persistence and population mean are fitted on the
   whole train split, residual-only is trained on the fitting part and calibrated like the twin.
   Every site scores its own held-out patients (fedtwin.evaluation.site_statistics, what-if
   effects against the ground truth), and the sites' statistics are ADDED (as SecAgg+ would)
   before the report is computed.

Prints compact tables; the last line is ``coverage90 X.XXX`` (hybrid twin, no DP, 90 % interval
coverage pooled over variables and horizon bins).
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedtwin.evaluation import (
    EvaluationConfig,
    EvaluationLayout,
    GroundTruth,
    TwinEvaluationStats,
    calibrate_intervals,
    crossfit_folds,
    evaluation_report,
    fit_baselines,
    site_statistics,
)
from fedtwin.evaluation.truth import match_truth
from fedtwin.extract.extractor import Extractor, concat
from fedtwin.omop import open_database
from fedtwin.privacy.accounting import calibrate_noise_multiplier
from fedtwin.spec import load_spec
from fedtwin.synth import SynthRequest, synthesize
from fedtwin.training.split import train_test_split
from fedtwin.twin import DPSettings, FitConfig, TwinModel, fit

SPEC = Path(__file__).resolve().parents[1] / "specs" / "icu-hemodynamics.yaml"
EPSILONS = (8.0, 3.0, 1.0)
DELTA = 1e-5
BATCH = 128
CLIP = 1.0
ACCOUNTANT = "rdp"  # the privacy ledger's default


def value(metrics: dict, key: str) -> float:
    cell = metrics.get(key)
    return float(cell["value"]) if isinstance(cell, dict) and cell.get("value") is not None else math.nan


def fmt(x: float, width: int = 8) -> str:
    if not math.isfinite(x):
        return "n/a".rjust(width)
    a = abs(x)
    s = f"{x:.3f}" if a < 10 else f"{x:.2f}" if a < 100 else f"{x:.1f}"
    return s.rjust(width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=2000, help="patients in total over all sites")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--epochs", type=int, default=60, help="non-private training epochs (twin and residual-only)")
    ap.add_argument("--dp-epochs", type=float, default=30.0, help="DP-SGD steps = dp-epochs / sample rate")
    ap.add_argument("--samples", type=int, default=32, help="posterior draws per patient")
    ap.add_argument("--keep", type=Path, default=None, help="write the synthetic sites here (default: a temporary folder)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    spec = load_spec(SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "synth"
        if not (out / "ground_truth").exists():
            synthesize(SynthRequest(sites=args.sites, patients=max(1, args.patients // args.sites), seed=args.seed, out=out, workers=2))
        truth = GroundTruth.load(out)
        cohorts = [Extractor(open_database(str(out / f"site_{k}.db")), spec).extract() for k in range(1, args.sites + 1)]
        splits = [train_test_split(c) for c in cohorts]
        train = concat([tr for tr, _ in splits])
        part = crossfit_folds(train.person_ids, 5)
        fit_part, cal_part = train.select(np.flatnonzero(part != 0)), train.select(np.flatnonzero(part == 0))
        tests = [te for _, te in splits]
        n_test = sum(t.n_patients for t in tests)
        t_data = time.perf_counter() - t_start
        print(f"twin quality: {args.sites} synthetic ICU sites (seed {args.seed}), {args.patients} patients, "
              f"cohort {sum(c.n_patients for c in cohorts)}; trained on the pooled train split ({fit_part.n_patients} fit + "
              f"{cal_part.n_patients} interval calibration), "
              f"scored on each site's held-out split ({n_test}), site statistics summed; data {t_data:.0f} s")

        runs: dict[str, TwinModel] = {}
        t0 = time.perf_counter()
        model = TwinModel(spec)
        fit(model, fit_part, FitConfig(epochs=args.epochs, batch_size=BATCH, lr=3e-3, seed=args.seed))
        raw = copy.deepcopy(model)
        scale = calibrate_intervals(model, cal_part, n_samples=args.samples, seed=args.seed)
        runs["twin"] = model
        runs["twin_uncal"] = raw
        timings = {"twin": time.perf_counter() - t0}
        q = BATCH / fit_part.n_patients
        steps = max(1, round(args.dp_epochs / q))
        sigmas = {}
        for eps in EPSILONS:
            t0 = time.perf_counter()
            sigma = calibrate_noise_multiplier(prior=[], sample_rate=q, steps=steps, target_epsilon=eps, delta=DELTA, accountant=ACCOUNTANT)
            dp_model = TwinModel(spec)
            rep = fit(dp_model, fit_part, FitConfig(lr=3e-3, seed=args.seed),
                      DPSettings(noise_multiplier=sigma, max_grad_norm=CLIP, sample_rate=q, steps=steps, accountant=ACCOUNTANT, delta=DELTA, seed=args.seed))
            name = f"twin_eps{eps:g}"
            runs[name] = dp_model
            sigmas[name] = (sigma, rep.dp.epsilon if rep.dp else math.nan)
            timings[name] = time.perf_counter() - t0

        t0 = time.perf_counter()
        config = EvaluationConfig(n_samples=args.samples, seed=args.seed, residual_fit=FitConfig(epochs=args.epochs, batch_size=BATCH, seed=args.seed))
        layout = EvaluationLayout.for_spec(spec, plans=truth.alternatives)
        baselines = fit_baselines(model, fit_part, layout.models, config, calibration=cal_part)
        timings["baselines"] = time.perf_counter() - t0
        reports = {}
        t0 = time.perf_counter()
        for name, m in runs.items():
            lay = layout if name == "twin" else EvaluationLayout.for_spec(spec, models=("twin",), plans=truth.alternatives)
            total = TwinEvaluationStats.zeros(lay)
            for te in tests:
                h = te.history_steps
                matched = match_truth(truth, spec, te.person_ids, np.asarray(te.doses[:, h:]), lay.plans)
                total = total + site_statistics(m, te, lay, baselines if name == "twin" else None, matched, config)
            reports[name] = evaluation_report(total, suppression_threshold=spec.suppression_threshold, subgroups=False, cells=False)["metrics"]
        timings["evaluation"] = time.perf_counter() - t0

    # ---- tables --------------------------------------------------------------------------------
    base = reports["twin"]
    rows = [(name, reports[name], "twin") for name in runs] + [
        (mo, base, mo) for mo in ("mechanistic_only", "residual_only", "persistence", "population_mean")
    ]
    variables = spec.state_names
    pers = {v: value(base, f"rmse.{v}.all.persistence") for v in variables}
    short = {"heart_rate": "HR", "map": "MAP", "glucose": "glucose", "creatinine": "creat", "lactate": "lactate"}
    print("\nforecast on held-out patients, pooled over the 12 h horizon (RMSE in canonical units; rel = geometric mean of RMSE / persistence RMSE;")
    print("coverage of the model's own 50/90% intervals; NLL nats per observation, canonical units; AUROC from the prospective-plan risk)")
    head = f"{'model':18s}" + "".join(f"{short.get(v, v)[:8]:>9s}" for v in variables) + f"{'rel':>7s}{'cov50':>7s}{'cov90':>7s}{'NLL':>7s}" + "".join(f"{'AUC ' + o:>11s}" for o in spec.outcome_names)
    print(head)
    print("-" * len(head))
    for label, met, mo in rows:
        rm = [value(met, f"rmse.{v}.all.{mo}") for v in variables]
        rel = math.exp(np.mean([math.log(r / pers[v]) for r, v in zip(rm, variables)])) if all(math.isfinite(r) for r in rm) else math.nan
        line = f"{label:18s}" + "".join(fmt(r, 9) for r in rm) + fmt(rel, 7)
        line += fmt(value(met, f"coverage50.all.all.{mo}"), 7) + fmt(value(met, f"coverage90.all.all.{mo}"), 7) + fmt(value(met, f"nll.all.all.{mo}"), 7)
        line += "".join(fmt(value(met, f"auroc.{o}.{mo}"), 11) for o in spec.outcome_names)
        print(line)

    changed = {}
    for j, p in enumerate(truth.plan_names):
        if p != "recorded":
            diff = np.any(truth.plan_doses[:, j] != truth.plan_doses[:, 0], axis=(0, 1))
            drugs = [spec.intervention_names[d] for d in np.flatnonzero(diff)]
            changed[p] = [v for v in variables if any(v in iv.affects for iv in spec.interventions if iv.name in drugs)]
    cols = list(runs) + ["mechanistic_only", "residual_only", "no_effect"]
    print("\nwhat-if effect error: RMSE of (predicted - true) effect vs ground truth, pooled over the horizon, on the variables the plan's drugs act on")
    print("(no_effect = predicting no change, i.e. the size of the true effect)")
    head = f"{'plan':16s}{'variable':11s}" + "".join(f"{c.replace('_only', '')[:12]:>13s}" for c in cols)
    print(head)
    print("-" * len(head))
    for plan, vs in changed.items():
        for v in vs:
            cells = [value(reports[c], f"effect_rmse.{plan}.{v}.all.twin") for c in runs]
            cells += [value(base, f"effect_rmse.{plan}.{v}.all.{mo}") for mo in ("mechanistic_only", "residual_only", "persistence")]
            print(f"{plan:16s}{v:11s}" + "".join(fmt(c, 13) for c in cells))
    print("\nDP-SGD: sample rate {:.4f}, {} steps, clip {:g}, delta {:g}: ".format(q, steps, CLIP, DELTA)
          + "; ".join(f"{k}: sigma {s:.3f} (epsilon {e:.2f})" for k, (s, e) in sigmas.items()))
    print("interval calibration factors (sd scale per variable, twin): " + ", ".join(f"{v} {c:.3f}" for v, c in zip(variables, scale)))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f", total {time.perf_counter() - t_start:.0f}")
    print(f"coverage90 {value(base, 'coverage90.all.all.twin'):.3f}")


if __name__ == "__main__":
    main()
