"""A federation of synthetic hospitals: one OMOP database and one ground truth per site.

:func:`synthesize` is what ``fedtwin synth`` runs. It checks every target before writing
anything (the output folder, each site database: reachable, and empty of persons), builds each
site (population -> physiology -> staff -> outcomes -> counterfactual plans -> OMOP rows ->
defects -> ground truth), and writes it atomically: the ground truth goes to a temporary folder,
the database is written in one transaction, and only then is the ground truth moved into place.
Sites run in a process pool (``workers``); each site depends on ``(seed, site)`` only, so the
result is the same whatever the pool does. If any site fails, everything this run created
(SQLite files, PostgreSQL databases, ground-truth folders) is removed before the error is raised.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fedtwin.errors import DatabaseError, FedTwinError
from fedtwin.omop.database import normalize_url, open_database, redact
from fedtwin.synth import concepts as C
from fedtwin.synth.defects import inject_defects
from fedtwin.synth.ground_truth import FORMAT, FORMAT_VERSION, SiteTruth, build_truth, write_json, write_site_truth
from fedtwin.synth.omop_writer import write_site
from fedtwin.synth.physiology import draw_params
from fedtwin.synth.plans import PLANS, plan_doses, run_plans
from fedtwin.synth.population import draw_population
from fedtwin.synth.profiles import SiteProfile, make_profiles
from fedtwin.synth.records import Table, build_records
from fedtwin.synth.simulation import simulate

GROUND_TRUTH_DIR = "ground_truth"
SITE_PLACEHOLDER = "{site}"


@dataclass(frozen=True)
class SynthRequest:
    """The arguments of ``fedtwin synth``."""

    sites: int
    patients: int
    seed: int
    out: Path
    db_url_template: str | None = None
    sizes: list[int] | None = None
    defects: float = 0.0
    workers: int = 2


@dataclass(frozen=True)
class SiteTarget:
    """Where one site is written. ``created_by_run`` marks databases this run makes (removed on failure)."""

    site: int
    url: str
    display: str
    backend: str  # "sqlite" | "postgresql"
    sqlite_path: Path | None
    truth_dir: Path
    created_by_run: bool


@dataclass
class SiteSummary:
    """What one site holds, in aggregate (no patient-level value is ever reported)."""

    site: int
    name: str
    database: str
    persons: int
    cohort: int
    rows: dict[str, int]
    defects: dict[str, int]
    deaths_in_window: int
    aki_in_window: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


# --- building -------------------------------------------------------------------------------------


@dataclass
class SiteBuild:
    """A simulated site before any I/O: its CDM tables, its ground truth, stage timings."""

    tables: dict[str, Table]
    truth: SiteTruth
    timings: dict[str, float]


def build_site(profile: SiteProfile, seed: int, database: dict[str, str]) -> SiteBuild:
    """Simulate one site and produce its CDM tables and ground truth (no I/O).

    Independent random streams (population, parameters, simulation, records, defects) come from
    ``SeedSequence([seed, site])``, so e.g. changing the defect rate never changes the patients.
    """
    t0 = time.perf_counter()
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, profile.site]).spawn(5)]
    pop = draw_population(profile, rngs[0])
    params = draw_params(pop, rngs[1])
    factual = simulate(pop, params, profile, rngs[2])
    t1 = time.perf_counter()
    doses = plan_doses(factual.policy_doses[:, C.HISTORY_STEPS : C.HISTORY_STEPS + C.HORIZON_STEPS])
    outcome = run_plans(params, factual, doses)
    t2 = time.perf_counter()
    records = build_records(profile, pop, params, factual, rngs[3])
    measurement, report = inject_defects(records.measurement, profile, pop.person_id, records.period_start, rngs[4])
    tables = {**records.tables, "measurement": measurement}
    row_counts = {name: len(t) for name, t in sorted(tables.items())}
    truth = build_truth(profile, seed, pop, params, factual, doses, outcome, report, row_counts, database)
    t3 = time.perf_counter()
    return SiteBuild(tables, truth, {"simulate": t1 - t0, "counterfactuals": t2 - t1, "records": t3 - t2})


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def run_site(profile: SiteProfile, seed: int, target: SiteTarget) -> SiteSummary:
    """Build and write one site, atomically. Runs in a worker process."""
    start = time.perf_counter()
    in_out = target.sqlite_path is not None and target.sqlite_path.parent == target.truth_dir.parent.parent
    location = target.sqlite_path.name if in_out and target.sqlite_path is not None else target.display  # relative: reproducible
    build = build_site(profile, seed, {"backend": target.backend, "location": location})
    tmp = target.truth_dir.parent / f".{target.truth_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    db = open_database(target.url)
    try:
        write_site_truth(tmp, build.truth)
        t = time.perf_counter()
        rows = write_site(db, profile, build.tables, new_sqlite_file=target.sqlite_path is not None and target.created_by_run)
        build.timings["write"] = time.perf_counter() - t
        if target.truth_dir.exists():
            shutil.rmtree(target.truth_dir)
        tmp.rename(target.truth_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        db.dispose()
        if target.sqlite_path is not None and target.created_by_run:
            _remove_sqlite(target.sqlite_path)
        if isinstance(exc, SQLAlchemyError):
            raise DatabaseError(
                f"writing site {profile.site} to {target.display} failed: {str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}",
                "check free disk space and that nothing else writes to that database, then run again",
            ) from None
        if isinstance(exc, OSError):
            raise FedTwinError(
                f"writing site {profile.site} ({target.display}, ground truth in {target.truth_dir}) failed: {exc}",
                "check free disk space and the permissions of --out, then run again",
            ) from None
        raise
    db.dispose()
    counts = build.truth.manifest["counts"]
    return SiteSummary(
        site=profile.site,
        name=profile.name,
        database=target.display,
        persons=counts["persons"],
        cohort=counts["cohort"],
        rows=rows,
        defects=dict(build.truth.manifest["defects"]["counts"]),
        deaths_in_window=counts["cohort_deaths_in_window"],
        aki_in_window=counts["cohort_aki_in_window"],
        seconds=time.perf_counter() - start,
        timings=build.timings,
    )


def _worker(profile: SiteProfile, seed: int, target: SiteTarget) -> tuple[str, Any]:
    """Pool entry point. FedTwinErrors come back as values: pickling would fold ``fix`` into
    ``problem``; the class and both fields are rebuilt in the parent."""
    try:
        return "ok", run_site(profile, seed, target)
    except FedTwinError as exc:
        return "error", (type(exc), exc.problem, exc.fix)


# --- checking targets -----------------------------------------------------------------------------


def _prepare_out(out: Path) -> bool:
    """Check (and create) the output folder; returns whether this run created it."""
    if out.exists() and not out.is_dir():
        raise FedTwinError(
            f"--out {out} is a file, not a folder",
            "pass a folder path for --out (it is created if missing); each site becomes site_<k>.db in it",
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedTwinError(f"cannot create the output folder {out}: {exc.strerror or exc}", "choose a writable --out folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise FedTwinError(f"the output folder {out} is not writable", "choose a writable --out folder")
    return created


def _sqlite_person_rows(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            has = con.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name='person'").fetchone()[0]
            return int(con.execute("SELECT count(*) FROM person").fetchone()[0]) if has else 0
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise FedTwinError(
            f"{path} exists and is not a readable SQLite database ({exc})",
            "remove that file or choose another --out",
        ) from None


def _pg_admin(url: str) -> tuple[str, str]:
    """(admin URL on the same server, database name) for a PostgreSQL site URL."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        raise FedTwinError(f"{redact(url)} names no database", "end the template with /fedtwin_site_{site}")
    if '"' in name or len(name) > 63:
        raise FedTwinError(f"database name {name!r} is not usable", "use letters, digits and underscores in the database name")
    return parsed.set(database="postgres").render_as_string(hide_password=False), name


def _pg_check(url: str, display: str) -> bool:
    """Whether the site database exists; refuses one with persons. Errors say how to fix."""
    admin, name = _pg_admin(url)
    engine = create_engine(admin, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot connect to the PostgreSQL server of {display}: {str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}",
            "start the server, or correct host, port and user in --db-url-template "
            "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/fedtwin_site_{site}); omit it to write SQLite files",
        ) from None
    finally:
        engine.dispose()
    if exists:
        db = open_database(url)
        try:
            with db.connect() as conn:
                from fedtwin.synth.omop_writer import person_rows

                if person_rows(conn):
                    raise FedTwinError(
                        f"{display} already holds an OMOP person table with rows",
                        "drop that database, or point --db-url-template at new database names",
                    )
        finally:
            db.dispose()
    return exists


def _pg_create(url: str) -> None:
    admin, name = _pg_admin(url)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot create database {name!r}: {str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}",
            "create it yourself (CREATE DATABASE ...) or connect as a user with CREATEDB",
        ) from None
    finally:
        engine.dispose()


def _pg_drop(url: str) -> None:
    admin, name = _pg_admin(url)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except SQLAlchemyError:
        pass  # best effort while already failing
    finally:
        engine.dispose()


def site_url(template: str, site: int) -> str:
    return template.replace(SITE_PLACEHOLDER, str(site))


def plan_targets(request: SynthRequest) -> list[SiteTarget]:
    """Check every site's database before anything is written (read-only; nothing is created)."""
    truth_root = request.out / GROUND_TRUTH_DIR
    targets: list[SiteTarget] = []
    if request.db_url_template is not None and SITE_PLACEHOLDER not in request.db_url_template and request.sites > 1:
        raise FedTwinError(
            f"--db-url-template {redact(request.db_url_template)!r} has no {SITE_PLACEHOLDER} placeholder",
            "put {site} where the site number goes, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/fedtwin_site_{site} "
            "(a plain URL is accepted with --sites 1 only)",
        )
    urls = set()
    for k in range(1, request.sites + 1):
        if request.db_url_template is None:
            path = (request.out / f"site_{k}.db").resolve()
            url = normalize_url(str(path))
        else:
            try:
                url = normalize_url(site_url(request.db_url_template, k))
                make_url(url)
            except ArgumentError:
                raise FedTwinError(
                    f"--db-url-template gives {redact(site_url(request.db_url_template, k))!r}, which is not a database URL",
                    "use e.g. postgresql+psycopg://postgres@127.0.0.1:5432/fedtwin_site_{site}",
                ) from None
            path = None
        if url in urls:
            raise FedTwinError(f"two sites would share the database {redact(url)}", "keep {site} in the database name")
        urls.add(url)
        open_database(url)  # validates the backend, with FedTwin's own error
        backend = make_url(url).get_backend_name()
        display = redact(url)
        if backend == "sqlite":
            sqlite_path = Path(make_url(url).database or "")
            if not sqlite_path.name or str(sqlite_path) == ":memory:":
                raise FedTwinError(f"{display} is not a SQLite file", "give a file path per site")
            exists = sqlite_path.exists()
            if exists and sqlite_path.is_dir():
                raise FedTwinError(f"{sqlite_path} is a folder, not a SQLite file", "choose another --out")
            if exists and _sqlite_person_rows(sqlite_path):
                raise FedTwinError(
                    f"{sqlite_path} already holds an OMOP person table with rows",
                    "remove it, or choose another --out folder",
                )
            targets.append(SiteTarget(k, url, str(sqlite_path), backend, sqlite_path, truth_root / f"site_{k}", not exists))
        else:
            exists = _pg_check(url, display)
            targets.append(SiteTarget(k, url, display, backend, None, truth_root / f"site_{k}", not exists))
    return targets


# --- running --------------------------------------------------------------------------------------


def _cleanup(targets: list[SiteTarget], written: set[int]) -> None:
    """Remove what this run created: its databases and their ground truth; sites written into
    databases that existed before (empty) keep both, as they are complete."""
    for t in targets:
        if not t.created_by_run and t.site in written:
            continue
        if t.created_by_run:
            if t.sqlite_path is not None:
                _remove_sqlite(t.sqlite_path)
            else:
                _pg_drop(t.url)
        shutil.rmtree(t.truth_dir, ignore_errors=True)
        for tmp in t.truth_dir.parent.glob(f".{t.truth_dir.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def synthesize(
    request: SynthRequest,
    on_site_done: Callable[[SiteSummary], None] | None = None,
    on_start: Callable[[list[SiteProfile]], None] | None = None,
) -> list[SiteSummary]:
    """Generate the federation; returns one summary per site (site order)."""
    if request.seed < 0:
        raise FedTwinError(f"--seed must be 0 or more, got {request.seed}", "pass a non-negative integer seed")
    if request.workers < 1:
        raise FedTwinError(f"--workers must be at least 1, got {request.workers}", "pass --workers 1 or 2")
    request = replace(request, out=request.out.expanduser().resolve())
    profiles = make_profiles(request.sites, request.patients, request.seed, request.sizes, request.defects)
    out_created = _prepare_out(request.out)
    try:
        targets = plan_targets(request)
    except BaseException:
        if out_created:
            shutil.rmtree(request.out, ignore_errors=True)
        raise
    created_pg: list[SiteTarget] = []
    written: set[int] = set()
    summaries: dict[int, SiteSummary] = {}
    try:
        for t in targets:
            if t.backend == "postgresql" and t.created_by_run:
                _pg_create(t.url)
                created_pg.append(t)
        (request.out / GROUND_TRUTH_DIR).mkdir(parents=True, exist_ok=True)
        if on_start:
            on_start(profiles)
        jobs = list(zip(profiles, targets))
        if request.workers == 1 or len(jobs) == 1:
            for profile, target in jobs:
                summary = run_site(profile, request.seed, target)
                written.add(profile.site)
                summaries[profile.site] = summary
                if on_site_done:
                    on_site_done(summary)
        else:
            _run_pool(request, jobs, written, summaries, on_site_done)
        _write_federation_manifest(request, profiles, targets, summaries)
    except BaseException:
        _cleanup(targets, written)
        if out_created and request.out.exists() and not any(
            p for p in request.out.iterdir() if p.name != GROUND_TRUTH_DIR
        ):
            shutil.rmtree(request.out, ignore_errors=True)
        raise
    return [summaries[p.site] for p in profiles]


def _run_pool(
    request: SynthRequest, jobs: list[tuple[SiteProfile, SiteTarget]], written: set[int],
    summaries: dict[int, SiteSummary], on_site_done: Callable[[SiteSummary], None] | None,
) -> None:
    error: tuple[type[FedTwinError], str, str] | None = None
    crash: BaseException | None = None
    with ProcessPoolExecutor(max_workers=min(request.workers, len(jobs)), mp_context=_pool_context()) as pool:
        # Largest sites first, so the last job to finish is a small one (better balance).
        ordered = sorted(jobs, key=lambda job: (-job[0].n_patients, job[0].site))
        pending: dict[Future, int] = {pool.submit(_worker, p, request.seed, t): p.site for p, t in ordered}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                site = pending.pop(fut)
                try:
                    status, value = fut.result()
                except BaseException as exc:  # a bug or a killed worker: keep the first
                    crash = crash or exc
                    continue
                if status == "ok":
                    written.add(site)
                    summaries[site] = value
                    if on_site_done:
                        on_site_done(value)
                else:
                    error = error or value
            if (error or crash) and pending:
                for fut in pending:
                    fut.cancel()
    if crash is not None:
        raise crash
    if error is not None:
        cls, problem, fix = error
        raise cls(problem, fix)


def _write_federation_manifest(
    request: SynthRequest, profiles: list[SiteProfile], targets: list[SiteTarget], summaries: dict[int, SiteSummary],
) -> None:
    sites = []
    for p, t in zip(profiles, targets):
        s = summaries[p.site]
        location = t.sqlite_path.name if t.sqlite_path is not None and t.sqlite_path.parent == request.out.resolve() else t.display
        sites.append({
            "site": p.site,
            "name": p.name,
            "database": {"backend": t.backend, "location": location},
            "ground_truth": f"site_{p.site}",
            "persons": s.persons,
            "cohort": s.cohort,
        })
    write_json(request.out / GROUND_TRUTH_DIR / "manifest.json", {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": "fedtwin synth",
        "arguments": {
            "sites": request.sites,
            "patients": request.patients,
            "seed": request.seed,
            "sizes": request.sizes,
            "defects": request.defects,
        },
        "spec": "specs/icu-hemodynamics.yaml",
        "state_names": list(C.STATE_NAMES),
        "intervention_names": list(C.DRUG_NAMES),
        "outcome_names": list(C.OUTCOME_NAMES),
        "plans": [p.name for p in PLANS],
        "sites": sites,
    })
