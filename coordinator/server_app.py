"""FedTwin's Flower ServerApp: weighted FedAvg of the twin, with SecAgg+ when ``secagg`` is on.

Run config (keys declared in ``apps/fedtwin/pyproject.toml``): ``num-rounds``, ``min-sites``,
``secagg``, ``num-shares``, ``reconstruction-threshold``, ``clipping-range``, ``max-weight``,
``secagg-timeout``, ``spec-path`` (the twin spec; the initial parameters are a fresh
``TwinModel(spec)``), ``spec-hash`` (optional: if set it must equal the spec's hash; the spec's hash
is what every site checks against its own), ``local-epochs``, ``epsilon-per-round``,
``batch-size``, ``max-grad-norm``, ``learning-rate``, ``output-path`` (npz of the final global
parameters, keys ``p0000``...; empty: not saved), ``strategy`` (only ``fedavg`` runs here),
``quantization-range``, ``modulus-range`` (SecAgg+), ``study-id``, ``checkpoint-dir``,
``mlflow-tracking-uri``, ``resume``.

Checkpoints (``checkpoint-dir`` non-empty): after every *completed* round the global parameters,
the round number and the spec hash go to ``round-NNNN.npz`` in that folder (temp file + rename;
keys ``p0000``..., ``__round__``, ``__spec_hash__``); a halted round writes none. A fresh run
refuses a folder that already holds checkpoints; with ``resume = true`` the run starts from the
last checkpoint (refused if its spec hash is not this spec's) at its round + 1 and runs only
the rounds left up to ``num-rounds``.

Tracking (``mlflow-tracking-uri`` non-empty): :class:`coordinator.tracking.RoundTracker` opens the
study's MLflow run before the first round (an unusable store fails the run then) and logs every
round; the run id lives in ``checkpoint-dir`` so that a resumed run continues it.

Per round it prints ``FEDTWIN round=R status=completed|halted sites=N`` (a SecAgg+ round below
the reconstruction threshold is "halted": Flower skips it without an exception), and at the end
``FEDTWIN final rounds_completed=C rounds=R saved=PATH``.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import ServerApp

FIT_KEYS = ("spec-hash", "epsilon-per-round", "local-epochs", "batch-size", "max-grad-norm", "learning-rate", "clipping-range")


class RoundLog:
    """What happened in each round, shared by the strategy and the fit workflow."""

    def __init__(self, on_round=None) -> None:
        self.round = 0
        self.results: dict[int, int] = {}
        self.status: dict[int, str] = {}
        self.started: dict[int, float] = {}
        self.epsilon: dict[int, dict[str, float]] = {}
        self.on_round = on_round  # (round, completed, sites) -> None, after the line is printed

    def report(self, server_round: int, completed: bool, sites: int) -> None:
        self.status[server_round] = "completed" if completed else "halted"
        print(f"FEDTWIN round={server_round} status={self.status[server_round]} sites={sites}", flush=True)
        if self.on_round is not None:
            self.on_round(server_round, completed, sites)


class FedTwinFedAvg(FedAvg):
    """Weighted FedAvg that remembers the latest aggregate and how many sites each round had."""

    def __init__(self, log: RoundLog, **kw) -> None:
        super().__init__(**kw)
        self.log = log
        self.latest = kw.get("initial_parameters")

    def configure_fit(self, server_round, parameters, client_manager):
        self.log.round = server_round
        self.log.started.setdefault(server_round, time.monotonic())
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        self.log.results[server_round] = len(results) if params is not None else 0
        eps: dict[str, float] = {}
        for proxy, res in results:
            v = (res.metrics or {}).get("epsilon_spent")
            if isinstance(v, (int, float)):
                eps[str(getattr(proxy, "node_id", proxy.cid))] = float(v)
        self.log.epsilon[server_round] = eps
        if params is not None:
            self.latest = params
        return params, metrics


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose every round reports whether all four stages returned True."""

    def __init__(self, log: RoundLog, **kw) -> None:
        super().__init__(**kw)
        self.log = log

    def __call__(self, grid, context) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        state = WorkflowState()
        completed = True
        for step in (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage):
            if not step(grid, context, state):
                completed = False
                break
        r = self.log.round
        sites = self.log.results.get(r, 0) if completed else len(state.active_node_ids)
        self.log.report(r, completed and self.log.results.get(r, 0) > 0, sites)


class ReportingPlainFitWorkflow:
    """Flower's default (plaintext) fit workflow, with the same per-round line."""

    def __init__(self, log: RoundLog) -> None:
        from flwr.server.workflow.default_workflows import default_fit_workflow

        self.log = log
        self._fit = default_fit_workflow

    def __call__(self, grid, context) -> None:
        self._fit(grid, context)
        r = self.log.round
        n = self.log.results.get(r, 0)
        self.log.report(r, n > 0, n)


class OffsetRounds:
    """Runs ``inner`` with the round number shifted by ``offset`` (a resumed run's rounds keep their numbers)."""

    def __init__(self, inner, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def __call__(self, grid, context) -> None:
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        cfg[Key.CURRENT_ROUND] = int(cfg[Key.CURRENT_ROUND]) + self.offset
        self.inner(grid, context)


# ------------------------------------------------------------------------------- checkpoints

CKPT_RE = re.compile(r"^round-(\d{4,})\.npz$")


def checkpoint_path(folder: str | Path, server_round: int) -> Path:
    return Path(folder) / f"round-{int(server_round):04d}.npz"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The folder's round checkpoints, oldest round first (none if the folder does not exist)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def write_checkpoint(folder: str | Path, server_round: int, spec_hash: str, ndarrays: list) -> Path:
    """Write ``round-NNNN.npz`` atomically: a temp file in the same folder, fsync, then rename."""
    import numpy as np

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(d, server_round)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            arrays = {f"p{i:04d}": np.asarray(a) for i, a in enumerate(ndarrays)}
            np.savez(fh, __round__=np.int64(server_round), __spec_hash__=np.str_(spec_hash), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_checkpoint(path: str | Path) -> tuple[int, str, list]:
    """(round, spec hash, parameters) of a checkpoint written by :func:`write_checkpoint`."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        rnd = int(z["__round__"])
        h = str(z["__spec_hash__"])
        params = [z[k] for k in sorted(k for k in z.files if re.fullmatch(r"p\d{4}", k))]
    return rnd, h, params


def fit_config_fn(cfg: dict, spec_hash: str):
    def fn(server_round: int) -> dict:
        out = {"server-round": int(server_round), "spec-hash": spec_hash}
        for k in FIT_KEYS[1:]:
            if k in cfg:
                out[k] = cfg[k]
        return out

    return fn


app = ServerApp()


@app.main()
def main(grid, context) -> None:
    import numpy as np

    from fedtwin.spec import load_spec, spec_hash
    from fedtwin.twin import TwinModel, get_parameters

    cfg = context.run_config
    spec_path = str(cfg.get("spec-path", "")).strip()
    if not spec_path:
        raise ValueError("run config 'spec-path' is empty: pass -c spec-path=PATH/TO/SPEC.yaml")
    spec = load_spec(spec_path)
    h = spec_hash(spec)
    wanted = str(cfg.get("spec-hash", "")).strip()
    if wanted and wanted != h:
        raise ValueError(f"run config spec-hash {wanted[:12]} is not the hash of {spec_path} ({h[:12]})")
    init = get_parameters(TwinModel(spec))
    rounds = int(cfg["num-rounds"])
    strategy_name = str(cfg.get("strategy", "fedavg")).strip() or "fedavg"
    if strategy_name != "fedavg":
        raise ValueError(f"run config strategy={strategy_name!r}: this ServerApp runs FedAvg only (the sites have no FedProx term)")
    ckpt_dir = str(cfg.get("checkpoint-dir", "")).strip()
    resume = bool(cfg.get("resume", False))
    start = 1
    if resume:
        if not ckpt_dir:
            raise ValueError("run config resume=true needs checkpoint-dir")
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise ValueError(f"resume=true but {ckpt_dir} holds no checkpoint (round-NNNN.npz): launch without resume")
        last_round, last_hash, params = read_checkpoint(found[-1])
        if last_hash != h:
            raise ValueError(f"checkpoint {found[-1]} is for spec hash {last_hash[:12]}, not {h[:12]} ({spec_path}): refusing to resume")
        if [a.shape for a in params] != [a.shape for a in init]:
            raise ValueError(f"checkpoint {found[-1]} does not hold this twin's parameter shapes")
        init, start = params, last_round + 1
        print(f"FEDTWIN resume checkpoint={found[-1]} round={last_round}", flush=True)
    elif ckpt_dir and list_checkpoints(ckpt_dir):
        raise ValueError(f"{ckpt_dir} already holds checkpoints of an earlier run: resume it (resume=true) or move them away")
    remaining = rounds - start + 1

    tracker = None
    uri = str(cfg.get("mlflow-tracking-uri", "")).strip()
    if uri:
        from coordinator.tracking import RoundTracker

        study = str(cfg.get("study-id", "")).strip() or "fedtwin"
        params_logged = {
            "spec_hash": h, "strategy": strategy_name, "rounds": rounds, "min_sites": int(cfg["min-sites"]),
            "secagg": bool(cfg["secagg"]), "epsilon_per_round": cfg.get("epsilon-per-round", ""),
        }
        if bool(cfg["secagg"]):
            for k in ("num-shares", "reconstruction-threshold", "clipping-range", "max-weight", "secagg-timeout",
                      "quantization-range", "modulus-range"):
                if k in cfg:
                    params_logged["secagg." + k.replace("-", "_")] = cfg[k]
        run_dir = Path(ckpt_dir) if ckpt_dir else None
        tracker = RoundTracker(uri, study, run_dir, params_logged, resume=resume)  # fails here, before round 1
        print(f"FEDTWIN tracking uri={uri} experiment={study} mlflow_run={tracker.run_id}", flush=True)

    n = int(cfg["min-sites"])
    holder: dict = {}

    def on_round(r: int, completed: bool, sites: int) -> None:
        if completed and ckpt_dir:
            path = write_checkpoint(ckpt_dir, r, h, parameters_to_ndarrays(holder["strategy"].latest))
            print(f"FEDTWIN checkpoint round={r} path={path}", flush=True)
        if tracker is not None:
            secs = time.monotonic() - log.started.get(r, time.monotonic())
            try:
                tracker.log_round(r, sites if completed else 0, secs, not completed, log.epsilon.get(r, {}) if completed else {})
            except Exception as exc:  # noqa: BLE001 - tracking must not lose a trained round
                print(f"FEDTWIN warning: MLflow logging of round {r} failed: {type(exc).__name__}: {exc}", flush=True)

    log = RoundLog(on_round)
    strategy = FedTwinFedAvg(
        log,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(init),
        on_fit_config_fn=fit_config_fn(dict(cfg), h),
        accept_failures=False,
    )
    holder["strategy"] = strategy
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=max(remaining, 0)), strategy=strategy)
    if bool(cfg["secagg"]):
        extra = {k.replace("-", "_"): int(cfg[k]) for k in ("quantization-range", "modulus-range") if k in cfg}
        fit_workflow = ReportingSecAggPlusWorkflow(
            log,
            num_shares=cfg["num-shares"],
            reconstruction_threshold=cfg["reconstruction-threshold"],
            clipping_range=float(cfg["clipping-range"]),
            max_weight=float(cfg["max-weight"]),
            timeout=float(cfg["secagg-timeout"]),
            **extra,
        )
    else:
        fit_workflow = ReportingPlainFitWorkflow(log)
    print(
        f"FEDTWIN start spec={spec.name} spec_hash={h[:12]} rounds={rounds} first_round={start} "
        f"secagg={bool(cfg['secagg'])} min_sites={n}",
        flush=True,
    )
    failed = True
    try:
        if remaining > 0:
            DefaultWorkflow(fit_workflow=OffsetRounds(fit_workflow, start - 1))(grid, legacy)
        failed = any(s != "completed" for s in log.status.values())
    finally:
        if tracker is not None:
            try:
                tracker.close(failed=failed)
            except Exception as exc:  # noqa: BLE001
                print(f"FEDTWIN warning: closing the MLflow run failed: {exc}", flush=True)

    final = parameters_to_ndarrays(strategy.latest)
    out = str(cfg.get("output-path", "")).strip()
    if out:
        np.savez(out, **{f"p{i:04d}": np.asarray(a) for i, a in enumerate(final)})
    done = sum(1 for s in log.status.values() if s == "completed")
    print(f"FEDTWIN final rounds_completed={done} rounds={rounds} first_round={start} saved={out or '-'}", flush=True)
