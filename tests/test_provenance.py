"""Signed, hash-chained provenance: canonical JSON, keys, manifests, round records, the chain
verifier and the site's append-only log. Real Ed25519 keys (generated in tmp_path, and the ones
``consortium init`` writes); every tampering test checks that the verifier names what failed."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtwin.provenance import (
    DataSource,
    DPParameters,
    FieldError,
    KeyRing,
    LogError,
    ProvenanceError,
    ProvenanceLog,
    RoundRecord,
    SigningKey,
    SiteManifest,
    VerifyKey,
    canonical_json,
    cohort_fingerprint,
    digest,
    parameters_digest,
    verify_chain,
)

SPEC = "a" * 64
SITES = ("site_1", "site_2")


# ------------------------------------------------------------------------------------ helpers


def _write_pair(folder: Path, who: str) -> None:
    """Write an Ed25519 pair exactly as coordinator/consortium/node_keys.generate_signing_key does."""
    key = ed25519.Ed25519PrivateKey.generate()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{who}.ed25519.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / f"{who}.ed25519.pub.pem").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.fixture()
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys" / "signing"
    for who in ("coordinator", *SITES, "intruder"):
        _write_pair(d, who)
    return d


@pytest.fixture()
def ring(keydir: Path) -> KeyRing:
    """The trusted keys: the coordinator and the two sites (not the intruder)."""
    return KeyRing.from_files({w: keydir / f"{w}.ed25519.pub.pem" for w in ("coordinator", *SITES)})


def _sk(keydir: Path, who: str) -> SigningKey:
    return SigningKey.from_pem_file(keydir / f"{who}.ed25519.pem")


def _params(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)]


def _manifest(keydir: Path, site: str, rnd: int, start: str, eps: float, **over: Any) -> SiteManifest:
    fields: dict[str, Any] = dict(
        study_id="icu-study", round=rnd, site=site, spec_hash=SPEC, code_version="0.1.0+g1a2b3c4",
        cohort_fingerprint=cohort_fingerprint({"suppression_threshold": 10, "cohort": {"patients": 120 + len(site)}}),
        quality_report_hash="b" * 64,
        dp=DPParameters(noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=1.0, delta=1e-5, accountant="rdp"),
        epsilon_spent=eps, start_parameters_hash=start,
        data_source=DataSource(cdm_version="5.4", period_start="2019-01", period_end="2023-12", n_patients=120),
    )
    fields.update(over)
    return SiteManifest(**fields).sign(_sk(keydir, site))


SECAGG = {"enabled": True, "num_shares": 1.0, "reconstruction_threshold": 0.67, "clipping_range": 8.0, "quantization_range": 2**22}


def _chain(keydir: Path, rounds: int = 3) -> list[RoundRecord]:
    """A real signed chain: round r starts from round r-1's aggregate."""
    coord = _sk(keydir, "coordinator")
    start = parameters_digest(_params(0))
    out: list[RoundRecord] = []
    for r in range(1, rounds + 1):
        agg = parameters_digest(_params(r))
        ms = [_manifest(keydir, s, r, start, 0.9 * r + i) for i, s in enumerate(SITES)]
        rec = RoundRecord.build(
            study_id="icu-study", round=r, spec_hash=SPEC, start_parameters_hash=start, aggregate_hash=agg,
            manifests=reversed(ms), metrics={"rmse": 1.0 / r, "auroc": 0.7 + r / 100, "sites": 2.0}, secagg=SECAGG,
            previous=out[-1] if out else None,
        ).sign(coord)
        out.append(rec)
        start = agg
    return out


def _resign(rec: RoundRecord | dict, keydir: Path, who: str = "coordinator") -> RoundRecord:
    r = rec if isinstance(rec, RoundRecord) else RoundRecord.from_dict(rec)
    return r.sign(_sk(keydir, who))


def _fields(report: Any) -> list[tuple[int | None, str]]:
    return [(p.index, p.field) for p in report.problems]


# ----------------------------------------------------------------------------- canonical JSON


def test_canonical_json_is_stable_across_dict_order_and_keeps_floats_exact() -> None:
    a = {"b": [1, 2.5, {"y": None, "x": True}], "a": "é", "c": 0.1 + 0.2}
    b = {"c": 0.1 + 0.2, "a": "é", "b": [1, 2.5, {"x": True, "y": None}]}
    assert canonical_json(a) == canonical_json(b) == '{"a":"é","b":[1,2.5,{"x":true,"y":null}],"c":0.30000000000000004}'
    assert digest(a) == digest(b)
    assert json.loads(canonical_json(a))["c"] == 0.1 + 0.2
    assert canonical_json({"v": 1}) != canonical_json({"v": 1.0})  # an int is not a float
    assert canonical_json({"v": np.float64(2.5)}) == '{"v":2.5}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_canonical_json_rejects_nan_and_infinity_naming_the_path(bad: float) -> None:
    with pytest.raises(ProvenanceError, match=r"\$\.metrics\.loss"):
        canonical_json({"metrics": {"loss": bad}})


def test_canonical_json_rejects_objects_without_a_json_form() -> None:
    with pytest.raises(ProvenanceError, match=r"\$\.w.*numpy.ndarray"):
        canonical_json({"w": np.zeros(3)})
    with pytest.raises(ProvenanceError, match="key 1"):
        canonical_json({1: "x"})


def test_parameters_digest_covers_dtype_shape_bytes_and_order() -> None:
    p = _params(1)
    d = parameters_digest(p)
    assert d == parameters_digest([a.copy() for a in p])
    assert d != parameters_digest(p[::-1])
    assert d != parameters_digest([p[0].reshape(4, 3), p[1]])
    assert d != parameters_digest([p[0].astype(np.float64), p[1]])
    q = [a.copy() for a in p]
    q[1][2] = np.nextafter(q[1][2], np.float32(10))
    assert d != parameters_digest(q)
    assert d == parameters_digest([a.astype(a.dtype.newbyteorder(">")) for a in p])  # byte order is not content
    assert d == parameters_digest([np.asfortranarray(p[0]), p[1]])
    with pytest.raises(ProvenanceError, match="parameter array 0"):
        parameters_digest([np.array(["x"], dtype=object)])


def test_cohort_fingerprint_hashes_a_suppressed_summary_only() -> None:
    s = {"spec_hash": SPEC, "suppression_threshold": 10, "cohort": {"patients": 120, "excluded_age": "<10"}}
    assert cohort_fingerprint(s) == cohort_fingerprint(dict(reversed(list(s.items())))) == digest(s)
    assert cohort_fingerprint(s) != cohort_fingerprint({**s, "cohort": {"patients": 130, "excluded_age": "<10"}})
    with pytest.raises(ProvenanceError, match="suppression_threshold"):
        cohort_fingerprint({"cohort": {"patients": 120}})
    with pytest.raises(ProvenanceError, match="summary dict"):
        cohort_fingerprint([{"person_id": 1}])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ keys


def test_keys_from_a_real_consortium_init_folder_sign_and_verify(tmp_path: Path) -> None:
    from coordinator.consortium.consortium import init_consortium
    from fedtwin.federation.config import load_site_config

    init_consortium(tmp_path / "c", sites=2)
    cfg = load_site_config(tmp_path / "c" / "sites" / "site_1.toml")
    sk = SigningKey.from_pem_file(cfg.keys.signing_private_key)
    own = VerifyKey.from_pem_file(cfg.keys.signing_public_key, "site_1")
    assert sk.key_id == own.key_id and len(sk.key_id) == 16
    assert "PRIVATE" not in repr(sk) and sk.key_id in repr(sk)
    ring = KeyRing.from_dir(cfg.keys.signing_public_key.parent)
    assert ring.names == ["coordinator", "site_1", "site_2"]
    assert ring.by_name("coordinator").key_id == VerifyKey.from_pem_file(cfg.trust.coordinator_signing_public_key).key_id
    m = _manifest_with(sk, "site_1")
    m.verify(ring)
    m.verify(own)
    site_2 = ring.by_name("site_2")
    assert site_2 is not None and not m.signature_valid(site_2)
    coord = SigningKey.from_pem_file(tmp_path / "c" / "keys" / "signing" / "coordinator.ed25519.pem")
    rec = RoundRecord.build(
        study_id="icu-study", round=1, spec_hash=SPEC, start_parameters_hash=m.start_parameters_hash,
        aggregate_hash=parameters_digest(_params(1)), manifests=[m], metrics={"rmse": 1.2}, secagg=SECAGG, previous=None,
    ).sign(coord)
    rec.verify(ring)
    assert verify_chain([rec], ring).ok


def _manifest_with(sk: SigningKey, site: str) -> SiteManifest:
    return SiteManifest(
        study_id="icu-study", round=1, site=site, spec_hash=SPEC, code_version="0.1.0",
        cohort_fingerprint="c" * 64, quality_report_hash="d" * 64, dp=None, epsilon_spent=0.0,
        start_parameters_hash=parameters_digest(_params(0)),
    ).sign(sk)


def test_key_loading_errors_name_the_file_and_the_mixup(tmp_path: Path, keydir: Path) -> None:
    with pytest.raises(ProvenanceError, match=r"missing\.pem does not exist"):
        SigningKey.from_pem_file(tmp_path / "missing.pem")
    with pytest.raises(ProvenanceError, match=r"site_1\.ed25519\.pub\.pem holds a public key"):
        SigningKey.from_pem_file(keydir / "site_1.ed25519.pub.pem")
    with pytest.raises(ProvenanceError, match=r"site_1\.ed25519\.pem holds a PRIVATE key"):
        VerifyKey.from_pem_file(keydir / "site_1.ed25519.pem")
    ssh = tmp_path / "supernode.key"
    ssh.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with pytest.raises(ProvenanceError, match=r"supernode\.key is an OpenSSH key"):
        SigningKey.from_pem_file(ssh)
    p256 = tmp_path / "ec.pem"
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ProvenanceError, match=r"ec\.pem holds an EC secp256r1 key, not an Ed25519"):
        SigningKey.from_pem_file(p256)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ProvenanceError, match=r"junk\.pem is not a PEM file"):
        VerifyKey.from_pem_file(junk)
    with pytest.raises(ProvenanceError, match="same key"):
        KeyRing.from_files({"a": keydir / "site_1.ed25519.pub.pem", "b": keydir / "site_1.ed25519.pub.pem"})


# ------------------------------------------------------------------------------- manifests


def test_manifest_round_trips_through_json_and_verifies(keydir: Path, ring: KeyRing) -> None:
    m = _manifest(keydir, "site_1", 1, "e" * 64, 1.25)
    text = m.to_json()
    assert len(text) < 1200
    back = SiteManifest.from_json(text)
    assert back == m and back.to_json() == text
    back.verify(ring)
    assert set(json.loads(text)) == {
        "type", "format", "study_id", "round", "site", "spec_hash", "code_version", "cohort_fingerprint",
        "quality_report_hash", "dp", "epsilon_spent", "start_parameters_hash", "data_source", "key_id", "signature",
    }
    # every leaf is a string, a number or null: nothing else can be carried
    d = json.loads(text)
    leaves = [v for v in d.values() if not isinstance(v, dict)] + list(d["dp"].values()) + list(d["data_source"].values())
    assert all(v is None or isinstance(v, (str, int, float)) for v in leaves)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon_spent", 0.5), ("round", 2), ("cohort_fingerprint", "f" * 64), ("site", "site_2"), ("code_version", "0.2.0")],
)
def test_a_tampered_manifest_field_fails_its_signature(keydir: Path, ring: KeyRing, field: str, value: Any) -> None:
    d = _manifest(keydir, "site_1", 1, "e" * 64, 1.25).to_dict()
    d[field] = value
    m = SiteManifest.from_dict(d)
    with pytest.raises(ProvenanceError, match="does not verify|no trusted key|is expected"):
        m.verify(ring)


def test_manifest_refuses_extra_fields_free_text_and_bad_numbers(keydir: Path) -> None:
    d = _manifest(keydir, "site_1", 1, "e" * 64, 1.25).to_dict()
    with pytest.raises(FieldError, match="^patients: expected no such field"):
        SiteManifest.from_dict({**d, "patients": [1, 2]})
    with pytest.raises(FieldError, match="^dp.person_id"):
        SiteManifest.from_dict({**d, "dp": {**d["dp"], "person_id": 7}})
    with pytest.raises(FieldError, match="^cohort_fingerprint: expected a sha256 digest"):
        SiteManifest.from_dict({**d, "cohort_fingerprint": "John Smith, 1957-03-02"})
    with pytest.raises(FieldError, match="^code_version"):
        SiteManifest.from_dict({**d, "code_version": "x" * 200})
    with pytest.raises(FieldError, match="^epsilon_spent: expected a finite number"):
        SiteManifest.from_dict({**d, "epsilon_spent": float("nan")})
    with pytest.raises(FieldError, match="^dp.sample_rate"):
        SiteManifest.from_dict({**d, "dp": {**d["dp"], "sample_rate": 2.0}})
    with pytest.raises(ProvenanceError, match="at most 2048"):
        SiteManifest.from_json(json.dumps({**d, "pad": "x" * 3000}))


def test_dp_parameters_from_a_privacy_plan() -> None:
    from fedtwin.training.privacy_plan import PrivacyPlan

    plan = PrivacyPlan("site_1", "rdp", 1.3, 0.02, 150, 1.0, 1e-5, 8.0, 0.0, 3.0, 2.9)
    dp = DPParameters.from_settings(plan)
    assert dp.to_dict() == {"noise_multiplier": 1.3, "sample_rate": 0.02, "steps": 150, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}


# ---------------------------------------------------------------------------- round records


def test_round_records_sign_verify_and_chain(keydir: Path, ring: KeyRing) -> None:
    chain = _chain(keydir)
    assert [m.site for m in chain[0].manifests] == ["site_1", "site_2"]  # build orders them
    assert chain[0].prev_hash is None and chain[1].prev_hash == chain[0].record_hash()
    for rec in chain:
        rec.verify(ring)
        assert RoundRecord.from_json(rec.to_json()) == rec
        assert RoundRecord.from_json(rec.to_json(indent=2)).record_hash() == rec.record_hash()
    report = verify_chain([r.to_dict() for r in chain], ring, final_parameters_hash=parameters_digest(_params(3)))
    assert report.ok, report.summary()
    assert report.records == 3 and report.manifests == 6 and report.signatures_checked == 9
    assert report.head_hash == chain[-1].record_hash()
    assert report.final_aggregate_hash == parameters_digest(_params(3))
    assert report.summary().startswith("OK: 3 round record(s)")


def test_record_hash_excludes_only_the_signature(keydir: Path) -> None:
    rec = _chain(keydir, 1)[0]
    d = rec.to_dict()
    del d["signature"]
    assert rec.record_hash() == digest(d)
    assert rec.record_hash() == RoundRecord.from_dict({**rec.to_dict(), "signature": None}).record_hash()


def test_tampered_metric_is_caught_and_named(keydir: Path, ring: KeyRing) -> None:
    chain = [r.to_dict() for r in _chain(keydir)]
    chain[1]["metrics"]["rmse"] = 0.01
    report = verify_chain(chain, ring)
    assert (1, "signature") in _fields(report)
    assert (2, "prev_hash") in _fields(report)  # the next record no longer links to it
    assert "record 1 (round 2) signature" in report.summary()


def test_tampered_manifest_field_is_caught_and_named(keydir: Path, ring: KeyRing) -> None:
    chain = [r.to_dict() for r in _chain(keydir)]
    chain[0]["manifests"][1]["epsilon_spent"] = 0.0
    p = {(x.index, x.field, x.site) for x in verify_chain(chain, ring).problems}
    assert (0, "manifests[1].signature", "site_2") in p and (0, "signature", None) in p
    # even re-signed by the coordinator (who cannot forge the site's signature), the manifest fails
    chain[0] = _resign(chain[0], keydir).to_dict()
    p = verify_chain(chain, ring).problems
    assert [(x.index, x.field, x.site) for x in p if x.index == 0] == [(0, "manifests[1].signature", "site_2")]


def test_tampered_signature_byte_is_caught(keydir: Path, ring: KeyRing) -> None:
    chain = [r.to_dict() for r in _chain(keydir)]
    sig = bytearray(base64.b64decode(chain[2]["signature"]))
    sig[5] ^= 0x01
    chain[2]["signature"] = base64.b64encode(bytes(sig)).decode()
    report = verify_chain(chain, ring)
    assert _fields(report) == [(2, "signature")]
    assert "does not verify" in report.problems[0].found


def test_tampered_aggregate_hash_is_caught_even_when_re_signed(keydir: Path, ring: KeyRing) -> None:
    chain = [r.to_dict() for r in _chain(keydir)]
    chain[2]["aggregate_hash"] = parameters_digest(_params(99))
    assert _fields(verify_chain(chain, ring)) == [(2, "signature")]
    # the released model no longer matches the recorded aggregate
    clean = _chain(keydir)
    report = verify_chain(clean, ring, final_parameters_hash=parameters_digest(_params(99)))
    assert _fields(report) == [(2, "aggregate_hash")]
    assert parameters_digest(_params(99)) in report.problems[0].expected


def test_start_parameters_must_be_the_previous_aggregate(keydir: Path, ring: KeyRing) -> None:
    chain = _chain(keydir)
    coord = _sk(keydir, "coordinator")
    bad = RoundRecord.build(
        study_id="icu-study", round=3, spec_hash=SPEC, start_parameters_hash="0" * 64, aggregate_hash=chain[2].aggregate_hash,
        manifests=[_manifest(keydir, s, 3, "0" * 64, 5.0) for s in SITES], metrics={}, secagg=SECAGG, previous=chain[1],
    ).sign(coord)
    assert _fields(verify_chain([*chain[:2], bad], ring)) == [(2, "start_parameters_hash")]


def test_removed_round_is_caught(keydir: Path, ring: KeyRing) -> None:
    chain = _chain(keydir, 4)
    report = verify_chain([chain[0], chain[1], chain[3]], ring)
    f = _fields(report)
    assert (2, "prev_hash") in f and (2, "round") in f and (2, "start_parameters_hash") in f
    rnd = next(p for p in report.problems if p.field == "round")
    assert rnd.expected.startswith("3") and rnd.found.startswith("4")
    # the first round removed: the chain no longer starts at round 1 with no predecessor
    assert {(0, "prev_hash"), (0, "round")} <= set(_fields(verify_chain(chain[1:], ring)))
    # ... unless the verifier is given the hash it should start after
    assert verify_chain(chain[1:], ring, first_round=2, anchor=chain[0].record_hash()).ok


def test_reordered_rounds_are_caught(keydir: Path, ring: KeyRing) -> None:
    chain = _chain(keydir)
    f = _fields(verify_chain([chain[0], chain[2], chain[1]], ring))
    assert {(1, "prev_hash"), (1, "round"), (2, "prev_hash"), (2, "round")} <= set(f)


def test_record_signed_by_the_wrong_key_is_caught(keydir: Path, ring: KeyRing) -> None:
    chain = _chain(keydir)
    by_site = _resign(chain[1], keydir, "site_1")
    by_intruder = _resign(chain[2], keydir, "intruder")
    report = verify_chain([chain[0], by_site, by_intruder], ring)
    problems = {(p.index, p.field): p for p in report.problems}
    assert "site_1's key" in problems[(1, "key_id")].found
    assert "not a trusted key" in problems[(2, "key_id")].found
    # a manifest signed by another site's key, claiming to be site_1
    forged = _manifest(keydir, "site_1", 1, chain[0].start_parameters_hash, 0.0).sign(_sk(keydir, "site_2"))
    rec = RoundRecord.build(
        study_id="icu-study", round=1, spec_hash=SPEC, start_parameters_hash=chain[0].start_parameters_hash,
        aggregate_hash=chain[0].aggregate_hash, manifests=[forged], metrics={}, secagg=SECAGG, previous=None,
    ).sign(_sk(keydir, "coordinator"))
    p = verify_chain([rec], ring).problems
    assert [(x.field, x.site) for x in p] == [("manifests[0].key_id", "site_1")] and "site_2's key" in p[0].found


def test_manifest_of_another_round_or_study_is_caught(keydir: Path, ring: KeyRing) -> None:
    chain = _chain(keydir, 2)
    stale = chain[0].manifests[0]  # round 1's manifest replayed into round 2
    rec = RoundRecord.build(
        study_id="icu-study", round=2, spec_hash=SPEC, start_parameters_hash=chain[1].start_parameters_hash,
        aggregate_hash=chain[1].aggregate_hash, manifests=[stale, chain[1].manifests[1]], metrics={}, secagg=SECAGG,
        previous=chain[0],
    ).sign(_sk(keydir, "coordinator"))
    p = {(x.field, x.site): x for x in verify_chain([chain[0], rec], ring).problems}
    assert set(p) == {("manifests[0].round", "site_1"), ("manifests[0].start_parameters_hash", "site_1")}
    assert (p[("manifests[0].round", "site_1")].expected, p[("manifests[0].round", "site_1")].found) == ("2", "1")
    other = _manifest(keydir, "site_1", 1, chain[0].start_parameters_hash, 1.0, study_id="other-study", spec_hash="9" * 64)
    rec = RoundRecord.build(
        study_id="icu-study", round=1, spec_hash=SPEC, start_parameters_hash=chain[0].start_parameters_hash,
        aggregate_hash=chain[0].aggregate_hash, manifests=[other], metrics={}, secagg=SECAGG, previous=None,
    ).sign(_sk(keydir, "coordinator"))
    assert {x.field for x in verify_chain([rec], ring).problems} == {"manifests[0].study_id", "manifests[0].spec_hash"}


def test_halted_round_may_be_retried_and_must_have_no_aggregate(keydir: Path, ring: KeyRing) -> None:
    coord = _sk(keydir, "coordinator")
    chain = _chain(keydir, 1)
    start = chain[0].aggregate_hash
    assert start is not None

    def rec(r: int, prev: RoundRecord, status: str, agg: str | None, eps: float) -> RoundRecord:
        return RoundRecord.build(
            study_id="icu-study", round=r, spec_hash=SPEC, start_parameters_hash=start, aggregate_hash=agg,
            manifests=[_manifest(keydir, "site_1", r, start, eps)] if status == "completed" else [],
            metrics={}, secagg=SECAGG, previous=prev, status=status, sites_dropped=["site_2"],  # type: ignore[arg-type]
        ).sign(coord)

    halted = rec(2, chain[0], "halted", None, 0)
    retried = rec(2, halted, "completed", "1" * 64, 3.0)  # a resumed training runs round 2 again
    assert verify_chain([chain[0], halted, retried], ring).ok
    third = rec(3, retried, "completed", "2" * 64, 4.0)
    f = _fields(verify_chain([chain[0], halted, retried, third], ring))
    assert f == [(3, "start_parameters_hash")]  # round 3 must start from round 2's aggregate
    bad = rec(2, chain[0], "halted", "3" * 64, 0)
    assert (1, "aggregate_hash") in _fields(verify_chain([chain[0], bad], ring))
    jump = rec(4, halted, "completed", "1" * 64, 3.0)
    assert (2, "round") in _fields(verify_chain([chain[0], halted, jump], ring))


def test_epsilon_going_down_is_caught(keydir: Path, ring: KeyRing) -> None:
    chain = _chain(keydir, 2)
    m = _manifest(keydir, "site_1", 2, chain[1].start_parameters_hash, 0.1)
    rec = RoundRecord.build(
        study_id="icu-study", round=2, spec_hash=SPEC, start_parameters_hash=chain[1].start_parameters_hash,
        aggregate_hash=chain[1].aggregate_hash, manifests=[m, chain[1].manifests[1]], metrics={}, secagg=SECAGG, previous=chain[0],
    ).sign(_sk(keydir, "coordinator"))
    p = verify_chain([chain[0], rec], ring).problems
    assert [(x.index, x.field, x.site) for x in p] == [(1, "manifests[0].epsilon_spent", "site_1")]


def test_unparseable_records_are_reported_and_checking_goes_on(keydir: Path, ring: KeyRing) -> None:
    chain = [r.to_dict() for r in _chain(keydir, 3)]
    chain[0]["metrics"]["rmse"] = "low"
    chain[2]["metrics"]["auroc"] = 0.99
    report = verify_chain(chain, ring)
    f = _fields(report)
    assert (0, "metrics.rmse") in f and (1, "prev_hash") in f and (2, "signature") in f
    assert not verify_chain([], ring).ok
    with pytest.raises(ProvenanceError, match="FAILED"):
        report.raise_for_problems()


def test_record_refuses_nan_metrics_and_split_finite_names_them() -> None:
    from fedtwin.provenance import split_finite

    kept, dropped = split_finite({"rmse": 1.0, "auroc": float("nan"), "n": 3})
    assert kept == {"rmse": 1.0, "n": 3.0} and dropped == ["auroc"]
    with pytest.raises(FieldError, match="^metrics.auroc: expected a finite number"):
        RoundRecord.build(
            study_id="s", round=1, spec_hash=SPEC, start_parameters_hash=SPEC, aggregate_hash=SPEC, manifests=[],
            metrics={"auroc": float("nan")}, secagg={}, previous=None,
        )


# ---------------------------------------------------------------------------- the site's log


def test_local_log_appends_reopens_and_returns_the_records(tmp_path: Path, keydir: Path, ring: KeyRing) -> None:
    path = tmp_path / "site_1" / "provenance.jsonl"
    log = ProvenanceLog.open(path)
    assert len(log) == 0 and log.head is None
    chain = _chain(keydir)
    for rec in chain:
        log.append_manifest(rec.manifests[0])
        log.append_record(rec)
    before = path.read_bytes()
    again = ProvenanceLog.open(path, expected_head=log.head)
    assert len(again) == 6 and again.round_records() == chain and again.manifests()[0] == chain[0].manifests[0]
    assert verify_chain(again.round_records(), ring).ok
    again.append("note", {"text": "audit copy sent"})
    assert path.read_bytes().startswith(before)  # appending never rewrites
    assert [e.seq for e in ProvenanceLog.open(path).entries] == list(range(1, 8))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


@pytest.fixture()
def filled_log(tmp_path: Path, keydir: Path) -> Path:
    path = tmp_path / "provenance.jsonl"
    log = ProvenanceLog.open(path)
    for rec in _chain(keydir, 4):
        log.append_record(rec)
    return path


def test_log_line_edit_is_caught_naming_the_line(filled_log: Path) -> None:
    lines = _lines(filled_log)
    obj = json.loads(lines[1])
    obj["entry"]["metrics"]["rmse"] = 0.01
    lines[1] = canonical_json(obj).encode()
    filled_log.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(LogError, match="line 3 links to .* but line 2 has hash"):
        ProvenanceLog.open(filled_log)


def test_log_non_canonical_edit_removed_line_reorder_and_truncation_are_caught(filled_log: Path) -> None:
    good = filled_log.read_bytes()
    lines = _lines(filled_log)
    filled_log.write_bytes(b"\n".join([lines[0], lines[1].replace(b'"round":2', b'"round": 2'), *lines[2:]]) + b"\n")
    with pytest.raises(LogError, match="line 2 is not in canonical form"):
        ProvenanceLog.open(filled_log)
    filled_log.write_bytes(b"\n".join([lines[0], *lines[2:]]) + b"\n")
    with pytest.raises(LogError, match="line 2 says it is line 3"):
        ProvenanceLog.open(filled_log)
    filled_log.write_bytes(b"\n".join([lines[0], lines[2], lines[1], lines[3]]) + b"\n")
    with pytest.raises(LogError, match="line 2 says it is line 3"):
        ProvenanceLog.open(filled_log)
    filled_log.write_bytes(good[:-40])
    with pytest.raises(LogError, match="line 4 is truncated"):
        ProvenanceLog.open(filled_log)
    filled_log.write_bytes(b"\n".join(lines[:3]) + b"\n")  # last line removed cleanly: caught with the head kept elsewhere
    head = json.loads(lines[3])
    assert head["seq"] == 4
    with pytest.raises(LogError, match="last line \\(line 3\\)"):
        from fedtwin.provenance.canonical import sha256_hex

        ProvenanceLog.open(filled_log, expected_head=sha256_hex(lines[3]))


def test_log_refuses_to_append_after_someone_else_wrote(filled_log: Path) -> None:
    log = ProvenanceLog.open(filled_log)
    with open(filled_log, "ab") as fh:
        fh.write(b'{"x":1}\n')
    size = os.path.getsize(filled_log)
    with pytest.raises(LogError, match="changed since it was opened"):
        log.append("note", {"a": 1})
    assert os.path.getsize(filled_log) == size
    with pytest.raises(LogError, match="line 5 is not a log line"):
        ProvenanceLog.open(filled_log)
