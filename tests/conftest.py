"""Shared fixtures: real SQLite files, a real PostgreSQL database per test, the shared/ data."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDTWIN_SHARED", REPO.parent / "shared"))
PG_ADMIN_URL = os.environ.get("FEDTWIN_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test saying what is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data {p} is absent (set FEDTWIN_SHARED to the shared/ folder)")
    return p


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The PostgreSQL server, or a skip; under CI=true an unreachable server fails the run."""
    engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is unreachable under CI=true: {exc}")
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}")
    finally:
        engine.dispose()
    return PG_ADMIN_URL


def _create_database(admin_url: str) -> str:
    name = f"fedtwin_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin_url: str):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    url = _create_database(pg_admin_url)
    try:
        yield url
    finally:
        _drop_database(pg_admin_url, url)


@pytest.fixture
def pg_database_factory(pg_admin_url: str):
    """Make several fresh PostgreSQL databases in one test (e.g. one per synthetic site)."""
    made: list[str] = []

    def make() -> str:
        url = _create_database(pg_admin_url)
        made.append(url)
        return url

    try:
        yield make
    finally:
        for url in made:
            _drop_database(pg_admin_url, url)


@contextmanager
def running_consortium(root: Path, extra_env: dict[str, str] | None = None) -> Iterator[Path]:
    """``up`` a consortium for the block, then ``down`` it and check no process was left behind."""
    from coordinator.consortium import down, processes, up
    from coordinator.consortium.layout import Layout

    try:
        up(root, timeout=180, extra_env=extra_env)
        yield root
    finally:
        down(root)
        leftovers = processes.stray_processes(Layout.at(root).root, by_cmdline=True)
        assert not leftovers, f"processes left behind: {leftovers}"


def synthetic_site_databases(root: Path, work: Path, n_sites: int, patients: int = 150, seed: int = 11) -> None:
    """Small synthetic ICU hospitals copied to where the consortium's site configs expect them."""
    import shutil

    from fedtwin.synth import SynthRequest, synthesize

    out = work / "synth"
    synthesize(SynthRequest(sites=n_sites, patients=patients, seed=seed, out=out, sizes=[patients] * n_sites, workers=1))
    for k in range(1, n_sites + 1):
        shutil.copyfile(out / f"site_{k}.db", root / "data" / f"site_{k}.omop.sqlite")
    from site_agent.approval import approve_for_sites  # each site approves the study's spec, as an operator would

    approve_for_sites(sorted((root / "sites").glob("site_*.toml")), None, approved_by="tests")


def cli_text(res) -> str:
    """A typer CliRunner result's stdout (+ stderr where kept apart), whitespace collapsed."""
    import re

    out = res.output
    try:
        out += res.stderr
    except ValueError:  # stderr mixed into output
        pass
    return re.sub(r"\s+", " ", out)
