"""The ground truth of a synthetic site: what a twin is later scored against.

It is written next to, never inside, the site's OMOP database: ``DIR/ground_truth/site_<k>/``
holds ``truth.npz`` (arrays, one row per person, rows sorted by person_id) and
``manifest.json`` (what each array means, the site profile, row counts, injected defects).
docs/synthetic-hospitals.md documents every key. Files are byte-identical for the same seed:
the npz is written with fixed zip timestamps and the manifest holds no time or absolute path.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtwin.synth import concepts as C
from fedtwin.synth.defects import DEFECT_KINDS, DefectReport
from fedtwin.synth.physiology import LatentParams
from fedtwin.synth.plans import PLANS, PLAN_NAMES, PlanOutcome
from fedtwin.synth.population import HOUR, Population
from fedtwin.synth.profiles import SiteProfile
from fedtwin.synth.simulation import NO_EVENT, Factual

FORMAT = "fedtwin-synth-ground-truth"
FORMAT_VERSION = 1
TRUTH_FILE = "truth.npz"
MANIFEST_FILE = "manifest.json"

# key -> (description, unit); shapes use N persons, T = 36 bins, H = 12, P plans, V = 5, D = 4, O = 2.
KEY_DOCS: dict[str, tuple[str, str]] = {
    "person_id": ("OMOP person_id of each row; rows are sorted by it", ""),
    "in_cohort": ("the person is in the spec's cohort (adult at ICU admission, alive at prediction time, >= 3 history observations)", ""),
    "index_epoch": ("ICU admission = cohort index time, UTC seconds", "s"),
    "age": ("age at admission, years, computed like the extractor", "years"),
    "gender_concept_id": ("OMOP gender concept", ""),
    "race_concept_id": ("OMOP race concept", ""),
    "latent_params": ("per-person latent parameters, columns named by latent_param_names", "see docs"),
    "latent_param_names": ("column names of latent_params", ""),
    "state_names": ("state variables, spec order", ""),
    "intervention_names": ("interventions, spec order", ""),
    "outcome_names": ("outcomes, spec order", ""),
    "plan_names": ("counterfactual plans; index 0 is 'recorded'", ""),
    "latent_states": ("noise-free state per bin of history + horizon (factual run)", "canonical"),
    "latent_inflammation": ("latent inflammatory state per bin (0..1.2)", ""),
    "latent_kidney_injury": ("latent kidney injury per bin", ""),
    "recorded_doses": ("doses per bin as the extractor computes them from drug_exposure", "canonical"),
    "measurement_counts": ("clean measurement rows per bin and variable (defect rows excluded)", ""),
    "plan_doses": ("dose per forecast bin of every plan (plan replaces named interventions)", "canonical"),
    "plan_states": ("noise-free expected state per forecast bin under every plan", "canonical"),
    "plan_risk": ("probability of each outcome within its window after prediction time, under every plan", ""),
    "outcome_risk": ("plan_risk of the 'recorded' plan", ""),
    "outcome_event": ("the outcome label the extractor computes", ""),
    "outcome_time": ("bins from prediction time to the event, NaN if none in the window", "bins"),
    "died_before_prediction": ("died before the prediction time (not in the cohort)", ""),
    "aki_before_prediction": ("AKI recorded before the prediction time (its label cannot be 1)", ""),
    "defect_measurement_ids": ("measurement_id of every injected defect row", ""),
    "defect_kinds": ("defect kind of each defect_measurement_ids entry, index into defect_kind_names", ""),
    "defect_kind_names": ("names of the defect kinds", ""),
    "history_steps": ("bins of history (spec)", "bins"),
    "horizon_steps": ("bins of forecast (spec)", "bins"),
    "step_seconds": ("bin width (spec)", "s"),
}


@dataclass
class SiteTruth:
    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any]


def _bins(hour: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bins from prediction time to an event, as the extractor computes them (float32)."""
    return ((hour * HOUR + offset - C.HISTORY_STEPS * HOUR) / HOUR).astype(np.float32)


def build_truth(
    profile: SiteProfile, seed: int, pop: Population, params: LatentParams, factual: Factual,
    plan_doses: np.ndarray, outcome: PlanOutcome, defects: DefectReport, row_counts: dict[str, int],
    database: dict[str, str],
) -> SiteTruth:
    """Assemble the arrays and the manifest of one site."""
    t_total, h = C.HISTORY_STEPS + C.HORIZON_STEPS, C.HORIZON_STEPS
    pred, window = C.HISTORY_STEPS, C.OUTCOME_WINDOW_STEPS
    counts = factual.counts[:, :t_total]
    history_obs = (counts[:, :pred] > 0).sum(axis=(1, 2))
    died_before = (factual.death_hour != NO_EVENT) & (factual.death_hour < pred)
    aki_before = (factual.aki_hour != NO_EVENT) & (factual.aki_hour < pred)
    in_cohort = (pop.age >= C.MIN_AGE) & ~died_before & (history_obs >= C.MIN_HISTORY_OBSERVATIONS)

    event = np.zeros((pop.n, 2), dtype=bool)
    when = np.full((pop.n, 2), np.nan, dtype=np.float32)
    for o, (hour, offset) in enumerate(((factual.death_hour, factual.death_offset), (factual.aki_hour, factual.aki_offset))):
        hit = (hour != NO_EVENT) & (hour >= pred) & (hour < pred + window)
        event[:, o] = hit
        when[hit, o] = _bins(hour[hit], offset[hit])

    risk = outcome.risk.copy()
    risk[aki_before, :, 1] = 0.0  # only the first AKI is recorded: its label can no longer be 1

    kinds = [k for k in DEFECT_KINDS if defects.measurement_ids.get(k) is not None]
    defect_ids = np.concatenate([defects.measurement_ids[k] for k in kinds]) if kinds else np.zeros(0, np.int64)
    defect_kind = np.concatenate(
        [np.full(defects.measurement_ids[k].size, DEFECT_KINDS.index(k), np.int8) for k in kinds]
    ) if kinds else np.zeros(0, np.int8)

    arrays: dict[str, np.ndarray] = {
        "person_id": pop.person_id.astype(np.int64),
        "in_cohort": in_cohort,
        "index_epoch": pop.admit_epoch.astype(np.float64),
        "age": pop.age.astype(np.float64),
        "gender_concept_id": pop.gender_concept_id.astype(np.int64),
        "race_concept_id": pop.race_concept_id.astype(np.int64),
        "latent_params": params.matrix(),
        "latent_param_names": np.array(LatentParams.names()),
        "state_names": np.array(C.STATE_NAMES),
        "intervention_names": np.array(C.DRUG_NAMES),
        "outcome_names": np.array(C.OUTCOME_NAMES),
        "plan_names": np.array(PLAN_NAMES),
        "latent_states": factual.states[:, :t_total].astype(np.float32),
        "latent_inflammation": factual.inflammation[:, :t_total].astype(np.float32),
        "latent_kidney_injury": factual.injury[:, :t_total].astype(np.float32),
        "recorded_doses": factual.doses[:, :t_total].astype(np.float32),
        "measurement_counts": counts.astype(np.int16),
        "plan_doses": plan_doses.astype(np.float32),
        "plan_states": outcome.states.astype(np.float32),
        "plan_risk": risk.astype(np.float64),
        "outcome_risk": risk[:, 0].astype(np.float64),
        "outcome_event": event,
        "outcome_time": when,
        "died_before_prediction": died_before,
        "aki_before_prediction": aki_before,
        "defect_measurement_ids": defect_ids.astype(np.int64),
        "defect_kinds": defect_kind,
        "defect_kind_names": np.array(DEFECT_KINDS),
        "history_steps": np.array(C.HISTORY_STEPS, dtype=np.int64),
        "horizon_steps": np.array(h, dtype=np.int64),
        "step_seconds": np.array(C.STEP_SECONDS, dtype=np.float64),
    }
    assert set(arrays) == set(KEY_DOCS), set(arrays) ^ set(KEY_DOCS)
    cohort = int(in_cohort.sum())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "site": profile.site,
        "seed": seed,
        "files": {"arrays": TRUTH_FILE},
        "database": database,
        "spec": {
            "name": "icu_hemodynamics",
            "step_seconds": C.STEP_SECONDS,
            "history_steps": C.HISTORY_STEPS,
            "horizon_steps": h,
            "outcome_window_steps": window,
            "min_age": C.MIN_AGE,
            "min_history_observations": C.MIN_HISTORY_OBSERVATIONS,
        },
        "counts": {
            "persons": pop.n,
            "cohort": cohort,
            "cohort_deaths_in_window": int(event[in_cohort, 0].sum()),
            "cohort_aki_in_window": int(event[in_cohort, 1].sum()),
            "rows": row_counts,
        },
        "defects": defects.to_json(),
        "plans": [
            {"name": p.name, "description": p.description, "replaces": sorted(p.replaces)} for p in PLANS
        ],
        "arrays": {
            key: {"shape": list(arrays[key].shape), "dtype": str(arrays[key].dtype), "description": d, "unit": u}
            for key, (d, u) in KEY_DOCS.items()
        },
        "canonical_units": {
            **{v.name: v.canonical_unit for v in C.STATE_VARIABLES},
            **{d.name: d.canonical_unit for d in C.DRUGS},
        },
        "profile": profile.to_json(),
    }
    return SiteTruth(arrays=arrays, manifest=manifest)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A numpy .npz (readable by ``np.load``) whose bytes depend only on the arrays: fixed zip
    timestamps and permissions, keys in insertion order, no pickled objects."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                arr = np.asarray(value)
                np.lib.format.write_array(fh, arr if arr.flags.c_contiguous else arr.copy(order="C"), allow_pickle=False)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_site_truth(directory: Path, truth: SiteTruth) -> None:
    """Write ``truth.npz`` and ``manifest.json`` into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_npz(directory / TRUTH_FILE, truth.arrays)
    write_json(directory / MANIFEST_FILE, truth.manifest)


def load_site_truth(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a site's ground truth back: (arrays, manifest)."""
    with np.load(directory / TRUTH_FILE, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    return arrays, manifest
