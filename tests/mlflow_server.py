"""A real ``mlflow server`` on loopback for tests (``running_mlflow_server``), and a fresh PostgreSQL
database for its backend store (``fresh_postgres_database``).

Importable from any test (``from mlflow_server import running_mlflow_server``), e.g. the coordinator
tests that want to log to a tracking server instead of an SQLite file.

The server is the venv's own ``mlflow`` script (MLflow 3.17: uvicorn, ``--workers 1``), bound to
127.0.0.1 on a free port, artifacts proxied by the server (``--artifacts-destination``, clients see
``mlflow-artifacts:/`` URIs). Its default security middleware (allowed hosts: localhost and
private IPs; CORS: localhost origins) accepts ``http://127.0.0.1:<port>`` as is, so nothing is
relaxed. It runs in its own session (process group); at the end the group is sent SIGTERM, then
SIGKILL if it has not exited after 15 s. Its output goes to ``<tmp_path>/mlflow-server.log``,
which the error message points at if it does not come up.

The backend URI may use the psycopg 3 driver spelling ``postgresql+psycopg://``, which MLflow's
server accepts (it hands the URI to SQLAlchemy; the DB type is the part before ``+``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - loopback http
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)  # the group this helper started (start_new_session): server + its workers
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_mlflow_server(tmp_path: Path, backend_uri: str, port: int, *, timeout: float = 120.0) -> subprocess.Popen:
    """Start ``mlflow server`` on 127.0.0.1:``port`` (its own process group) and wait for /health.

    For tests that stop the server and start it again on the same port and stores (the fault
    tests); stop it with ``stop_mlflow_server``. The log is appended to ``<tmp_path>/mlflow-server.log``.
    """
    url = f"http://127.0.0.1:{port}"
    artifacts = Path(tmp_path) / "mlflow-server-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = Path(tmp_path) / "mlflow-server.log"
    cmd = [
        str(MLFLOW), "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(tmp_path), start_new_session=True)
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering /health; see {log_path}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"mlflow server did not answer {url}/health within {timeout:.0f} s; see {log_path}")
        time.sleep(0.5)
    return proc


def stop_mlflow_server(proc: subprocess.Popen, *, kill: bool = False) -> None:
    """Stop a server from ``start_mlflow_server``: SIGKILL of its process group (``kill``), else SIGTERM then SIGKILL."""
    if kill and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        return
    _stop(proc)


@contextmanager
def running_mlflow_server(tmp_path: Path, backend_uri: str, *, timeout: float = 120.0) -> Iterator[str]:
    """Start ``mlflow server`` on ``backend_uri`` for the block; yields its URL ``http://127.0.0.1:PORT``."""
    port = free_port()
    proc = start_mlflow_server(tmp_path, backend_uri, port, timeout=timeout)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@contextmanager
def fresh_postgres_database(admin_url: str, prefix: str = "fedtwin_mlflow") -> Iterator[str]:
    """A new, empty database ``<prefix>_<random>`` on the server of ``admin_url`` (a SQLAlchemy URL
    of an existing database, e.g. FEDTWIN_PG_URL); dropped (WITH FORCE) afterwards. Yields its URL
    with the driver of ``admin_url``."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()
