"""Counterfactual drug plans and the what-if runs that score a twin's answers to them.

A plan maps intervention names to a dose per forecast bin (canonical units: ug, [iU], mg, mL)
that REPLACES the recorded doses of that intervention over the 12-bin horizon; interventions a
plan does not name keep their recorded doses. Every plan is re-simulated from the patient's
latent state at the prediction time with the same latent parameters and the *same process-noise
draws* as the factual run (common random numbers), and without observation noise; so the
difference between two plans' trajectories is exactly the causal effect of the dose change.
Beyond the horizon every plan continues with the staff policy's factual doses, which is what
the outcome risks (48 h window) integrate over.

"Recorded" means the staff policy's doses of the factual run. They equal the doses in the
database for every patient alive at the end of the horizon; for a patient who dies inside the
horizon the database stops at death, while the plan keeps the staff's doses, so that the risk
is not computed from a trajectory that the death itself altered (the ground truth also stores
the database's doses, cut at death, as ``recorded_doses``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedtwin.synth.concepts import DRUG_NAMES, HISTORY_STEPS, HORIZON_STEPS, OUTCOME_WINDOW_STEPS
from fedtwin.synth.physiology import FLUID, FURO, INS, NE, LatentParams, advance, event_probability, hazards
from fedtwin.synth.simulation import Factual

DoseRule = Callable[[np.ndarray], np.ndarray]  # recorded horizon doses (N, H) -> plan doses (N, H)


@dataclass(frozen=True)
class Plan:
    """A named alternative: for each intervention it replaces, a rule from the recorded
    horizon doses to the plan's doses (the stored ground truth holds the resulting arrays)."""

    name: str
    description: str
    replaces: dict[str, DoseRule]


def _zero(rec: np.ndarray) -> np.ndarray:
    return np.zeros_like(rec)


def _double(rec: np.ndarray) -> np.ndarray:
    return 2.0 * rec


def _first_bin(amount: float, keep_recorded: bool) -> DoseRule:
    def rule(rec: np.ndarray) -> np.ndarray:
        out = rec.copy() if keep_recorded else np.zeros_like(rec)
        out[:, 0] += amount
        return out

    return rule


PLANS: tuple[Plan, ...] = (
    Plan("recorded", "the staff's doses (the database's, for patients alive through the horizon)", {}),
    Plan("no_vasopressor", "norepinephrine 0 ug in every forecast bin", {"norepinephrine": _zero}),
    Plan("double_insulin", "insulin doses twice the recorded ones", {"insulin": _double}),
    Plan("fluid_bolus_1l", "recorded fluids plus 1000 mL in the first forecast bin", {"fluids": _first_bin(1000.0, True)}),
    Plan("furosemide_40mg", "furosemide 40 mg in the first forecast bin, none after", {"furosemide": _first_bin(40.0, False)}),
)
PLAN_NAMES: tuple[str, ...] = tuple(p.name for p in PLANS)
_DRUG_INDEX = {"norepinephrine": NE, "insulin": INS, "furosemide": FURO, "fluids": FLUID}
assert tuple(sorted(_DRUG_INDEX, key=_DRUG_INDEX.get)) == DRUG_NAMES


def plan_doses(recorded_horizon: np.ndarray) -> np.ndarray:
    """(N, P, H, 4) dose arrays of every plan from the recorded horizon doses (N, H, 4)."""
    n, h, d = recorded_horizon.shape
    out = np.repeat(recorded_horizon[:, None], len(PLANS), axis=1).copy()
    for j, plan in enumerate(PLANS):
        for drug, rule in plan.replaces.items():
            out[:, j, :, _DRUG_INDEX[drug]] = rule(recorded_horizon[:, :, _DRUG_INDEX[drug]])
    return out


@dataclass
class PlanOutcome:
    states: np.ndarray  # (N, P, H, 5) noise-free expected state per forecast bin
    risk: np.ndarray  # (N, P, 2) P(death), P(AKI) within 48 h of prediction time


def run_plans(p: LatentParams, factual: Factual, doses: np.ndarray) -> PlanOutcome:
    """Re-simulate every plan from the prediction time; all plans in one vectorized pass."""
    n, n_plans, h, _ = doses.shape
    start, end = HISTORY_STEPS, HISTORY_STEPS + OUTCOME_WINDOW_STEPS
    tiled = p.tile(n_plans)
    s = factual.at_prediction.tile(n_plans)
    # plan-major stacking: rows [j*N:(j+1)*N] are plan j
    plan_major = doses.transpose(1, 0, 2, 3).reshape(n_plans * n, h, -1)
    after = np.tile(factual.policy_doses, (n_plans, 1, 1))
    noise = np.tile(factual.noise, (n_plans, 1, 1))
    states = np.empty((n_plans * n, h, s.x.shape[1]))
    survive = np.ones(n_plans * n)
    no_aki_yet = np.ones(n_plans * n)
    aki_risk = np.zeros(n_plans * n)
    for k in range(start, end):
        if k - start < h:
            states[:, k - start] = s.x
        prob = event_probability(hazards(tiled, s, k))
        aki_risk += survive * no_aki_yet * prob[:, 1]
        survive *= 1.0 - prob[:, 0]
        no_aki_yet *= 1.0 - prob[:, 1]
        dose = plan_major[:, k - start] if k - start < h else after[:, k]
        s = advance(tiled, s, dose, k, noise[:, k])
    risk = np.stack([1.0 - survive, aki_risk], axis=1)
    return PlanOutcome(
        states=states.reshape(n_plans, n, h, -1).transpose(1, 0, 2, 3),
        risk=risk.reshape(n_plans, n, 2).transpose(1, 0, 2),
    )


__all__ = ["PLANS", "PLAN_NAMES", "Plan", "PlanOutcome", "plan_doses", "run_plans", "HORIZON_STEPS"]
