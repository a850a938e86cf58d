"""What-if: roll the twin forward from a patient's current state under another intervention plan.

A plan is ``{intervention_name: [dose per horizon bin, canonical units]}``. It replaces the
recorded doses of the named interventions over the horizon; the other interventions keep
their recorded doses and the history is untouched. Both plans are simulated with the same
posterior draws (common random numbers), so the difference between them reflects the plan,
not Monte Carlo noise.

Each plan's risk is the outcome hazard read from that plan's rollout. ``risk_recorded`` is
therefore conditional on the doses actually given after the prediction time: fine for a
retrospective comparison, but those doses can reflect the outcome (treatment stops at death),
so it is not a prospective risk; :func:`fedtwin.twin.forecast` gives that one (default plan).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedtwin.errors import FedTwinError
from fedtwin.extract.tensors import CohortTensors
from fedtwin.spec import TwinSpec
from fedtwin.twin.batch import prepare_batch
from fedtwin.twin.forecast import Bands, bands, model_doses, simulate
from fedtwin.twin.model import TwinModel
from fedtwin.twin.training import torch_threads

Plan = Mapping[str, Sequence[float]]


def validate_plan(spec: TwinSpec, plan: Plan) -> dict[str, np.ndarray]:
    """Check a plan against the spec; every problem is reported at once, with the fix."""
    if not isinstance(plan, Mapping) or not plan:
        raise FedTwinError(
            "an intervention plan must be a non-empty mapping {intervention_name: [dose per horizon bin]}",
            f"name one or more of {spec.intervention_names}",
        )
    horizon = spec.time.horizon_steps
    kinds = {i.name: i for i in spec.interventions}
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    for name, doses in plan.items():
        if name not in kinds:
            problems.append(f"unknown intervention {name!r} (the spec has {spec.intervention_names})")
            continue
        iv = kinds[name]
        try:
            arr = np.asarray([float(d) for d in doses], dtype=np.float64)
        except (TypeError, ValueError):
            problems.append(f"{name}: doses must be a list of numbers, got {doses!r}")
            continue
        if arr.shape != (horizon,):
            problems.append(f"{name}: {arr.size} doses given, the horizon has {horizon} bins (one dose per bin)")
            continue
        if not np.all(np.isfinite(arr)):
            problems.append(f"{name}: doses must be finite numbers")
            continue
        neg = np.flatnonzero(arr < 0)
        if neg.size:
            problems.append(f"{name}: negative dose {arr[neg[0]]:g} at horizon bin {int(neg[0])} (doses are amounts >= 0)")
            continue
        if iv.kind == "exposure" and np.any(arr > 1):
            problems.append(f"{name}: exposure fractions must lie in [0, 1], got max {arr.max():g}")
            continue
        out[name] = arr
    if problems:
        raise FedTwinError(
            "invalid intervention plan:\n" + "\n".join(f"  - {p}" for p in problems),
            f"give per-bin doses in canonical units ({', '.join(f'{i.name}: {i.canonical_unit}' for i in spec.interventions)}) "
            f"for each of the {horizon} horizon bins",
        )
    return out


@dataclass
class WhatIfResult:
    """Recorded vs alternative plan for N patients (canonical units).

    ``recorded``/``alternative``: bands (N, F, V); ``risk_*`` (N, O); doses (N, F, D);
    ``history_values`` (N, H, V) with NaN where unobserved; ``affected`` names the variables the
    plan's interventions act on (per the spec).
    """

    person_ids: np.ndarray
    state_names: list[str]
    units: list[str]
    intervention_names: list[str]
    outcome_names: list[str]
    plan: dict[str, list[float]]
    affected: list[str]
    history_steps: int
    step_seconds: float
    history_values: np.ndarray
    recorded: Bands
    alternative: Bands
    doses_recorded: np.ndarray
    doses_alternative: np.ndarray
    risk_recorded: np.ndarray
    risk_alternative: np.ndarray
    n_samples: int

    @property
    def difference(self) -> np.ndarray:
        """Alternative minus recorded mean (N, F, V)."""
        return self.alternative.mean - self.recorded.mean


def what_if(
    model: TwinModel,
    tensors: CohortTensors,
    plan: Plan,
    patients: Sequence[int] | None = None,
    n_samples: int = 64,
    seed: int = 0,
    num_threads: int | None = None,
) -> WhatIfResult:
    """Simulate ``plan`` against the recorded doses for the patients at positions ``patients``
    (all when None); Monte Carlo over the parameter posterior gives the bands."""
    checked = validate_plan(model.spec, plan)
    if patients is not None:
        idx = np.asarray(list(patients), dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= tensors.n_patients:
            raise FedTwinError(
                f"patient positions {list(idx)} are out of range for a cohort of {tensors.n_patients}",
                "pass row positions in the CohortTensors (0-based)",
            )
        tensors = tensors.select(idx)
    h = model.history
    recorded = np.asarray(tensors.doses, dtype=np.float32)
    alternative = recorded.copy()
    names = model.spec.intervention_names
    for name, doses in checked.items():
        alternative[:, h:, names.index(name)] = doses.astype(np.float32)
    with torch_threads(num_threads):
        batch = prepare_batch(tensors, model.spec, model.norm)
        rec, alt = simulate(model, batch, [model_doses(model, recorded), model_doses(model, alternative)], n_samples, seed,
                            mechanism_only=False, row_keys=tensors.person_ids)
    affected = [v for v in model.spec.state_names if any(v in iv.affects for iv in model.spec.interventions if iv.name in checked)]
    hist = np.where(np.asarray(tensors.mask[:, :h]), np.asarray(tensors.values[:, :h], np.float64), math.nan)
    return WhatIfResult(
        person_ids=np.asarray(tensors.person_ids),
        state_names=list(model.spec.state_names),
        units=[v.canonical_unit for v in model.spec.state_variables],
        intervention_names=list(names),
        outcome_names=list(model.spec.outcome_names),
        plan={k: v.tolist() for k, v in checked.items()},
        affected=affected,
        history_steps=h,
        step_seconds=model.spec.time.step_seconds,
        history_values=hist,
        recorded=bands(model, rec.mean[:, h:], rec.var[:, h:]),
        alternative=bands(model, alt.mean[:, h:], alt.var[:, h:]),
        doses_recorded=recorded[:, h:],
        doses_alternative=alternative[:, h:],
        risk_recorded=rec.risk,
        risk_alternative=alt.risk,
        n_samples=n_samples,
    )
