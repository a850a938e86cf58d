"""``fedtwin site run --config SITE.toml``: a site joins the consortium's rounds from its own config.

A 2-site consortium is brought up; site_2's SuperNode is stopped and started again by the site's
own command (as a hospital would run it), and a SecAgg+ round completes with both sites. Also
the refusals before anything starts (missing config, missing key, missing database).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import running_consortium, synthetic_site_databases

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "fedtwin"
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"


def _cli(*args: str) -> tuple[int, str]:
    """The real ``fedtwin site ...`` command (its errors become exit code 2 in fedtwin's main)."""
    res = subprocess.run([str(Path(sys.executable).parent / "fedtwin"), "site", *args], capture_output=True, text=True, timeout=120)
    return res.returncode, " ".join((res.stdout + res.stderr).split())


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coordinator.consortium import init_consortium

    work = tmp_path_factory.mktemp("siterun")
    root = work / "local"
    init_consortium(root, sites=2, spec=SPEC, runtime={"preload": ["torch", "site_agent.client_app"]})
    synthetic_site_databases(root, work, 2, patients=120)
    return root


def test_missing_config_key_or_database_is_refused_before_anything_starts(consortium: Path, tmp_path: Path) -> None:
    code, out = _cli("run", "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "does not exist" in out, out
    text = (consortium / "sites" / "site_1.toml").read_text()
    bad = consortium / "sites" / "bad_key.toml"
    bad.write_text(text.replace("../keys/supernode/site_1.key", "../keys/supernode/missing.key"))
    code, out = _cli("run", "--config", str(bad))
    assert code == 2 and "SuperNode private key" in out and "missing.key" in out, out
    bad.write_text(text.replace("../data/site_1.omop.sqlite", "../data/nowhere.sqlite"))
    code, out = _cli("run", "--config", str(bad))
    assert code == 2 and "OMOP database" in out, out
    bad.unlink()
    code, out = _cli("run", "--config", str(consortium / "sites" / "site_1.toml"), "--dry-run")
    assert code == 0, out
    assert "--auth-supernode-private-key" in out and "site-config=" in out and "--heartbeat-interval" in out


@pytest.mark.slow
def test_a_site_started_with_site_run_trains_in_a_secagg_round(consortium: Path) -> None:
    from coordinator.consortium import processes, run_app
    from coordinator.consortium.layout import Layout
    from fedtwin.federation.config import load_site_config
    from fedtwin.spec import load_spec, spec_hash

    with running_consortium(consortium):
        from coordinator.consortium.consortium import Consortium

        layout = Layout.at(consortium)
        for rec in processes.records(layout):
            if rec.name.startswith("site_2-"):
                processes.stop(rec)  # a graceful stop: the SuperLink marks the node offline
                processes.forget(layout, rec.name)
        with Consortium.load(consortium).control() as ctl:
            deadline = time.monotonic() + 90
            while any(n.name == "site_2" and n.status == "online" for n in ctl.nodes()):
                assert time.monotonic() < deadline, "site_2 still online after its SuperNode stopped"
                time.sleep(0.5)

        log = (consortium / "logs" / "site_2-run.log").open("w")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "fedtwin"), "site", "run", "--config", str(consortium / "sites" / "site_2.toml")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            with Consortium.load(consortium).control() as ctl:
                deadline = time.monotonic() + 120
                while not any(n.name == "site_2" and n.status == "online" for n in ctl.nodes()):
                    assert proc.poll() is None, (consortium / "logs" / "site_2-run.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "site_2 did not come online through `fedtwin site run`"
                    time.sleep(0.5)
            spec_path = consortium / "specs" / SPEC.name
            res = run_app(
                consortium, APP,
                {"num-rounds": 1, "secagg": True, "min-sites": 2, "num-shares": 1.0, "reconstruction-threshold": 1.0,
                 "secagg-timeout": 120.0, "spec-path": str(spec_path), "spec-hash": spec_hash(load_spec(spec_path)),
                 "epsilon-per-site": 1.0, "evaluate": False},
                timeout=300,
            )
            assert res.ok, res.output[-4000:]
            assert re.search(r"FEDTWIN round=1 status=completed sites=2", res.output), res.output[-4000:]
            ledger = load_site_config(consortium / "sites" / "site_2.toml").privacy.ledger
            assert ledger.exists()  # site_2 (run by `fedtwin site run`) trained and spent in its ledger
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=60)
            log.close()
        out = (consortium / "logs" / "site_2-run.log").read_text()
        assert code == 0, out[-3000:]
        assert "site stopped" in out
        leftovers = [p for p in processes.stray_processes(consortium, by_cmdline=True) if "site_2" in p[1]]
        assert not leftovers, leftovers
