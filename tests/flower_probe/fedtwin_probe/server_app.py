"""Probe ServerApp: legacy FedAvg in a DefaultWorkflow, plain or with SecAggPlusWorkflow.

Logs one ``PROBE round=R seconds=S`` line per round (from configure_fit to aggregate_fit, i.e.
all fit messages of the round, and for SecAgg+ its 4 stages) and ``PROBE final=[...]`` at the end.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import ServerApp


class TimedFedAvg(FedAvg):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.t_round: dict[int, float] = {}
        self.final: list[float] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        self.t_round[server_round] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        dt = time.perf_counter() - self.t_round[server_round]
        print(f"PROBE round={server_round} seconds={dt:.3f} results={len(results)} failures={len(failures)}", flush=True)
        if params is not None:
            self.final = [float(x) for x in parameters_to_ndarrays(params)[0]]
        return params, metrics


app = ServerApp()


@app.main()
def main(grid, context) -> None:
    cfg = context.run_config
    n = int(cfg["min-nodes"])
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(4)]),
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=int(cfg["num-rounds"])), strategy=strategy)
    if bool(cfg["secagg"]):
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=cfg["num-shares"],
                reconstruction_threshold=cfg["reconstruction-threshold"],
                timeout=float(cfg["secagg-timeout"]),
            )
        )
    else:
        workflow = DefaultWorkflow()
    t0 = time.perf_counter()
    workflow(grid, legacy)
    print(f"PROBE final={strategy.final} secagg={bool(cfg['secagg'])} workflow_seconds={time.perf_counter() - t0:.3f}", flush=True)
