"""Spec + OMOP database -> :class:`CohortTensors`, streamed in chunks of persons.

Memory is bounded by the chunk (the measurement table is aggregated per bin inside the database
and never fetched row by row), plus the output arrays themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from fedtwin.errors import FedTwinError
from fedtwin.extract import queries
from fedtwin.extract.cohort import FEMALE, HISPANIC, MALE, RACES, CohortIndex, load_cohort_index
from fedtwin.extract.tensors import CohortTensors
from fedtwin.omop.database import OmopDatabase
from fedtwin.spec import TwinSpec, spec_hash

DEFAULT_CHUNK = 4000


@dataclass
class ExtractionStats:
    """What was dropped and why; counts of persons go through suppression before display."""

    candidates: int = 0
    excluded_age: int = 0
    excluded_no_person: int = 0
    excluded_died_in_history: int = 0
    excluded_few_observations: int = 0
    drug_rows_unknown_unit: int = 0
    drug_rows_negative: int = 0
    measurement_bins: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def static_names(spec: TwinSpec) -> list[str]:
    names: list[str] = []
    for cov in spec.static_covariates:
        if cov == "age":
            names.append("age")
        elif cov == "sex":
            names.append("sex_female")
        elif cov == "race":
            names += ["race_white", "race_black", "race_asian", "race_other"]
        elif cov == "ethnicity":
            names.append("ethnicity_hispanic")
    return names


def _static(spec: TwinSpec, cohort: CohortIndex, sel: slice) -> np.ndarray:
    cols = []
    for cov in spec.static_covariates:
        if cov == "age":
            cols.append(cohort.age[sel])
        elif cov == "sex":
            g = cohort.gender_concept_id[sel]
            cols.append(np.where(g == FEMALE, 1.0, np.where(g == MALE, 0.0, 0.5)))
        elif cov == "race":
            r = cohort.race_concept_id[sel]
            known = np.isin(r, [8527, 8516, 8515])
            cols += [(r == 8527) * 1.0, (r == 8516) * 1.0, (r == 8515) * 1.0, (~known) * 1.0]
        elif cov == "ethnicity":
            cols.append((cohort.ethnicity_concept_id[sel] == HISPANIC) * 1.0)
    n = len(cohort.person_ids[sel])
    return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((n, 0), np.float32)


def _age_band(age: np.ndarray, bands: list[float]) -> np.ndarray:
    labels = [f"<{bands[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(bands, bands[1:])] + [f"{bands[-1]:g}+"]
    pos = np.searchsorted(np.asarray(bands), age, side="right")
    out = np.asarray(labels, dtype=object)[pos]
    out[~np.isfinite(age)] = "unknown"
    return out


def _subgroups(spec: TwinSpec, cohort: CohortIndex, sel: slice) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    f = spec.fairness
    if f.sex:
        g = cohort.gender_concept_id[sel]
        out["sex"] = np.where(g == FEMALE, "F", np.where(g == MALE, "M", "unknown")).astype(object)
    if f.age_bands:
        out["age"] = _age_band(cohort.age[sel], f.age_bands)
    if f.race:
        out["race"] = np.array([RACES.get(int(r), "other" if r else "unknown") for r in cohort.race_concept_id[sel]], dtype=object)
    return out


def time_since_last(mask: np.ndarray) -> np.ndarray:
    """Bins since the last observation at or before each bin (0 = observed now, -1 = never)."""
    n, t, v = mask.shape
    steps = np.arange(t, dtype=np.float32)[None, :, None]
    last = np.where(mask, steps, -np.inf)
    last = np.maximum.accumulate(last, axis=1)
    out = steps - last
    out[~np.isfinite(out)] = -1.0
    return out.astype(np.float32)


def _spread_doses(spec: TwinSpec, rows: list, pos: dict[int, int], n: int, stats: ExtractionStats) -> np.ndarray:
    """Intervention amount per bin: bolus at its start bin, infusion/exposure by interval overlap."""
    t_total, step = spec.time.total_steps, spec.time.step_seconds
    doses = np.zeros((n, t_total, len(spec.interventions)), dtype=np.float64)
    if not rows:
        return doses.astype(np.float32)
    edges = np.arange(t_total + 1, dtype=np.float64) * step
    person = np.array([pos.get(int(r[0]), -1) for r in rows])
    which = np.array([r[1] for r in rows], dtype=np.int64)
    start = np.array([r[2] for r in rows], dtype=np.float64)
    end = np.array([r[3] for r in rows], dtype=np.float64)
    qty = np.array([np.nan if r[4] is None else float(r[4]) for r in rows], dtype=np.float64)
    unit = [r[5] for r in rows]
    kind = np.array([spec.interventions[w].kind for w in which])
    factor = np.array(
        [1.0 if kind[i] == "exposure" else spec.interventions[w].dose_units.get(unit[i] or "", np.nan) for i, w in enumerate(which)]
    )
    bad_unit = np.isnan(factor) & (kind != "exposure")
    negative = (qty < 0) & (kind != "exposure")
    stats.drug_rows_unknown_unit += int(bad_unit.sum())
    stats.drug_rows_negative += int(negative.sum())
    ok = (person >= 0) & ~bad_unit & ~negative & (end >= start)
    ok &= (kind == "exposure") | np.isfinite(qty)
    amount = np.where(kind == "exposure", 0.0, np.nan_to_num(qty) * np.nan_to_num(factor))
    point = ok & ((kind == "bolus") | ((kind == "infusion") & (end <= start)))
    if point.any():
        b = np.floor(start[point] / step).astype(np.int64)
        inside = (b >= 0) & (b < t_total)
        np.add.at(doses, (person[point][inside], b[inside], which[point][inside]), amount[point][inside])
    spread = ok & ~point
    idx = np.flatnonzero(spread)
    batch = max(1, 2_000_000 // (t_total + 1))
    for lo in range(0, idx.size, batch):
        sel = idx[lo : lo + batch]
        s, e = start[sel, None], end[sel, None]
        dur = np.maximum(e - s, 1e-9)
        # Cumulative amount delivered by each bin edge, for a constant rate over [s, e].
        per_second = np.where(kind[sel] == "exposure", 1.0 / step, amount[sel] / dur[:, 0])[:, None]
        cum = per_second * np.clip(edges[None, :] - s, 0.0, dur)
        np.add.at(doses, (person[sel][:, None], np.arange(t_total)[None, :], which[sel][:, None]), np.diff(cum, axis=1))
    return doses.astype(np.float32)


class Extractor:
    """Reads a cohort for a spec from an OMOP database. ``iter_chunks`` streams; ``extract`` collects."""

    def __init__(self, db: OmopDatabase, spec: TwinSpec, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.db, self.spec, self.chunk_size = db, spec, chunk_size
        self.stats = ExtractionStats()
        self._hash = spec_hash(spec)

    def _required_tables(self) -> tuple[str, ...]:
        s = self.spec
        need = ["person", "measurement"]
        need.append({"visit": "visit_occurrence", "condition": "condition_occurrence"}.get(s.cohort.anchor, "measurement"))
        if s.cohort.anchor == "observation_period":
            need.append("observation_period")
        if s.interventions:
            need.append("drug_exposure")
        if any(o.kind == "death" for o in s.outcomes):
            need.append("death")
        if any(o.kind == "condition" for o in s.outcomes):
            need.append("condition_occurrence")
        return tuple(dict.fromkeys(need))

    def iter_chunks(self, progress: Callable[[int], None] | None = None) -> Iterator[CohortTensors]:
        self.db.require_tables(self._required_tables())
        with self.db.connect() as conn:
            cohort = load_cohort_index(conn, self.spec)
            self.stats.candidates = len(cohort) + cohort.excluded_age
            self.stats.excluded_age = cohort.excluded_age
            self.stats.excluded_no_person = cohort.excluded_no_person
            for lo in range(0, len(cohort), self.chunk_size):
                sel = slice(lo, min(lo + self.chunk_size, len(cohort)))
                chunk = self._chunk(conn, cohort, sel)
                if progress:
                    progress(sel.stop - sel.start)
                if chunk.n_patients:
                    yield chunk

    def _chunk(self, conn, cohort: CohortIndex, sel: slice) -> CohortTensors:  # noqa: ANN001
        spec = self.spec
        pids = cohort.person_ids[sel]
        lo, hi = int(pids[0]), int(pids[-1])
        pos = {int(p): i for i, p in enumerate(pids)}
        n, t_total, v = len(pids), spec.time.total_steps, len(spec.state_variables)
        values = np.zeros((n, t_total, v), np.float32)
        counts = np.zeros((n, t_total, v), np.int32)
        for person_id, var, b, mean, cnt in conn.execute(queries.measurement_bins(spec, lo, hi)):
            i = pos.get(int(person_id))
            if i is None:
                continue
            values[i, b, var] = mean
            counts[i, b, var] = cnt
            self.stats.measurement_bins += 1
        mask = counts > 0
        doses = _spread_doses(spec, conn.execute(queries.drug_rows(spec, lo, hi)).all(), pos, n, self.stats)

        step, pred = spec.time.step_seconds, spec.time.history_steps * spec.time.step_seconds
        n_out = len(spec.outcomes)
        event = np.zeros((n, n_out), bool)
        when = np.full((n, n_out), np.nan, np.float32)
        died_in_history = np.zeros(n, bool)
        death_rel = {int(p): float(r) for p, r in conn.execute(queries.death_times(spec, lo, hi)) if r is not None}
        for i, p in enumerate(pids):
            r = death_rel.get(int(p))
            if r is not None and r < pred:
                died_in_history[i] = True
        for k, out in enumerate(spec.outcomes):
            if out.kind == "death":
                rel = death_rel
            else:
                rel = {int(p): float(r) for p, r in conn.execute(queries.condition_times(spec, out.concept_ids, lo, hi)) if r is not None}
            for p, r in rel.items():
                i = pos.get(p)
                if i is None:
                    continue
                steps_after = (r - pred) / step
                if 0 <= steps_after < out.within_steps:
                    event[i, k] = True
                    when[i, k] = steps_after

        hist_obs = mask[:, : spec.time.history_steps].sum(axis=(1, 2))
        few = hist_obs < spec.cohort.min_history_observations
        keep = ~died_in_history & ~few
        self.stats.excluded_died_in_history += int(died_in_history.sum())
        self.stats.excluded_few_observations += int((few & ~died_in_history).sum())
        tensors = CohortTensors(
            spec_hash=self._hash,
            state_names=spec.state_names,
            intervention_names=spec.intervention_names,
            outcome_names=spec.outcome_names,
            static_names=static_names(spec),
            history_steps=spec.time.history_steps,
            horizon_steps=spec.time.horizon_steps,
            step_seconds=step,
            person_ids=pids,
            values=values,
            mask=mask,
            counts=np.minimum(counts, np.iinfo(np.int16).max).astype(np.int16),
            time_since=time_since_last(mask),
            doses=doses,
            outcome_event=event,
            outcome_time=when,
            static=_static(spec, cohort, sel),
            subgroups=_subgroups(spec, cohort, sel),
            index_epoch=cohort.index_epoch[sel],
        )
        return tensors.select(np.flatnonzero(keep))

    def extract(self, progress: Callable[[int], None] | None = None) -> CohortTensors:
        chunks = list(self.iter_chunks(progress))
        if not chunks:
            raise FedTwinError(
                f"the cohort of spec {self.spec.name!r} is empty in {self.db.display_url}",
                "check the cohort's anchor concepts and age limits with `fedtwin site check`, "
                "or load data with `fedtwin synth` / `fedtwin omop load`",
            )
        return concat(chunks)


def concat(chunks: list[CohortTensors]) -> CohortTensors:
    return CohortTensors.concat(chunks)


def extract_cohort(db: OmopDatabase, spec: TwinSpec, chunk_size: int = DEFAULT_CHUNK) -> CohortTensors:
    """Convenience: the whole cohort in memory."""
    return Extractor(db, spec, chunk_size).extract()
