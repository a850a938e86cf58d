"""The real federation: FedTwin's ServerApp and ClientApp on a local consortium with SecAgg+.

Two synthetic hospitals (~150 patients each, fedtwin.synth) are written into the consortium's
site databases (``data/site_<k>.omop.sqlite``, what ``init`` puts in each site config); the app
(``apps/fedtwin``, a FAB holding only pyproject.toml) runs 2 rounds of weighted FedAvg with SecAgg+
and per-site DP-SGD inside each site's privacy ledger. Also (fast) the site-side refusals.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import running_consortium, synthetic_site_databases

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "fedtwin"
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"  # fedtwin.synth writes ICU stays: this spec's cohort is not empty
ROUND_RE = re.compile(r"FEDTWIN round=(\d+) status=(\w+) sites=(\d+)")
N_SITES = 2
ROUNDS = 2


# ---------------------------------------------------------------------------------- fast checks


def test_pyproject_declares_every_run_config_key_the_apps_read() -> None:
    import tomllib

    cfg = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert cfg["components"] == {"serverapp": "coordinator.server_app:app", "clientapp": "site_agent.client_app:app"}
    used = set(re.findall(r'cfg(?:\.get)?[\[(]"([a-z-]+)"', (REPO / "coordinator" / "server_app.py").read_text()))
    # what a site reads comes from the per-round fit config or, failing that, the run config
    site_reads = set(re.findall(r'get\("([a-z-]+)"', (REPO / "site_agent" / "task.py").read_text()))
    from coordinator.server_app import fit_config_fn

    per_round = set(fit_config_fn("h", "t", None)(1))
    assert per_round == {"server-round", "spec-hash", "training-id", "round-kind"}
    needed = used | (site_reads - per_round)
    assert needed <= set(cfg["config"]), sorted(needed - set(cfg["config"]))


def test_site_helpers_coarsen_counts_and_refuse_unsafe_updates() -> None:
    from site_agent.task import SiteRefusal, check_update, coarsen_count

    assert [coarsen_count(n) for n in (0, 3, 10, 19, 127)] == [10, 10, 10, 10, 120]
    check_update([np.zeros(3), np.full(2, 7.9)], 8.0)
    with pytest.raises(SiteRefusal, match="outside"):
        check_update([np.full(2, 8.5)], 8.0)
    with pytest.raises(SiteRefusal, match="non-finite"):
        check_update([np.array([np.nan])], 8.0)


# ------------------------------------------------------------------------ the federation (slow)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    from coordinator.consortium import init_consortium

    work = tmp_path_factory.mktemp("federation")
    root = work / "local"
    init_consortium(root, sites=N_SITES, spec=SPEC, runtime={"preload": ["torch", "site_agent.client_app"]})
    synthetic_site_databases(root, work, N_SITES)
    with running_consortium(root):
        yield root


@pytest.mark.slow
def test_site_refuses_a_round_with_another_spec_hash(federation: Path) -> None:
    from site_agent.task import RoundSettings, SiteRefusal, run_round

    settings = RoundSettings.from_config({"spec-hash": "0" * 64, "epsilon-per-site": 1.0, "num-rounds": 1}, {}, 1, "refusal-test")
    with pytest.raises(SiteRefusal, match="refuses round 1"):
        run_round(federation / "sites" / "site_1.toml", [], settings)
    assert not (federation / "privacy" / "site_1.ledger.sqlite").exists()  # refused before any spend


@pytest.mark.slow
def test_two_secagg_rounds_train_the_twin_inside_each_sites_ledger(federation: Path) -> None:
    from coordinator.consortium import load_site_config, run_app
    from fedtwin.privacy.ledger import PrivacyLedger
    from fedtwin.spec import load_spec, spec_hash
    from fedtwin.twin import TwinModel, get_parameters

    spec_path = federation / "specs" / SPEC.name
    out = federation / "checkpoints" / "final.npz"
    res = run_app(
        federation,
        APP,
        {
            "num-rounds": ROUNDS,
            "secagg": True,
            "min-sites": N_SITES,
            "num-shares": 1.0,
            "reconstruction-threshold": 1.0,
            "secagg-timeout": 120.0,
            "spec-path": str(spec_path),
            "spec-hash": spec_hash(load_spec(spec_path)),
            "output-path": str(out),
            "epsilon-per-site": 2.0,
            "local-epochs": 1.0,
        },
        timeout=240,
    )
    assert res.ok, f"run {res.run_id} ended {res.status}/{res.sub_status}:\n{res.output[-4000:]}"
    rounds = ROUND_RE.findall(res.output)
    assert [(int(r), s, int(n)) for r, s, n in rounds] == [(r, "completed", N_SITES) for r in range(1, ROUNDS + 1)], res.output[-4000:]

    initial = get_parameters(TwinModel(load_spec(spec_path)))
    with np.load(out) as z:
        final = [z[k] for k in sorted(z.files)]
    assert [a.shape for a in final] == [a.shape for a in initial]
    assert all(np.all(np.isfinite(a)) for a in final)
    assert any(not np.allclose(a, b) for a, b in zip(final, initial))

    for k in range(1, N_SITES + 1):
        site = load_site_config(federation / "sites" / f"site_{k}.toml")
        with PrivacyLedger.open(site.privacy.ledger, read_only=True) as led:
            (status,) = led.statuses()
            entries = status.entries
        assert sorted({e.round for e in entries if e.kind == "settlement"}) == list(range(1, ROUNDS + 1))
        assert status.open_reservations == 0
        assert 0 < status.spent_epsilon <= site.privacy.epsilon
    print(res.output[-2500:])


@pytest.mark.slow
def test_plain_fedavg_round_without_secagg(federation: Path) -> None:
    """The same apps without SecAgg+: the ClientApp must not apply secaggplus_mod then."""
    from coordinator.consortium import run_app

    res = run_app(
        federation,
        APP,
        {"num-rounds": 1, "secagg": False, "min-sites": N_SITES, "spec-path": str(federation / "specs" / SPEC.name),
         "epsilon-per-site": 0.5},
        timeout=180,
    )
    assert res.ok, f"run {res.run_id} ended {res.status}/{res.sub_status}:\n{res.output[-4000:]}"
    assert ROUND_RE.findall(res.output) == [("1", "completed", str(N_SITES))], res.output[-4000:]
