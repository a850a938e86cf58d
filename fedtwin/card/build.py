"""``build_card``: the model card as a JSON-ready dict, derived from the run's evidence only.

Deterministic by construction: no clock, no randomness, no environment lookups; every list is
ordered by something in the evidence (spec order, round order, or sorted names), never by the
order a dict happened to be built in; every float passes through :func:`normalize` once at the
end. ``fedtwin audit verify`` rebuilds the card from the evidence and compares it with the
stored one, so anything that is not a function of the evidence would be a false alarm.

Numbers are copied, not recomputed: report cells keep their CI and counts, suppressed cells stay
``"suppressed"``, coarse counts like ``"<10"`` stay strings. The only arithmetic is bookkeeping
over the records (steps summed over rounds, rounds counted, sites listed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fedtwin.card import text
from fedtwin.card.evidence import RunEvidence
from fedtwin.card.values import SUPPRESSED, is_cell, normalize
from fedtwin.provenance.record import RoundRecord

CARD_FORMAT = "fedtwin-model-card/1"

#: (key, title) of every section, in reading order (Mitchell et al. 2019, then TRIPOD+AI items)
SECTIONS: tuple[tuple[str, str], ...] = (
    ("model_details", "Model details"),
    ("intended_use", "Intended use and out-of-scope uses"),
    ("factors", "Factors"),
    ("metrics", "Metrics"),
    ("training_data", "Training data"),
    ("evaluation_data", "Evaluation data"),
    ("quantitative_analyses", "Quantitative analyses"),
    ("uncertainty", "Uncertainty"),
    ("privacy", "Privacy"),
    ("secure_aggregation", "Secure aggregation (SecAgg+)"),
    ("rounds", "Training rounds"),
    ("ethical_considerations", "Ethical considerations"),
    ("caveats", "Caveats and recommendations"),
    ("mechanistic_limitations", "Known limitations of the mechanistic core"),
    ("update_plan", "Update and drift plan"),
)

#: TRIPOD+AI items the card covers -> where (section / key)
TRIPOD_ITEMS: dict[str, str] = {
    "data sources per site (CDM version, period, cohort size)": "training_data.sites",
    "eligibility and cohort definition": "training_data.cohort_definition",
    "predictors and outcomes (definitions)": "training_data.variables, training_data.outcome_definitions",
    "missing data handling": "training_data.missing_data",
    "sample size": "evaluation_data.cohort, training_data.sites",
    "model type and training": "model_details.training",
    "discrimination and calibration with CIs": "quantitative_analyses.overall.outcomes",
    "uncertainty method and measured coverage": "uncertainty",
    "fairness (performance by subgroup)": "quantitative_analyses.subgroups, quantitative_analyses.fairness",
    "privacy (epsilon, delta, accountant, unit, rounds, secure RNG)": "privacy",
    "secure aggregation parameters": "secure_aggregation",
    "limitations": "caveats, mechanistic_limitations",
    "model updating": "update_plan",
}

FORECAST_METRICS = ("rmse", "mae", "bias", "nll", "coverage50", "coverage90")
OUTCOME_METRICS = ("auroc", "auprc", "brier", "ece", "oe_ratio", "calibration_slope", "calibration_intercept", "tpr", "fpr")
EFFECT_METRICS = ("effect_rmse", "effect_mae", "effect_bias")
ROUND_HEADLINE = ("coverage90.all.all", "nll.all.all")


# --------------------------------------------------------------------------------------- helpers


def spec_digest(spec: Mapping[str, Any]) -> str:
    """The hash ``fedtwin.spec.spec_hash`` gives a TwinSpec whose ``model_dump(mode="json")`` is ``spec``."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _asdict(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return dict(obj)
    return dict(obj.to_dict())


def _cell(report: Mapping[str, Any], key: str) -> Any:
    """A report cell as published, or None when the report has no such key."""
    return report.get("metrics", {}).get(key)


def risk_caveats(report: Mapping[str, Any]) -> list[str]:
    """What this twin's own held-out AUROCs say about using its risk scores, per outcome.

    Why: a risk score that ranks patients backwards is worse than none, and the benchmark shows
    DP training can produce one; the card must say so for *this* model, from its own published
    cells (value and CI; suppressed cells say nothing)."""
    out = []
    for o in report.get("outcomes", []):
        cell = _cell(report, f"auroc.{o}.twin")
        if not isinstance(cell, dict) or cell.get("value") is None or not cell.get("ci"):
            continue
        v, (lo, hi) = float(cell["value"]), (float(x) for x in cell["ci"])
        shown = f"AUROC {v:.2f}, CI {lo:.2f}-{hi:.2f}"
        if hi < 0.5:
            out.append(f"The {o} risk ranks the held-out patients BACKWARDS ({shown}): do not use it to rank, triage or "
                       f"alert; retrain (docs/results.md discusses why DP training can do this).")
        elif lo <= 0.5:
            out.append(f"The {o} risk is not distinguishable from chance on the held-out patients ({shown}): do not use "
                       f"it to rank, triage or alert.")
    return out


def _last_completed_train(records: tuple[RoundRecord, ...]) -> RoundRecord | None:
    done = [r for r in records if r.kind == "train" and r.status == "completed"]
    return done[-1] if done else None


def _sites(records: tuple[RoundRecord, ...]) -> list[str]:
    return sorted({m.site for r in records for m in r.manifests} | {s for r in records for s in r.sites_dropped})


def _distinct(values: list[Any]) -> list[Any]:
    """Distinct JSON values in order of first appearance (chain order)."""
    out: list[Any] = []
    seen: set[str] = set()
    for v in values:
        k = json.dumps(normalize(v), sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(v)
    return out


# -------------------------------------------------------------------------------------- sections


def _model_details(ev: RunEvidence) -> dict[str, Any]:
    records, spec, study = ev.records, ev.spec, ev.study
    last = records[-1]
    final_train = _last_completed_train(records)
    given = spec_digest(spec)
    attachments = [
        {"round": r.round, "kind": r.kind, "name": name, "sha256": digest}
        for r in records
        for name, digest in sorted(dict(getattr(r, "attachments", {}) or {}).items())
    ]
    code_versions = sorted({m.code_version for r in records for m in r.manifests} | {str(study["code_version"])})
    return {
        "name": f"{spec.get('name')} (study {study['study_id']})",
        "description": text.model_description(spec),
        "model_type": "hybrid mechanistic/neural patient digital twin (fedtwin.twin.TwinModel)",
        "spec": {
            "name": spec.get("name"),
            "version": spec.get("version"),
            "description": text.spec_facts(spec)["description"],
            "hash_recorded": records[0].spec_hash,
            "hash_of_given_spec": given,
            "matches_records": all(r.spec_hash == given for r in records),
            "report_spec_hash": ev.final_report.get("spec_hash"),
        },
        "study_id": study["study_id"],
        "code_version": study["code_version"],
        "code_versions_in_manifests": code_versions,
        "training": {
            "strategy": study["strategy"],
            "proximal_mu": study["proximal_mu"],
            "num_rounds_planned": study["num_rounds"],
            "train_rounds_completed": sum(1 for r in records if r.kind == "train" and r.status == "completed"),
            "train_rounds_halted": sum(1 for r in records if r.kind == "train" and r.status == "halted"),
            "min_sites": study["min_sites"],
            "local_epochs": study["local_epochs"],
            "batch_size": study["batch_size"],
            "learning_rate": study["learning_rate"],
            "max_grad_norm": study["max_grad_norm"],
        },
        "provenance": {
            "records": len(records),
            "last_record_round": last.round,
            "last_record_kind": last.kind,
            "last_record_hash": last.record_hash(),
            "final_aggregate_hash": final_train.aggregate_hash if final_train else None,
            "final_aggregate_round": final_train.round if final_train else None,
            "coordinator_key_id": last.key_id,
            "attachments": attachments,
            "verify_with": "fedtwin audit verify (verify_chain over the records; the registered model's parameters digest "
            "must equal final_aggregate_hash)",
        },
        "tripod_ai_items": dict(TRIPOD_ITEMS),
    }


def _training_data(ev: RunEvidence) -> dict[str, Any]:
    spec, records = ev.spec, ev.records
    sites = []
    for site in _sites(records):
        ms = [m for r in records for m in r.manifests if m.site == site]
        sources = _distinct([_asdict(getattr(m, "data_source", None)) for m in ms if getattr(m, "data_source", None) is not None])
        sites.append({
            "site": site,
            "data_source": sources[-1] if sources else None,
            "data_source_changed_during_study": len(sources) > 1,
            "cohort_fingerprint": ms[-1].cohort_fingerprint if ms else None,
            "cohort_fingerprints_seen": len({m.cohort_fingerprint for m in ms}),
            "quality_report_hash": ms[-1].quality_report_hash if ms else None,
            "train_rounds_participated": sorted({m.round for r in records if r.kind == "train" for m in r.manifests if m.site == site}),
            "rounds_dropped": sorted({r.round for r in records if site in r.sites_dropped}),
        })
    cohort = dict(spec.get("cohort", {}) or {})
    time = spec.get("time", {}) or {}
    return {
        "summary": "Each site's own OMOP CDM database; patients never left the site. Training used each site's training "
        "split (fixed person-id rule), evaluation its held-out split.",
        "sites": sites,
        "spec_cdm_version": spec.get("cdm_version"),
        "cohort_definition": cohort,
        "time": {"step": time.get("step"), "history_steps": time.get("history_steps"), "horizon_steps": time.get("horizon_steps")},
        "variables": [
            {"name": v.get("name"), "concept_ids": v.get("concept_ids"), "unit": v.get("canonical_unit"),
             "plausible_range": v.get("plausible_range")}
            for v in spec.get("state_variables", [])
        ],
        "interventions": [
            {"name": i.get("name"), "concept_ids": i.get("concept_ids"), "kind": i.get("kind"), "unit": i.get("canonical_unit"),
             "affects": i.get("affects")}
            for i in spec.get("interventions", [])
        ],
        "outcome_definitions": [
            {"name": o.get("name"), "kind": o.get("kind"), "concept_ids": o.get("concept_ids"),
             "within_steps": o.get("within_steps"), "step": time.get("step"),
             "definition": (f"death within {o.get('within_steps')} bins of {time.get('step')} after the prediction time"
                            if o.get("kind") == "death" else
                            f"first condition occurrence of concepts {o.get('concept_ids')} within {o.get('within_steps')} bins "
                            f"of {time.get('step')} after the prediction time")}
            for o in spec.get("outcomes", [])
        ],
        "static_covariates": spec.get("static_covariates"),
        "missing_data": text.missing_data_handling(),
    }


def _evaluation_data(ev: RunEvidence) -> dict[str, Any]:
    rep = ev.final_report
    evals = [r for r in ev.records if r.kind == "evaluate"]
    last_eval = evals[-1] if evals else None
    return {
        "summary": "Final evaluation-only round: every site scored the final global model and the baselines on its "
        "held-out patients; the statistics were summed inside SecAgg+ and only the suppressed report of the sum was "
        "released. Baselines (persistence) were fitted on each site's training patients only.",
        "report_format": rep.get("format"),
        "layout_fingerprint": rep.get("layout_fingerprint"),
        "spec_hash": rep.get("spec_hash"),
        "spec_hash_matches_records": rep.get("spec_hash") == ev.records[0].spec_hash,
        "models": list(rep.get("models", [])),
        "horizon": rep.get("horizon"),
        "plans": list(rep.get("plans", [])),
        "ci_level": rep.get("ci_level"),
        "decision_threshold": rep.get("decision_threshold"),
        "suppression": rep.get("suppression"),
        "cohort": rep.get("cohort"),
        "evaluation_round": last_eval.round if last_eval else None,
        "evaluation_status": last_eval.status if last_eval else None,
        "evaluation_sites": sorted(m.site for m in last_eval.manifests) if last_eval else [],
        "evaluation_sites_dropped": list(last_eval.sites_dropped) if last_eval else [],
    }


def _overall(rep: Mapping[str, Any], variables: list[str]) -> dict[str, Any]:
    models = list(rep.get("models", []))
    forecast = {
        var: {m: {k: _cell(rep, f"{k}.{var}.all.{m}") for k in FORECAST_METRICS if _cell(rep, f"{k}.{var}.all.{m}") is not None}
              for m in models}
        for var in [*variables, "all"]
    }
    outcomes = {
        o: {m: {k: _cell(rep, f"{k}.{o}.{m}") for k in OUTCOME_METRICS if _cell(rep, f"{k}.{o}.{m}") is not None}
            for m in models if any(_cell(rep, f"{k}.{o}.{m}") is not None for k in OUTCOME_METRICS)}
        for o in rep.get("outcomes", [])
    }
    effects: dict[str, Any] = {}
    for plan in rep.get("plans", []):
        for var in variables:
            row = {m: {k: _cell(rep, f"{k}.{plan}.{var}.all.{m}") for k in EFFECT_METRICS if _cell(rep, f"{k}.{plan}.{var}.all.{m}") is not None}
                   for m in models}
            row = {m: v for m, v in row.items() if v}
            if row:
                effects[f"{plan}.{var}"] = row
    return {"models": models, "forecast": forecast, "outcomes": outcomes, "effects": effects}


def _subgroups(rep: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in sorted(rep.get("subgroups", {})):
        g = rep["subgroups"][name]
        out.append({
            "group": name,
            "family": "&".join(part.split("=", 1)[0] for part in name.split("&")),
            "n_patients": g.get("n_patients"),
            "metrics": dict(g.get("metrics", {})),
        })
    return out


def _fairness_summary(fair: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Worst group and gap (with its CI when the report has one) per metric, target and family.

    Generic over the report's fairness block (``auroc``, ``forecast_rmse``, ``ece``, ``oe_ratio``,
    ``forecast_coverage_*``, ... as ``fedtwin.metrics.fairness_summary`` writes them), so a metric
    added there shows up here without a change.
    """
    rows = []
    for metric in sorted(k for k in fair if k != "equalized_odds"):
        for target in sorted(fair[metric]):
            for family in sorted(fair[metric][target]):
                g = fair[metric][target][family]
                if not isinstance(g, Mapping):
                    continue
                rows.append({
                    "metric": metric, "target": target, "family": family, "worst_group": g.get("worst_group"),
                    "worst": g.get("worst"), "best_group": g.get("best_group"), "best": g.get("best"), "gap": g.get("gap"),
                    "gap_ci": g.get("gap_ci"), "groups_shown": g.get("groups"), "groups_excluded": len(g.get("excluded", [])),
                })
    for outcome in sorted(fair.get("equalized_odds", {})):
        for thr in sorted(fair["equalized_odds"][outcome]):
            for family in sorted(fair["equalized_odds"][outcome][thr]):
                g = fair["equalized_odds"][outcome][thr][family]
                rows.append({
                    "metric": f"equalized_odds@{thr}", "target": outcome, "family": family, "worst_group": None, "worst": None,
                    "best_group": None, "best": None, "gap": g.get("difference"), "gap_ci": g.get("difference_ci"),
                    "tpr_gap": g.get("tpr_gap"), "fpr_gap": g.get("fpr_gap"), "groups_shown": None, "groups_excluded": None,
                })
    return rows


def _quantitative(ev: RunEvidence) -> dict[str, Any]:
    rep = ev.final_report
    variables = list(rep.get("variables", [])) or text.spec_facts(ev.spec)["variables"]
    fair = rep.get("fairness", {}) or {}
    return {
        "source": "final evaluation report (summed over sites, suppressed); forecast metrics pooled over the horizon",
        "ci_level": rep.get("ci_level"),
        "overall": _overall(rep, variables),
        "subgroups": _subgroups(rep),
        "fairness": {"summary": _fairness_summary(fair), "report": fair},
        "calibration_curve": {"available": False, "reason": text.calibration_curve_note()},
    }


def _uncertainty(ev: RunEvidence) -> dict[str, Any]:
    rep = ev.final_report
    models = list(rep.get("models", []))
    variables = list(rep.get("variables", []))
    coverage = {
        m: {var: {lvl: _cell(rep, f"{lvl}.{var}.all.{m}") for lvl in ("coverage50", "coverage90")} for var in [*variables, "all"]}
        for m in models
    }
    return {"method": text.uncertainty_method(), "nominal_levels": [0.5, 0.9], "measured_coverage": coverage}


def _privacy(ev: RunEvidence) -> dict[str, Any]:
    records, study = ev.records, ev.study
    per_site = []
    for site in _sites(records):
        ms = [(r, m) for r in records for m in r.manifests if m.site == site]
        dps = [(r, m.dp) for r, m in ms if m.dp is not None]
        last_dp = dps[-1][1] if dps else None
        per_site.append({
            "site": site,
            "epsilon_spent": ms[-1][1].epsilon_spent if ms else None,
            "epsilon_as_of_round": ms[-1][0].round if ms else None,
            "delta": last_dp.delta if last_dp else None,
            "accountant": last_dp.accountant if last_dp else None,
            "noise_multipliers": _distinct([dp.noise_multiplier for _, dp in dps]),
            "sample_rates": _distinct([dp.sample_rate for _, dp in dps]),
            "max_grad_norm": _distinct([dp.max_grad_norm for _, dp in dps]),
            "steps_total": sum(dp.steps for _, dp in dps),
            "rounds_composed": len(dps),
            "epsilon_by_round": [{"round": r.round, "kind": r.kind, "status": r.status, "epsilon_spent": m.epsilon_spent} for r, m in ms],
        })
    return {
        "privacy_unit": study["privacy_unit"],
        "mechanism": "DP-SGD (Opacus) with per-patient clipping and Poisson sampling at every site",
        "epsilon_per_site_allowance": study["epsilon_per_site"],
        "delta": study["delta"],
        "accountant": study["accountant"],
        "secure_rng": study["secure_rng"],
        "max_grad_norm": study["max_grad_norm"],
        "per_site": per_site,
        "max_epsilon_spent": max((s["epsilon_spent"] for s in per_site if s["epsilon_spent"] is not None), default=None),
        "notes": text.privacy_notes(study),
    }


def _secure_aggregation(ev: RunEvidence) -> dict[str, Any]:
    configured = dict(ev.study["secagg"])
    recorded = _distinct([dict(r.secagg) for r in ev.records])
    return {
        "configured": configured,
        "recorded": recorded,
        "recorded_constant": len(recorded) <= 1,
        "what_it_protects": "The coordinator sees only the sum of the sites' (quantised, clipped) updates and evaluation "
        "statistics, never one site's; it cannot check that the aggregate is that sum (it attests to it by signing).",
    }


def _round_headline(rep: Mapping[str, Any]) -> dict[str, Any]:
    """The round report's twin cells worth a row: RMSE per variable, pooled coverage/NLL, AUROC per outcome."""
    out: dict[str, Any] = {}
    for var in rep.get("variables", []):
        out[f"rmse.{var}.all"] = _cell(rep, f"rmse.{var}.all.twin")
    for key in ROUND_HEADLINE:
        out[key] = _cell(rep, f"{key}.twin")
    for o in rep.get("outcomes", []):
        out[f"auroc.{o}"] = _cell(rep, f"auroc.{o}.twin")
    return {k: v for k, v in out.items() if v is not None}


def _rounds(ev: RunEvidence) -> dict[str, Any]:
    rows = []
    for r in ev.records:
        rows.append({
            "round": r.round, "kind": r.kind, "status": r.status,
            "sites": sorted(m.site for m in r.manifests), "n_sites": len(r.manifests),
            "sites_dropped": list(r.sites_dropped), "aggregate_hash": r.aggregate_hash, "record_hash": r.record_hash(),
            "metrics": dict(r.metrics),
        })
    reports = [
        {"model_after_round": k, "n_patients": ev.round_reports[k].get("cohort", {}).get("n_patients"),
         "twin": _round_headline(ev.round_reports[k])}
        for k in sorted(ev.round_reports)
    ]
    return {"records": rows, "round_reports": reports}


# ------------------------------------------------------------------------------------------- card


def build_card(evidence: RunEvidence) -> dict[str, Any]:
    """The model card of ``evidence`` (format :data:`CARD_FORMAT`); a pure, deterministic function."""
    ev, spec, study = evidence, evidence.spec, evidence.study
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "sections": [{"key": k, "title": t} for k, t in SECTIONS],
        "spec_facts": text.spec_facts(spec),
        "model_details": _model_details(ev),
        "intended_use": text.intended_use(spec, study),
        "factors": {
            "statements": text.factors(spec),
            "fairness_spec": spec.get("fairness"),
            "subgroups_reported": sorted(ev.final_report.get("subgroups", {})),
        },
        "metrics": {
            "definitions": text.metric_definitions(),
            "forecast": list(FORECAST_METRICS),
            "outcome": list(OUTCOME_METRICS),
            "effect": list(EFFECT_METRICS),
            "ci_level": ev.final_report.get("ci_level"),
            "suppression": ev.final_report.get("suppression"),
            "suppression_threshold_study": study["suppression_threshold"],
            "marker": SUPPRESSED,
        },
        "training_data": _training_data(ev),
        "evaluation_data": _evaluation_data(ev),
        "quantitative_analyses": _quantitative(ev),
        "uncertainty": _uncertainty(ev),
        "privacy": _privacy(ev),
        "secure_aggregation": _secure_aggregation(ev),
        "rounds": _rounds(ev),
        "ethical_considerations": text.ethical_considerations(spec, study),
        "caveats": risk_caveats(ev.final_report) + text.caveats(spec, study),
        "mechanistic_limitations": text.mechanistic_limitations(spec),
        "update_plan": text.update_plan(spec, study),
    }
    return normalize(card)


def shown_cells(card: Mapping[str, Any]) -> int:
    """How many shown (non-suppressed) report cells the card holds (for summaries and tests)."""
    count = 0

    def walk(x: Any) -> None:
        nonlocal count
        if is_cell(x):
            count += 1
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(card)
    return count
