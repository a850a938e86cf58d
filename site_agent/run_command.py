"""``fedtwin site run --config SITE.toml``: the hospital's SuperNode with FedTwin's ClientApp.

What a site operator runs on the site's own machine, next to its OMOP database. Everything comes
from the site config (``fedtwin consortium init`` writes one per site; docs/deployment.md): the
SuperLink address and the consortium CA to trust, the SuperNode key registered with the SuperLink,
the Runtime API port (loopback only). The ClientApp finds the same file through the SuperNode's
node config and reads the database, spec, privacy budget and ledger from it.

The processes and flags are those ``fedtwin consortium up`` uses for a site
(:mod:`fedtwin.federation.commands`): Flower's SuperNode with ``--isolation process`` and
FedTwin's fork executor (``executor = "fork"``, the default), or Flower's own subprocess
isolation (``"flower"``). Runs in the foreground until Ctrl-C / SIGTERM, then stops both
processes; if either dies the other is stopped and the exit code says so.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedtwin.errors import FedTwinError


@dataclass(frozen=True)
class SitePlan:
    """The command lines and environment ``run_site`` will start (also what ``--dry-run`` shows)."""

    site: str
    superlink_address: str
    supernode: list[str]
    executor: list[str] | None
    env: dict[str, str]
    secret_dir: Path

    def discard_secret(self) -> None:
        """Remove the per-run executor secret (its folder is private to this run)."""
        for f in self.secret_dir.glob("*"):
            f.unlink(missing_ok=True)
        self.secret_dir.rmdir()


def check_site(config: Path):  # -> SiteConfig
    """Load the site config and check what the SuperNode and ClientApp will need, before starting."""
    from fedtwin.code_version import code_version
    from fedtwin.federation.config import load_site_config
    from fedtwin.spec import load_spec, spec_hash
    from site_agent.approval import check_study_approved

    if not config.is_file():
        raise FedTwinError(f"site config {config} does not exist", "give --config PATH/TO/site_<k>.toml (written by `fedtwin consortium init`)")
    site = load_site_config(config)
    for what, path in (
        ("SuperNode private key ([keys] supernode_private_key)", site.keys.supernode_private_key),
        ("consortium CA certificate ([trust] ca_certificate)", site.trust.ca_certificate),
        ("twin spec ([data] spec)", site.data.spec),
    ):
        if not Path(path).is_file():
            raise FedTwinError(f"{what} {path} does not exist", f"fix the path in {config} or copy the file there")
    spec = load_spec(site.data.spec)
    # a site runs only a study it approved (spec hash + this FedTwin's code version)
    check_study_approved(site.allow_list_path(), spec_hash(spec), code_version(), site.site.name,
                         config_path=config, spec_path=site.data.spec)
    db = site.data.database
    if "://" not in db and not Path(db).is_file():
        raise FedTwinError(f"the site's OMOP database {db} does not exist", f"fix [data] database in {config}")
    ledger_dir = Path(site.privacy.ledger).parent
    if not ledger_dir.is_dir():
        raise FedTwinError(f"the privacy ledger's folder {ledger_dir} does not exist", "create it (the ledger itself is created at the first round)")
    return site


def plan_site(config: Path, *, executor: str = "fork", flwr_home: Path | None = None, max_retries: int | None = None) -> SitePlan:
    """Build the SuperNode (and executor) command lines for the site described by ``config``."""
    from fedtwin.federation import commands
    from fedtwin.federation.config import ManifestRuntime

    if executor not in ("fork", "flower"):
        raise FedTwinError(f"--executor {executor!r}", "use fork (FedTwin's fork executor) or flower (Flower's subprocess isolation)")
    config = config.resolve()
    site = check_site(config)
    secret_dir = Path(tempfile.mkdtemp(prefix=f"fedtwin-{site.site.name}-"))
    secret = secret_dir / "superexec.secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o600)
    r = commands.Render(
        python=sys.executable, bin_dir=commands.local_bin_dir(), superlink_host="", superlink_port="",
        superlink_address=site.trust.superlink_address, ca_cert=str(site.trust.ca_certificate), server_cert="",
        server_key="", superlink_db="", superlink_secret="", executor=executor,
        **commands.runtime_settings(ManifestRuntime()),  # a local consortium's defaults
    )
    sr = commands.SiteRender(
        name=site.site.name, site_config=str(config), supernode_key=str(site.keys.supernode_private_key),
        runtime_host="127.0.0.1", runtime_port=str(site.supernode.runtime_api_port), secret=str(secret),
    )
    home = flwr_home or config.parent.parent / "flwr_home" / site.site.name
    path = os.pathsep.join([commands.local_bin_dir(), os.environ.get("PATH", os.defpath)])
    env = {**os.environ, **commands.common_env(r), "FLWR_HOME": str(home), "PATH": path}
    return SitePlan(site.site.name, site.trust.superlink_address, commands.supernode_argv(r, sr, max_retries=max_retries),
                    commands.supernode_executor_argv(r, sr), env, secret_dir)


def run_site(plan: SitePlan, echo: Callable[[str], None] = print) -> int:
    """Start the SuperNode (and executor), wait, stop both; 0 after Ctrl-C/SIGTERM, else the failed exit code."""
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = {"signal": False}

    def on_signal(signum, _frame) -> None:
        stopping["signal"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sn = subprocess.Popen(plan.supernode, env=plan.env, start_new_session=True)
        procs.append(("SuperNode", sn))
        echo(f"SuperNode started (pid {sn.pid})")
        if plan.executor is not None:
            ex = subprocess.Popen([*plan.executor, "--watch-pid", str(sn.pid)], env=plan.env, start_new_session=True)
            procs.append(("executor", ex))
            echo(f"ClientApp executor started (pid {ex.pid})")
        code = 0
        while not stopping["signal"]:
            dead = [(name, p.returncode) for name, p in procs if p.poll() is not None]
            if dead:
                name, code = dead[0]
                echo(f"the {name} exited with code {code}: stopping the site (see the output above)")
                code = code or 1
                break
            time.sleep(0.2)
        return code
    finally:
        for _name, p in reversed(procs):
            _stop(p)
        for s, h in old.items():
            signal.signal(s, h)
        plan.discard_secret()
        echo("site stopped")


def _stop(p: subprocess.Popen, timeout: float = 10.0) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    except ProcessLookupError:
        pass
