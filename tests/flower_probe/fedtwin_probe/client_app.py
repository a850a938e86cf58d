"""Probe ClientApp: NumPyClient + secaggplus_mod; the site comes from node config ``site-config``."""

from __future__ import annotations

import tomllib

import numpy as np
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp


def site_index(node_config: dict) -> int:
    """The site's index, read from the site config file the SuperNode names in its node config."""
    with open(node_config["site-config"], "rb") as fh:
        site = tomllib.load(fh)["site"]
    if site["name"] != node_config.get("site-name", site["name"]):
        raise ValueError(f"node config site-name {node_config['site-name']!r} != site config {site['name']!r}")
    return int(site["index"])


class ProbeClient(NumPyClient):
    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, parameters, config):
        return [np.asarray(p, dtype=np.float64) + self.k for p in parameters], 10 * self.k, {"site": self.k}

    def evaluate(self, parameters, config):
        return float(self.k), 10 * self.k, {}


def client_fn(context):
    return ProbeClient(site_index(context.node_config)).to_client()


def secagg_if_asked(msg, context, call_next):
    """secaggplus_mod only when the ServerApp runs SecAgg+ (the mod fails on a plain train message)."""
    if context.run_config.get("secagg"):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(client_fn=client_fn, mods=[secagg_if_asked])
