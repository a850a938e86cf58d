"""``fedtwin audit verify`` on a real federated training, and every kind of tampering it must catch.

One real training per store (module scope): a 2-site local consortium (real Flower SuperLink and
SuperNodes on loopback, SecAgg+), 1 training round + the final evaluation round, small synthetic
hospitals, launched with :func:`coordinator.launch.launch` as ``fedtwin coordinator launch`` does.
Two stores (the fixture ``trained`` is parametrized over them):

* ``sqlite``: the consortium's default local store (``tracking/mlflow.db``, artifacts in
  ``tracking/mlartifacts/``);
* ``postgres-server``: a real ``mlflow server`` on loopback backed by a fresh PostgreSQL database
  (artifacts proxied into its ``--artifacts-destination``); skipped, saying why, when PostgreSQL is
  unreachable, so the SQLite half always runs.

Both launches share one consortium (~10 s to start; a launch takes ~30 s). On *both* stores: the
untampered run verifies (with and without ``--keys``), a forged metric is named, an altered
registered model is named (the store-specific paths: each database, each artifact layout). The
other tamper tests run once, on the PostgreSQL-backed server when it is reachable (the production
set-up), else on SQLite, so they never all skip; running them on both stores would add about a
minute to a file that takes about 3 minutes. Each tamper test changes the stored evidence the way
someone with write access to the store would (files in the artifact folder on disk; for metrics
the MLflow API), runs the real CLI (``fedtwin audit verify`` through typer's CliRunner on
``fedtwin.cli.main.app``), asserts a non-zero exit and that the output names exactly what was
altered, then puts the evidence back:

* artifacts: the artifact folder is copied once after the launch (``pristine``) and restored after
  every test (:func:`tampered_store` checks the restore byte for byte);
* metrics: MLflow cannot delete one metric value, so the forged value is logged with
  ``timestamp=0`` (it never becomes the run's latest value) and deleted afterwards straight from the
  backend database's ``metrics`` table, the one row matching (run, key, step, timestamp 0).

A cheap test (no Flower) shows a site refuses a study that is not on its allow-list before it reads
any data. Nothing patient-level is printed: the evidence holds aggregates, digests and signatures only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import REPO, running_consortium, synthetic_site_databases
from typer.testing import CliRunner

SPEC = REPO / "specs" / "icu-hemodynamics.yaml"
N_SITES = 2
ROUNDS = 1  # records: 0001-round-0001.json (training), 0002-round-0002.json (final evaluation)
STUDY_ID = "audit-study"
RELEASE_RE = re.compile(r"FEDTWIN release registered_model=(\S+)/(\d+) best_round=\S+ mlflow_run=(\w+)")
PARAMETERS_FILE = "twin-parameters.npz"
OK_LINE = "verified: nothing was altered"
CHECKS = ("chain", "attachments", "model", "card", "metrics")


# ------------------------------------------------------------------------------ the trained run


@dataclass
class TrainedRun:
    """Where one training's evidence lives, and what an attacker would edit."""

    store: str  # "sqlite" or "postgres-server"
    uri: str  # the MLflow tracking URI the coordinator logged to
    run_id: str
    model_name: str  # the registered model (version 1)
    keys: Path  # the consortium's trusted public keys (<root>/keys/signing)
    artifact_root: Path  # every artifact of the store, on disk
    backend_url: str  # SQLAlchemy URL of the store's database (for the metric test's clean-up only)
    pristine: Path  # a copy of artifact_root taken right after the launch

    @property
    def run_dir(self) -> Path:
        """The run's artifacts (``<root>[/<experiment>]/<run id>/artifacts``)."""
        found = [p for p in self.artifact_root.rglob(self.run_id) if p.is_dir() and (p / "artifacts").is_dir()]
        assert len(found) == 1, f"{len(found)} artifact folders for run {self.run_id} under {self.artifact_root}"
        return found[0] / "artifacts"

    def artifact(self, rel: str) -> Path:
        p = self.run_dir / rel
        assert p.is_file(), f"the run has no artifact {rel}"
        return p

    def records(self) -> list[Path]:
        return sorted((self.run_dir / "provenance").glob("*-round-*.json"))

    def registered_file(self, name: str) -> Path:
        """A file of the registered model version (its logged model's artifacts, not the run's)."""
        found = [p for p in self.artifact_root.rglob(name) if "models" in p.parts and self.run_id not in p.parts]
        assert len(found) == 1, f"{len(found)} copies of {name} among the registered model's artifacts"
        return found[0]


def _launch(root: Path, study_file: Path) -> tuple[str, str, str]:
    """Run the study on the consortium; (registered model name, version, MLflow run id)."""
    from coordinator.launch import launch
    from fedtwin.code_version import code_version
    from site_agent.approval import approve_for_sites

    # the sites approve the code version the coordinator's processes will compute when they start: a
    # commit made to this checkout since set-up (or since the previous launch) changes it
    code_version.cache_clear()
    approve_for_sites(sorted((root / "sites").glob("site_*.toml")), None, code_version(), approved_by="tests")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the study file says where to log
        res = launch(study_file, root, timeout=600)
    assert res.ok, f"{res.message}\n{res.output[-4000:]}"
    m = RELEASE_RE.search(res.output)
    assert m, f"no 'FEDTWIN release' line in the ServerApp output:\n{res.output[-4000:]}"
    name, version, run_id = m.groups()
    assert run_id == res.mlflow_run_id and version == "1"
    return name, version, run_id


def _study_file(root: Path, name: str, study_id: str, uri: str) -> Path:
    """A copy of the consortium's study.toml with another study id (own checkpoint folder) and store."""
    import tomli_w

    data = tomllib.loads((root / "study.toml").read_text())
    data["study"]["id"] = study_id
    data["tracking"].update(mlflow_tracking_uri=uri, experiment=study_id)
    p = root / name
    p.write_text(tomli_w.dumps(data))
    return p


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from coordinator.consortium import init_consortium

    work = tmp_path_factory.mktemp("audit")
    root = work / "local"
    init_consortium(root, sites=N_SITES, spec=SPEC, rounds=ROUNDS, study_id=STUDY_ID,
                    secagg={"num_shares": 1.0, "reconstruction_threshold": 1.0, "timeout": 120.0},
                    runtime={"preload": ["torch", "site_agent.client_app"]})
    synthetic_site_databases(root, work, N_SITES)
    with running_consortium(root):
        yield root


class Trainings:
    """The trainings of this module, one per store, launched on first use and kept for the module."""

    def __init__(self, consortium: Path, tmp: pytest.TempPathFactory, stack: ExitStack) -> None:
        self.consortium, self.tmp, self.stack = consortium, tmp, stack
        self.runs: dict[str, TrainedRun | BaseException] = {}

    def get(self, store: str, pg_admin_url: str | None = None) -> TrainedRun:
        """The training on ``store``; a failed launch is not retried (a second launch of the study would
        fail on the first one's checkpoints and hide why): later requests see the first error."""
        if store not in self.runs:
            try:
                self.runs[store] = self._train(store, pg_admin_url)
            except BaseException as exc:
                self.runs[store] = exc
                raise
        got = self.runs[store]
        if isinstance(got, BaseException):
            raise RuntimeError(f"the training on the {store} store failed earlier in this module: {got}")
        return got

    def _train(self, store: str, pg_admin_url: str | None) -> TrainedRun:
        from mlflow_server import fresh_postgres_database, running_mlflow_server

        root = self.consortium
        keys = root / "keys" / "signing"
        snap = self.tmp.mktemp(f"pristine-{store}") / "artifacts"
        if store == "sqlite":
            db = root / "tracking" / "mlflow.db"
            uri = f"sqlite:///{db}"
            name, _, run_id = _launch(root, _study_file(root, "study-sqlite.toml", STUDY_ID, uri))
            artifacts = db.parent / "mlartifacts"
            backend = uri
        else:
            assert pg_admin_url is not None
            server_dir = self.tmp.mktemp("mlflow-server")
            backend = self.stack.enter_context(fresh_postgres_database(pg_admin_url))
            uri = self.stack.enter_context(running_mlflow_server(server_dir, backend))
            name, _, run_id = _launch(root, _study_file(root, "study-pg.toml", f"{STUDY_ID}-pg", uri))
            artifacts = server_dir / "mlflow-server-artifacts"
        shutil.copytree(artifacts, snap)
        return TrainedRun(store, uri, run_id, name, keys, artifacts, backend, snap)


@pytest.fixture(scope="module")
def trainings(consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainings]:
    with ExitStack() as stack:  # the mlflow server and its database live until the module ends
        yield Trainings(consortium, tmp_path_factory, stack)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres-server", marks=pytest.mark.postgres)])
def trained(request: pytest.FixtureRequest, trainings: Trainings) -> TrainedRun:
    """The training on each store: the PostgreSQL half is skipped, saying why, if the server is unreachable."""
    if request.param == "postgres-server":
        return trainings.get("postgres-server", request.getfixturevalue("pg_admin_url"))
    return trainings.get("sqlite")


@pytest.fixture(scope="module")
def tamper_target(request: pytest.FixtureRequest, trainings: Trainings) -> TrainedRun:
    """Where the tamper tests run: the PostgreSQL-backed server (the production set-up) when reachable, else SQLite.

    Running all of them on both stores too would add about a minute; the store-specific paths (the
    registered model's artifacts, the metric clean-up in each database) are covered on both by the
    ``trained`` tests.
    """
    try:
        admin = request.getfixturevalue("pg_admin_url")
    except pytest.skip.Exception:  # no PostgreSQL here (under CI=true pg_admin_url fails instead)
        return trainings.get("sqlite")
    return trainings.get("postgres-server", admin)


# --------------------------------------------------------------------------- snapshot / restore


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def tampered_store(run: TrainedRun) -> Iterator[TrainedRun]:
    """Let the block alter the artifact folder; afterwards put the pristine copy back and check it."""
    try:
        yield run
    finally:
        shutil.rmtree(run.artifact_root)
        shutil.copytree(run.pristine, run.artifact_root)
        assert _tree_digest(run.artifact_root) == _tree_digest(run.pristine), "the artifact store was not restored"


@pytest.fixture
def store(trained: TrainedRun) -> Iterator[TrainedRun]:
    """The training on each store, restored to its untampered state after the test whatever the test did."""
    with tampered_store(trained) as run:
        yield run


@pytest.fixture
def target(tamper_target: TrainedRun) -> Iterator[TrainedRun]:
    """The tamper tests' training, restored to its untampered state after the test whatever the test did."""
    with tampered_store(tamper_target) as run:
        yield run


def _read(p: Path) -> Any:
    return json.loads(p.read_text(encoding="utf-8"))


def _write(p: Path, value: Any) -> None:
    p.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------- running verify


@dataclass
class Verdict:
    """What ``fedtwin audit verify`` printed, and its exit code."""

    exit_code: int
    output: str

    @property
    def problems(self) -> list[str]:
        """Every ``- <check>: <problem>`` line (printed unwrapped: soft_wrap)."""
        return [line[2:] for line in self.output.splitlines() if line.startswith("- ")]

    @property
    def failed(self) -> set[str]:
        return {p.split(":", 1)[0] for p in self.problems}

    def of(self, check: str) -> list[str]:
        return [p.split(": ", 1)[1] for p in self.problems if p.startswith(check + ": ")]

    def names(self, check: str, *parts: str) -> str:
        """The one problem of ``check`` that contains every part; fails listing them all if none does."""
        hits = [p for p in self.of(check) if all(x in p for x in parts)]
        assert hits, f"no {check} problem mentions {parts}; the problems are:\n" + "\n".join(self.problems)
        return hits[0]


def audit(run: TrainedRun, keys: Path | None | str = "trusted") -> Verdict:
    """``fedtwin audit verify --tracking-uri URI --run-id ID [--keys DIR]`` through the real CLI.

    ``keys="trusted"``: the consortium's keys/signing; ``None``: no --keys (the recorded folder).
    """
    from fedtwin.cli import main

    main._register()
    args = ["audit", "verify", "--tracking-uri", run.uri, "--run-id", run.run_id]
    if keys is not None:
        args += ["--keys", str(run.keys if keys == "trusted" else keys)]
    # a wide console: rich must not wrap the key folder or a problem line
    res = CliRunner().invoke(main.app, args, env={"COLUMNS": "1000"}, catch_exceptions=False)
    return Verdict(res.exit_code, res.output)


def assert_caught(v: Verdict, *checks: str) -> None:
    """Non-zero exit, the failing checks' rows and the problem count, and no claim that all is well."""
    assert v.exit_code == 1, f"exit {v.exit_code}; output:\n{v.output}"
    assert OK_LINE not in v.output
    assert f"{len(v.problems)} problem(s)" in v.output, v.output
    for c in checks:
        assert c in v.failed, f"the {c} check did not fail; problems:\n" + "\n".join(v.problems)
        assert re.search(rf"{c}\s*│\s*FAILED \({len(v.of(c))}\)", v.output), v.output


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.slow
def test_the_untampered_run_verifies_with_and_without_keys(trained: TrainedRun) -> None:
    v = audit(trained)
    assert v.exit_code == 0, v.output
    assert OK_LINE in v.output and not v.problems
    for c in CHECKS:
        assert re.search(rf"{c}\s*│\s*ok\s*│", v.output), f"{c} is not ok:\n{v.output}"
    assert "trusted keys: coordinator (" in v.output and "site_1 (" in v.output and "site_2 (" in v.output
    assert "2 records, 6 signatures" in v.output  # 2 records, each signed by the coordinator and both sites
    assert f"registered model {trained.model_name} version 1: twin-parameters.npz sha256" in v.output
    assert "trusting the public keys" not in v.output

    # without --keys: the folder the coordinator recorded, with a warning that it is the coordinator's word
    v = audit(trained, keys=None)
    assert v.exit_code == 0 and OK_LINE in v.output, v.output
    assert f"trusting the public keys in {trained.keys}, the folder the coordinator recorded" in v.output
    assert "pass --keys with your own copy" in v.output


@pytest.mark.slow
def test_a_changed_metric_is_named_with_its_key_and_step(trained: TrainedRun) -> None:
    from mlflow import MlflowClient
    from sqlalchemy import create_engine, text

    client = MlflowClient(tracking_uri=trained.uri)
    forged = {("eval.rmse.map.all.twin", 0): None, ("epsilon_spent.site_1", 1): None}  # (key, step) -> forged value
    before = {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(trained.run_id, k)) for k, _ in forged}
    latest = dict(client.get_run(trained.run_id).data.metrics)
    for key, step in forged:
        true = next(val for s, _, val in before[key] if s == step)
        forged[(key, step)] = true * 0.5  # e.g. a smaller RMSE or a smaller privacy spend than recorded
        client.log_metric(trained.run_id, key, forged[(key, step)], timestamp=0, step=step)
    try:
        v = audit(trained)
        assert_caught(v, "metrics")
        assert v.failed == {"metrics"}, v.problems
        for (key, step), value in forged.items():
            v.names("metrics", f"MLflow metric {key} at step {step} = {value!r}, but the round record says")
        assert len(v.problems) == len(forged)
    finally:
        engine = create_engine(trained.backend_url)
        try:
            with engine.begin() as conn:
                for key, step in forged:
                    gone = conn.execute(text("DELETE FROM metrics WHERE run_uuid = :r AND key = :k AND step = :s AND timestamp = 0"),
                                        {"r": trained.run_id, "k": key, "s": step}).rowcount
                    assert gone == 1, f"{gone} forged rows of {key} at step {step}"
        finally:
            engine.dispose()
    after = {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(trained.run_id, k)) for k, _ in forged}
    assert after == before and dict(client.get_run(trained.run_id).data.metrics) == latest, "the metrics were not restored"


@pytest.mark.slow
def test_a_changed_card_field_is_named_with_the_file(target: TrainedRun) -> None:
    from fedtwin.card.io import card_to_json

    card = target.artifact("card/model-card.json")
    doc = _read(card)
    doc["privacy"]["max_epsilon_spent"] = round(doc["privacy"]["max_epsilon_spent"] / 2, 4)  # claim half the spend
    card.write_text(card_to_json(doc), encoding="utf-8")  # written as the card is (canonical JSON): only the field differs
    v = audit(target)
    assert_caught(v, "card")
    assert v.failed == {"card"}, v.problems
    v.names("card", "card/model-card.json: differs from the card rebuilt from the records", "max_epsilon_spent")


@pytest.mark.slow
def test_a_changed_html_card_and_registered_card_copy_are_named(target: TrainedRun) -> None:
    html = target.artifact("card/model-card.html")
    text = html.read_text(encoding="utf-8")
    assert "Not validated prospectively" in text
    html.write_text(text.replace("Not validated prospectively", "Validated prospectively"), encoding="utf-8")
    md = target.registered_file("model-card.md")  # the copy attached to the registered model version
    md.write_text(md.read_text(encoding="utf-8").replace("Not validated prospectively", "Validated prospectively"), encoding="utf-8")
    v = audit(target)
    assert_caught(v, "card")
    assert v.failed == {"card"}, v.problems
    v.names("card", "card/model-card.html: differs from the card rebuilt from the records", "Validated prospectively")
    v.names("card", f"registered model {target.model_name} version 1: attached model-card.md differs")
    assert len(v.of("card")) == 2, v.problems


@pytest.mark.slow
def test_an_altered_registered_model_fails_the_model_and_the_chain(store: TrainedRun) -> None:
    import numpy as np

    from fedtwin.provenance import parameters_digest
    from fedtwin.tracking.twin_pyfunc import read_parameters_npz, write_parameters_npz

    npz = store.registered_file(PARAMETERS_FILE)
    arrays = read_parameters_npz(npz)
    good = parameters_digest(arrays)
    arrays[0] = arrays[0] + np.float32(0.01)
    write_parameters_npz(npz, arrays)
    bad = parameters_digest(arrays)
    v = audit(store)
    assert_caught(v, "model", "chain")
    assert v.failed == {"model", "chain"}, v.problems
    v.names("model", f"registered model {store.model_name} version 1: twin-parameters.npz hashes to {bad[:16]}",
            f"tag says {good[:16]}")
    # the released model is not the last training round's signed aggregate
    v.names("chain", "0001-round-0001.json: record 0 (round 1) aggregate_hash", f"expected {bad} (digest of the released model)",
            f"found {good}")


@pytest.mark.slow
def test_a_changed_record_fails_its_signature_and_the_next_link(target: TrainedRun) -> None:
    first = target.records()[0]
    rec = _read(first)
    key = "eval.rmse.map.all.twin"
    true = rec["metrics"][key]
    rec["metrics"][key] = true * 0.5
    _write(first, rec)
    v = audit(target)
    assert_caught(v, "chain", "metrics")
    v.names("chain", "0001-round-0001.json: record 0 (round 1) signature:", "does not verify (the record was altered after signing)")
    v.names("chain", "0002-round-0002.json: record 1 (round 2) prev_hash:")  # the next record links to the original
    v.names("metrics", f"MLflow metric {key} at step 0 = {true!r}, but the round record says {true * 0.5!r}")


@pytest.mark.slow
def test_a_signature_copied_from_another_record_is_named(target: TrainedRun) -> None:
    first, second = target.records()
    rec = _read(first)
    rec["signature"] = _read(second)["signature"]  # a valid coordinator signature, of another record
    _write(first, rec)
    v = audit(target)
    assert_caught(v, "chain")
    assert v.failed == {"chain"}, v.problems
    (problem,) = v.of("chain")
    assert problem.startswith("0001-round-0001.json: record 0 (round 1) signature: expected a valid signature by coordinator")
    assert "does not verify" in problem


@pytest.mark.slow
def test_a_removed_round_is_named(target: TrainedRun) -> None:
    from fedtwin.provenance import RoundRecord

    first = target.records()[0]
    removed_hash = RoundRecord.from_dict(_read(first)).record_hash()
    first.unlink()
    v = audit(target)
    assert_caught(v, "chain")
    v.names("chain", "0002-round-0002.json: record 0 (round 2) round: expected 1, found 2")
    v.names("chain", "0002-round-0002.json: record 0 (round 2) prev_hash:", f"found {removed_hash}")  # points at the missing record
    # the metrics of the removed round are no longer vouched for by any record
    v.names("metrics", "MLflow metric(s) at step 1 are in no round record", "epsilon_spent.site_1")


@pytest.mark.slow
def test_an_altered_manifest_names_its_site(target: TrainedRun) -> None:
    first = target.records()[0]
    rec = _read(first)
    sites = [m["site"] for m in rec["manifests"]]
    assert sites == ["site_1", "site_2"]
    rec["manifests"][1]["epsilon_spent"] = rec["manifests"][1]["epsilon_spent"] / 2  # site_2 "spent" half
    _write(first, rec)
    v = audit(target)
    assert_caught(v, "chain")
    v.names("chain", "0001-round-0001.json: record 0 (round 1) [site_2] manifests[1].signature: expected a valid signature by site_2",
            "the manifest was altered after signing")
    assert not [p for p in v.of("chain") if "[site_1]" in p], v.problems  # site_1's manifest is intact
    # the record holding the manifest signed it too: the coordinator's signature fails as well
    v.names("chain", "0001-round-0001.json: record 0 (round 1) signature:", "does not verify")


@pytest.mark.slow
def test_an_altered_evaluation_report_is_named(target: TrainedRun) -> None:
    for name in ("evaluation/final.json", "evaluation/evaluation-round-0002.json"):  # the card's input, the round's copy
        path = target.artifact(name)
        rep = _read(path)
        key = next(iter(rep["metrics"]))
        rep["metrics"][key]["value"] = rep["metrics"][key]["value"] * 0.5
        _write(path, rep)
    v = audit(target)
    assert_caught(v, "attachments")
    v.names("attachments", "evaluation/final.json: sha256", "that the last evaluation round's record (round 2) vouches for")
    v.names("attachments", "evaluation/evaluation-round-0002.json: sha256", "that 0002-round-0002.json vouches for")
    assert "chain" not in v.failed and "metrics" not in v.failed, v.problems


@pytest.mark.slow
def test_wrong_trusted_keys_are_named(target: TrainedRun, tmp_path: Path) -> None:
    from coordinator.consortium.node_keys import generate_signing_key
    from fedtwin.provenance import KeyRing

    real = {k.name: k.key_id for k in KeyRing.from_dir(target.keys)}
    # another consortium's keys (same names, other key pairs, as `consortium init` makes them): every signer is unknown
    other = tmp_path / "other" / "keys" / "signing"
    other.mkdir(parents=True)
    for name in ("coordinator", "site_1", "site_2"):
        generate_signing_key(other / f"{name}.ed25519.pem", other / f"{name}.ed25519.pub.pem")
    theirs = {k.name: k.key_id for k in KeyRing.from_dir(other)}
    v = audit(target, keys=other)
    assert_caught(v, "chain")
    assert v.failed == {"chain"}, v.problems
    v.names("chain", "record 0 (round 1) key_id:", f"expected coordinator's key {theirs['coordinator']}",
            f"found {real['coordinator']} (not a trusted key)")
    v.names("chain", "[site_2] manifests[1].key_id:", f"expected site_2's key {theirs['site_2']}", f"found {real['site_2']} (not a trusted key)")

    # the consortium's folder without the coordinator's key
    partial = tmp_path / "no-coordinator"
    partial.mkdir()
    for p in target.keys.glob("site_*.ed25519.pub.pem"):
        shutil.copy(p, partial / p.name)
    v = audit(target, keys=partial)
    assert_caught(v, "chain")
    v.names("chain", "record 0 (round 1) key_id: expected a trusted key named 'coordinator', found no such key among site_1, site_2")
    assert not [p for p in v.of("chain") if "manifests" in p], v.problems  # the sites' keys are there


def test_a_key_folder_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    """The console script itself: exit 2, the folder named, before any store is read (so no run is needed)."""
    missing = tmp_path / "no-such-keys"
    res = subprocess.run([str(Path(sys.executable).parent / "fedtwin"), "audit", "verify", "--tracking-uri",
                          f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-id", "0" * 32, "--keys", str(missing)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "1000"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"key folder {missing} does not exist" in res.stderr and "keys/signing" in res.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_missing_store_or_unknown_run_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedtwin.cli import main

    main._register()
    app = main.app
    keys = tmp_path / "keys"
    keys.mkdir()
    from coordinator.consortium.node_keys import generate_signing_key

    generate_signing_key(keys / "coordinator.ed25519.pem", keys / "coordinator.ed25519.pub.pem")
    store = tmp_path / "nowhere" / "mlflow.db"
    for cmd in (["verify", "--keys", str(keys)], ["card"]):
        res = CliRunner().invoke(app, ["audit", *cmd, "--tracking-uri", f"sqlite:///{store}", "--run-id", "0" * 32])
        assert f"no MLflow store at {store}" in str(res.exception), res.output  # fedtwin's main prints it, exit 2
    assert not store.parent.exists()  # looking never creates a store
    empty = tmp_path / "empty.db"
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments()  # a real, empty store
    res = CliRunner().invoke(app, ["audit", "card", "--tracking-uri", f"sqlite:///{empty}", "--run-id", "0" * 32])
    assert "cannot be read" in str(res.exception) and "check --run-id" in res.exception.fix, res.output


# ------------------------------------------------------------------- the site's allow-list (cheap)


def test_a_site_refuses_an_unapproved_study_before_reading_any_data(tmp_path: Path) -> None:
    """run_round with the study off the allow-list: ApprovalError naming the spec and the fix; nothing read or written."""
    from coordinator.consortium import init_consortium
    from fedtwin.code_version import code_version
    from fedtwin.federation.config import load_site_config
    from fedtwin.spec import load_spec, spec_hash
    from site_agent.approval import ApprovalError, approve
    from site_agent.provenance import site_log_path
    from site_agent.task import RoundSettings, run_round

    root = tmp_path / "c"
    init_consortium(root, sites=2, spec=SPEC)
    cfg_path = root / "sites" / "site_1.toml"
    site = load_site_config(cfg_path)
    h = spec_hash(load_spec(site.data.spec))
    assert not Path(site.data.database).exists()  # no data: any read would fail with another error (or create the file)
    settings = RoundSettings(
        server_round=1, rounds=1, kind="train", training_id="training-test", spec_hash=h, epsilon=3.0, local_epochs=1.0,
        batch_size=32, max_grad_norm=1.0, lr=3e-3, proximal_mu=0.0, secagg=True, evaluate=True, clipping_range=8.0,
        quantization_range=2**22, max_weight=1000.0, count_step=10, study_id="audit-study", code_version=code_version(),
    )

    def refused() -> str:
        with pytest.raises(ApprovalError) as caught:
            run_round(cfg_path, [], settings)
        return str(caught.value)

    msg = refused()  # no allow-list file at all
    assert f"site site_1 refuses the study: twin spec {h[:12]}" in msg and "is not approved" in msg
    assert str(site.allow_list_path()) in msg and "the file does not exist yet" in msg
    assert f"fedtwin site approve --config {cfg_path} --spec {site.data.spec} --code-version {code_version()}" in msg

    # an allow-list holding the same spec for another code version only: still refused, the approved version named
    approve(site.allow_list_path(), site.data.spec, code_version="0.0.1", approved_by="tests")
    msg = refused()
    assert f"twin spec {h[:12]} is approved at this site, but for other FedTwin code version(s): 0.0.1" in msg
    assert "fedtwin site approve --config" in msg

    # nothing was read, nothing was written: no database, no privacy ledger, no provenance log
    assert not Path(site.data.database).exists()
    assert not Path(site.privacy.ledger).exists()
    assert not site_log_path(site).exists()
