"""Ground truth of synthetic sites, matched to a cohort by person id.

``fedtwin synth`` writes, next to every site database, ``ground_truth/site_<k>/truth.npz``
(docs/synthetic-hospitals.md). For what-if scoring this module reads, per person, every plan's
doses over the horizon (``plan_doses``, canonical units, all interventions) and noise-free
states (``plan_states``). Plan 0 is ``recorded``: the staff's doses, which for a patient who died
inside the horizon continue past the death (the database stops at it). The effect of plan ``p``
is ``plan_states[p] - plan_states[recorded]``; the twin is asked the same question with the same
doses, so both sides compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtwin.errors import FedTwinError
from fedtwin.spec import TwinSpec

TRUTH_FILE = "truth.npz"
RECORDED = "recorded"


@dataclass
class GroundTruth:
    """Per person (rows sorted by ``person_id``): plan doses (M, P, F, D) and states (M, P, F, V)."""

    person_id: np.ndarray
    in_cohort: np.ndarray
    plan_names: tuple[str, ...]
    plan_doses: np.ndarray
    plan_states: np.ndarray
    state_names: tuple[str, ...]
    intervention_names: tuple[str, ...]
    sources: tuple[str, ...] = ()

    @property
    def alternatives(self) -> tuple[str, ...]:
        """Plan names other than ``recorded``, in file order."""
        return tuple(p for p in self.plan_names if p != RECORDED)

    @classmethod
    def load(cls, path: str | Path) -> "GroundTruth":
        """Read ``truth.npz`` files: a file, a ``site_<k>`` folder, a ``ground_truth`` folder, or
        the ``fedtwin synth --out`` folder (all sites; person ids are unique across sites)."""
        p = Path(path)
        if p.is_file():
            files = [p]
        elif (p / TRUTH_FILE).is_file():
            files = [p / TRUTH_FILE]
        else:
            base = p / "ground_truth" if (p / "ground_truth").is_dir() else p
            files = sorted(base.glob(f"site_*/{TRUTH_FILE}"))
        if not files:
            raise FedTwinError(
                f"no ground truth ({TRUTH_FILE}) found at {p}",
                "pass the folder `fedtwin synth --out` wrote, its ground_truth/ folder, or a site_<k>/ folder",
            )
        parts = []
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    parts.append({k: z[k] for k in ("person_id", "in_cohort", "plan_names", "plan_doses", "plan_states", "state_names", "intervention_names")})
            except (OSError, KeyError, ValueError) as exc:
                raise FedTwinError(f"{f} is not a FedTwin ground-truth file: {exc}", "pass files written by `fedtwin synth`") from None
        first = parts[0]
        for f, part in zip(files, parts):
            for key in ("plan_names", "state_names", "intervention_names"):
                if list(part[key]) != list(first[key]):
                    raise FedTwinError(f"{f}: {key} differ from {files[0]}", "use ground truth of one `fedtwin synth` run")
        pid = np.concatenate([q["person_id"] for q in parts]).astype(np.int64)
        order = np.argsort(pid, kind="stable")
        if np.any(np.diff(pid[order]) == 0):
            raise FedTwinError("the ground-truth files repeat person ids", "use ground truth of one `fedtwin synth` run")
        cat = lambda k: np.concatenate([q[k] for q in parts])[order]  # noqa: E731
        names = tuple(str(x) for x in first["plan_names"])
        if RECORDED not in names:
            raise FedTwinError(f"the ground truth has no '{RECORDED}' plan (plans: {list(names)})")
        return cls(
            person_id=pid[order],
            in_cohort=cat("in_cohort").astype(bool),
            plan_names=names,
            plan_doses=cat("plan_doses").astype(np.float32),
            plan_states=cat("plan_states").astype(np.float64),
            state_names=tuple(str(x) for x in first["state_names"]),
            intervention_names=tuple(str(x) for x in first["intervention_names"]),
            sources=tuple(str(f) for f in files),
        )

    def check_spec(self, spec: TwinSpec) -> None:
        problems = []
        if list(self.state_names) != list(spec.state_names):
            problems.append(f"state variables {list(self.state_names)} vs the spec's {spec.state_names}")
        if list(self.intervention_names) != list(spec.intervention_names):
            problems.append(f"interventions {list(self.intervention_names)} vs the spec's {spec.intervention_names}")
        if self.plan_states.shape[2] != spec.time.horizon_steps:
            problems.append(f"horizon {self.plan_states.shape[2]} bins vs the spec's {spec.time.horizon_steps}")
        if problems:
            raise FedTwinError(
                "the ground truth does not match the spec: " + "; ".join(problems),
                "score with the spec the synthetic sites were generated for (specs/icu-hemodynamics.yaml)",
            )

    def match(self, person_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found): the truth row of each person id, and whether it exists and is in the cohort."""
        ids = np.asarray(person_ids, dtype=np.int64)
        rows = np.searchsorted(self.person_id, ids)
        rows = np.minimum(rows, max(len(self.person_id) - 1, 0))
        found = (self.person_id[rows] == ids) if len(self.person_id) else np.zeros(len(ids), bool)
        found &= self.in_cohort[rows] if len(self.person_id) else found
        return rows, found


@dataclass
class MatchedTruth:
    """The ground truth of one cohort, row-aligned with its tensors.

    ``plans`` (P alternatives) exclude ``recorded``; ``doses`` (N, 1 + P, F, D) start with the
    recorded plan; ``effect`` (N, P, F, V) is the true effect of each alternative;
    ``found`` (N,) marks patients with ground truth (the others carry placeholders and are
    masked out of every effect statistic).
    """

    plans: tuple[str, ...]
    doses: np.ndarray
    effect: np.ndarray
    found: np.ndarray

    def select(self, idx: np.ndarray) -> "MatchedTruth":
        return MatchedTruth(self.plans, self.doses[idx], self.effect[idx], self.found[idx])


def match_truth(truth: GroundTruth, spec: TwinSpec, person_ids: np.ndarray, recorded_horizon: np.ndarray, plans: tuple[str, ...] | None = None) -> MatchedTruth:
    """Align ``truth`` with a cohort; ``recorded_horizon`` (N, F, D) fills the doses of patients
    without ground truth (never scored)."""
    truth.check_spec(spec)
    plans = truth.alternatives if plans is None else tuple(plans)
    missing = [p for p in plans if p not in truth.plan_names]
    if missing:
        raise FedTwinError(f"the ground truth has no plans {missing} (it has {list(truth.plan_names)})")
    rows, found = truth.match(person_ids)
    idx = [truth.plan_names.index(RECORDED)] + [truth.plan_names.index(p) for p in plans]
    doses = truth.plan_doses[rows][:, idx]
    doses = np.where(found[:, None, None, None], doses, np.asarray(recorded_horizon, np.float32)[:, None])
    states = truth.plan_states[rows][:, idx]
    effect = np.where(found[:, None, None, None], states[:, 1:] - states[:, :1], 0.0)
    return MatchedTruth(plans, doses.astype(np.float32), effect, found)
