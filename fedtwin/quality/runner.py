"""Running the checks: structure first (tables, columns), then set-based SQL, one connection.

Every query aggregates inside the database (COUNT/SUM over joins, NOT EXISTS, GROUP BY ...
HAVING); nothing patient-level is fetched. Concept ids, unit ids, conversion factors, ranges and
dose-unit spellings from the spec all reach SQL as bound parameters, through the omop-cdm
``Table`` objects (whose placeholder schemas the engine translates to the site's).
"""

from __future__ import annotations

import datetime as dt
from typing import Mapping

from sqlalchemy import and_, case, exists, func, inspect, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from fedtwin.errors import DatabaseError
from fedtwin.omop.database import OmopDatabase
from fedtwin.omop.schema import cdm_table
from fedtwin.privacy.suppression import suppress_partition
from fedtwin.quality.checks import CHECKS, CheckDef, CheckResult
from fedtwin.quality.report import QualityReport
from fedtwin.extract.cohort import index_query
from fedtwin.omop.time_sql import day_of
from fedtwin.quality.sql import ends_before_start
from fedtwin.spec import TwinSpec, spec_hash

# The columns each table must have for the checks (and extraction) to run.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "person": ("person_id", "year_of_birth", "birth_datetime"),
    "observation_period": ("person_id", "observation_period_start_date", "observation_period_end_date"),
    "measurement": (
        "person_id", "measurement_concept_id", "measurement_date", "measurement_datetime",
        "value_as_number", "unit_concept_id",
    ),
    "concept": ("concept_id", "concept_code"),
    "visit_occurrence": ("person_id", "visit_concept_id", "visit_start_date", "visit_start_datetime"),
    "condition_occurrence": ("person_id", "condition_concept_id", "condition_start_date", "condition_start_datetime"),
    "drug_exposure": (
        "person_id", "drug_concept_id", "drug_exposure_start_date", "drug_exposure_start_datetime",
        "drug_exposure_end_date", "drug_exposure_end_datetime", "quantity", "dose_unit_source_value",
    ),
    "death": ("person_id",),
}

_LISTED_DOSE_UNITS = 5


def required_tables(spec: TwinSpec) -> tuple[str, ...]:
    """The CDM tables ``spec`` reads: always person, observation_period, measurement, concept."""
    need = ["person", "observation_period", "measurement", "concept"]
    if spec.cohort.anchor == "visit":
        need.append("visit_occurrence")
    if spec.cohort.anchor == "condition" or any(o.kind == "condition" for o in spec.outcomes):
        need.append("condition_occurrence")
    if spec.interventions:
        need.append("drug_exposure")
    if any(o.kind == "death" for o in spec.outcomes):
        need.append("death")
    return tuple(need)


def _first_line(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _physical_schema(db: OmopDatabase, table: str) -> str | None:
    if cdm_table(table).schema == "vocabulary_schema":
        return db.vocabulary_schema or db.cdm_schema
    return db.cdm_schema


def validate_structure(db: OmopDatabase, tables: tuple[str, ...]) -> None:
    """Refuse, naming what is missing, a database without the tables or columns the checks read."""
    try:
        vocab_apart = db.vocabulary_schema not in (None, db.cdm_schema)
        in_cdm = tuple(t for t in tables if not (vocab_apart and cdm_table(t).schema == "vocabulary_schema"))
        db.require_tables(in_cdm)
        with db.connect() as conn:
            insp = inspect(conn)
            if vocab_apart:
                present = set(insp.get_table_names(schema=db.vocabulary_schema))
                absent = [t for t in tables if t not in in_cdm and t not in present]
                if absent:
                    raise DatabaseError(
                        f"{db.display_url}: vocabulary schema {db.vocabulary_schema!r} has no table(s) {', '.join(absent)}",
                        "point --vocabulary-schema at the schema holding the OHDSI vocabulary tables",
                    )
            missing: list[str] = []
            for t in tables:
                cols = {c["name"].lower() for c in insp.get_columns(t, schema=_physical_schema(db, t))}
                missing += [f"{t}.{c}" for c in REQUIRED_COLUMNS[t] if c not in cols]
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"{db.display_url} cannot be read as an OMOP CDM database: {_first_line(exc)}",
            "point --db at an OMOP CDM 5.4 database (SQLite file or PostgreSQL URL)",
        ) from None
    if missing:
        raise DatabaseError(
            f"{db.display_url}: the OMOP CDM tables lack column(s) {', '.join(missing)}",
            "load a complete OMOP CDM 5.4 schema (OHDSI DDL or `fedtwin omop load`); columns are "
            "named as in the CDM 5.4 specification",
        )


class _Run:
    """State of one run: the spec, the suppression threshold, threshold overrides."""

    def __init__(self, spec: TwinSpec, threshold: int, overrides: Mapping[str, float]) -> None:
        self.spec = spec
        self.threshold = threshold
        self.overrides = dict(overrides)
        self.m = cdm_table("measurement")
        self.p = cdm_table("person")
        self.op = cdm_table("observation_period")
        self.measurement_ids = [cid for v in spec.state_variables for cid in v.concept_ids]
        self.drug_ids = sorted({cid for iv in spec.interventions for cid in iv.concept_ids})

    def result(
        self, defn: CheckDef, subject: str | None, failing: int | None, checked: int, *,
        table: str | None = None, min_count: int | None = None, details: dict | None = None, **fmt: object,
    ) -> CheckResult:
        key = defn.id if subject is None else f"{defn.id}.{subject}"
        threshold_pct = self.overrides.get(key, self.overrides.get(defn.id, defn.threshold_pct))
        ctx = {"subject": subject or "", **fmt}
        return CheckResult(
            check=defn,
            subject=subject,
            table=table or defn.table,
            failing=None if failing is None else int(failing),
            checked=int(checked),
            threshold_pct=None if min_count is not None else threshold_pct,
            min_count=min_count,
            description=defn.description.format(**ctx),
            fix=defn.fix.format(**ctx),
            details=details or {},
        )

    def has_person(self, person_col) -> object:  # noqa: ANN001 - a Column
        return exists().where(self.p.c.person_id == person_col)

    def in_period(self, person_col, day) -> object:  # noqa: ANN001
        op = self.op
        return exists().where(
            op.c.person_id == person_col,
            day_of(op.c.observation_period_start_date) <= day,
            day_of(op.c.observation_period_end_date) >= day,
        )


def _n(value: object) -> int:
    return int(value or 0)


def _count(conn: Connection, table, *where) -> int:  # noqa: ANN001 - a Table or subquery
    """``SELECT count(*) FROM table WHERE ...``. Correlated (NOT) EXISTS conditions stay in the
    WHERE clause, where both databases plan them as semi/anti joins (inside a CASE they would
    run once per row)."""
    return _n(conn.execute(select(func.count()).select_from(table).where(*where)).scalar())


def _spec_concepts(spec: TwinSpec) -> dict[int, list[str]]:
    """Every concept id the spec names, with what it is used as (unit 0 = 'no unit' is skipped)."""
    roles: dict[int, list[str]] = {}

    def add(cid: int, role: str) -> None:
        if cid > 0:
            roles.setdefault(cid, []).append(role)

    for v in spec.state_variables:
        for cid in v.concept_ids:
            add(cid, f"state variable {v.name}")
        for u in v.units:
            add(u.concept_id, f"unit of {v.name}")
    for cid in spec.cohort.visit_concept_ids:
        add(cid, "cohort visit")
    for cid in spec.cohort.condition_concept_ids:
        add(cid, "cohort condition")
    for iv in spec.interventions:
        for cid in iv.concept_ids:
            add(cid, f"intervention {iv.name}")
    for o in spec.outcomes:
        for cid in o.concept_ids:
            add(cid, f"outcome {o.name}")
    return roles


def _concepts(conn: Connection, r: _Run) -> list[CheckResult]:
    c = cdm_table("concept")
    roles = _spec_concepts(r.spec)
    ids = sorted(roles)
    present = {int(x) for x in conn.execute(select(c.c.concept_id).where(c.c.concept_id.in_(ids))).scalars()}
    missing = [cid for cid in ids if cid not in present]
    listed = ", ".join(f"{cid} ({'; '.join(roles[cid])})" for cid in missing) or "none"
    return [
        r.result(
            CHECKS["concept_in_vocabulary"], None, len(missing), len(ids), missing=listed,
            details={"missing_concept_ids": [{"concept_id": cid, "used_as": roles[cid]} for cid in missing]},
        )
    ]


def _measurements(conn: Connection, r: _Run) -> list[CheckResult]:
    """Per state variable: unknown units, missing values, implausible values (one GROUP BY)."""
    m, spec = r.m, r.spec
    unit = func.coalesce(m.c.unit_concept_id, 0)
    implausible = []
    for v in spec.state_variables:
        lo, hi = v.plausible_range
        for u in v.units:
            converted = m.c.value_as_number * u.factor + u.offset
            implausible.append(
                (and_(m.c.measurement_concept_id.in_(v.concept_ids), unit == u.concept_id, or_(converted < lo, converted > hi)), 1)
            )
    # Grouped by the raw unit column (NULL and 0 both mean "no unit" and are merged below): an
    # expression with a bound parameter could not be repeated in GROUP BY on PostgreSQL.
    q = (
        select(
            m.c.measurement_concept_id,
            m.c.unit_concept_id,
            func.count(),
            func.count(m.c.value_as_number),
            func.sum(case(*implausible, else_=0)),
        )
        .select_from(m)
        .where(m.c.measurement_concept_id.in_(r.measurement_ids))
        .group_by(m.c.measurement_concept_id, m.c.unit_concept_id)
    )
    groups = [(int(cid), int(u or 0), _n(n), _n(nv), _n(bad)) for cid, u, n, nv, bad in conn.execute(q)]

    unknown_ids = sorted(
        {u for v in spec.state_variables for cid, u, *_ in groups if cid in v.concept_ids and v.conversion_for(u) is None}
    )
    codes: dict[int, str] = {}
    if unknown_ids:
        c = cdm_table("concept")
        rows = conn.execute(select(c.c.concept_id, c.c.concept_code).where(c.c.concept_id.in_(unknown_ids)))
        codes = {int(cid): str(code) for cid, code in rows}

    out: list[CheckResult] = []
    for v in spec.state_variables:
        mine = [g for g in groups if g[0] in v.concept_ids]
        n = sum(g[2] for g in mine)
        missing_value = sum(g[2] - g[3] for g in mine)
        implausible_n = sum(g[4] for g in mine)
        by_unit: dict[int, int] = {}
        for _cid, u, cnt, _nv, _bad in mine:
            if v.conversion_for(u) is None:
                by_unit[u] = by_unit.get(u, 0) + cnt
        unknown = sum(by_unit.values())
        shown = suppress_partition({str(u): k for u, k in sorted(by_unit.items())}, r.threshold)
        details = {
            "accepted_unit_concept_ids": [u.concept_id for u in v.units],
            "unknown_units": [
                {"unit_concept_id": u, "code": codes.get(u), "rows": shown[str(u)]} for u in sorted(by_unit)
            ],
        }
        ids_seen = ", ".join(str(u) for u in sorted(by_unit)) or "none"
        out.append(r.result(CHECKS["measurement_unit_known"], v.name, unknown, n, units=ids_seen, details=details))
        out.append(r.result(CHECKS["measurement_value_present"], v.name, missing_value, n))
        lo, hi = v.plausible_range
        out.append(
            r.result(
                CHECKS["measurement_value_plausible"], v.name, implausible_n, n,
                details={"plausible_range": [lo, hi], "canonical_unit": v.canonical_unit},
            )
        )
    return out


def _measurement_table(conn: Connection, r: _Run) -> list[CheckResult]:
    """Duplicates, orphans and rows outside observation periods, over the spec's concepts."""
    m = r.m
    spec_rows = m.c.measurement_concept_id.in_(r.measurement_ids)
    has_person = r.has_person(m.c.person_id)
    inside = r.in_period(m.c.person_id, day_of(m.c.measurement_date))
    total = _count(conn, m, spec_rows)
    orphans = _count(conn, m, spec_rows, ~has_person)
    outside = _count(conn, m, spec_rows, has_person, ~inside)
    dup_groups = (
        select(func.count().label("n"))
        .select_from(m)
        .where(spec_rows)
        .group_by(
            m.c.person_id, m.c.measurement_concept_id, m.c.measurement_date, m.c.measurement_datetime,
            m.c.value_as_number, m.c.unit_concept_id,
        )
        .having(func.count() > 1)
        .subquery("dup")
    )
    extra = conn.execute(select(func.sum(dup_groups.c.n - 1))).scalar()
    return [
        r.result(CHECKS["person_exists"], "measurement", orphans, total, table="measurement"),
        r.result(CHECKS["measurement_duplicate"], None, _n(extra), total),
        r.result(CHECKS["measurement_in_observation_period"], None, outside, total),
    ]


_ANCHOR_TABLE = {
    "visit": "visit_occurrence",
    "condition": "condition_occurrence",
    "first_measurement": "measurement",
    "observation_period": "observation_period",
}


def _cohort(conn: Connection, r: _Run) -> tuple[int, list[CheckResult]]:
    """Cohort size (persons with a qualifying anchor, of age) and which variables they lack."""
    spec, p, m = r.spec, r.p, r.m
    # The same anchor query extraction uses, so the gate counts the cohort extraction will read
    # (before its history-based exclusions); joined to person so orphans do not count.
    idx = index_query(spec).subquery("idx")
    cohort = (
        select(idx.c.person_id.label("person_id"))
        .select_from(idx.join(p, p.c.person_id == idx.c.person_id))
        .subquery("cohort")
    )
    persons = _count(conn, cohort)
    # Persons measured, aggregated first and then joined to the cohort: a plan that stays a hash
    # join even on a freshly loaded PostgreSQL database without statistics (a correlated NOT
    # EXISTS from the cohort side can turn into a nested loop over the whole table there).
    lacking = []
    for v in spec.state_variables:
        measured = (
            select(m.c.person_id.label("person_id"))
            .where(m.c.measurement_concept_id.in_(v.concept_ids), m.c.value_as_number.is_not(None))
            .group_by(m.c.person_id)
            .subquery("measured")
        )
        lacking.append(persons - _count(conn, cohort.join(measured, measured.c.person_id == cohort.c.person_id)))
    anchor = spec.cohort.anchor
    out = [
        r.result(
            CHECKS["cohort_size"], None, None, persons, table=_ANCHOR_TABLE[anchor], min_count=spec.cohort.min_patients,
            anchor=anchor, min_patients=spec.cohort.min_patients,
            details={"anchor": anchor, "min_age": spec.cohort.min_age},
        )
    ]
    for v, n_lacking in zip(spec.state_variables, lacking):
        out.append(r.result(CHECKS["variable_recorded"], v.name, n_lacking, persons))
    return persons, out


def _observation_periods(conn: Connection, r: _Run) -> list[CheckResult]:
    p, op = r.p, r.op
    persons = _count(conn, p)
    without = _count(conn, p, ~exists().where(op.c.person_id == p.c.person_id))
    return [r.result(CHECKS["person_has_observation_period"], None, without, persons)]


def _orphans(conn: Connection, r: _Run, tables: tuple[str, ...]) -> list[CheckResult]:
    """Orphan rows in the other tables the spec reads (measurement/drug_exposure are done with
    their table checks)."""
    spec = r.spec
    filters = {
        "observation_period": [],
        "visit_occurrence": lambda t: [t.c.visit_concept_id.in_(spec.cohort.visit_concept_ids)],
        "condition_occurrence": lambda t: [
            t.c.condition_concept_id.in_(
                sorted(set(spec.cohort.condition_concept_ids) | {c for o in spec.outcomes for c in o.concept_ids})
            )
        ],
        "death": [],
    }
    out = []
    for name in ("visit_occurrence", "condition_occurrence", "observation_period", "death"):
        if name not in tables:
            continue
        t = cdm_table(name)
        f = filters[name]
        where = f(t) if callable(f) else f
        total = _count(conn, t, *where)
        orphans = _count(conn, t, *where, ~r.has_person(t.c.person_id))
        out.append(r.result(CHECKS["person_exists"], name, orphans, total, table=name))
    return out


def _drugs(conn: Connection, r: _Run) -> tuple[dict[str, int], list[CheckResult]]:
    """Per bolus/infusion intervention: dose units, quantities; then table-level checks."""
    d = cdm_table("drug_exposure")
    out: list[CheckResult] = []
    rows_per_intervention: dict[str, int] = {}
    for iv in r.spec.interventions:
        mine = d.c.drug_concept_id.in_(iv.concept_ids)
        if iv.kind == "exposure":
            rows_per_intervention[iv.name] = _count(conn, d, mine)
            continue
        unit = d.c.dose_unit_source_value
        unknown = or_(unit.is_(None), unit.not_in(sorted(iv.dose_units)))
        n, bad_unit, no_unit, no_qty, negative = conn.execute(
            select(
                func.count(),
                func.sum(case((unknown, 1), else_=0)),
                func.sum(case((unit.is_(None), 1), else_=0)),
                func.sum(case((d.c.quantity.is_(None), 1), else_=0)),
                func.sum(case((d.c.quantity < 0, 1), else_=0)),
            )
            .select_from(d)
            .where(mine)
        ).one()
        n, bad_unit, no_unit = _n(n), _n(bad_unit), _n(no_unit)
        rows_per_intervention[iv.name] = n
        # Free-text spellings are listed only when frequent (at least the suppression threshold).
        frequent = conn.execute(
            select(unit, func.count())
            .where(mine, unit.is_not(None), unit.not_in(sorted(iv.dose_units)))
            .group_by(unit)
            .having(func.count() >= r.threshold)
            .order_by(func.count().desc(), unit)
            .limit(_LISTED_DOSE_UNITS)
        ).all()
        # Cells of a partition of the failing rows: frequent spellings, missing, all others.
        cells = {f"value:{v}": _n(k) for v, k in frequent}
        cells["missing"] = no_unit
        cells["other"] = bad_unit - no_unit - sum(_n(k) for _v, k in frequent)
        shown = suppress_partition(cells, r.threshold)
        listed = [{"value": str(v), "rows": shown[f"value:{v}"]} for v, _k in frequent]
        details = {
            "accepted_dose_units": sorted(iv.dose_units),
            "unknown_dose_units": listed,
            "rows_without_dose_unit": shown["missing"],
            "rows_with_rare_unknown_dose_units": shown["other"],
        }
        out.append(r.result(CHECKS["drug_dose_unit_known"], iv.name, bad_unit, n, kind=iv.kind, details=details))
        out.append(r.result(CHECKS["drug_quantity_present"], iv.name, _n(no_qty), n, kind=iv.kind))
        out.append(r.result(CHECKS["drug_quantity_not_negative"], iv.name, _n(negative), n, kind=iv.kind))

    spec_rows = d.c.drug_concept_id.in_(r.drug_ids)
    has_person = r.has_person(d.c.person_id)
    inside = r.in_period(d.c.person_id, day_of(d.c.drug_exposure_start_date))
    backwards = ends_before_start(
        d.c.drug_exposure_start_date, d.c.drug_exposure_start_datetime,
        d.c.drug_exposure_end_date, d.c.drug_exposure_end_datetime,
    )
    total, reversed_ = conn.execute(
        select(func.count(), func.sum(case((backwards, 1), else_=0))).select_from(d).where(spec_rows)
    ).one()
    orphans = _count(conn, d, spec_rows, ~has_person)
    outside = _count(conn, d, spec_rows, has_person, ~inside)
    total = _n(total)
    out += [
        r.result(CHECKS["person_exists"], "drug_exposure", orphans, total, table="drug_exposure"),
        r.result(CHECKS["drug_in_observation_period"], None, outside, total),
        r.result(CHECKS["drug_start_before_end"], None, _n(reversed_), total),
    ]
    return rows_per_intervention, out


def _complementary(results: list[CheckResult], total: int, cells: dict[str, int], displayed: set[str],
                   check_ids: tuple[str, ...], threshold: int) -> None:
    """Hide one more per-subject denominator when a table total minus the shown ones would
    reveal a single suppressed one (cells not displayed anywhere count as unknown too)."""
    if total < threshold:
        return
    unknown = [k for k, n in cells.items() if k not in displayed or n < threshold]
    if len(unknown) != 1 or unknown[0] not in displayed:
        return  # nothing small to recover, or two unknowns whose split stays hidden
    shown = sorted((n, k) for k, n in cells.items() if k in displayed and n >= threshold)
    if not shown:
        return
    victim = shown[0][1]
    for res in results:
        if res.subject == victim and res.check.id in check_ids:
            res.hide_checked = True


def run_quality_checks(
    db: OmopDatabase,
    spec: TwinSpec,
    suppression_threshold: int | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> QualityReport:
    """Check ``db`` against what ``spec`` reads; returns the report (exact counts in memory,
    suppressed in every rendering). Raises :class:`DatabaseError` if the database is not an
    OMOP CDM with the tables and columns the spec needs. It does not raise on failed checks:
    call :meth:`QualityReport.raise_for_blocking` for the gate.

    ``thresholds`` overrides the default maximum failing percentage per check id (all subjects)
    or per key (``measurement_unit_known.glucose``).
    """
    threshold = spec.suppression_threshold if suppression_threshold is None else int(suppression_threshold)
    if threshold < 1:
        raise ValueError(f"suppression threshold must be >= 1, got {threshold}")
    overrides = dict(thresholds or {})
    for k, v in overrides.items():
        if k.split(".", 1)[0] not in CHECKS or CHECKS[k.split(".", 1)[0]].threshold_pct is None:
            raise ValueError(f"no percentage threshold named {k!r}; choose from {sorted(CHECKS)}")
        if not 0 <= float(v) <= 100:
            raise ValueError(f"threshold {k!r} must be a percentage between 0 and 100, got {v}")
    tables = required_tables(spec)
    validate_structure(db, tables)
    run = _Run(spec, threshold, overrides)
    try:
        with db.connect() as conn:
            results = _concepts(conn, run)
            persons, cohort_results = _cohort(conn, run)
            results += cohort_results
            results += _observation_periods(conn, run)
            measurement_results = _measurements(conn, run)
            results += measurement_results + _measurement_table(conn, run)
            drug_rows: dict[str, int] = {}
            if spec.interventions:
                drug_rows, drug_results = _drugs(conn, run)
                results += drug_results
            results += _orphans(conn, run, tables)
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"a data-quality query failed on {db.display_url}: {_first_line(exc)}",
            "check that the OMOP tables have the CDM 5.4 column types (dates as DATE, ids as integers)",
        ) from None

    # Complementary suppression: the per-variable (per-intervention) denominators partition the
    # table's total, which the table-level checks show.
    by_key = {res.key: res for res in results}
    var_rows = {v.name: by_key[f"measurement_unit_known.{v.name}"].checked for v in spec.state_variables}
    _complementary(
        results, by_key["measurement_duplicate"].checked, var_rows, set(var_rows),
        ("measurement_unit_known", "measurement_value_present", "measurement_value_plausible"), threshold,
    )
    if spec.interventions:
        displayed = {iv.name for iv in spec.interventions if iv.kind != "exposure"}
        overlap = sum(drug_rows.values()) != by_key["drug_start_before_end"].checked
        if not overlap:
            _complementary(
                results, by_key["drug_start_before_end"].checked, drug_rows, displayed,
                ("drug_dose_unit_known", "drug_quantity_present", "drug_quantity_not_negative"), threshold,
            )

    return QualityReport(
        spec_name=spec.name,
        spec_version=spec.version,
        spec_hash=spec_hash(spec),
        dialect=db.engine.dialect.name,
        cdm_schema=db.cdm_schema,
        vocabulary_schema=db.vocabulary_schema,
        display_url=db.display_url,
        tables=list(tables),
        suppression_threshold=threshold,
        anchor=spec.cohort.anchor,
        min_patients=spec.cohort.min_patients,
        cohort_persons=persons,
        results=results,
        generated_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    )


def quality_report(
    db: OmopDatabase, spec: TwinSpec, suppression_threshold: int | None = None
) -> dict:
    """The suppressed report as a JSON-ready dict (with its ``report_hash``)."""
    return run_quality_checks(db, spec, suppression_threshold).to_dict()


__all__ = ["REQUIRED_COLUMNS", "quality_report", "required_tables", "run_quality_checks", "validate_structure"]
