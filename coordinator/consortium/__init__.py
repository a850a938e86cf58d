"""Local consortium deployment: a Flower SuperLink and one SuperNode per site, on real processes.

Public API (``from coordinator.consortium import ...``)::

    init_consortium(out, sites=2, ...)   # CA + TLS, SuperNode/signing keys, site & study configs, ports
    up(root) / down(root) / status(root)  # start/stop/inspect the processes on 127.0.0.1
    run_app(root, app_dir, run_config={...}, stream=True, timeout=600) -> RunResult
    load_site_config(path) / load_study_config(path)

The ``fedtwin consortium`` CLI (init/up/down/status/run) wraps these; see docs/deployment.md.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConsortiumError",
    "RunResult",
    "down",
    "init_consortium",
    "load_site_config",
    "load_study_config",
    "run_app",
    "status",
    "up",
]


def __getattr__(name: str) -> Any:  # lazy: `fedtwin --help` should not import Flower
    if name in ("init_consortium", "up", "down", "status", "run_app", "RunResult"):
        from coordinator.consortium import consortium

        return getattr(consortium, name)
    if name in ("load_site_config", "load_study_config"):
        from fedtwin.federation import config

        return getattr(config, name)
    if name == "ConsortiumError":
        from fedtwin.federation.errors import ConsortiumError

        return ConsortiumError
    raise AttributeError(name)
