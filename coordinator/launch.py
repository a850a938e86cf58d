"""``fedtwin coordinator launch``: run a study (study.toml) on an already running consortium.

:func:`build_run_config` turns a :class:`~fedtwin.federation.config.StudyConfig` into the run
config of ``apps/fedtwin`` (see :mod:`coordinator.server_app`); :func:`launch` checks everything
it can before anything runs (study file, consortium, spec, MLflow store, checkpoints), runs the app
with :func:`coordinator.consortium.run_app` and reads the per-round lines the ServerApp prints.

Checkpoints and the MLflow run id of a study live in ``<checkpoints.dir>/<study id>/``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedtwin.federation.errors import ConsortiumError

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "fedtwin"
ROUND_RE = re.compile(r"FEDTWIN round=(\d+) status=(\w+) sites=(\d+)")
CKPT_LINE_RE = re.compile(r"FEDTWIN checkpoint round=(\d+) path=(\S+)")
MLFLOW_RE = re.compile(r"FEDTWIN tracking uri=(\S+) experiment=(\S+) mlflow_run=(\w+)")
SITE_ERROR_RE = re.compile(r"FEDTWIN site_error round=(\d+) node=(\d+) site=(\S+) reason=(.*)$", re.M)
EVALUATION_RE = re.compile(r"FEDTWIN evaluation round=(\d+) status=(\w+) sites=(\d+)")
EVAL_METRICS_RE = re.compile(r"FEDTWIN evaluation model_round=(\d+) (.*)$", re.M)
REFUSED_RE = re.compile(r"FEDTWIN (provenance_error|aggregate_error) round=(\d+) (.*)$", re.M)  # the coordinator refused an aggregate
TRACKING_ERROR_RE = re.compile(r"FEDTWIN tracking_error (.*)$", re.M)
TRACKING_RECOVERED_RE = re.compile(r"FEDTWIN tracking_recovered (.*)$", re.M)
TRACKING_LOST_RE = re.compile(r"FEDTWIN tracking_lost unwritten=(\d+) what=(\S*) uri=(\S+) records=(\S+)")


@dataclass
class RoundOutcome:
    round: int
    status: str
    sites: int


@dataclass
class LaunchResult:
    run_id: int | None
    ok: bool
    message: str
    rounds: list[RoundOutcome] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    output: str = ""
    run_config: dict[str, Any] = field(default_factory=dict)
    site_errors: list[str] = field(default_factory=list)  # "round R, site S: reason"
    evaluation: RoundOutcome | None = None  # the final evaluation-only round (SecAgg+)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # model round -> headline metrics


def study_checkpoint_dir(study) -> Path:
    return Path(study.checkpoints.dir) / study.study.id


def tracking_uri(study) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or study.tracking.mlflow_tracking_uri


def build_run_config(
    study,
    *,
    spec_hash: str,
    rounds: int | None = None,
    epsilon: float | None = None,
    resume: bool = False,
    output_path: str | Path | None = None,
    mlflow_uri: str | None = None,
) -> dict[str, Any]:
    """The run config of apps/fedtwin for ``study`` (every key is declared in its pyproject.toml)."""
    s = study.secagg
    ckpt = study_checkpoint_dir(study)
    cfg: dict[str, Any] = {
        "study-id": study.study.id,
        "spec-path": str(study.study.spec),
        "spec-hash": spec_hash,
        "num-rounds": int(rounds if rounds is not None else study.study.rounds),
        "min-sites": int(study.study.min_sites),
        "strategy": study.strategy.name,
        "secagg": bool(s.enabled),
        "proximal-mu": float(study.strategy.proximal_mu),
        "epsilon-per-site": float(epsilon if epsilon is not None else study.training.epsilon_per_site),
        "local-epochs": float(study.training.local_epochs),
        "batch-size": int(study.training.batch_size),
        "max-grad-norm": float(study.training.max_grad_norm),
        "learning-rate": float(study.training.learning_rate),
        "evaluate": bool(study.training.federated_evaluation),
        "checkpoint-dir": str(ckpt),
        "output-path": str(output_path if output_path is not None else ckpt / "final.npz"),
        "mlflow-tracking-uri": mlflow_uri if mlflow_uri is not None else tracking_uri(study),
        "resume": bool(resume),
    }
    if s.enabled:
        cfg.update({
            "num-shares": s.num_shares,
            "reconstruction-threshold": s.reconstruction_threshold,
            "clipping-range": float(s.clipping_range),
            "quantization-range": int(s.quantization_range),
            "modulus-range": int(s.modulus_range),
            "max-weight": float(s.max_weight),
            "secagg-timeout": float(s.timeout),
        })
    return cfg


def consortium_node_names(root: Path) -> dict[str, str]:
    """node id -> site name, from the consortium's ``state/nodes.json`` (written by ``up``; empty if absent).

    The ServerApp only learns a site's name from the site's own reply, so a site that dies before
    replying is printed as ``site=?``; the consortium knows which key (site) holds that node id.
    """
    import json

    from coordinator.consortium.layout import Layout

    try:
        nodes = json.loads(Layout.at(root).nodes_file.read_text())
    except (OSError, ValueError):
        return {}
    return {str(node): str(site) for site, node in nodes.items()} if isinstance(nodes, dict) else {}


def _site_name(site: str, node: str, names: dict[str, str]) -> str:
    """The site's name as the ServerApp printed it, else from the consortium's node map, else ``node N``."""
    if site != "?":
        return site
    return names.get(node) or f"node {node}"


def _progress(echo: Callable[[str], None], names: dict[str, str] | None = None) -> Callable[[str], None]:
    """Echo the ServerApp's round, site-error and evaluation lines as they arrive."""
    names = names or {}

    def on_line(line: str) -> None:
        if m := ROUND_RE.search(line):
            r, status, n = m.groups()
            echo(f"round {r}: {status} ({n} site{'s' if n != '1' else ''})")
        elif m := SITE_ERROR_RE.search(line):
            r, node, site, why = m.groups()
            echo(f"site error: round {r}, site {_site_name(site, node, names)}: {why.strip()}")
        elif m := EVALUATION_RE.search(line):
            echo(f"final evaluation: {m.group(2)} ({m.group(3)} sites)")
        elif m := EVAL_METRICS_RE.search(line):
            echo(f"round-{m.group(1)} model scored on held-out patients: {m.group(2)}")
        elif m := REFUSED_RE.search(line):
            echo(f"coordinator check failed: round {m.group(2)}: {m.group(3).strip()}")
        elif m := TRACKING_ERROR_RE.search(line):
            echo(f"MLflow write failed, kept and retried: {m.group(1).strip()}")
        elif m := TRACKING_RECOVERED_RE.search(line):
            echo(f"MLflow reachable again: {m.group(1).strip()}")

    return on_line


def _superlink_alive(root: Path) -> bool:
    """Whether the consortium's SuperLink process is running (after a run whose status could not be read)."""
    from coordinator.consortium import processes
    from coordinator.consortium.layout import Layout

    return any(r.name == "superlink" and r.alive() for r in processes.records(Layout.at(root)))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _server_error(output: str) -> str:
    """The most telling error line of the ServerApp's log (a traceback's last ``XxxError: ...``)."""
    hits = re.findall(r"^.*?\b(\w+(?:Error|Exception): .+)$", output, flags=re.M)
    return hits[-1].strip() if hits else ""


def prepare(config: str | Path, consortium: str | Path | None = None, *, resume: bool = False, rounds: int | None = None,
            epsilon: float | None = None, output_path: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """All checks that need no running app; returns (consortium folder, run config). Raises ConsortiumError."""
    from fedtwin.federation.config import load_manifest, load_study_config
    from fedtwin.tracking.run_tracker import TrackingError, check_tracking_uri

    cfg_path = Path(config).expanduser()
    if not cfg_path.is_file():
        raise ConsortiumError(f"study file {cfg_path} does not exist", "give --config PATH/TO/study.toml (written by `fedtwin consortium init`)")
    study = load_study_config(cfg_path)
    root = Path(consortium).expanduser().resolve() if consortium else cfg_path.resolve().parent
    manifest_path = root / "consortium.toml"
    if not manifest_path.is_file():
        raise ConsortiumError(f"{root} is not a consortium folder (no consortium.toml)", "give --consortium DIR (the folder `fedtwin consortium init` made)")
    study.check_against_sites(len(load_manifest(manifest_path).sites))
    if rounds is not None and rounds < 1:
        raise ConsortiumError(f"--rounds {rounds}: must be at least 1")
    if epsilon is not None and not (epsilon > 0):
        raise ConsortiumError(f"--epsilon {epsilon}: must be positive", "give the epsilon each site may spend on the whole training")
    if not Path(study.study.spec).is_file():
        raise ConsortiumError(f"the study's spec {study.study.spec} does not exist", "fix [study] spec in study.toml")
    from fedtwin.spec import load_spec, spec_hash

    h = spec_hash(load_spec(study.study.spec))
    uri = tracking_uri(study)
    try:
        check_tracking_uri(uri)
    except TrackingError as exc:
        raise ConsortiumError(str(exc), "fix [tracking] mlflow_tracking_uri in study.toml (or MLFLOW_TRACKING_URI), e.g. sqlite:////ABS/PATH/mlflow.db") from None

    from coordinator.server_app import list_checkpoints, read_checkpoint

    ckpt_dir = study_checkpoint_dir(study)
    found = list_checkpoints(ckpt_dir)
    n_rounds = rounds if rounds is not None else study.study.rounds
    if resume:
        if not found:
            raise ConsortiumError(f"--resume: no checkpoint in {ckpt_dir}", "launch without --resume to start at round 1")
        last_round, last_hash, _ = read_checkpoint(found[-1])
        if last_hash != h:
            raise ConsortiumError(
                f"--resume: checkpoint {found[-1]} is for spec hash {last_hash[:12]}, the study's spec is {h[:12]}",
                "resume with the spec the checkpoint was trained on, or start a new study id",
            )
        if last_round >= n_rounds:
            raise ConsortiumError(
                f"--resume: checkpoint {found[-1]} is already at round {last_round} of {n_rounds}: nothing left to run",
                f"raise the number of rounds (--rounds {last_round + 1} or more, or [study] rounds)",
            )
    elif found:
        raise ConsortiumError(
            f"{ckpt_dir} already holds checkpoints (last: {found[-1].name}) of an earlier launch of study {study.study.id!r}",
            "continue it with --resume, or move the folder away to start over",
        )
    run_config = build_run_config(study, spec_hash=h, rounds=rounds, epsilon=epsilon, resume=resume,
                                  output_path=output_path, mlflow_uri=uri)
    run_config.update(provenance_keys(root))
    return root, run_config


def provenance_keys(root: Path) -> dict[str, str]:
    """The coordinator's signing key and the consortium's public signing keys (``consortium init`` made them)."""
    from coordinator.consortium.layout import COORDINATOR, Layout

    layout = Layout.at(root)
    key = layout.signing_key(COORDINATOR)
    if not key.is_file():
        raise ConsortiumError(f"the coordinator's signing key {key} is missing", "recreate the consortium with `fedtwin consortium init`")
    return {"signing-key": str(key), "trusted-keys": str(key.parent)}


def launch(config: str | Path, consortium: str | Path | None = None, *, resume: bool = False, rounds: int | None = None,
           epsilon: float | None = None, output_path: str | Path | None = None, timeout: float = 3600.0,
           app_dir: str | Path = APP_DIR, echo: Callable[[str], None] | None = None) -> LaunchResult:
    """Check, run the study on the consortium, and say how it went (``ok`` False on failure or a halted round)."""
    from coordinator.consortium.consortium import run_app

    root, run_config = prepare(config, consortium, resume=resume, rounds=rounds, epsilon=epsilon,
                               output_path=output_path)
    Path(run_config["checkpoint-dir"]).mkdir(parents=True, exist_ok=True)
    if echo:
        echo(f"launching study {run_config['study-id']} on {root}: rounds={run_config['num-rounds']} resume={resume} "
             f"secagg={run_config['secagg']} min_sites={run_config['min-sites']}")
    names = consortium_node_names(root)
    res = run_app(root, app_dir, run_config, stream=True, timeout=timeout, on_line=_progress(echo, names) if echo else None)
    out = res.output
    outcomes = [RoundOutcome(int(r), s, int(n)) for r, s, n in ROUND_RE.findall(out)]
    ckpts = [p for _, p in CKPT_LINE_RE.findall(out)]
    m = MLFLOW_RE.search(out)
    result = LaunchResult(res.run_id, False, "", outcomes, ckpts, m.group(3) if m else None, out, run_config)
    result.site_errors = [f"round {r}, site {_site_name(site, node, names)}: {why.strip()}"
                          for r, node, site, why in SITE_ERROR_RE.findall(out)]
    ev = EVALUATION_RE.search(out)
    result.evaluation = RoundOutcome(int(ev.group(1)), ev.group(2), int(ev.group(3))) if ev else None
    for r, rest in EVAL_METRICS_RE.findall(out):
        result.metrics[int(r)] = {k: float(v) for k, v in (kv.split("=", 1) for kv in rest.split()) if _is_float(v)}
    halted = [o.round for o in outcomes if o.status != "completed"]
    first = int(re.search(r"first_round=(\d+)", out).group(1)) if re.search(r"first_round=(\d+)", out) else 1
    expected = list(range(first, int(run_config["num-rounds"]) + 1))
    if res.returncode == -1:
        result.message = f"run {res.run_id} timed out after {timeout:.0f} s (stopped on the SuperLink)"
    elif res.status is None and not _superlink_alive(root):
        last = ckpts[-1] if ckpts else "none written by this launch"
        result.message = (f"run {res.run_id}: the SuperLink stopped during the run (see {Path(root) / 'logs' / 'superlink.log'}); "
                          f"the rounds checkpointed before are kept (last checkpoint: {last}), the round under way is not. "
                          f"Fix: `fedtwin consortium up {root}` (it stops what is left of the consortium and starts it again), "
                          f"then `fedtwin coordinator launch --config {config} --resume`")
    elif not res.ok:
        why = _server_error(out)
        result.message = f"run {res.run_id} ended {res.status}:{res.sub_status}" + (f": {why}" if why else "")
    elif halted:
        refused = [f"round {r}: {why.strip()}" for _, r, why in REFUSED_RE.findall(out) if int(r) in halted]
        why = f" The coordinator refused the aggregate: {'; '.join(refused)}." if refused else ""
        why += f" Sites said: {'; '.join(result.site_errors)}" if result.site_errors else ("" if refused else " (see the sites' logs)")
        result.message = (f"run {res.run_id}: round(s) {', '.join(map(str, halted))} halted (a site failed or refused, or too few "
                          f"sites reached the SecAgg+ threshold); not checkpointed.{why}")
    elif lost := TRACKING_LOST_RE.search(out):
        n, what, uri, records = lost.groups()
        result.message = (f"run {res.run_id}: the training finished (checkpoints in {run_config['checkpoint-dir']}) but {n} MLflow "
                          f"write(s) never reached {uri} ({what}): the tracking server stayed unreachable for the whole retry "
                          f"window. The signed round records in {records} hold the same metrics; bring the server back and "
                          f"check the run with `fedtwin audit verify`.")
    elif [o.round for o in outcomes] != expected:
        result.message = f"run {res.run_id}: expected rounds {expected}, the ServerApp reported {[o.round for o in outcomes]}"
    else:
        result.ok = True
        result.message = (f"run {res.run_id}: rounds {expected[0]}..{expected[-1]} completed in {res.seconds:.1f} s; "
                          f"last checkpoint {ckpts[-1] if ckpts else '-'}; MLflow run {result.mlflow_run_id or '-'}")
        if result.evaluation is not None and result.evaluation.status != "completed":
            result.message += "; the final evaluation round halted (the model is saved, its federated evaluation is missing)"
    return result
