"""Shorter polling in Flower 1.41's deployment runtime (the fixed cost of every round).

Where Flower 1.41.0 polls or backs off (read in the installed source):

=============================================  ==========================================  =======================
where                                          what                                        configurable?
=============================================  ==========================================  =======================
flwr/supernode/start_client_internal.py        SuperNode: ``time.sleep(3)`` between Fleet  no (constant)
                                               PullMessages when no message; ``sleep(0.5)``
                                               while waiting for the ClientApp's reply
flwr/superlink/grid/http_grid.py               ServerApp: ``time.sleep(3)`` between        no (constant)
                                               PullMessages in ``send_and_receive``
flwr/supercore/superexec/run_superexec.py      SuperExec: AcquireTask every 1 s            env FLWR_SUPEREXEC_TASK_POLL_INTERVAL
flwr/supercore/inflatable/inflatable_utils.py  any process pulling message objects: an     no (keyword defaults)
(``pull_objects``)                             object not there yet is retried after 1 s,
                                               doubling up to 10 s
=============================================  ==========================================  =======================

A SecAgg+ round is 4 ``send_and_receive`` exchanges; each pays the SuperNode's and the grid's
poll (up to 3 s each), most of the 24.8 s/round measured with stock Flower. The two constants
are not configurable, so :func:`cap_sleep` replaces the ``time`` module *seen by those Flower
modules only* with a proxy whose ``sleep`` is capped; nothing else in the process changes.

Polling the SuperLink is not free (each HTTPS request costs the SuperLink ~10 ms of CPU, measured
here), so there are two caps: ``link`` for sleeps between requests to the SuperLink (SuperNode
Fleet poll, ServerApp grid poll) and ``local`` for waits inside one process (the SuperNode
waiting for its ClientApp's reply). The SuperNode's Fleet poll is also *adaptive*: it uses
``link`` only within ``active_window`` seconds of the last message it received or sent, and
Flower's own 3 s otherwise, so an idle consortium costs (almost) nothing.

The object-pull backoff matters once tasks start fast: a SuperNode creates the ClientApp task
*before* it has pulled the message's objects from the SuperLink, so a ClientApp started within
milliseconds (fork executor) finds them missing and, with Flower's defaults, sleeps 1 s; the
ServerApp likewise sees a reply before its objects are all pushed. :func:`cap_pull_backoff`
lowers the keyword defaults of ``pull_objects`` / ``pull_and_inflate_object_from_tree`` (first
retry after ``local``, doubling to 1 s; Flower's number of tries and 2 h limit are kept).

All of it is applied only in processes FedTwin starts itself (the SuperNode launcher below, the
fork executor and its task processes), only with flwr 1.41.x, and not at all with
``poll_interval = 0`` in consortium.toml.

``python -m fedtwin.federation.polling supernode --poll-interval 0.2 --local-poll-interval 0.05
[--active-window 30] -- <flower-supernode args>`` runs ``flower-supernode`` with the caps.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from types import ModuleType

SUPERNODE_MODULE = "flwr.supernode.start_client_internal"
GRID_MODULE = "flwr.superlink.grid.http_grid"
PATCHED_FOR = "1.41."
FLOWER_IDLE_SLEEP = 3  # the constant in both modules
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


class _CappedTime:
    """Stands in for the ``time`` module of one Flower module: ``sleep`` is capped, the rest is ``time``'s.

    ``sleep(s)`` with ``s >= 3`` (Flower's poll of the SuperLink) sleeps ``link`` while
    ``active()`` is true and ``s`` otherwise; shorter sleeps (local waits) sleep ``min(s, local)``.
    """

    def __init__(self, link: float, local: float, active=None) -> None:  # noqa: ANN001
        self.link = link
        self.local = local
        self.active = active or (lambda: True)

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_SLEEP:
            time.sleep(min(seconds, self.link) if self.active() else seconds)
        else:
            time.sleep(min(seconds, self.local))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def _version_ok() -> bool:
    from flwr.supercore.version import package_version

    if package_version.startswith(PATCHED_FOR):
        return True
    warnings.warn(f"FedTwin's polling caps were written for flwr {PATCHED_FOR}x, not {package_version}: not applied", stacklevel=3)
    return False


def cap_sleep(module_name: str, link: float, local: float | None = None, active=None) -> bool:  # noqa: ANN001
    """Cap ``time.sleep`` as seen by ``module_name``; return whether it was applied."""
    if link <= 0 or not _version_ok():
        return False
    module: ModuleType = importlib.import_module(module_name)
    current = getattr(module, "time", None)
    if isinstance(current, _CappedTime):
        current.link, current.local = link, local if local is not None else link
        if active is not None:
            current.active = active
        return True
    if current is not time:
        warnings.warn(f"{module_name} does not use the time module any more: poll cap not applied", stacklevel=2)
        return False
    module.time = _CappedTime(link, local if local is not None else link, active)  # type: ignore[attr-defined]
    return True


class _Activity:
    """When the SuperNode last received or sent a message (wraps two of its module functions)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.last = float("-inf")

    def __call__(self) -> bool:
        return time.monotonic() - self.last < self.window

    def wrap(self, fn):  # noqa: ANN001, ANN201
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            result = fn(*args, **kwargs)
            if fn.__name__ != "_pull_and_store_message" or result is not None:
                self.last = time.monotonic()
            return result

        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped


def adaptive_supernode_poll(link: float, local: float, window: float) -> bool:
    """SuperNode: poll the SuperLink every ``link`` s while active (``window`` s since the last
    message in or out), every 3 s (Flower's) when idle; local waits capped at ``local``."""
    if link <= 0 or not _version_ok():
        return False
    module = importlib.import_module(SUPERNODE_MODULE)
    names = ("_pull_and_store_message", "_push_messages")
    if not all(callable(getattr(module, n, None)) for n in names):
        warnings.warn("flwr's SuperNode loop changed: adaptive polling not applied (fixed cap instead)", stacklevel=2)
        return cap_sleep(SUPERNODE_MODULE, link, local)
    activity = _Activity(window)
    for n in names:
        fn = getattr(module, n)
        setattr(module, n, activity.wrap(getattr(fn, "__wrapped__", fn)))
    return cap_sleep(SUPERNODE_MODULE, link, local, activity)


def cap_pull_backoff(initial: float, cap: float = 1.0) -> bool:
    """Lower the object-pull retry backoff (keyword defaults) in this process; return whether applied."""
    if initial <= 0 or not _version_ok():
        return False
    from flwr.supercore.inflatable import inflatable_utils

    for name in PULL_FUNCTIONS:
        fn = getattr(inflatable_utils, name, None)
        kw = getattr(fn, "__kwdefaults__", None) or {}
        if "initial_backoff" not in kw or "backoff_cap" not in kw:
            warnings.warn(f"flwr {name} has no initial_backoff/backoff_cap keyword defaults: backoff cap not applied", stacklevel=2)
            return False
        kw["initial_backoff"] = min(initial, kw["initial_backoff"])
        kw["backoff_cap"] = min(max(cap, initial), kw["backoff_cap"])
    return True


def speed_up(component: str, link: float, local: float | None = None, active_window: float = 30.0) -> list[str]:
    """Apply the caps relevant to ``component`` (supernode | serverapp | clientapp); return what was applied."""
    done: list[str] = []
    if link <= 0:
        return done
    local = link if local is None else local
    if component == "supernode" and adaptive_supernode_poll(link, local, active_window):
        done.append(f"Fleet poll {link:g} s (3 s after {active_window:g} s idle), reply wait {local:g} s")
    if component == "serverapp" and cap_sleep(GRID_MODULE, link, local):
        done.append(f"grid reply poll {link:g} s")
    if cap_pull_backoff(local):
        done.append(f"object-pull backoff from {local:g} s")
    return done


def shorten_heartbeat(seconds: float) -> str | None:
    """The SuperNode's heartbeat interval (Flower: 30 s, the SuperLink accepts >= 10 s).

    The SuperLink marks a node offline after 2 missed intervals: with 10 s a site that dies is
    known to be gone (and may rejoin with the same key) after 20 s instead of 60 s.
    """
    from flwr.common import constant

    if seconds <= 0 or seconds == constant.HEARTBEAT_DEFAULT_INTERVAL:
        return None
    seconds = max(float(constant.HEARTBEAT_MIN_INTERVAL), float(seconds))
    for name in ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat"):
        module = importlib.import_module(name)
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            warnings.warn(f"{name} has no HEARTBEAT_DEFAULT_INTERVAL: heartbeat left at Flower's default", stacklevel=2)
            return None
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds
    return f"heartbeat every {seconds:g} s"


def plain_timestamped_logs() -> None:
    """Flower's console log with timestamps and without colour codes (it goes to a log file)."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flower = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m fedtwin.federation.polling",
        usage="%(prog)s supernode --poll-interval S [--local-poll-interval S] [--active-window S] [--heartbeat-interval S] "
        "-- FLOWER-SUPERNODE-ARGS",
    )
    parser.add_argument("component", choices=["supernode"])
    parser.add_argument("--poll-interval", type=float, required=True, help="Fleet poll while active (s); 0 = Flower's polling")
    parser.add_argument("--local-poll-interval", type=float, help="cap on local waits (default: --poll-interval)")
    parser.add_argument("--active-window", type=float, default=30.0, help="seconds after the last message before polling slows to 3 s")
    parser.add_argument("--heartbeat-interval", type=float, default=0.0, help="SuperNode heartbeat (s, >= 10); 0 = Flower's 30 s")
    args = parser.parse_args(ours)
    plain_timestamped_logs()
    applied = speed_up("supernode", args.poll_interval, args.local_poll_interval, args.active_window)
    beat = shorten_heartbeat(args.heartbeat_interval)
    if beat:
        applied.append(beat)
    from flwr.supercore import log

    log(20, "FedTwin polling caps: %s", "; ".join(applied) or "none")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower]  # Flower derives its exit telemetry event from argv[0]
    flower_supernode()


if __name__ == "__main__":
    main()
