"""TEST-ONLY adversary: turns one FedTwin site of the fault-kit consortium into a malicious site.

Never part of the product. ``tests/reliability/test_misuse.py`` restarts one site's SuperNode and
executor with this folder first on ``PYTHONPATH`` and ``FEDTWIN_TEST_ADVERSARY=<control folder>``;
Python imports ``sitecustomize`` at start-up, and this one (only when that variable is set)
installs an import hook that wraps ``site_agent.client_app.SiteClient.fit``: FedTwin's honest
ClientApp trains, checks and signs as usual, then the wrapper alters its reply *before*
Flower's ``secaggplus_mod`` quantizes and masks it, i.e. what a site running altered code can send.

The attack is read at every fit (each ClientApp task is a fresh forked process) from
``<control>/attack.json``: ``{"attack": "none" | "replay" | "nan" | "huge" | "count", "rounds": [2]}``.

* ``replay``: replace this round's signed manifest by the site's own valid manifest of an earlier
  round of the same training (every manifest the site signs is kept in ``<control>/manifests/``);
* ``nan``: every parameter array it sends becomes NaN;
* ``huge``: every parameter array it sends becomes 1e6 (far beyond SecAgg+'s clipping range);
* ``count``: report ``num_examples`` = 1,000,000 (far beyond the study's max_weight).

Every applied attack is appended to ``<control>/applied.jsonl`` and printed to the site's log.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from pathlib import Path

ENV = "FEDTWIN_TEST_ADVERSARY"
TARGET = "site_agent.client_app"
HUGE = 1e6
LYING_COUNT = 1_000_000


def _control() -> Path:
    folder = Path(os.environ[ENV])
    if not folder.is_dir():  # fail loudly rather than turn honest without anyone noticing
        raise RuntimeError(f"adversary: control folder {folder} is gone")
    return folder


def _attack() -> tuple[str, list[int]]:
    try:
        spec = json.loads((_control() / "attack.json").read_text())
    except (OSError, ValueError):
        return "none", []
    return str(spec.get("attack", "none")), [int(r) for r in spec.get("rounds", [])]


def _note(event: dict) -> None:
    event = {**event, "pid": os.getpid(), "time": time.time()}
    with open(_control() / "applied.jsonl", "a") as fh:
        fh.write(json.dumps(event) + "\n")
    print(f"FEDTWIN-TEST adversary: {json.dumps(event)}", file=sys.stderr, flush=True)


def _wrap(module) -> None:
    import numpy as np

    from fedtwin.provenance.manifest import MANIFEST_METRIC

    honest_fit = module.SiteClient.fit

    def fit(self, parameters, config):
        params, num_examples, metrics = honest_fit(self, parameters, config)
        server_round = int(config.get("server_round", config.get("server-round", 0)))
        training = str(config.get("training-id", "")) or self.run_id
        kind = str(config.get("round-kind", "train"))
        store = _control() / "manifests"
        store.mkdir(exist_ok=True)
        if metrics.get(MANIFEST_METRIC):  # keep every manifest this site signed (the replay's material)
            (store / f"{training}-{kind}-{server_round:04d}.json").write_text(str(metrics[MANIFEST_METRIC]))
        attack, rounds = _attack()
        if attack == "none" or server_round not in rounds or kind != "train":
            return params, num_examples, metrics
        event = {"attack": attack, "round": server_round, "training_id": training}
        if attack == "replay":
            earlier = sorted(p for p in store.glob(f"{training}-train-*.json") if int(p.stem.rsplit("-", 1)[1]) < server_round)
            if not earlier:
                raise RuntimeError(f"adversary: no earlier manifest of training {training} to replay in round {server_round}")
            metrics = {**metrics, MANIFEST_METRIC: earlier[-1].read_text()}
            event["replayed"] = earlier[-1].name
        elif attack == "nan":
            params = [np.full_like(np.asarray(p, dtype=np.float32), np.nan) for p in params]
        elif attack == "huge":
            params = [np.full_like(np.asarray(p, dtype=np.float32), HUGE) for p in params]
        elif attack == "count":
            event["honest_num_examples"] = int(num_examples)
            num_examples = LYING_COUNT
        else:
            raise RuntimeError(f"adversary: unknown attack {attack!r}")
        _note(event)
        return params, num_examples, metrics

    module.SiteClient.fit = fit


class _Loader(importlib.abc.Loader):
    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _wrap(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if os.environ.get(ENV):
    sys.meta_path.insert(0, _Finder())
