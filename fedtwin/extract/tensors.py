"""What extraction hands to a twin: per-patient arrays, missingness explicit.

Nothing here is imputed. A value that was not measured in a bin has ``mask == False`` and
``values == 0`` (the zero is a placeholder that models must multiply by the mask, never read);
``time_since`` says how many bins ago the variable was last measured (``-1`` = never yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass
class CohortTensors:
    """Arrays for N patients, T = history + horizon bins, V state variables, D interventions.

    - ``person_ids`` (N,) int64: OMOP person_id; stays at the site, never leaves it.
    - ``values`` (N, T, V) float32: mean of the bin's measurements in canonical units, 0 if none.
    - ``mask`` (N, T, V) bool: True where the bin has at least one plausible measurement.
    - ``counts`` (N, T, V) int16: how many measurements fell in the bin (informative missingness).
    - ``time_since`` (N, T, V) float32: bins since the last measurement, -1 if none yet.
    - ``doses`` (N, T, D) float32: intervention amount per bin in canonical units
      (exposure fraction for ``kind: exposure``).
    - ``outcome_event`` (N, O) bool: the outcome happened within its window after prediction time.
    - ``outcome_time`` (N, O) float32: bins from prediction time to the event (NaN if none).
    - ``static`` (N, S) float32: static covariates, columns named by ``static_names``.
    - ``subgroups``: fairness label per patient per attribute (e.g. ``{"sex": array(["F", ...])}``).
    - ``index_epoch`` (N,) float64: index time (UTC seconds); stays at the site.
    """

    spec_hash: str
    state_names: list[str]
    intervention_names: list[str]
    outcome_names: list[str]
    static_names: list[str]
    history_steps: int
    horizon_steps: int
    step_seconds: float
    person_ids: np.ndarray
    values: np.ndarray
    mask: np.ndarray
    counts: np.ndarray
    time_since: np.ndarray
    doses: np.ndarray
    outcome_event: np.ndarray
    outcome_time: np.ndarray
    static: np.ndarray
    subgroups: dict[str, np.ndarray] = field(default_factory=dict)
    index_epoch: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n_patients(self) -> int:
        return int(self.person_ids.shape[0])

    @property
    def total_steps(self) -> int:
        return self.history_steps + self.horizon_steps

    # Fields that describe the cohort as a whole; every other field has one row per patient.
    _META = ("spec_hash", "state_names", "intervention_names", "outcome_names", "static_names",
             "history_steps", "horizon_steps", "step_seconds")

    def _map_rows(self, per_row) -> "CohortTensors":  # noqa: ANN001 - array -> array
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._META:
                kwargs[f.name] = value
            elif f.name == "subgroups":
                kwargs[f.name] = {k: per_row(v) for k, v in value.items()}
            else:
                kwargs[f.name] = per_row(value)
        return CohortTensors(**kwargs)

    def select(self, idx: np.ndarray) -> "CohortTensors":
        """The same cohort restricted to the patients at positions ``idx`` (e.g. a train split)."""
        return self._map_rows(lambda a: a[idx])

    @staticmethod
    def concat(chunks: list["CohortTensors"]) -> "CohortTensors":
        """Patients of several chunks (or databases) of the same spec, in order."""
        first = chunks[0]
        if len(chunks) == 1:
            return first
        stacked = {f.name: [getattr(c, f.name) for c in chunks] for f in fields(first) if f.name not in CohortTensors._META}
        out = first._map_rows(lambda a: a)
        for name, parts in stacked.items():
            if name == "subgroups":
                out.subgroups = {k: np.concatenate([p[k] for p in parts]) for k in first.subgroups}
            else:
                setattr(out, name, np.concatenate(parts))
        return out

    def validate(self) -> None:
        """Check shapes and the no-imputation invariant; raises AssertionError on a bug."""
        n, t, v = self.values.shape
        assert t == self.total_steps and v == len(self.state_names)
        assert self.mask.shape == (n, t, v) and self.counts.shape == (n, t, v) and self.time_since.shape == (n, t, v)
        assert self.doses.shape == (n, t, len(self.intervention_names))
        assert self.outcome_event.shape == (n, len(self.outcome_names))
        assert self.static.shape == (n, len(self.static_names))
        assert not np.any(self.values[~self.mask]), "unobserved bins must hold the 0 placeholder"
        assert np.all(np.isfinite(self.values)) and np.all(np.isfinite(self.doses))
