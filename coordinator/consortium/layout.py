"""Where everything lives in a consortium folder (one place, so nothing else builds paths)."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Layout:
    """Paths of a consortium folder ``root`` (absolute)."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Layout:
        return cls(Path(root).expanduser().resolve())

    # --- configuration
    @property
    def manifest(self) -> Path:
        return self.root / "consortium.toml"

    @property
    def study(self) -> Path:
        return self.root / "study.toml"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    def site_config(self, site: str) -> Path:
        return self.sites_dir / f"{site}.toml"

    @property
    def specs_dir(self) -> Path:
        return self.root / "specs"

    # --- PKI and keys
    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.pki_dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.pki_dir / "superlink.pem"

    @property
    def server_key(self) -> Path:
        return self.pki_dir / "superlink.key"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    def supernode_key(self, site: str) -> Path:
        return self.keys_dir / "supernode" / f"{site}.key"

    def supernode_pub(self, site: str) -> Path:
        return self.keys_dir / "supernode" / f"{site}.pub"

    def signing_key(self, who: str) -> Path:
        return self.keys_dir / "signing" / f"{who}.ed25519.pem"

    def signing_pub(self, who: str) -> Path:
        return self.keys_dir / "signing" / f"{who}.ed25519.pub.pem"

    def superexec_secret(self, who: str) -> Path:
        """Shared secret between a SuperLink/SuperNode and its executor (who: 'superlink' or a site)."""
        return self.keys_dir / "superexec" / f"{who}.secret"

    # --- site data
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def site_database(self, site: str) -> Path:
        return self.data_dir / f"{site}.omop.sqlite"

    @property
    def privacy_dir(self) -> Path:
        return self.root / "privacy"

    def ledger(self, site: str) -> Path:
        return self.privacy_dir / f"{site}.ledger.sqlite"

    # --- coordinator outputs
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tracking_dir(self) -> Path:
        return self.root / "tracking"

    # --- runtime
    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the coordinator (SuperLink, its executor, the flwr CLI): holds config.toml."""
        return self.root / "flwr_home"

    def site_flwr_home(self, site: str) -> Path:
        """FLWR_HOME of a site's SuperNode and ClientApps (installed FABs)."""
        return self.run_dir / site / "flwr_home"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def superlink_db(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def nodes_file(self) -> Path:
        return self.state_dir / "nodes.json"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def record(self, proc: str) -> Path:
        return self.run_dir / f"{proc}.json"

    def pidfile(self, proc: str) -> Path:
        return self.run_dir / f"{proc}.pid"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def log(self, proc: str) -> Path:
        return self.logs_dir / f"{proc}.log"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (bound together, then released)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
    return ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
