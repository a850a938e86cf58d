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
