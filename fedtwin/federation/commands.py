"""The command lines of every consortium process, built in one place.

``processes.py`` (local processes on loopback) and ``compose.py`` (the docker compose files in
``compose/``) both render their commands with these functions, so the flags used on one machine
and across hosts cannot drift apart (tests/test_consortium.py checks the committed compose files
against a fresh rendering).

Flower 1.41.0 flags used (all checked with ``--help`` and in the installed source):

SuperLink (``flower-superlink``)
  ``--ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY``  TLS for Fleet, Control and Runtime APIs
  ``--enable-supernode-auth``   only SuperNodes whose EC public key was registered may connect
  ``--disable-runtime-dependency-installation``   no ``uv sync`` per app (no network needed)
  ``--isolation process``       ServerApps are run by an external executor (FedTwin's fork executor)
  ``--superexec-auth-secret-file S``  the executor's AcquireTask calls are HMAC-signed with S
  ``--host H --port P``         one HTTP port serves the Fleet, Control and Runtime APIs
  ``--database FILE``           persistent SuperLink state (registered nodes, runs)

SuperNode (``flower-supernode``, via the poll-cap launcher ``python -m fedtwin.federation.polling``)
  ``--superlink HOST:PORT --root-certificates CA``   TLS, trusting the consortium CA only
  ``--auth-supernode-private-key KEY``   OpenSSH EC P-384 key (public half registered)
  ``--node-config 'site-config="..." site-name="..."'``  tells the ClientApp which site it is
  ``--isolation process --host 127.0.0.1 --port RT``   Runtime API for the executor, loopback only
  ``--superexec-auth-secret-file S``
  (no ``--allow-runtime-dependency-installation``: off by default on the SuperNode)
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtwin.federation.config import SITE_CONFIG_NODE_KEY, ManifestRuntime

CLIENT_APP = "flwr-clientapp"
SERVER_APP = "flwr-serverapp"


@dataclass(frozen=True)
class ProcessSpec:
    """One long-running process of the consortium."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Render:
    """Concrete values for one rendering: local processes (host paths) or containers."""

    python: str  # the interpreter running FedTwin modules
    bin_dir: str  # where flower-superlink & co. are ("" = on PATH)
    superlink_host: str  # the SuperLink binds here (127.0.0.1 locally, 0.0.0.0 in a container)
    superlink_port: str
    superlink_address: str  # how SuperNodes reach the SuperLink (HOST:PORT)
    ca_cert: str
    server_cert: str
    server_key: str
    superlink_db: str
    superlink_secret: str
    executor: str = "fork"  # "fork" | "flower"
    poll_interval: float = 0.2
    local_poll_interval: float = 0.05
    active_window: float = 30.0
    task_poll_interval: float = 0.1
    serverapp_task_poll_interval: float = 0.5
    heartbeat_interval: float = 10.0
    preload: tuple[str, ...] = ()

    def exe(self, name: str) -> str:
        return str(Path(self.bin_dir) / name) if self.bin_dir else name


@dataclass(frozen=True)
class SiteRender:
    name: str
    site_config: str
    supernode_key: str
    runtime_host: str  # 127.0.0.1: the Runtime API is never exposed off the host/container
    runtime_port: str
    secret: str


def runtime_settings(rt: ManifestRuntime) -> dict:
    """The :class:`Render` fields a consortium's ``[runtime]`` table sets (the executor aside).

    Local processes, the compose files and ``fedtwin site run`` all take them from here, so a
    runtime knob is added in one place.
    """
    return {
        "poll_interval": rt.poll_interval,
        "local_poll_interval": rt.local_poll_interval,
        "active_window": rt.active_window,
        "task_poll_interval": rt.task_poll_interval,
        "serverapp_task_poll_interval": rt.serverapp_task_poll_interval,
        "heartbeat_interval": rt.heartbeat_interval,
        "preload": tuple(rt.preload),
    }


def common_env(r: Render) -> dict[str, str]:
    """Environment of every Flower process: no telemetry, no update check, executor polling."""
    env = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{r.task_poll_interval:g}",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def superlink_argv(r: Render) -> list[str]:
    argv = [
        r.exe("flower-superlink"),
        "--ssl-ca-certfile", r.ca_cert,
        "--ssl-certfile", r.server_cert,
        "--ssl-keyfile", r.server_key,
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", r.superlink_host,
        "--port", r.superlink_port,
        "--database", r.superlink_db,
    ]
    if r.executor == "fork":
        argv += ["--isolation", "process", "--superexec-auth-secret-file", r.superlink_secret]
    else:
        argv += ["--isolation", "subprocess"]
    return argv


def _poll_flags(r: Render) -> list[str]:
    return [
        "--poll-interval", f"{r.poll_interval:g}",
        "--local-poll-interval", f"{r.local_poll_interval:g}",
        "--active-window", f"{r.active_window:g}",
    ]


def superlink_executor_argv(r: Render, watch_pid: int | None = None) -> list[str] | None:
    """FedTwin's fork executor for ServerApps (None with Flower's own subprocess isolation)."""
    if r.executor != "fork":
        return None
    return _executor_argv(
        r, r.superlink_port, ["--root-certificates", r.ca_cert], SERVER_APP, r.superlink_secret,
        r.serverapp_task_poll_interval, watch_pid,
    )


def node_config(site: SiteRender) -> str:
    """The SuperNode's --node-config: the ClientApp reads ``context.node_config["site-config"]``."""
    return f'{SITE_CONFIG_NODE_KEY}="{site.site_config}" site-name="{site.name}"'


def supernode_argv(
    r: Render, site: SiteRender, *, superlink_address: str | None = None, ca_cert: str | None = None,
    max_retries: int | None = None,
) -> list[str]:
    """The SuperNode's command line; ``max_retries`` bounds its reconnect attempts (Flower: unlimited)."""
    flower = [
        "--superlink", superlink_address or r.superlink_address,
        "--root-certificates", ca_cert or r.ca_cert,
        "--auth-supernode-private-key", site.supernode_key,
        "--node-config", node_config(site),
        "--host", site.runtime_host,
        "--port", site.runtime_port,
    ]
    if max_retries is not None:
        flower += ["--max-retries", str(int(max_retries))]
    if r.executor == "fork":
        flower += ["--isolation", "process", "--superexec-auth-secret-file", site.secret]
    else:
        flower += ["--isolation", "subprocess"]
    if r.poll_interval > 0:
        beat = ["--heartbeat-interval", f"{r.heartbeat_interval:g}"] if r.heartbeat_interval else []
        return [r.python, "-m", "fedtwin.federation.polling", "supernode", *_poll_flags(r), *beat, "--", *flower]
    return [r.exe("flower-supernode"), *flower]


def supernode_executor_argv(r: Render, site: SiteRender, watch_pid: int | None = None) -> list[str] | None:
    if r.executor != "fork":
        return None
    return _executor_argv(r, site.runtime_port, ["--insecure"], CLIENT_APP, site.secret, r.task_poll_interval, watch_pid)


def _executor_argv(
    r: Render, port: str, tls: list[str], task_type: str, secret: str, task_poll: float, watch_pid: int | None
) -> list[str]:
    """FedTwin's fork executor polling the Runtime API on 127.0.0.1:``port`` for ``task_type`` tasks."""
    argv = [
        r.python, "-m", "fedtwin.federation.executor",
        "--runtime-api-address", f"127.0.0.1:{port}",
        *tls,
        "--task-type", task_type,
        "--superexec-auth-secret-file", secret,
        "--task-poll-interval", f"{task_poll:g}",
        *_poll_flags(r),
    ]
    for m in r.preload:
        argv += ["--preload", m]
    if watch_pid is not None:
        argv += ["--watch-pid", str(watch_pid)]
    return argv


def flwr_config_toml(federation: str, address: str, ca_cert: str) -> str:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (the default) for the ``flwr`` CLI."""
    return (
        "# Written by fedtwin consortium: the flwr CLI's SuperLink connection for this consortium.\n"
        "[superlink]\n"
        f'default = "{federation}"\n\n'
        f"[superlink.{federation}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )


def flwr_run_argv(bin_dir: str, app: str, federation: str, run_config: dict | None = None, stream: bool = True) -> list[str]:
    """``flwr run APP FEDERATION [--run-config k=v ...] [--stream]``."""
    argv = [str(Path(bin_dir) / "flwr") if bin_dir else "flwr", "run", app, federation]
    for key, value in (run_config or {}).items():
        argv += ["--run-config", f"{key}={toml_value(value)}"]
    if stream:
        argv.append("--stream")
    return argv


def toml_value(value: object) -> str:
    """A run-config value as Flower's ``--run-config key=value`` parser expects it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if '"' in value or "\n" in value:
            raise ValueError(f"run-config/node-config strings cannot hold '\"' or newlines (Flower's parser): {value!r}")
        return f'"{value}"'
    raise TypeError(f"run-config values must be str, int, float or bool, got {type(value).__name__}")


def local_bin_dir() -> str:
    """The folder of the running interpreter, where pip put flower-superlink & co."""
    return str(Path(sys.executable).parent)


def strip_values(argv: Sequence[str], value_flags: Sequence[str] = ()) -> list[str]:
    """The flags of a command line with the values of ``value_flags`` replaced by '<v>' (for comparisons)."""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("<v>")
            skip = False
            continue
        out.append(a)
        if a in value_flags:
            skip = True
    return out
