"""``coordinator.simulate``'s options for studies: unequal sites, reused hospitals, training settings.

What is asserted: bad combinations are refused before anything is written; ``prepare`` with
``hospitals=`` points every site at the given databases (nothing synthesized, nothing written
there) and puts the ``training`` overrides in the run config; ``sizes=`` gives each synthetic
site its own number of patients. The engine itself is exercised by tests/test_simulate.py.
"""

from __future__ import annotations

import sqlite3
import tomllib
from pathlib import Path

import pytest

from coordinator.simulate import prepare, simulate
from fedtwin.federation.errors import ConsortiumError
from fedtwin.synth import SynthRequest, synthesize


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sizes": [60, 60]}, "sizes has 2 entries for 3 sites"),
        ({"sizes": [60, 60, 5000]}, "max_weight"),
        ({"hospitals": "missing"}, "lacks site_1.db"),
        ({"training": {"secagg": False}}, "cannot be set here"),
    ],
)
def test_bad_study_options_are_refused_before_anything_is_written(tmp_path: Path, kwargs: dict, needle: str) -> None:
    if kwargs.get("hospitals") == "missing":
        kwargs = {**kwargs, "hospitals": tmp_path / "nothing-here"}
    out = tmp_path / "out"
    with pytest.raises(ConsortiumError, match=needle):
        simulate(3, 1, out=out, **kwargs)
    assert not out.exists()


def test_sizes_and_hospitals_together_are_refused(tmp_path: Path) -> None:
    h = tmp_path / "h"
    h.mkdir()
    for k in (1, 2):
        (h / f"site_{k}.db").write_bytes(b"")
    with pytest.raises(ConsortiumError, match="sizes and hospitals"):
        simulate(2, 1, out=tmp_path / "out", sizes=[60, 60], hospitals=h)


def _persons(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT COUNT(*) FROM person").fetchone()[0])


def test_prepare_reuses_hospitals_in_place_and_applies_training_overrides(tmp_path: Path) -> None:
    hospitals = tmp_path / "hospitals"
    synthesize(SynthRequest(sites=2, patients=60, seed=4, out=hospitals, sizes=[60, 75], workers=1))
    before = {p.name: p.stat().st_mtime_ns for p in hospitals.glob("site_*.db")}
    out = tmp_path / "run"
    out.mkdir()
    cfg, initial = prepare(out, sites=2, rounds=2, patients=60, seed=4, secagg=True, epsilon=3.0, stage_timeout=300.0,
                           mlflow=False, hospitals=hospitals, training={"local-epochs": 2.5, "batch-size": 32, "evaluate": False})
    assert not (out / "hospitals").exists()  # nothing synthesized
    for k in (1, 2):
        site = tomllib.loads((out / "consortium" / "sites" / f"site_{k}.toml").read_text())
        assert (out / "consortium" / "sites" / site["data"]["database"]).resolve() == (hospitals / f"site_{k}.db").resolve()
    assert cfg["local-epochs"] == 2.5 and cfg["batch-size"] == 32 and cfg["evaluate"] is False
    assert cfg["epsilon-per-site"] == 3.0 and initial.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in hospitals.glob("site_*.db")} == before  # never written
    assert [_persons(hospitals / f"site_{k}.db") for k in (1, 2)] == [60, 75]


def test_prepare_synthesizes_sites_of_the_given_sizes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    prepare(out, sites=2, rounds=1, patients=60, seed=5, secagg=True, epsilon=8.0, stage_timeout=300.0, mlflow=False, sizes=[60, 80])
    assert [_persons(out / "hospitals" / f"site_{k}.db") for k in (1, 2)] == [60, 80]
