"""FedTwin's Flower ServerApp: weighted FedAvg of the twin, with SecAgg+ when ``secagg`` is on.

Run config (keys declared in ``apps/fedtwin/pyproject.toml``): ``num-rounds``, ``min-sites``,
``secagg``, ``num-shares``, ``reconstruction-threshold``, ``clipping-range``, ``max-weight``,
``secagg-timeout``, ``spec-path`` (the twin spec; the initial parameters are a fresh
``TwinModel(spec)``), ``spec-hash`` (optional: if set it must equal the spec's hash; the spec's hash
is what every site checks against its own), ``local-epochs``, ``epsilon-per-round``,
``batch-size``, ``max-grad-norm``, ``learning-rate``, ``output-path`` (npz of the final global
parameters, keys ``p0000``...; empty: not saved).

Per round it prints ``FEDTWIN round=R status=completed|halted sites=N`` (a SecAgg+ round below
the reconstruction threshold is "halted": Flower skips it without an exception), and at the end
``FEDTWIN final rounds_completed=C rounds=R saved=PATH``.
"""

from __future__ import annotations

from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import ServerApp

FIT_KEYS = ("spec-hash", "epsilon-per-round", "local-epochs", "batch-size", "max-grad-norm", "learning-rate", "clipping-range")


class RoundLog:
    """What happened in each round, shared by the strategy and the fit workflow."""

    def __init__(self) -> None:
        self.round = 0
        self.results: dict[int, int] = {}
        self.status: dict[int, str] = {}

    def report(self, server_round: int, completed: bool, sites: int) -> None:
        self.status[server_round] = "completed" if completed else "halted"
        print(f"FEDTWIN round={server_round} status={self.status[server_round]} sites={sites}", flush=True)


class FedTwinFedAvg(FedAvg):
    """Weighted FedAvg that remembers the latest aggregate and how many sites each round had."""

    def __init__(self, log: RoundLog, **kw) -> None:
        super().__init__(**kw)
        self.log = log
        self.latest = kw.get("initial_parameters")

    def configure_fit(self, server_round, parameters, client_manager):
        self.log.round = server_round
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        self.log.results[server_round] = len(results) if params is not None else 0
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
    n = int(cfg["min-sites"])
    log = RoundLog()
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
    rounds = int(cfg["num-rounds"])
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    if bool(cfg["secagg"]):
        fit_workflow = ReportingSecAggPlusWorkflow(
            log,
            num_shares=cfg["num-shares"],
            reconstruction_threshold=cfg["reconstruction-threshold"],
            clipping_range=float(cfg["clipping-range"]),
            max_weight=float(cfg["max-weight"]),
            timeout=float(cfg["secagg-timeout"]),
        )
    else:
        fit_workflow = ReportingPlainFitWorkflow(log)
    print(f"FEDTWIN start spec={spec.name} spec_hash={h[:12]} rounds={rounds} secagg={bool(cfg['secagg'])} min_sites={n}", flush=True)
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)

    final = parameters_to_ndarrays(strategy.latest)
    out = str(cfg.get("output-path", "")).strip()
    if out:
        np.savez(out, **{f"p{i:04d}": np.asarray(a) for i, a in enumerate(final)})
    done = sum(1 for s in log.status.values() if s == "completed")
    print(f"FEDTWIN final rounds_completed={done} rounds={rounds} saved={out or '-'}", flush=True)
