"""The coordinator's keeper of the chain, on real consortium keys and files (no Flower processes).

It accepts a round only if every site sent a valid manifest for *this* round (a replayed manifest
of an earlier round, one signed by another site's key, a missing one are each named), and it
writes a signed record per round that continues across a resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SPEC_HASH = "a" * 64


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coordinator.consortium.node_keys import generate_signing_key

    d = tmp_path_factory.mktemp("keys") / "signing"
    d.mkdir()
    for who in ("coordinator", "site_1", "site_2"):
        generate_signing_key(d / f"{who}.ed25519.pem", d / f"{who}.ed25519.pub.pem")
    return d


def _keeper(keys: Path, folder: Path, resume: bool = False):
    from coordinator.provenance_keeper import ProvenanceKeeper

    return ProvenanceKeeper.open(study_id="study", spec_hash=SPEC_HASH, signing_key=keys / "coordinator.ed25519.pem",
                                 trusted_keys=keys, folder=folder, secagg={"enabled": True}, attachments={"spec": "b" * 64},
                                 resume=resume)


def _manifest(keys: Path, site: str, rnd: int, start: str, signer: str | None = None) -> str:
    from fedtwin.provenance import SiteManifest, load_signing_key

    return SiteManifest(
        study_id="study", round=rnd, site=site, spec_hash=SPEC_HASH, code_version="0.1.0", cohort_fingerprint="c" * 64,
        quality_report_hash="d" * 64, dp=None, epsilon_spent=1.0, start_parameters_hash=start,
    ).sign(load_signing_key(keys / f"{signer or site}.ed25519.pem")).to_json()


def test_manifests_are_checked_against_the_round(keys: Path, tmp_path: Path) -> None:
    keeper = _keeper(keys, tmp_path / "prov")
    start = "e" * 64
    good, problems = keeper.check_manifests(2, start, {"site_1": _manifest(keys, "site_1", 2, start),
                                                       "site_2": _manifest(keys, "site_2", 2, start)})
    assert [m.site for m in good] == ["site_1", "site_2"] and problems == []

    _, problems = keeper.check_manifests(2, start, {
        "site_1": _manifest(keys, "site_1", 1, start),  # replayed: last round's manifest
        "site_2": _manifest(keys, "site_2", 2, start, signer="site_1"),  # signed with another site's key
    })
    assert len(problems) == 2
    assert problems[0].startswith("site_1: manifest does not match the round: round=1 (expected 2)")
    assert problems[1].startswith("site_2: manifest of site_2, round 2: signed with key") and "site_2" in problems[1]

    _, problems = keeper.check_manifests(2, start, {"site_1": None, "site_2": _manifest(keys, "site_2", 2, "f" * 64)})
    assert problems[0].startswith("site_1: sent no provenance manifest")
    assert "start_parameters_hash=ffffffffffffffff (expected eeeeeeeeeeeeeeee)" in problems[1]


def test_records_are_signed_written_and_continued_after_a_resume(keys: Path, tmp_path: Path) -> None:
    from fedtwin.provenance import KeyRing, SiteManifest, verify_chain

    folder = tmp_path / "prov"
    keeper = _keeper(keys, folder)
    s0, s1 = "1" * 64, "2" * 64
    m = [SiteManifest.from_json(_manifest(keys, "site_1", 1, s0))]
    keeper.record(server_round=1, kind="train", status="completed", start_hash=s0, aggregate_hash=s1, manifests=m,
                  metrics={"sites": 1.0, "bad": float("nan")}, sites_dropped=["site_2"], report={"x": 1})
    keeper.record(server_round=2, kind="train", status="halted", start_hash=s1, aggregate_hash=None, manifests=[],
                  metrics={"sites": 0.0}, sites_dropped=[], report=None)
    assert sorted(p.name for p in folder.iterdir()) == ["0001-round-0001.json", "0002-round-0002.json"]
    with pytest.raises(Exception, match="already holds round records"):
        _keeper(keys, folder)  # a fresh training never writes into another training's chain
    resumed = _keeper(keys, folder, resume=True)
    assert resumed.last.record_hash() == keeper.last.record_hash() and resumed.seq == 2
    m2 = [SiteManifest.from_json(_manifest(keys, "site_1", 2, s1))]
    resumed.record(server_round=2, kind="train", status="completed", start_hash=s1, aggregate_hash="3" * 64, manifests=m2,
                   metrics={}, sites_dropped=[], report=None)
    records = resumed.records
    assert [(r.round, r.status) for r in records] == [(1, "completed"), (2, "halted"), (2, "completed")]
    assert records[0].metrics == {"sites": 1.0} and "evaluation_report" in records[0].attachments  # NaN left out
    report = verify_chain(records, KeyRing.from_dir(keys), final_parameters_hash="3" * 64)
    assert report.ok, report.summary()
