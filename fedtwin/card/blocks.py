"""The card laid out as blocks (paragraphs, lists, tables) per section, shared by Markdown and HTML.

Both renderings must show the same numbers, formatted the same way, and neither may show a
number for a suppressed cell; laying the card out once here, from the card dict alone, makes that
true by construction. Renderers only escape and wrap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtwin.card.values import fmt_cell, fmt_number


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    title: str | None = None


@dataclass(frozen=True)
class Table:
    caption: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    row_ids: tuple[str, ...] = field(default=())
    """an id per row (e.g. the subgroup name) for renderers that can attach one."""
    kind: str = ""


Block = Para | Bullets | Table

MODEL_LABELS = {"twin": "twin", "mechanistic_only": "mechanistic only", "persistence": "persistence",
                "residual_only": "residual only", "population_mean": "population mean"}


def _kv(caption: str, items: list[tuple[str, Any]]) -> Table:
    return Table(caption, ("item", "value"), tuple((k, fmt_number(v) if not isinstance(v, (list, dict)) else _compact(v)) for k, v in items))


def _compact(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(_compact(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return "; ".join(f"{k}={_compact(x)}" for k, x in v.items()) if v else "none"
    return fmt_number(v)


def _model_details(c: Mapping[str, Any]) -> list[Block]:
    d = c["model_details"]
    prov, spec, tr = d["provenance"], d["spec"], d["training"]
    out: list[Block] = [Para(d["description"])]
    out.append(_kv("Identity", [
        ("name", d["name"]), ("model type", d["model_type"]), ("study", d["study_id"]), ("code version", d["code_version"]),
        ("code versions in manifests", d["code_versions_in_manifests"]), ("spec", f"{spec['name']} v{spec['version']}"),
        ("spec hash (records)", spec["hash_recorded"]), ("spec given matches records", spec["matches_records"]),
    ]))
    out.append(_kv("Training", list(tr.items())))
    out.append(_kv("Provenance", [
        ("round records", prov["records"]), ("last record", f"round {prov['last_record_round']} ({prov['last_record_kind']})"),
        ("last record hash", prov["last_record_hash"]), ("final aggregate hash", prov["final_aggregate_hash"]),
        ("final aggregate from round", prov["final_aggregate_round"]), ("coordinator key id", prov["coordinator_key_id"]),
        ("verify with", prov["verify_with"]),
    ]))
    if prov["attachments"]:
        out.append(Table("Attachments cited by the records", ("round", "kind", "name", "sha256"),
                         tuple((str(a["round"]), a["kind"], a["name"], a["sha256"]) for a in prov["attachments"])))
    out.append(Table("TRIPOD+AI items and where this card covers them", ("item", "section"),
                     tuple((k, v) for k, v in sorted(d["tripod_ai_items"].items()))))
    return out


def _intended_use(c: Mapping[str, Any]) -> list[Block]:
    u = c["intended_use"]
    return [Bullets(tuple(u["primary_uses"]), "Primary intended uses"), Bullets(tuple(u["primary_users"]), "Primary intended users"),
            Bullets(tuple(u["out_of_scope_uses"]), "Out-of-scope uses")]


def _factors(c: Mapping[str, Any]) -> list[Block]:
    f = c["factors"]
    return [Bullets(tuple(f["statements"])), Para(f"Subgroups reported ({len(f['subgroups_reported'])}): " + ", ".join(f["subgroups_reported"]))]


def _metrics(c: Mapping[str, Any]) -> list[Block]:
    m = c["metrics"]
    sup = m.get("suppression") or {}
    return [
        Table("Metric definitions", ("metric", "definition"), tuple(sorted(m["definitions"].items()))),
        Para(f"Confidence level {fmt_number(m['ci_level'])}. Cells resting on fewer than {fmt_number(sup.get('threshold'))} patients "
             f"(events and non-events for outcome metrics) show as '{m['marker']}'; counts below it as '{sup.get('count_marker')}'."),
    ]


def _training_data(c: Mapping[str, Any]) -> list[Block]:
    t = c["training_data"]
    rows, ids = [], []
    for s in t["sites"]:
        ds = s["data_source"] or {}
        period = f"{ds.get('period_start') or '?'} to {ds.get('period_end') or '?'}" if ds else "not recorded"
        rows.append((s["site"], fmt_number(ds.get("cdm_version")) if ds else "not recorded", period,
                     fmt_number(ds.get("n_patients")) if ds else "not recorded",
                     ", ".join(str(r) for r in s["train_rounds_participated"]) or "none",
                     ", ".join(str(r) for r in s["rounds_dropped"]) or "none", s["cohort_fingerprint"] or "n/a"))
        ids.append(s["site"])
    out: list[Block] = [Para(t["summary"]), Table(
        "Data sources per site (cohort size coarsened or suppressed by the site)",
        ("site", "OMOP CDM", "index period", "patients", "train rounds", "dropped in rounds", "cohort fingerprint"),
        tuple(rows), tuple(ids), kind="sites")]
    out.append(_kv("Cohort definition (spec)", [(k, v) for k, v in t["cohort_definition"].items()] + [
        ("spec CDM version", t["spec_cdm_version"]), ("bin", t["time"]["step"]), ("history bins", t["time"]["history_steps"]),
        ("horizon bins", t["time"]["horizon_steps"]), ("static covariates", t["static_covariates"])]))
    out.append(Table("State variables", ("variable", "concept ids", "unit", "plausible range"),
                     tuple((v["name"], _compact(v["concept_ids"]), v["unit"], _compact(v["plausible_range"])) for v in t["variables"])))
    out.append(Table("Interventions", ("intervention", "concept ids", "kind", "unit", "acts on"),
                     tuple((i["name"], _compact(i["concept_ids"]), i["kind"], i["unit"], _compact(i["affects"])) for i in t["interventions"])))
    out.append(Table("Outcome definitions", ("outcome", "definition"), tuple((o["name"], o["definition"]) for o in t["outcome_definitions"])))
    out.append(Bullets(tuple(t["missing_data"]), "Missing-data handling"))
    return out


def _evaluation_data(c: Mapping[str, Any]) -> list[Block]:
    e = c["evaluation_data"]
    coh = e["cohort"] or {}
    return [Para(e["summary"]), _kv("Evaluation", [
        ("evaluation round", e["evaluation_round"]), ("status", e["evaluation_status"]), ("sites", e["evaluation_sites"]),
        ("sites dropped", e["evaluation_sites_dropped"]), ("patients (all sites)", coh.get("n_patients")),
        ("events", coh.get("n_events")), ("models", e["models"]), ("horizon bins", e["horizon"]),
        ("what-if plans with ground truth", e["plans"]), ("decision threshold (TPR/FPR)", e.get("decision_threshold")), ("report spec hash matches records", e["spec_hash_matches_records"]),
        ("layout fingerprint", e["layout_fingerprint"])])]


def _quantitative(c: Mapping[str, Any]) -> list[Block]:
    q = c["quantitative_analyses"]
    ov = q["overall"]
    models = ov["models"]
    labels = tuple(MODEL_LABELS.get(m, m) for m in models)
    out: list[Block] = [Para(q["source"] + f"; {fmt_number(q['ci_level'])} CIs in brackets.")]
    for metric in ("rmse", "nll", "coverage50", "coverage90"):
        rows, ids = [], []
        for var, per_model in ov["forecast"].items():
            cells = [per_model.get(m, {}).get(metric) for m in models]
            if all(x is None for x in cells):
                continue
            rows.append((var, *(fmt_cell(x) for x in cells)))
            ids.append(var)
        if rows:
            out.append(Table(f"Forecast {metric} per variable, pooled over the horizon", ("variable", *labels), tuple(rows), tuple(ids), kind="forecast"))
    for outcome, per_model in ov["outcomes"].items():
        ms = list(per_model)
        metrics = sorted({k for m in ms for k in per_model[m]}, key=lambda k: list(c["metrics"]["outcome"]).index(k) if k in c["metrics"]["outcome"] else 99)
        out.append(Table(f"Outcome '{outcome}': discrimination and calibration", ("metric", *(MODEL_LABELS.get(m, m) for m in ms)),
                         tuple((k, *(fmt_cell(per_model[m].get(k)) for m in ms)) for k in metrics), tuple(metrics), kind="outcome"))
    if ov["effects"]:
        out.append(Table("What-if effect RMSE (predicted - true effect), pooled over the horizon", ("plan.variable", *labels),
                         tuple((k, *(fmt_cell(v.get(m, {}).get("effect_rmse")) for m in models)) for k, v in ov["effects"].items())))
    out.append(Para(q["calibration_curve"]["reason"]))
    out.extend(subgroup_tables(c))
    fs = q["fairness"]["summary"]
    if fs:
        out.append(Table("Fairness: worst shown group and gap per family (suppressed groups excluded; gap CI where the report has one)",
                         ("metric", "target", "family", "worst group", "worst", "best group", "best", "gap", "groups shown", "excluded"),
                         tuple((r["metric"], r["target"], r["family"], fmt_number(r["worst_group"]) if r["worst_group"] else "n/a",
                                fmt_number(r["worst"]), fmt_number(r["best_group"]) if r["best_group"] else "n/a", fmt_number(r["best"]),
                                fmt_cell({"value": r["gap"], "ci": r.get("gap_ci")}), fmt_number(r["groups_shown"]),
                                fmt_number(r["groups_excluded"])) for r in fs)))
    return out


def subgroup_tables(c: Mapping[str, Any]) -> list[Table]:
    """The twin per subgroup: RMSE per variable, pooled 90 % coverage, AUROC per outcome."""
    q = c["quantitative_analyses"]
    facts = c["spec_facts"]
    cols = [(f"rmse.{v}.all.twin", f"RMSE {v}") for v in facts["variables"]]
    cols += [("coverage90.all.all.twin", "coverage90")]
    cols += [(f"auroc.{o}.twin", f"AUROC {o}") for o in facts["outcomes"]]
    rows, ids = [], []
    for g in q["subgroups"]:
        rows.append((g["group"], fmt_number(g["n_patients"]), *(fmt_cell(g["metrics"].get(k)) for k, _ in cols)))
        ids.append(g["group"])
    return [Table("Twin by subgroup (disaggregated; 'suppressed' = too few patients or events to show)",
                  ("subgroup", "patients", *(label for _, label in cols)), tuple(rows), tuple(ids), kind="subgroups")]


def _uncertainty(c: Mapping[str, Any]) -> list[Block]:
    u = c["uncertainty"]
    cov = u["measured_coverage"]
    models = list(cov)
    rows = []
    for var in next(iter(cov.values()), {}):
        rows.append((var, *(f"{fmt_cell(cov[m][var]['coverage50'])} / {fmt_cell(cov[m][var]['coverage90'])}" for m in models)))
    return [Bullets(tuple(u["method"]), "Method"),
            Table("Measured coverage of the 50 % / 90 % intervals (nominal 0.5 / 0.9)", ("variable", *(MODEL_LABELS.get(m, m) for m in models)), tuple(rows))]


def _privacy(c: Mapping[str, Any]) -> list[Block]:
    p = c["privacy"]
    rows, ids = [], []
    for s in p["per_site"]:
        rows.append((s["site"], fmt_number(s["epsilon_spent"]), fmt_number(s["epsilon_as_of_round"]), fmt_number(s["delta"]),
                     fmt_number(s["accountant"]), _compact(s["noise_multipliers"]), _compact(s["sample_rates"]),
                     fmt_number(s["steps_total"]), fmt_number(s["rounds_composed"])))
        ids.append(s["site"])
    return [
        _kv("Privacy settings", [("privacy unit", p["privacy_unit"]), ("mechanism", p["mechanism"]),
                                 ("epsilon allowance per site (this training)", p["epsilon_per_site_allowance"]), ("delta", p["delta"]),
                                 ("accountant", p["accountant"]), ("secure RNG", p["secure_rng"]), ("clipping norm", p["max_grad_norm"]),
                                 ("largest epsilon spent", p["max_epsilon_spent"])]),
        Table("Privacy spent per site (composed, from each site's last signed manifest)",
              ("site", "epsilon", "as of round", "delta", "accountant", "noise multiplier", "sample rate", "steps", "rounds composed"),
              tuple(rows), tuple(ids), kind="privacy"),
        Bullets(tuple(p["notes"])),
    ]


def _secagg(c: Mapping[str, Any]) -> list[Block]:
    s = c["secure_aggregation"]
    out: list[Block] = [Para(s["what_it_protects"]), _kv("Configured for the study", list(s["configured"].items()))]
    for i, rec in enumerate(s["recorded"]):
        out.append(_kv(f"Recorded in the round records ({i + 1} of {len(s['recorded'])})", list(rec.items())))
    return out


def _rounds(c: Mapping[str, Any]) -> list[Block]:
    r = c["rounds"]
    out: list[Block] = [Table("Rounds (from the signed records)", ("round", "kind", "status", "sites", "dropped", "aggregate hash"),
                              tuple((str(x["round"]), x["kind"], x["status"], ", ".join(x["sites"]) or "none",
                                     ", ".join(x["sites_dropped"]) or "none", (x["aggregate_hash"] or "none")[:16])
                                    for x in r["records"]), kind="rounds")]
    reps = r["round_reports"]
    if reps:
        keys = sorted({k for x in reps for k in x["twin"]})
        out.append(Table("Twin after each training round (round 0 = initial model), summed over sites",
                         ("after round", "patients", *keys),
                         tuple((str(x["model_after_round"]), fmt_number(x["n_patients"]), *(fmt_cell(x["twin"].get(k)) for k in keys)) for x in reps)))
    return out


def _bullets(key: str) -> Any:
    return lambda c: [Bullets(tuple(c[key]))]


LAYOUT = {
    "model_details": _model_details, "intended_use": _intended_use, "factors": _factors, "metrics": _metrics,
    "training_data": _training_data, "evaluation_data": _evaluation_data, "quantitative_analyses": _quantitative,
    "uncertainty": _uncertainty, "privacy": _privacy, "secure_aggregation": _secagg, "rounds": _rounds,
    "ethical_considerations": _bullets("ethical_considerations"), "caveats": _bullets("caveats"),
    "mechanistic_limitations": _bullets("mechanistic_limitations"), "update_plan": _bullets("update_plan"),
}


def section_blocks(card: Mapping[str, Any]) -> list[tuple[str, str, list[Block]]]:
    """(key, title, blocks) for every section of the card, in the card's order."""
    return [(s["key"], s["title"], LAYOUT[s["key"]](card)) for s in card["sections"]]
