"""The local consortium on real processes: init (PKI, keys, configs), up/down, runs, refusals, compose.

One consortium (SuperLink + 2 SuperNodes, TLS, SuperNode authentication) is shared by the slow
tests of this module (module-scoped fixture); the last test stops it and checks that no process
is left behind. The probe Flower app is tests/flower_probe.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import threading
import time
import tomllib
import zipfile
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from conftest import running_consortium

from coordinator.consortium import compose, processes
from fedtwin.federation import commands
from fedtwin.federation.commands import ProcessSpec
from fedtwin.federation.config import load_site_config, load_study_config
from coordinator.consortium.consortium import Consortium, down, init_consortium, run_app, status, up
from fedtwin.federation.errors import ConsortiumError
from coordinator.consortium.layout import Layout, free_ports

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "flower_probe"
COMPOSE_DIR = REPO / "compose"
FINAL_RE = re.compile(r"PROBE final=\[([^\]]*)\]")
ROUND_RE = re.compile(r"PROBE round=(\d+) seconds=([\d.]+) results=(\d+) failures=(\d+)")


def _final(output: str) -> list[float]:
    m = FINAL_RE.search(output)
    assert m, f"no PROBE final line in:\n{output[-3000:]}"
    return [float(x) for x in m.group(1).split(",")]


# ------------------------------------------------------------------------------- init (fast)


def test_run_state_says_how_the_training_went_not_only_that_the_serverapp_exited() -> None:
    from coordinator.consortium.run_outcome import run_state, training_outcome

    def state(log: str, status: str = "finished", sub: str = "completed") -> str:
        return run_state(status, sub, training_outcome(log))

    line = "FEDTWIN final rounds_completed={} rounds={} first_round={} saved=-"
    assert state("FEDTWIN round=1 status=halted sites=0\n" + line.format(0, 2, 1) + " reason=no-round-completed\n") \
        == "finished:no-round-completed"
    assert state(line.format(1, 2, 1)) == "finished:rounds-halted"
    assert state(line.format(2, 2, 1)) == "finished:completed"
    assert state(line.format(1, 2, 2)) == "finished:completed"  # a resumed launch ran round 2 only
    assert training_outcome(line.format(1, 2, 2)).describe() == "1 of 1 completed (from round 2)"
    assert training_outcome(line.format(0, 3, 1)).describe() == "0 of 3 completed"
    # another app's run, a failed or running run: Flower's status as it is
    assert state("PROBE final=[1.0]") == "finished:completed"
    assert state(line.format(0, 2, 1), sub="failed") == "finished:failed"
    assert run_state("running", "", None) == "running"


def test_init_creates_verifiable_pki_keys_and_configs(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.verification import VerificationError

    from coordinator.consortium.node_keys import load_signing_private_key, load_signing_public_key, load_supernode_private_key
    from coordinator.consortium.pki import load_certificate, verify_server_certificate

    root = tmp_path / "c"
    res = init_consortium(root, sites=3, server_names=("coordinator.example.org",))
    L = Layout.at(root)

    # the SuperLink certificate chains to the consortium CA for every name a client may use
    for name in ("127.0.0.1", "localhost", "::1", "superlink", "coordinator.example.org"):
        verify_server_certificate(L.ca_cert, L.server_cert, name)
    with pytest.raises(VerificationError):
        verify_server_certificate(L.ca_cert, L.server_cert, "evil.example.org")
    other = tmp_path / "other"
    init_consortium(other, sites=1)
    with pytest.raises(VerificationError):  # another consortium's CA does not vouch for this SuperLink
        verify_server_certificate(Layout.at(other).ca_cert, L.server_cert, "127.0.0.1")
    ca = load_certificate(L.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf = load_certificate(L.server_cert)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    # keys: SuperNode keys are OpenSSH EC P-384 (what flower-supernode/flwr supernode register load); Ed25519 signing keys
    for site in ("site_1", "site_2", "site_3"):
        key = load_supernode_private_key(L.supernode_key(site))
        assert isinstance(key.curve, ec.SECP384R1)
        assert L.supernode_pub(site).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert isinstance(load_signing_private_key(L.signing_key(site)), ed25519.Ed25519PrivateKey)
        assert isinstance(load_signing_public_key(L.signing_pub(site)), ed25519.Ed25519PublicKey)
        for secret in (L.supernode_key(site), L.signing_key(site), L.superexec_secret(site)):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert isinstance(load_signing_public_key(L.signing_pub("coordinator")), ed25519.Ed25519PublicKey)
    for secret in (L.ca_key, L.server_key, L.signing_key("coordinator"), L.superexec_secret("superlink")):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret

    # configs: what init wrote loads, paths resolve into the folder, ports are distinct
    m = res.manifest
    ports = [m.superlink.port] + [s.runtime_api_port for s in m.sites]
    assert len(set(ports)) == len(ports) == 4
    for k, s in enumerate(m.sites, start=1):
        cfg = load_site_config(root / s.config)
        assert (cfg.site.name, cfg.site.index) == (f"site_{k}", k)
        assert cfg.keys.supernode_private_key == L.supernode_key(s.name)
        assert cfg.trust.ca_certificate == L.ca_cert
        assert cfg.trust.superlink_address == f"127.0.0.1:{m.superlink.port}"
        assert cfg.data.spec.is_file() and cfg.privacy.ledger.parent == L.privacy_dir
        assert cfg.supernode.runtime_api_port == s.runtime_api_port
    study = load_study_config(L.study)
    assert study.study.spec.is_file() and study.checkpoints.dir == L.checkpoints_dir
    assert (study.strategy.name, study.secagg.enabled, study.study.min_sites) == ("fedavg", True, 2)
    # site configs are plain TOML a site can read without FedTwin
    raw = tomllib.loads((root / "sites" / "site_2.toml").read_text())
    assert raw["privacy"]["suppression_threshold"] == 10 and raw["keys"]["supernode_private_key"].startswith("../keys/")


def test_init_refuses_to_overwrite_unless_force(tmp_path: Path) -> None:
    root = tmp_path / "c"
    first = init_consortium(root, sites=2)
    with pytest.raises(ConsortiumError, match="refusing to overwrite"):
        init_consortium(root, sites=2)
    second = init_consortium(root, sites=2, force=True)
    assert Layout.at(root).ca_cert.read_bytes() != b"" and second.manifest.superlink.port != 0
    assert first.manifest.consortium.created <= second.manifest.consortium.created
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ConsortiumError, match="without consortium.toml"):
        init_consortium(junk, sites=2, force=True)
    assert (junk / "notes.txt").read_text() == "mine"


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConsortiumError, match=r"strategy.*FedProx needs proximal_mu > 0"):
        init_consortium(tmp_path / "a", sites=2, strategy="fedprox")
    with pytest.raises(ConsortiumError, match=r"secagg.*num_shares = 2"):
        init_consortium(tmp_path / "b", sites=3, secagg={"num_shares": 2})
    with pytest.raises(ConsortiumError, match=r"num_shares = 4: an integer num_shares must be odd"):
        init_consortium(tmp_path / "b", sites=5, secagg={"num_shares": 4})
    with pytest.raises(ConsortiumError, match=r"min_sites = 5"):
        init_consortium(tmp_path / "c", sites=3, min_sites=5)
    assert not (tmp_path / "a").exists()  # nothing written when the options are wrong
    root = tmp_path / "ok"
    init_consortium(root, sites=2)
    p = root / "sites" / "site_1.toml"
    p.write_text(p.read_text().replace("suppression_threshold = 10", "suppression_threshold = 0").replace('index = 1', 'index = "one"'))
    with pytest.raises(ConsortiumError) as exc:
        load_site_config(p)
    assert "privacy.suppression_threshold = 0" in exc.value.problem and "site.index = 'one'" in exc.value.problem
    assert "2 problems" in exc.value.problem
    with pytest.raises(ConsortiumError, match="not valid TOML"):
        (root / "study.toml").write_text("[study\n")
        load_study_config(root / "study.toml")


def test_cli_init_and_status(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.consortium.cli import app

    runner = CliRunner()
    root = tmp_path / "c"
    r = runner.invoke(app, ["init", "--sites", "2", "--out", str(root)])
    assert r.exit_code == 0, r.output
    assert "created consortium" in r.output and (root / "sites" / "site_2.toml").is_file()
    r = runner.invoke(app, ["init", "--sites", "2", "--out", str(root)])
    assert isinstance(r.exception, ConsortiumError)  # the fedtwin main prints problem + fix, exits 2
    r = runner.invoke(app, ["status", str(root)])
    assert r.exit_code == 0 and "no processes" in r.output


# ----------------------------------------------------------------------------- compose (fast)


def test_compose_files_are_rendered_from_the_command_builders() -> None:
    for rel, text in compose.render_files().items():
        committed = (COMPOSE_DIR / rel).read_text()
        assert committed == text, f"compose/{rel} is out of date: run `python -m coordinator.consortium.compose`"


def _compose_commands(path: Path) -> dict[str, list[str]]:
    data = yaml.safe_load(path.read_text())
    return {name: svc["command"] for name, svc in data["services"].items() if "command" in svc}


VALUE_FLAGS = (
    "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--host", "--port", "--database", "--superexec-auth-secret-file",
    "--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config", "--runtime-api-address",
)


def _flags(argv: list[str]) -> list[str]:
    """A command without interpreter, paths and addresses: the program, then flags in order, with the
    values of path/address flags masked (``--watch-pid``, local-only, dropped)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--watch-pid":
            skip = True
            continue
        out.append(a)
    out = commands.strip_values(out, VALUE_FLAGS)
    if out and Path(out[0]).name.startswith("python"):
        out = out[1:]
    if out and "/" in out[0]:
        out[0] = Path(out[0]).name
    return out


def test_compose_commands_and_flags_match_the_local_processes(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_consortium(root, sites=2)
    c = Consortium.load(root)
    r = c.render()
    site = c.site_render(c.manifest.sites[0])
    local = {
        "superlink": commands.superlink_argv(r),
        "coordinator-superexec": commands.superlink_executor_argv(r, watch_pid=123),
        "supernode": commands.supernode_argv(r, site),
        "site-superexec": commands.supernode_executor_argv(r, site, watch_pid=456),
    }
    coord = _compose_commands(COMPOSE_DIR / "coordinator.yml")
    site_yml = _compose_commands(COMPOSE_DIR / "site.yml")
    composed = {
        "superlink": coord["superlink"],
        "coordinator-superexec": coord["superexec"],
        "supernode": site_yml["supernode"],
        "site-superexec": site_yml["superexec"],
    }
    for name in local:
        assert _flags(composed[name]) == _flags(local[name]), name
    # the security-relevant flags are there, on both sides
    for argv in (local["superlink"], composed["superlink"]):
        assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile"} <= set(argv)
        assert "--insecure" not in argv
    for argv in (local["supernode"], composed["supernode"]):
        assert {"--root-certificates", "--auth-supernode-private-key", "--node-config"} <= set(argv) and "--insecure" not in argv
    assert coord["coordinator"][1:3] == ["run", "/app"] and "--stream" in coord["coordinator"]


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.parametrize("name", ["coordinator.yml", "site.yml"])
def test_compose_config_validates(name: str, tmp_path: Path) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("docker-compose is not installed (CI: apt-get update && apt-get install -y docker-compose)")
    env = {
        **os.environ,
        "FEDTWIN_CONSORTIUM_DIR": str(tmp_path),
        "FEDTWIN_SITE": "site_1",
        "FEDTWIN_SUPERLINK_ADDRESS": "coordinator.example.org:9092",
        "OMOP_DB_PASSWORD": "x",
        "MLFLOW_DB_PASSWORD": "y",
    }
    r = subprocess.run([*binary, "-f", str(COMPOSE_DIR / name), "config"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["services"]
    # and without the required variables it refuses, naming them
    bare = {k: v for k, v in env.items() if not k.startswith(("FEDTWIN_", "OMOP_", "MLFLOW_"))}
    r = subprocess.run([*binary, "-f", str(COMPOSE_DIR / name), "config"], capture_output=True, text=True, env=bare, timeout=120)
    assert r.returncode != 0 and "set FEDTWIN_" in (r.stderr + r.stdout)


# ------------------------------------------------------------------- the running consortium (slow)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory):
    """A consortium with 2 sites, up for the whole module; the probe package importable by every process
    (so that a FAB holding only pyproject.toml can reference it, as the real app references installed modules)."""
    root = tmp_path_factory.mktemp("consortium") / "local"
    init_consortium(root, sites=2)
    with running_consortium(root, extra_env={"PYTHONPATH": str(PROBE)}):
        yield root


@pytest.mark.slow
def test_up_runs_superlink_and_supernodes_with_tls_and_auth(consortium: Path) -> None:
    st = status(consortium)
    names = {p.name for p in st.processes if p.running}
    assert {"superlink", "superlink-executor", "site_1-supernode", "site_1-executor", "site_2-supernode", "site_2-executor"} <= names
    assert st.superlink_reachable
    assert sorted((n["site"], n["status"]) for n in st.nodes) == [("site_1", "online"), ("site_2", "online")]
    log = (consortium / "logs" / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in log and "--enable-supernode-auth" in log
    assert "Uvicorn running on https://" in log  # TLS
    # plain HTTP is not served
    import httpx

    c = Consortium.load(consortium)
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://{c.address}/v1/control/list-nodes", timeout=5)
    # each SuperNode got its site config as node config and its own FLWR_HOME under the folder
    sn = (consortium / "logs" / "site_2-supernode.log").read_text()
    assert f'site-config="{consortium / "sites" / "site_2.toml"}"' in sn
    assert (consortium / "flwr_home" / "config.toml").read_text().count(c.address) == 1


@pytest.mark.slow
def test_plain_fedavg_rounds(consortium: Path) -> None:
    res = run_app(consortium, PROBE, {"num-rounds": 2, "secagg": False}, timeout=300)
    assert res.ok, res.output[-3000:]
    rounds = [(int(a), int(n), int(f)) for a, _, n, f in ROUND_RE.findall(res.output)]
    assert rounds == [(1, 2, 0), (2, 2, 0)]
    # each site adds its index (read from its site config) with weight 10 * index: +5/3 per round
    assert _final(res.output) == pytest.approx([2 * 5 / 3] * 4, abs=1e-9)


@pytest.mark.slow
def test_secagg_plus_round(consortium: Path) -> None:
    res = run_app(consortium, PROBE, {"num-rounds": 1, "secagg": True}, timeout=300)
    assert res.ok, res.output[-3000:]
    assert "Secure aggregation commencing." in res.output and "Secure aggregation completed." in res.output
    assert _final(res.output) == pytest.approx([5 / 3] * 4, abs=1e-3)  # quantized, masked, unmasked sum
    # 4 SecAgg+ stages: 4 ClientApp task processes per site for this run
    for site in ("site_1", "site_2"):
        log = (consortium / "logs" / f"{site}-executor.log").read_text()
        assert len(re.findall(rf"run {res.run_id}\) exited with 0", log)) == 4


@pytest.mark.slow
def test_tiny_fab_with_only_pyproject_referencing_importable_modules(consortium: Path, tmp_path: Path) -> None:
    app_dir = tmp_path / "fedtwin-probe-tiny"
    app_dir.mkdir()
    text = (PROBE / "pyproject.toml").read_text().replace('name = "fedtwin-probe"', 'name = "fedtwin-probe-tiny"')
    (app_dir / "pyproject.toml").write_text(text)
    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(BytesIO(build_fab_from_disk(app_dir))).namelist()
    assert [n for n in names if not n.startswith(".info/")] == ["pyproject.toml"]
    res = run_app(consortium, app_dir, {"num-rounds": 1}, timeout=300, extra_env={"PYTHONPATH": str(PROBE)})
    assert res.ok, res.output[-3000:]
    assert res.argv[1:3] == ["run", str(app_dir)]
    assert _final(res.output) == pytest.approx([5 / 3] * 4, abs=1e-9)


def _start_extra_supernode(consortium: Path, name: str, *, key: Path | None = None, ca: Path | None = None) -> processes.ProcessRecord:
    c = Consortium.load(consortium)
    site = c.site_render(c.manifest.sites[0])
    extra = replace(site, name=name, runtime_port=str(free_ports(1)[0]), supernode_key=str(key or site.supernode_key))
    # bounded reconnects: a refused SuperNode then gives up on its own within seconds
    argv = commands.supernode_argv(c.render(), extra, ca_cert=str(ca) if ca else None, max_retries=2)
    return processes.start(c.layout, ProcessSpec(f"{name}-supernode", argv, c.site_env("site_1")))


def _wait_exit(rec: processes.ProcessRecord, timeout: float = 150) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and rec.alive():
        time.sleep(0.2)
    return processes.exit_code(rec)


def _run_refused_supernode(consortium: Path, name: str, **kw) -> tuple[processes.ProcessRecord, int | None]:
    """Start an extra SuperNode, wait for it to give up, stop and forget it; (record, exit code)."""
    rec = _start_extra_supernode(consortium, name, **kw)
    try:
        return rec, _wait_exit(rec)
    finally:
        processes.stop(rec)
        processes.forget(Layout.at(consortium), rec.name)


@pytest.mark.slow
def test_unregistered_supernode_is_refused(consortium: Path, tmp_path: Path) -> None:
    from coordinator.consortium.node_keys import generate_supernode_key

    generate_supernode_key(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    rec, code = _run_refused_supernode(consortium, "rogue", key=tmp_path / "rogue.key")
    assert code not in (None, 0)
    log = processes.log_since_start(rec)
    assert "Failed to activate SuperNode" in log, log[-2000:]
    sl = (consortium / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in sl
    with Consortium.load(consortium).control() as ctl:
        nodes = ctl.nodes()
    assert sorted(n.name for n in nodes) == ["site_1", "site_2"] and all(n.status == "online" for n in nodes)


@pytest.mark.slow
def test_supernode_trusting_another_ca_cannot_connect(consortium: Path, tmp_path: Path) -> None:
    from coordinator.consortium.pki import create_ca, write_certificate

    other = tmp_path / "other-ca.pem"
    write_certificate(other, create_ca("someone else's CA").certificate)
    with Consortium.load(consortium).control() as ctl:
        before = {n.node_id: n.status for n in ctl.nodes()}
    # site_1's registered key: only the trusted CA differs
    rec, code = _run_refused_supernode(consortium, "wrongca", ca=other)
    assert code not in (None, 0)
    assert "CERTIFICATE_VERIFY_FAILED" in processes.log_since_start(rec)
    with Consortium.load(consortium).control() as ctl:
        assert {n.node_id: n.status for n in ctl.nodes()} == before


@pytest.mark.slow
def test_up_twice_is_refused_and_status_cli(consortium: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.consortium.cli import app

    with pytest.raises(ConsortiumError, match="already running"):
        up(consortium)
    r = CliRunner().invoke(app, ["status", str(consortium)])
    assert r.exit_code == 0, r.output
    assert "site_1-supernode" in r.output and "online" in r.output and "reachable" in r.output


@pytest.mark.slow
def test_down_mid_run_leaves_no_process(consortium: Path) -> None:
    """Stop the consortium while a run is in flight (ClientApp/ServerApp processes alive): nothing remains."""
    out: dict = {}
    log = consortium / "logs" / "site_1-executor.log"
    offset = log.stat().st_size
    t = threading.Thread(target=lambda: out.update(r=run_app(consortium, PROBE, {"num-rounds": 50, "secagg": True}, timeout=600)))
    t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "started task process" not in log.read_text()[offset:]:
        time.sleep(0.2)
    assert "started task process" in log.read_text()[offset:]
    res = down(consortium)
    t.join(timeout=60)
    assert not t.is_alive()
    assert {n for n, _ in res.stopped} >= {"superlink", "site_1-supernode", "site_2-executor"}
    L = Layout.at(consortium)
    assert processes.stray_processes(L.root, by_cmdline=True) == []
    for rec_name, _ in res.stopped:
        assert not L.record(rec_name).exists()
    assert not status(consortium).running
    assert out["r"].sub_status != "completed"
