"""The site's allow-list: a study (spec hash + FedTwin code version) is accepted only once approved.

Real files and the real CLI (typer's CliRunner on ``fedtwin``'s app, and the installed ``fedtwin``
script for exit codes and the printed Error/Fix).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_text
from typer.testing import CliRunner

from fedtwin.federation.config import load_site_config, to_toml_dict
from fedtwin.federation.errors import ConsortiumError
from fedtwin.spec import load_spec, spec_hash
from site_agent.approval import (
    AllowList,
    ApprovalError,
    approve,
    approve_for_sites,
    check_study_approved,
    revoke,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "specs" / "icu-hemodynamics.yaml"
OTHER_SPEC = REPO / "specs" / "hypertension-bp.yaml"

SITE_TOML = """\
[site]
name = "{name}"
index = {index}
consortium = "test"

[data]
database = "../data/{name}.omop.sqlite"
spec = "../specs/icu-hemodynamics.yaml"

[privacy]
epsilon = 8.0
delta = 1e-05
ledger = "../privacy/{name}.ledger.sqlite"

[keys]
supernode_private_key = "../keys/{name}.key"
supernode_public_key = "../keys/{name}.pub"
signing_private_key = "../keys/{name}.pem"
signing_public_key = "../keys/{name}.pub.pem"

[trust]
superlink_address = "127.0.0.1:9092"
ca_certificate = "../pki/ca.pem"
coordinator_signing_public_key = "../keys/coordinator.pub.pem"

[supernode]
runtime_api_port = {port}
{extra}"""


def _site(root: Path, index: int = 1, extra: str = "") -> Path:
    """A consortium-like folder: sites/site_<k>.toml, specs/, privacy/ (paths relative to the config)."""
    name = f"site_{index}"
    (root / "sites").mkdir(parents=True, exist_ok=True)
    (root / "specs").mkdir(exist_ok=True)
    (root / "privacy").mkdir(exist_ok=True)
    if not (root / "specs" / SPEC.name).exists():
        (root / "specs" / SPEC.name).write_bytes(SPEC.read_bytes())
    cfg = root / "sites" / f"{name}.toml"
    cfg.write_text(SITE_TOML.format(name=name, index=index, port=9100 + index, extra=extra))
    return cfg


def _main(*args: str):
    from fedtwin.cli import main

    main._register()
    return CliRunner().invoke(main.app, list(args))


def _fedtwin(*args: str) -> tuple[int, str]:
    """The installed ``fedtwin`` script: a FedTwinError is printed as Error/Fix and exits 2."""
    res = subprocess.run([str(Path(sys.executable).parent / "fedtwin"), *args], capture_output=True, text=True, timeout=120)
    return res.returncode, " ".join((res.stdout + res.stderr).split())


def _hash(path: Path = SPEC) -> str:
    return spec_hash(load_spec(path))


# ------------------------------------------------------------------------------ site config


def test_allow_list_path_defaults_beside_the_ledger_and_resolves_like_other_paths(tmp_path: Path) -> None:
    cfg = load_site_config(_site(tmp_path))
    assert cfg.allow_list_path() == (tmp_path / "privacy" / "site_1.approvals.json").resolve()
    assert cfg.allow_list_path().parent == cfg.privacy.ledger.parent
    # a site config written back without [approval] stays without it (generated files unchanged)
    assert "approval" not in to_toml_dict(load_site_config(tmp_path / "sites" / "site_1.toml", resolve=False))
    own = _site(tmp_path, 2, extra='\n[approval]\nallow_list = "../approvals/mine.json"\n')
    assert load_site_config(own).allow_list_path() == (tmp_path / "approvals" / "mine.json").resolve()
    (tmp_path / "sites" / "bad.toml").write_text(own.read_text().replace("allow_list", "allowlist"))
    with pytest.raises(ConsortiumError) as exc:  # naming the unknown field
        load_site_config(tmp_path / "sites" / "bad.toml")
    assert "approval.allowlist" in str(exc.value)


# ------------------------------------------------------------------------- the round trip


def test_approve_list_revoke_round_trip_through_the_cli(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    allow = tmp_path / "privacy" / "site_1.approvals.json"
    h = _hash()
    res = _main("site", "approvals", "--config", str(cfg))
    assert res.exit_code == 0 and "is empty: no study is accepted" in cli_text(res), cli_text(res)

    res = _main("site", "approve", "--config", str(cfg), "--spec", str(SPEC), "--code-version", "0.1.0+gabc123def456",
                "--by", "Dr A. Site (DPO)", "--note", "ethics ref 2025-17")
    out = cli_text(res)
    assert res.exit_code == 0, out
    assert "approved at site site_1: twin spec icu_hemodynamics v1" in out and f"spec hash {h}" in out
    assert "code version 0.1.0+gabc123def456" in out and f"allow-list {allow}" in out
    doc = json.loads(allow.read_text())  # human-readable JSON
    assert doc["format"] == "fedtwin-site-allow-list" and len(doc["approvals"]) == 1
    e = doc["approvals"][0]
    assert (e["spec_hash"], e["spec_name"], e["code_version"], e["approved_by"], e["note"]) == (
        h, "icu_hemodynamics", "0.1.0+gabc123def456", "Dr A. Site (DPO)", "ethics ref 2025-17")
    assert e["approved_at"].endswith("+00:00")
    assert check_study_approved(allow, h, "0.1.0+gabc123def456", "site_1").approved_by == "Dr A. Site (DPO)"

    before = allow.read_bytes()
    res = _main("site", "approve", "--config", str(cfg), "--spec", str(SPEC), "--code-version", "0.1.0+gabc123def456")
    assert res.exit_code == 0 and "already approved" in cli_text(res), cli_text(res)
    assert allow.read_bytes() == before  # approving twice changes nothing

    # a second approval with the default code version: the running code's
    from fedtwin.code_version import code_version

    res = _main("site", "approve", "--config", str(cfg), "--spec", str(SPEC))
    assert res.exit_code == 0 and code_version() in cli_text(res), cli_text(res)
    res = _main("site", "approvals", "--config", str(cfg))
    out = cli_text(res)
    assert res.exit_code == 0, out
    assert h[:12] in out and "0.1.0+gabc123def456" in out and code_version() in out and "Dr A. Site (DPO)" in out
    res = _main("site", "approvals", "--config", str(cfg), "--json")
    listed = json.loads(res.output)
    assert [a["code_version"] for a in listed["approvals"]] == ["0.1.0+gabc123def456", code_version()]

    res = _main("site", "revoke", "--config", str(cfg), "--spec-hash", h[:12], "--code-version", "0.1.0+gabc123def456")
    assert res.exit_code == 0 and "revoked" in cli_text(res) and h in cli_text(res), cli_text(res)
    assert [a.code_version for a in AllowList.load(allow).approvals] == [code_version()]
    with pytest.raises(ApprovalError, match="other FedTwin code version"):
        check_study_approved(allow, h, "0.1.0+gabc123def456", "site_1")
    with pytest.raises(ApprovalError, match=r"is not approved in .*\(nothing revoked\)"):
        revoke(allow, h, "0.1.0+gabc123def456")
    revoke(allow, h, code_version())
    assert AllowList.load(allow).approvals == () and AllowList.load(allow).exists


def test_a_json_spec_is_approved_under_the_same_hash_as_its_yaml(tmp_path: Path) -> None:
    as_json = tmp_path / "icu.json"
    as_json.write_text(json.dumps(yaml.safe_load(SPEC.read_text())))
    a = approve(tmp_path / "a.json", as_json, "0.1.0")
    assert a.spec_hash == _hash() and a.spec_file == str(as_json.resolve())


# --------------------------------------------------------------------------- refusals


def test_another_spec_hash_is_refused_naming_hash_version_file_and_command(tmp_path: Path) -> None:
    allow = tmp_path / "approvals.json"
    with pytest.raises(ApprovalError) as exc:  # no file yet: fail-closed
        check_study_approved(allow, _hash(), "0.1.0", "site_1")
    assert "does not exist yet: nothing is approved" in exc.value.problem
    approve(allow, SPEC, "0.1.0")
    other = _hash(OTHER_SPEC)
    with pytest.raises(ApprovalError) as exc:
        check_study_approved(allow, other, "0.1.0", "site_1", config_path="sites/site_1.toml", spec_path="specs/hypertension-bp.yaml")
    problem, fix = exc.value.problem, exc.value.fix
    assert f"site site_1 refuses the study: twin spec {other[:12]} with FedTwin code version 0.1.0 is not approved" in problem
    assert str(allow) in problem and other not in problem  # the short hash, not the full one
    assert "other FedTwin code version" not in problem
    assert "fedtwin site approve --config sites/site_1.toml --spec specs/hypertension-bp.yaml --code-version 0.1.0" in fix
    # without the paths, placeholders
    with pytest.raises(ApprovalError) as exc:
        check_study_approved(allow, other, "0.1.0", "site_1")
    assert "fedtwin site approve --config SITE.toml --spec SPEC --code-version 0.1.0" in exc.value.fix


def test_another_code_version_is_refused_naming_the_approved_versions(tmp_path: Path) -> None:
    allow = tmp_path / "approvals.json"
    h = _hash()
    approve(allow, SPEC, "0.1.0+gaaaaaaaaaaaa")
    approve(allow, SPEC, "0.1.0+gbbbbbbbbbbbb")
    approve(allow, OTHER_SPEC, "0.2.0")  # another spec's version is not listed
    assert check_study_approved(allow, h, "0.1.0+gbbbbbbbbbbbb", "site_1").code_version == "0.1.0+gbbbbbbbbbbbb"
    with pytest.raises(ApprovalError) as exc:
        check_study_approved(allow, h, "0.2.0", "site_3", config_path="c.toml", spec_path="s.yaml")
    problem = exc.value.problem
    assert (f"site site_3 refuses the study: twin spec {h[:12]} is approved at this site, but for other FedTwin code "
            "version(s): 0.1.0+gaaaaaaaaaaaa, 0.1.0+gbbbbbbbbbbbb; not for code version 0.2.0") in problem
    assert str(allow) in problem
    assert "fedtwin site approve --config c.toml --spec s.yaml --code-version 0.2.0" in exc.value.fix


def test_a_corrupt_allow_list_is_a_clear_error_and_is_never_overwritten(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    allow = load_site_config(cfg).allow_list_path()
    approve(allow, SPEC, "0.1.0")
    corrupt = allow.read_bytes()[: len(allow.read_bytes()) // 2]  # a half-written file (what atomic writes prevent)
    allow.write_bytes(corrupt)
    for call in (lambda: AllowList.load(allow), lambda: check_study_approved(allow, _hash(), "0.1.0", "site_1"),
                 lambda: approve(allow, SPEC, "0.2.0"), lambda: revoke(allow, _hash(), "0.1.0")):
        with pytest.raises(ApprovalError) as exc:
            call()
        assert str(allow) in exc.value.problem and "not valid JSON" in exc.value.problem, exc.value.problem
        assert "restore" in exc.value.fix and "fedtwin site approve" in exc.value.fix
    assert allow.read_bytes() == corrupt
    code, out = _fedtwin("site", "approve", "--config", str(cfg), "--spec", str(SPEC))
    assert code == 2 and "Error:" in out and "not valid JSON" in out and "Fix:" in out, out
    assert allow.read_bytes() == corrupt
    # valid JSON that is not an allow-list, and an entry that breaks the rules: refused too
    allow.write_text(json.dumps({"approvals": []}))
    with pytest.raises(ApprovalError, match="not a FedTwin site allow-list"):
        AllowList.load(allow)
    good = json.loads(AllowList(allow).to_json([approve(tmp_path / "ok.json", SPEC, "0.1.0")]))
    good["approvals"][0]["spec_hash"] = "abc"
    allow.write_text(json.dumps(good))
    with pytest.raises(ApprovalError, match=r"approvals\[0\] is invalid: spec_hash = 'abc'"):
        check_study_approved(allow, _hash(), "0.1.0", "site_1")


def test_approve_refuses_an_invalid_spec_and_writes_nothing(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    allow = load_site_config(cfg).allow_list_path()
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(SPEC.read_text())
    del data["state_variables"]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ApprovalError) as exc:
        approve(allow, bad, "0.1.0")
    assert "refusing to approve" in exc.value.problem and "invalid twin spec" in exc.value.problem
    assert "state_variables" in exc.value.problem and exc.value.fix  # the loader's message and fix
    with pytest.raises(ApprovalError, match="does not exist"):
        approve(allow, tmp_path / "missing.yaml", "0.1.0")
    with pytest.raises(ApprovalError, match="must be a version string"):
        approve(allow, SPEC, "not a version")
    assert not allow.exists()
    code, out = _fedtwin("site", "approve", "--config", str(cfg), "--spec", str(bad))
    assert code == 2 and "refusing to approve" in out and "invalid twin spec" in out and "Fix:" in out, out
    assert not allow.exists() and sorted(p.name for p in allow.parent.iterdir()) == []
    code, out = _fedtwin("site", "revoke", "--config", str(cfg), "--spec-hash", _hash()[:12], "--code-version", "0.1.0")
    assert code == 2 and "nothing revoked" in out, out


# ----------------------------------------------------------------------- atomic writes


def _approve_version(args: tuple[str, str]) -> str:
    path, version = args
    return approve(path, SPEC, version).code_version


def _read_while_written(path: str, stop, errors) -> None:
    while not stop.is_set():
        try:
            AllowList.load(path)
        except ApprovalError as exc:  # a half-written file would land here
            errors.put(exc.problem)
            return


def test_writes_are_atomic_concurrent_approvals_all_land_and_no_temp_file_is_left(tmp_path: Path) -> None:
    allow = tmp_path / "privacy" / "approvals.json"
    approve(allow, SPEC, "0.0.1")
    ctx = multiprocessing.get_context("fork")
    stop, errors = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_read_while_written, args=(str(allow), stop, errors))
    reader.start()
    try:
        versions = [f"0.1.{i}" for i in range(12)]
        with ctx.Pool(6) as pool:
            assert sorted(pool.map(_approve_version, [(str(allow), v) for v in versions])) == sorted(versions)
    finally:
        stop.set()
        reader.join(30)
    assert errors.empty(), errors.get()
    assert sorted(a.code_version for a in AllowList.load(allow).approvals) == sorted(["0.0.1", *versions])
    for v in versions[::2]:
        revoke(allow, _hash(), v)
    assert len(AllowList.load(allow).approvals) == 7
    assert sorted(p.name for p in allow.parent.iterdir()) == ["approvals.json"]  # no temp or lock file left
    assert oct(allow.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_replace_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    allow = tmp_path / "approvals.json"
    approve(allow, SPEC, "0.1.0")
    before = allow.read_bytes()

    def crash(*_a, **_k):  # fault injection: the process dies between writing the temp file and the rename
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        approve(allow, SPEC, "0.2.0")
    monkeypatch.undo()
    assert allow.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["approvals.json"]


# ---------------------------------------------------------------------------- set-up helper


def test_approve_for_sites_approves_each_site_in_its_own_allow_list(tmp_path: Path) -> None:
    cfgs = [_site(tmp_path, k) for k in (1, 2, 3)]
    approvals = approve_for_sites(cfgs[:2], None, "0.1.0+gabc", approved_by="test set-up")
    assert [a.spec_hash for a in approvals] == [_hash()] * 2
    for cfg in cfgs[:2]:
        site = load_site_config(cfg)
        assert check_study_approved(site.allow_list_path(), _hash(), "0.1.0+gabc", site.site.name).approved_by == "test set-up"
    site3 = load_site_config(cfgs[2])  # same privacy/ folder, its own list: not approved
    with pytest.raises(ApprovalError, match="site site_3 refuses the study"):
        check_study_approved(site3.allow_list_path(), _hash(), "0.1.0+gabc", "site_3")
    assert sorted(p.name for p in (tmp_path / "privacy").iterdir()) == ["site_1.approvals.json", "site_2.approvals.json"]
    again = approve_for_sites(cfgs[:1], SPEC, "0.1.0+gabc")  # idempotent
    assert again[0].approved_at == approvals[0].approved_at
