"""``fedtwin simulate``: FedTwin's ServerApp and ClientApp in Flower's simulation engine (Ray).

The slow test runs the real command in a subprocess (its own Ray instance): 4 synthetic
hospitals, 1 round, SecAgg+ on, per-site DP-SGD; the round must complete with every site and the
final global twin must differ from the recorded initial one. The fast tests check the refusals,
which happen before anything is written or started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_text
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
N_SITES = 4


def _cli(*args: str):
    import typer

    from coordinator.simulate import simulate_command

    app = typer.Typer()
    app.command()(simulate_command)
    return CliRunner().invoke(app, list(args), catch_exceptions=False)




def test_one_site_with_secagg_is_a_clear_error_naming_the_fix(tmp_path: Path) -> None:
    from coordinator.simulate import simulate
    from fedtwin.federation.errors import ConsortiumError

    out = tmp_path / "one"
    res = _cli("--sites", "1", "--rounds", "1", "--out", str(out))
    assert res.exit_code == 2, cli_text(res)
    assert "SecAgg+ needs at least 2 sites" in cli_text(res) and "--no-secagg" in cli_text(res), cli_text(res)
    assert not out.exists()  # refused before anything is written
    with pytest.raises(ConsortiumError, match="SecAgg\\+ needs at least 2 sites") as exc:
        simulate(1, 1, out=out)
    assert "--no-secagg" in exc.value.fix


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--sites", "0"), "at least one site"),
        (("--sites", "3", "--rounds", "0"), "--rounds 0"),
        (("--sites", "3", "--patients", "5000"), "max_weight"),
        (("--sites", "3", "--patients", "40"), "data-quality minimum"),
        (("--sites", "3", "--epsilon", "0"), "--epsilon 0"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    out = tmp_path / "bad"
    res = _cli(*args, "--out", str(out))
    assert res.exit_code == 2 and needle in cli_text(res), cli_text(res)
    assert not out.exists()


def test_a_non_empty_out_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    res = _cli("--sites", "3", "--out", str(tmp_path))
    assert res.exit_code == 2 and "not an empty folder" in cli_text(res), cli_text(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_the_app_declares_site_config_dir() -> None:
    cfg = tomllib.loads((REPO / "apps" / "fedtwin" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg["site-config-dir"] == ""


@pytest.mark.slow
def test_simulation_of_four_sites_with_secagg_completes_and_changes_the_twin(tmp_path: Path) -> None:
    from coordinator.server_app import read_checkpoint

    out = tmp_path / "sim"
    fedtwin = Path(sys.executable).parent / "fedtwin"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "160"}
    proc = subprocess.run(
        [str(fedtwin), "simulate", "--sites", str(N_SITES), "--rounds", "1", "--patients", "60", "--seed", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    log = out / "simulation.log"
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}\n" + (
        f"log:\n{log.read_text()[-4000:]}" if log.is_file() else "")
    assert proc.returncode == 0, detail
    assert f"FEDTWIN round=1 status=completed sites={N_SITES}" in proc.stdout, detail
    assert re.search(r"total [\d.]+ s .*per round [\d.]+ s", proc.stdout), detail

    result = json.loads((out / "result.json").read_text())
    assert result["ok"] and result["secagg"] and result["sites"] == N_SITES, result
    assert [(r["round"], r["status"], r["sites"]) for r in result["rounds"]] == [(1, "completed", N_SITES)]
    assert result["run_config"]["secagg"] is True
    assert result["run_config"]["site-config-dir"] == str(out / "consortium" / "sites")

    # every site trained: its own ledger (named in its site config) recorded the round
    for k in range(1, N_SITES + 1):
        site_toml = tomllib.loads((out / "consortium" / "sites" / f"site_{k}.toml").read_text())
        assert (out / "consortium" / "sites" / site_toml["data"]["database"]).resolve() == (out / "hospitals" / f"site_{k}.db").resolve()
        assert (out / "consortium" / "privacy" / f"site_{k}.ledger.sqlite").is_file()

    rnd, _h, initial = read_checkpoint(result["initial_path"])
    assert rnd == 0
    with np.load(out / "final.npz") as z:
        final = [z[k] for k in sorted(z.files)]
    assert [a.shape for a in final] == [a.shape for a in initial]
    assert all(np.all(np.isfinite(a)) for a in final)
    assert any(not np.allclose(a, b) for a, b in zip(final, initial)), "the global twin did not change"
