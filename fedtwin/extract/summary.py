"""Cohort statistics a site may show: aggregates only, every count through small-cell suppression."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedtwin.extract.extractor import ExtractionStats
from fedtwin.extract.tensors import CohortTensors
from fedtwin.privacy.suppression import suppress_count, suppress_partition, suppress_share


def _mean_sd(x: np.ndarray, n_patients: int, threshold: int) -> tuple[Any, Any]:
    """Mean and SD of values contributed by at least ``threshold`` patients, else suppressed."""
    if n_patients < threshold or x.size == 0:
        return "suppressed", "suppressed"
    return round(float(x.mean()), 3), round(float(x.std(ddof=1)) if x.size > 1 else 0.0, 3)


def summarize(t: CohortTensors, stats: ExtractionStats, threshold: int) -> dict[str, Any]:
    """The summary as a JSON-ready dict. Nothing in it is patient-level."""
    n = t.n_patients
    h = t.history_steps
    out: dict[str, Any] = {
        "spec_hash": t.spec_hash,
        "suppression_threshold": threshold,
        "cohort": {
            "patients": suppress_count(n, threshold),
            "candidates": suppress_count(stats.candidates, threshold),
            "excluded_age": suppress_count(stats.excluded_age, threshold),
            "excluded_died_in_history": suppress_count(stats.excluded_died_in_history, threshold),
            "excluded_few_observations": suppress_count(stats.excluded_few_observations, threshold),
            "bins_per_patient": t.total_steps,
            "history_bins": h,
            "step_seconds": t.step_seconds,
        },
        "state_variables": {},
        "interventions": {},
        "outcomes": {},
        "subgroups": {},
    }
    for j, name in enumerate(t.state_names):
        m = t.mask[:, :, j]
        patients = int(m.any(axis=1).sum())
        mean, sd = _mean_sd(t.values[:, :, j][m], patients, threshold)
        out["state_variables"][name] = {
            "patients_measured": suppress_count(patients, threshold),
            "measurements": suppress_count(int(t.counts[:, :, j].sum()), threshold),
            "bins_observed_share": suppress_share(int(m.sum()), int(m.size), threshold),
            "mean": mean,
            "sd": sd,
        }
    for k, name in enumerate(t.intervention_names):
        d = t.doses[:, :, k]
        exposed = int((d > 0).any(axis=1).sum())
        out["interventions"][name] = {
            "patients_exposed": suppress_count(exposed, threshold),
            "mean_amount_per_exposed_patient": (
                round(float(d.sum() / exposed), 3) if exposed >= threshold else "suppressed"
            ),
        }
    for k, name in enumerate(t.outcome_names):
        events = int(t.outcome_event[:, k].sum())
        out["outcomes"][name] = {
            "events": suppress_count(events, threshold),
            "rate": suppress_share(events, n, threshold),
        }
    for attr, labels in t.subgroups.items():
        values, counts = np.unique(labels.astype(str), return_counts=True)
        out["subgroups"][attr] = suppress_partition({str(v): int(c) for v, c in zip(values, counts)}, threshold)
    return out
