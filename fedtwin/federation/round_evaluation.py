"""What a site scores in a federated round, and how the coordinator reads the secure sum.

Every training round a site scores the global model it *received* (the result of the previous
round) on its held-out patients and adds the statistics to its SecAgg+ vector
(:mod:`fedtwin.federation.secure_sums`); a last evaluation-only round scores the final model.
The layouts are derived from the spec alone (never from data), so every site's vector has the
same size and order:

- ``round`` layout: the twin only, fairness subgroups without intersections (~43 k statistics
  for the ICU spec: x3 on the wire) - cheap enough to send every round;
- ``final`` layout: the twin, its mechanistic core alone and persistence (fitted on the site's
  training patients), every fairness subgroup of the spec including intersections.

The coordinator never sees a site's statistics, only their sum over the sites of the round.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import numpy as np

from fedtwin.evaluation import EvaluationLayout, TwinEvaluationStats, evaluation_report
from fedtwin.federation.secure_sums import SecureSumEncoding, decode_sums
from fedtwin.metrics import SubgroupConfig
from fedtwin.spec import TwinSpec

Kind = Literal["round", "final"]
ROUND_MODELS = ("twin",)
FINAL_MODELS = ("twin", "mechanistic_only", "persistence")


def federated_subgroups(spec: TwinSpec, kind: Kind) -> SubgroupConfig:
    config = SubgroupConfig.from_fairness(spec.fairness)
    if kind == "round":
        return dataclasses.replace(config, intersections=False)
    if kind == "final":
        return config
    raise ValueError(f"unknown evaluation kind {kind!r}")


def federated_layout(spec: TwinSpec, kind: Kind) -> EvaluationLayout:
    models = ROUND_MODELS if kind == "round" else FINAL_MODELS
    return EvaluationLayout.for_spec(spec, models=models, subgroups=federated_subgroups(spec, kind))


def decode_report(aggregated: np.ndarray, num_examples: list[int], enc: SecureSumEncoding, spec: TwinSpec, kind: Kind) -> dict[str, Any]:
    """The (suppressed) evaluation report of the summed statistics SecAgg+ returned."""
    layout = federated_layout(spec, kind)
    sums = decode_sums(aggregated, num_examples, enc)
    total = TwinEvaluationStats.from_vector(TwinEvaluationStats.zeros(layout), sums)
    return evaluation_report(total, suppression_threshold=spec.suppression_threshold)


def headline_metrics(report: dict[str, Any], model: str = "twin") -> dict[str, float]:
    """Overall numbers worth a line per round in MLflow: pooled over the horizon, not suppressed.

    Keys as in the report (``rmse.map.all.twin``, ``coverage90.all.all.twin``,
    ``auroc.death.twin``) plus ``<key>.ci_low``/``.ci_high`` and ``n_patients``.
    """
    out: dict[str, float] = {}
    for key, cell in report.get("metrics", {}).items():
        parts = key.split(".")
        if parts[-1] != model or not isinstance(cell, dict) or cell.get("value") is None:
            continue
        if len(parts) == 4 and parts[2] != "all":
            continue  # per-step cells stay in the JSON artifact
        v = float(cell["value"])
        if not np.isfinite(v):
            continue
        out[key] = v
        ci = cell.get("ci")
        if ci and all(c is not None and np.isfinite(float(c)) for c in ci):
            out[key + ".ci_low"], out[key + ".ci_high"] = float(ci[0]), float(ci[1])
    n = report.get("cohort", {}).get("n_patients")
    if isinstance(n, (int, float)):
        out["n_patients"] = float(n)
    return out


#: Names of ``fairness_headline``: inside both the round record's metric-name rule
#: (``^[A-Za-z0-9][A-Za-z0-9_.:/@+\-]{0,199}$``, fedtwin.provenance) and MLflow's (alphanumerics,
#: ``_ - . / :`` and spaces: no ``@``, no ``+``), with room for the coordinator's ``fair.`` prefix.
FAIR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./\-]{0,194}$")
#: report["fairness"] block -> headline prefix, for the per-outcome and per-variable gaps
_FAIR_GAPS = {"auroc": "auroc_gap", "ece": "ece_gap", "oe_ratio": "oe_ratio_gap", "forecast_rmse": "rmse_gap"}


def _part(name: str) -> str:
    """A name part safe for a metric key: ``sex&age -> sex-age``, anything else odd -> ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(name).replace("&", "-"))


def fairness_headline(report: dict[str, Any]) -> dict[str, float]:
    """Gaps and differences of the twin's fairness summary, flat and finite, for a line per round.

    Names (``<family>`` = ``sex``, ``age``, ``race``, ``sex-age``, ... or ``any``: ``&`` becomes
    ``-``; ``<t>`` the report's decision threshold, e.g. ``thr0.5``):
    ``auroc_gap.<outcome>.<family>``, ``ece_gap.<outcome>.<family>``,
    ``oe_ratio_gap.<outcome>.<family>``, ``eod.<outcome>.<family>.<t>`` (equalized-odds
    difference), ``tpr_gap.<outcome>.<family>.<t>``, ``fpr_gap.<outcome>.<family>.<t>``,
    ``rmse_gap.<variable>.<family>``, ``coverage<L>_gap.<variable | all>.<family>``; each with
    ``.ci_low``/``.ci_high`` where its CI exists. Only differences between shown groups
    (suppressed groups never enter a gap, fedtwin.metrics.fairness) - never one group's own
    value or n. (No ``@``/``+`` in the names: MLflow refuses them.)
    """
    fair = report.get("fairness") or {}
    out: dict[str, float] = {}

    def put(name: str, value: Any, ci: Any) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)) or not FAIR_NAME.match(name + ".ci_high"):
            return
        out[name] = float(value)
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) and math.isfinite(float(c)) for c in ci):
            out[name + ".ci_low"], out[name + ".ci_high"] = float(ci[0]), float(ci[1])

    def gaps(prefix: str, block: Any, suffix: str = "") -> None:
        for target, per_family in (block or {}).items():
            for family, g in (per_family or {}).items():
                if isinstance(g, dict):
                    put(f"{prefix}.{_part(target)}.{_part(family)}{suffix}", g.get("gap"), g.get("gap_ci"))

    for block, prefix in _FAIR_GAPS.items():
        gaps(prefix, fair.get(block))
    for block, per_var in fair.items():
        if block.startswith("forecast_coverage_"):
            gaps(f"coverage{_part(block[len('forecast_coverage_'):])}_gap", per_var)
    for outcome, per_t in (fair.get("equalized_odds") or {}).items():
        for t, per_family in (per_t or {}).items():
            for family, eo in (per_family or {}).items():
                if not isinstance(eo, dict):
                    continue
                at = "thr" + (t if re.fullmatch(r"[0-9][0-9.]*", t) else _part(t))  # "thr0.5"
                stem = f"{_part(outcome)}.{_part(family)}.{at}"
                put(f"eod.{stem}", eo.get("difference"), eo.get("difference_ci"))
                put(f"tpr_gap.{stem}", eo.get("tpr_gap"), eo.get("tpr_gap_ci"))
                put(f"fpr_gap.{stem}", eo.get("fpr_gap"), eo.get("fpr_gap_ci"))
    return out
