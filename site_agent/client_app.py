"""FedTwin's Flower ClientApp: one hospital's part of a federated round.

The SuperNode names the site's config in its node config (``site-config``); each fit reads it,
refuses a round whose spec hash is not the site's, trains the global twin with DP-SGD inside the
site's privacy ledger (:mod:`site_agent.task`) and returns the new parameters, a coarsened patient
count and only ``{"epsilon_spent": composed epsilon, "site": its name}`` as plaintext metrics; its
evaluation statistics travel inside the masked vector (SecAgg+ only). ``secaggplus_mod`` is applied
only when the ServerApp runs SecAgg+ (run config ``secagg``): the mod fails on a plain train
message. Kept cheap to import: the heavy work is imported inside :mod:`site_agent.task`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

log = logging.getLogger("fedtwin.site")


class SiteClient(NumPyClient):
    def __init__(self, site_config: str, run_config: dict, run_id: str) -> None:
        self.site_config = site_config
        self.run_config = dict(run_config)
        self.run_id = run_id

    def get_parameters(self, config):  # the ServerApp sends initial parameters itself
        raise RuntimeError("FedTwin sites do not provide initial parameters: the coordinator does")

    def fit(self, parameters, config):
        from fedtwin.errors import FedTwinError
        from site_agent.task import RoundSettings, SiteRefusal, run_round

        server_round = int(config.get("server_round", config.get("server-round", 0)))
        try:
            settings = RoundSettings.from_config(dict(config), self.run_config, server_round, self.run_id)
            result = run_round(self.site_config, parameters, settings)
        except SiteRefusal:
            raise  # its message is written for the coordinator
        except FedTwinError as exc:  # problem + fix, written for people, never holds patient data
            log.exception("round %s refused at this site", server_round)
            raise SiteRefusal(f"round {server_round}: {exc}") from None
        except Exception as exc:
            # Flower sends an exception's text to the coordinator: an arbitrary error (a database
            # driver's, say) might quote data, so only its type leaves the site; the traceback
            # stays in the site's own log.
            log.exception("round %s failed at this site", server_round)
            raise SiteRefusal(f"round {server_round} failed at the site: {type(exc).__name__} (details in the site's log)") from None
        metrics = {"epsilon_spent": float(result.epsilon_spent), "site": result.site}
        if result.manifest_json:
            from fedtwin.provenance.manifest import MANIFEST_METRIC

            metrics[MANIFEST_METRIC] = result.manifest_json
        return result.parameters, result.num_examples, metrics

    def evaluate(self, parameters, config):
        raise RuntimeError("FedTwin sites do not evaluate in the federation (evaluate messages are not protected)")


def site_config_path(node_config, run_config) -> str:
    """The site's config file: the SuperNode's ``site-config``, or in Flower's simulation engine
    ``<run config site-config-dir>/site_<partition-id + 1>.toml``."""
    if "site-config" in node_config:
        return str(node_config["site-config"])
    if "partition-id" in node_config and str(run_config.get("site-config-dir", "")).strip():
        return str(Path(str(run_config["site-config-dir"])) / f"site_{int(node_config['partition-id']) + 1}.toml")
    raise RuntimeError(
        "the SuperNode has no node config 'site-config': start it with --node-config site-config=PATH "
        "(in simulation, set the run config site-config-dir)"
    )


def client_fn(context):
    path = site_config_path(context.node_config, context.run_config)
    return SiteClient(path, context.run_config, f"flwr-run-{context.run_id}").to_client()


def secagg_if_asked(msg, context, call_next):
    """secaggplus_mod only when the ServerApp runs SecAgg+ (the mod fails on a plain train message)."""
    if context.run_config.get("secagg"):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(client_fn=client_fn, mods=[secagg_if_asked])
