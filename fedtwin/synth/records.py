"""From a simulated site to OMOP CDM rows, column by column with numpy.

Tables are held as columns (:class:`Table`) until they are written, so that building ~200
measurement rows per patient costs no Python loop per row; tuples are made only at write time.
Times are integer epoch seconds until then and become ``'YYYY-MM-DD HH:MM:SS'`` / ``'YYYY-MM-DD'``
text, which SQLite stores as is (and its ``julianday`` reads) and PostgreSQL's COPY parses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np

from fedtwin.synth import care
from fedtwin.synth import concepts as C
from fedtwin.synth.physiology import LatentParams
from fedtwin.synth.population import DAY, HOUR, Population
from fedtwin.synth.profiles import SiteProfile
from fedtwin.synth.simulation import NO_EVENT, Factual

Kind = Literal["int", "float", "str", "date", "datetime"]
NULL_INT = -(2**62)  # sentinel for NULL in integer and time columns


@dataclass
class Table:
    """One CDM table as columns. ``kinds`` says how each column becomes SQL values; integer and
    time columns use :data:`NULL_INT` for NULL, string columns ``None``."""

    name: str
    columns: list[str]
    kinds: dict[str, Kind]
    data: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(len(self.data[self.columns[0]])) if self.columns else 0

    def select(self, idx: np.ndarray) -> "Table":
        return Table(self.name, list(self.columns), dict(self.kinds), {c: self.data[c][idx] for c in self.columns})

    def concat(self, other: "Table") -> "Table":
        return Table(
            self.name, list(self.columns), dict(self.kinds),
            {c: np.concatenate([self.data[c], other.data[c]]) for c in self.columns},
        )

    def rows(self) -> Iterator[tuple]:
        """Tuples in ``columns`` order, ready for :func:`fedtwin.omop.bulk.bulk_insert`."""
        cols = [_python_values(self.data[c], self.kinds[c]) for c in self.columns]
        return zip(*cols)


def _table(name: str, spec: list[tuple[str, Kind, object]]) -> Table:
    return Table(name, [c for c, _, _ in spec], {c: k for c, k, _ in spec}, {c: np.asarray(v) for c, _, v in spec})


def _date_strings(epoch: np.ndarray) -> np.ndarray:
    days = np.floor_divide(epoch, DAY)
    uniq, inv = np.unique(days, return_inverse=True)
    text = np.datetime_as_string(uniq.astype("datetime64[D]"), unit="D").astype(object)
    return text[inv]


def _python_values(col: np.ndarray, kind: Kind) -> list:
    if kind == "str":
        return col.tolist()
    if kind == "float":
        return col.astype(np.float64).tolist()
    null = col == NULL_INT
    safe = np.where(null, 0, col).astype(np.int64)
    if kind == "int":
        out = safe.tolist()
    elif kind == "date":
        out = _date_strings(safe).tolist()
    else:
        # 'YYYY-MM-DDTHH:MM:SS' as fixed-width UCS4; the ISO 'T' (code point 10) becomes a space.
        text = np.ascontiguousarray(np.datetime_as_string(safe.astype("datetime64[s]"), unit="s").astype("U19"))
        text.view(np.uint32).reshape(-1, 19)[:, 10] = ord(" ")
        out = text.tolist()
    if null.any():
        for i in np.flatnonzero(null).tolist():
            out[i] = None
    return out


def _strings(values: list[str], idx: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=object)[idx]


@dataclass
class SiteRecords:
    """The CDM tables of one site, and facts the ground truth and the defect injector need."""

    tables: dict[str, Table]
    measurement: Table  # clean measurement rows (defect rows are added by fedtwin.synth.defects)
    period_start: np.ndarray  # (N,) epoch of each person's observation-period start date
    period_end: np.ndarray
    extra: dict[str, int] = field(default_factory=dict)


def _run_rows(rate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of a constant positive rate along bins: (row, first bin, end bin, rate)."""
    n, t = rate.shape
    padded = np.concatenate([np.zeros((n, 1)), rate, np.zeros((n, 1))], axis=1)
    change = padded[:, 1:] != padded[:, :-1]  # (n, t+1): a run boundary before bin j
    starts = change[:, :-1] & (rate > 0)
    ends = change[:, 1:] & (rate > 0)  # last bin of a run
    si, sk = np.nonzero(starts)
    _ei, ek = np.nonzero(ends)
    return si, sk, ek + 1, rate[si, sk]


def build_records(
    profile: SiteProfile, pop: Population, params: LatentParams, factual: Factual, rng: np.random.Generator,
) -> SiteRecords:
    """All CDM rows of the site except the vocabulary (see :mod:`fedtwin.synth.omop_writer`)."""
    n = pop.n
    pid = pop.person_id
    admit = pop.admit_epoch
    icu_end = admit + factual.icu_end_seconds
    died = factual.death_hour != NO_EVENT
    death_epoch = admit + factual.death_hour * HOUR + factual.death_offset
    has_aki = factual.aki_hour != NO_EVENT
    aki_epoch = admit + factual.aki_hour * HOUR + factual.aki_offset
    icu_visit = np.arange(1, n + 1, dtype=np.int64)
    prior_idx = np.flatnonzero(pop.prior_visit)
    prior_visit_id = np.full(n, NULL_INT, dtype=np.int64)
    prior_visit_id[prior_idx] = n + 1 + np.arange(prior_idx.size)
    tag = f"SYN{profile.site}"

    # --- person -------------------------------------------------------------------------------
    birth_day = pop.birth_epoch.astype("datetime64[s]").astype("datetime64[D]")
    ymd = np.datetime_as_string(birth_day, unit="D")
    year = np.array([int(s[:4]) for s in ymd], dtype=np.int64)
    month = np.array([int(s[5:7]) for s in ymd], dtype=np.int64)
    day = np.array([int(s[8:10]) for s in ymd], dtype=np.int64)
    race_label = {C.WHITE: "White", C.BLACK: "Black", C.ASIAN: "Asian", C.AMERICAN_INDIAN: "AIAN"}
    person = _table("person", [
        ("person_id", "int", pid),
        ("gender_concept_id", "int", pop.gender_concept_id),
        ("year_of_birth", "int", year),
        ("month_of_birth", "int", month),
        ("day_of_birth", "int", day),
        ("birth_datetime", "datetime", pop.birth_epoch),
        ("race_concept_id", "int", pop.race_concept_id),
        ("ethnicity_concept_id", "int", pop.ethnicity_concept_id),
        ("person_source_value", "str", np.array([f"{tag}-{i:07d}" for i in range(1, n + 1)], dtype=object)),
        ("gender_source_value", "str", np.where(pop.gender_concept_id == C.FEMALE, "F", "M").astype(object)),
        ("race_source_value", "str", np.array([race_label[int(r)] for r in pop.race_concept_id], dtype=object)),
        ("ethnicity_source_value", "str", np.where(pop.ethnicity_concept_id == C.HISPANIC, "Hispanic", "Not Hispanic").astype(object)),
    ])

    # --- visits -------------------------------------------------------------------------------
    visit = _table("visit_occurrence", [
        ("visit_occurrence_id", "int", np.concatenate([icu_visit, prior_visit_id[prior_idx]])),
        ("person_id", "int", np.concatenate([pid, pid[prior_idx]])),
        ("visit_concept_id", "int", np.concatenate([np.full(n, C.INTENSIVE_CARE), np.full(prior_idx.size, C.INPATIENT)])),
        ("visit_start_date", "date", np.concatenate([admit, pop.prior_start_epoch[prior_idx]])),
        ("visit_start_datetime", "datetime", np.concatenate([admit, pop.prior_start_epoch[prior_idx]])),
        ("visit_end_date", "date", np.concatenate([icu_end, pop.prior_end_epoch[prior_idx]])),
        ("visit_end_datetime", "datetime", np.concatenate([icu_end, pop.prior_end_epoch[prior_idx]])),
        ("visit_type_concept_id", "int", np.full(n + prior_idx.size, C.EHR)),
        ("visit_source_value", "str", np.array(["ICU"] * n + ["WARD"] * prior_idx.size, dtype=object)),
        ("preceding_visit_occurrence_id", "int", np.concatenate([prior_visit_id, np.full(prior_idx.size, NULL_INT)])),
    ])

    # --- conditions -----------------------------------------------------------------------------
    parts: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, str]] = []  # (rows, concept, epoch, visit, source)
    for flag, concept, source in ((pop.hypertension, C.HYPERTENSION, "I10"), (pop.diabetes, C.T2_DIABETES, "E11.9")):
        r = np.flatnonzero(flag)
        parts.append((r, concept, pop.comorbidity_epoch[r], prior_visit_id[r], source))
    r = np.flatnonzero(pop.septic)
    sepsis_offset = rng.integers(0, 3 * HOUR, n)
    parts.append((r, C.SEPSIS, admit[r] + sepsis_offset[r], icu_visit[r], "A41.9"))
    r = np.flatnonzero(has_aki)
    aki_in_icu = aki_epoch[r] < icu_end[r]
    parts.append((r, C.AKI, aki_epoch[r], np.where(aki_in_icu, icu_visit[r], NULL_INT), "N17.9"))
    cond_rows = np.concatenate([p[0] for p in parts])
    n_cond = cond_rows.size
    cond_epoch = np.concatenate([p[2] for p in parts])
    condition = _table("condition_occurrence", [
        ("condition_occurrence_id", "int", np.arange(1, n_cond + 1)),
        ("person_id", "int", pid[cond_rows]),
        ("condition_concept_id", "int", np.concatenate([np.full(p[0].size, p[1]) for p in parts])),
        ("condition_start_date", "date", cond_epoch),
        ("condition_start_datetime", "datetime", cond_epoch),
        ("condition_type_concept_id", "int", np.full(n_cond, C.EHR)),
        ("visit_occurrence_id", "int", np.concatenate([p[3] for p in parts])),
        ("condition_source_value", "str", np.concatenate([np.full(p[0].size, p[4], dtype=object) for p in parts])),
    ])

    # --- death ----------------------------------------------------------------------------------
    d = np.flatnonzero(died)
    septic_death = pop.septic[d]
    death = _table("death", [
        ("person_id", "int", pid[d]),
        ("death_date", "date", death_epoch[d]),
        ("death_datetime", "datetime", death_epoch[d]),
        ("death_type_concept_id", "int", np.full(d.size, C.EHR)),
        ("cause_concept_id", "int", np.where(septic_death, C.SEPSIS, NULL_INT)),
        ("cause_source_value", "str", np.where(septic_death, "A41.9", None).astype(object)),
    ])

    drug = _drug_table(profile, pid, admit, icu_visit, factual.doses, rng)
    measurement = _measurement_table(profile, pop, params, factual, icu_visit, prior_visit_id, rng)

    # --- observation periods: from the first to the last record of each person, in whole days --
    first = np.minimum(admit, np.where(pop.hypertension | pop.diabetes, pop.comorbidity_epoch, admit))
    first = np.minimum(first, np.where(pop.prior_visit, pop.prior_start_epoch, admit))
    last = np.maximum(icu_end, np.where(died, death_epoch, icu_end))
    last = np.maximum(last, np.where(has_aki, aki_epoch, icu_end))
    period_start = (first // DAY) * DAY
    period_end = (last // DAY) * DAY
    period = _table("observation_period", [
        ("observation_period_id", "int", np.arange(1, n + 1)),
        ("person_id", "int", pid),
        ("observation_period_start_date", "date", period_start),
        ("observation_period_end_date", "date", period_end),
        ("period_type_concept_id", "int", np.full(n, C.EHR)),
    ])
    tables = {
        "person": person,
        "observation_period": period,
        "visit_occurrence": visit,
        "condition_occurrence": condition,
        "drug_exposure": drug,
        "death": death,
    }
    return SiteRecords(tables=tables, measurement=measurement, period_start=period_start, period_end=period_end)


def _drug_table(
    profile: SiteProfile, pid: np.ndarray, admit: np.ndarray, visit: np.ndarray, doses: np.ndarray,
    rng: np.random.Generator,
) -> Table:
    """Infusions as one row per run of constant rate (norepinephrine) or per bolus hour (fluids),
    both aligned on bin edges; boluses (insulin, furosemide) at a random second of their bin."""
    blocks: list[dict[str, np.ndarray]] = []
    for d, drug in enumerate(C.DRUGS):
        unit = profile.dose_unit_of(drug.name)
        factor = drug.dose_units[unit]  # site unit -> canonical
        if drug.name == "norepinephrine":
            i, k0, k1, rate = _run_rows(doses[:, :, d])
            start, end = admit[i] + k0 * HOUR, admit[i] + k1 * HOUR
            qty = rate * (k1 - k0)
        elif drug.kind == "infusion":
            i, k = np.nonzero(doses[:, :, d] > 0)
            start, end = admit[i] + k * HOUR, admit[i] + (k + 1) * HOUR
            qty = doses[i, k, d]
        else:
            i, k = np.nonzero(doses[:, :, d] > 0)
            start = admit[i] + k * HOUR + rng.integers(60, HOUR - 60, i.size)
            end = start
            qty = doses[i, k, d]
        blocks.append({
            "person_id": pid[i],
            "drug_concept_id": np.full(i.size, drug.concept_id),
            "start": start,
            "end": end,
            "quantity": np.round(qty / factor, 6),
            "visit": visit[i],
            "source": np.full(i.size, profile.drug_source_codes[drug.name], dtype=object),
            "unit": np.full(i.size, unit, dtype=object),
        })
    cat = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    order = np.lexsort((cat["drug_concept_id"], cat["start"], cat["person_id"]))
    cat = {k: v[order] for k, v in cat.items()}
    m = order.size
    return _table("drug_exposure", [
        ("drug_exposure_id", "int", np.arange(1, m + 1)),
        ("person_id", "int", cat["person_id"]),
        ("drug_concept_id", "int", cat["drug_concept_id"]),
        ("drug_exposure_start_date", "date", cat["start"]),
        ("drug_exposure_start_datetime", "datetime", cat["start"]),
        ("drug_exposure_end_date", "date", cat["end"]),
        ("drug_exposure_end_datetime", "datetime", cat["end"]),
        ("drug_type_concept_id", "int", np.full(m, C.EHR)),
        ("quantity", "float", cat["quantity"]),
        ("route_concept_id", "int", np.full(m, C.INTRAVENOUS)),
        ("visit_occurrence_id", "int", cat["visit"]),
        ("drug_source_value", "str", cat["source"]),
        ("route_source_value", "str", np.full(m, "IV", dtype=object)),
        ("dose_unit_source_value", "str", cat["unit"]),
    ])


def site_units(profile: SiteProfile) -> list[C.Unit]:
    """The unit each state variable is recorded in at this site (spec order)."""
    return [C.UNITS[v][profile.unit_of(v)] for v in C.STATE_NAMES]


def _measurement_table(
    profile: SiteProfile, pop: Population, params: LatentParams, factual: Factual,
    icu_visit: np.ndarray, prior_visit_id: np.ndarray, rng: np.random.Generator,
) -> Table:
    """ICU readings from the simulated counts (the first reading of a bin uses the noise the
    staff policy saw), plus a few labs of earlier ward stays (before the index, never binned)."""
    counts = factual.counts
    i, k, v = np.nonzero(counts)
    c = counts[i, k, v].astype(np.int64)
    rep = np.repeat(np.arange(i.size), c)
    # j-th reading of its bin: 0 .. c-1
    j = np.arange(rep.size) - np.repeat(np.cumsum(c) - c, c)
    ii, kk, vv = i[rep], k[rep], v[rep]
    z = np.where(j == 0, factual.first_z[ii, kk, vv], rng.standard_normal(rep.size))
    truth = factual.states[ii, kk, vv]
    canonical = _read_one(truth, vv, z)
    # Stratified offsets: reading j of c falls in [j/c, (j+1)/c) of the hour, so times differ;
    # kept 1 s away from the bin edges, where julianday() rounding could move a reading across.
    cc = c[rep]
    offset = 1 + ((j + rng.random(rep.size)) / cc * (HOUR - 2)).astype(np.int64)
    when = pop.admit_epoch[ii] + kk * HOUR + offset
    person_rows, var_rows, when_rows, value_rows = [ii], [vv], [when], [canonical]
    visit_rows = [icu_visit[ii]]

    # Ward labs of an earlier inpatient stay: 1-3 glucose and creatinine readings.
    p = np.flatnonzero(pop.prior_visit)
    if p.size:
        per = rng.integers(1, 4, p.size)
        pp = np.repeat(p, per)
        nth = np.arange(pp.size) - np.repeat(np.cumsum(per) - per, per)
        for var, centre in ((2, params.glu_set), (3, params.cr_base)):
            span = pop.prior_end_epoch[pp] - pop.prior_start_epoch[pp]
            # stratified over the stay, so two readings of a person never share a time
            frac = (nth + rng.random(pp.size)) / np.repeat(per, per)
            t = pop.prior_start_epoch[pp] + (frac * span).astype(np.int64)
            person_rows.append(pp)
            var_rows.append(np.full(pp.size, var))
            when_rows.append(t)
            value_rows.append(_read_one(centre[pp], np.full(pp.size, var), rng.standard_normal(pp.size)))
            visit_rows.append(prior_visit_id[pp])
    person = np.concatenate(person_rows)
    var = np.concatenate(var_rows)
    when = np.concatenate(when_rows)
    canonical = np.concatenate(value_rows)
    visit = np.concatenate(visit_rows)
    order = np.lexsort((var, when, person))
    person, var, when, canonical, visit = person[order], var[order], when[order], canonical[order], visit[order]

    units = site_units(profile)
    factor = np.array([u.factor for u in units])[var]
    decimals = np.array([u.decimals for u in units])[var]
    value = canonical / factor
    for dcount in np.unique(decimals):
        sel = decimals == dcount
        value[sel] = np.round(value[sel], int(dcount))
    m = person.size
    concept = np.array([sv.concept_id for sv in C.STATE_VARIABLES])[var]
    unit_concept = np.array([u.concept_id for u in units])[var]
    unit_text = _strings([profile.unit_spellings[name] for name in C.STATE_NAMES], var)
    source = _strings([profile.source_codes[name] for name in C.STATE_NAMES], var)
    return _table("measurement", [
        ("measurement_id", "int", np.arange(1, m + 1)),
        ("person_id", "int", pop.person_id[person]),
        ("measurement_concept_id", "int", concept),
        ("measurement_date", "date", when),
        ("measurement_datetime", "datetime", when),
        ("measurement_type_concept_id", "int", np.full(m, C.EHR)),
        ("value_as_number", "float", value),
        ("unit_concept_id", "int", unit_concept),
        ("unit_source_value", "str", unit_text),
        ("measurement_source_value", "str", source),
        ("visit_occurrence_id", "int", visit),
    ])


def _read_one(truth: np.ndarray, var: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Readings of single values of mixed variables (``var`` indexes the spec order)."""
    sd, rel = care.OBS_SD[var], care.OBS_RELATIVE[var]
    noisy = np.where(rel, truth * (1.0 + sd * z), truth + sd * z)
    return np.clip(noisy, care.READ_LOWER[var], care.READ_UPPER[var])
