"""CohortTensors -> the model's tensors (normalised, masks as floats, hazard targets).

Conversion happens once per cohort, so that training batches are plain index selections of
preallocated tensors (a DataLoader collating 256 rows one by one would cost more than a step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from fedtwin.errors import FedTwinError
from fedtwin.extract.tensors import CohortTensors
from fedtwin.spec import TwinSpec, spec_hash
from fedtwin.twin.normalization import Normalizer, static_to_model


@dataclass
class TwinBatch:
    """Model-unit tensors for B patients; T = history + horizon bins.

    - ``y`` (B, T, V): observed values in model units, exactly 0 where unobserved.
    - ``m`` (B, T, V): 1.0 where observed.
    - ``logcount`` (B, T, V): log1p(measurements in the bin) (informative missingness).
    - ``dose`` (B, T, D): doses in model units.
    - ``static`` (B, S): static covariates in model units.
    - ``haz_surv`` (B, O, F+1): bins survived at risk, per horizon bin and (last column) in the
      tail beyond the horizon; ``haz_event`` (B, O, F+1): 1 in the bin/tail of the event.
    """

    y: torch.Tensor
    m: torch.Tensor
    logcount: torch.Tensor
    dose: torch.Tensor
    static: torch.Tensor
    haz_surv: torch.Tensor
    haz_event: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.y.shape[0])

    def select(self, idx: torch.Tensor | np.ndarray | slice) -> "TwinBatch":
        if isinstance(idx, np.ndarray):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return TwinBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def repeat(self, times: int) -> "TwinBatch":
        """Each patient ``times`` times in a row (Monte Carlo over the posterior)."""
        return TwinBatch(**{f.name: getattr(self, f.name).repeat_interleave(times, dim=0) for f in fields(self)})

    def with_doses(self, dose: torch.Tensor) -> "TwinBatch":
        out = TwinBatch(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.dose = dose
        return out


def check_compatible(tensors: CohortTensors, spec: TwinSpec) -> None:
    """The tensors were extracted with this spec (same hash, names and window)."""
    h = spec_hash(spec)
    if tensors.spec_hash != h:
        raise FedTwinError(
            f"the cohort tensors were extracted with spec hash {tensors.spec_hash[:12]}..., "
            f"but the twin model was built for spec hash {h[:12]}...",
            "extract the cohort with the spec the model was trained for, or train a model for this spec",
        )
    expected = (spec.state_names, spec.intervention_names, spec.outcome_names, spec.time.history_steps, spec.time.horizon_steps)
    got = (tensors.state_names, tensors.intervention_names, tensors.outcome_names, tensors.history_steps, tensors.horizon_steps)
    if expected != got:
        raise FedTwinError(
            f"the cohort tensors do not match the spec: expected names/window {expected}, got {got}",
            "re-extract the cohort with this spec",
        )


def hazard_targets(tensors: CohortTensors, spec: TwinSpec) -> tuple[np.ndarray, np.ndarray]:
    """Discrete-time survival targets over each outcome's ``within_steps`` window.

    Bin ``j`` is ``[j, j+1)`` bins after the prediction time. An event at ``outcome_time`` = t
    falls in bin ``floor(t)``: the patient survived bins ``0..floor(t)-1`` and had the event in
    bin ``floor(t)``. Without an event the patient is counted at risk through the whole window
    (administrative censoring at ``within_steps``; CohortTensors carry no earlier end of
    follow-up), except that a recorded death ends the risk of the other outcomes: they are
    censored at the death bin (competing risk treated as censoring). Bins at or beyond the
    horizon share one tail hazard, so their counts go to the last column.
    """
    n, f = tensors.n_patients, tensors.horizon_steps
    o = len(spec.outcomes)
    surv = np.zeros((n, o, f + 1), np.float32)
    event = np.zeros((n, o, f + 1), np.float32)
    death_k = next((k for k, out in enumerate(spec.outcomes) if out.kind == "death"), None)
    ev = np.asarray(tensors.outcome_event, bool)
    tt = np.asarray(tensors.outcome_time, np.float64)

    def add_survived(i: int, k: int, upto: int) -> None:
        inside = min(upto, f)
        surv[i, k, :inside] = 1.0
        surv[i, k, f] = max(0, upto - f)

    for k, out in enumerate(spec.outcomes):
        w = out.within_steps
        for i in range(n):
            if ev[i, k] and math.isfinite(tt[i, k]):
                e = min(max(int(math.floor(tt[i, k])), 0), w - 1)
                add_survived(i, k, e)
                event[i, k, min(e, f)] = 1.0
            else:
                upto = w
                if death_k is not None and k != death_k and ev[i, death_k] and math.isfinite(tt[i, death_k]):
                    upto = min(w, max(int(math.floor(tt[i, death_k])), 0))
                add_survived(i, k, upto)
    return surv, event


def prepare_batch(tensors: CohortTensors, spec: TwinSpec, norm: Normalizer) -> TwinBatch:
    """All patients of ``tensors`` as a :class:`TwinBatch` (checked against the spec)."""
    check_compatible(tensors, spec)
    mask = np.asarray(tensors.mask, bool)
    y = norm.values_to_model(np.asarray(tensors.values), mask)
    dose = norm.doses_to_model(np.asarray(tensors.doses))
    if not np.all(np.isfinite(dose)):
        raise FedTwinError("the cohort has non-finite doses", "check the extraction of drug_exposure quantities")
    surv, event = hazard_targets(tensors, spec)
    return TwinBatch(
        y=torch.from_numpy(y),
        m=torch.from_numpy(mask.astype(np.float32)),
        logcount=torch.from_numpy(np.log1p(np.maximum(np.asarray(tensors.counts, np.float32), 0.0)) * mask),
        dose=torch.from_numpy(dose),
        static=torch.from_numpy(static_to_model(np.asarray(tensors.static), tensors.static_names)),
        haz_surv=torch.from_numpy(surv),
        haz_event=torch.from_numpy(event),
    )
