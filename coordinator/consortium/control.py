"""The SuperLink's Control API from Python (what ``flwr supernode list`` / ``flwr ls`` call).

Used for fast readiness polling: the ``flwr`` CLI costs a Python start-up and Flower import per
call (2-4 s on a busy 2-core machine), this client one HTTPS request. Registration itself goes
through the ``flwr supernode register`` CLI, as Flower documents it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeView:
    node_id: int
    name: str
    status: str  # registered | online | offline | unregistered
    public_key: bytes


@dataclass(frozen=True)
class RunView:
    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | ""
    details: str
    fab_id: str


class Control:
    """A Control API client trusting the consortium CA only."""

    def __init__(self, address: str, ca_cert: Path, timeout: float = 10.0) -> None:
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker

        retry = make_simple_http_retry_invoker()
        retry.max_tries = 1
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=Path(ca_cert).read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
            retry_invoker=retry,
        )

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def nodes(self) -> list[NodeView]:
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

        res = self._client.ListNodes(ListNodesRequest())
        return [NodeView(n.node_id, n.name, n.status, bytes(n.public_key)) for n in res.nodes_info]

    def runs(self, run_id: int | None = None) -> list[RunView]:
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

        req = ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest()
        res = self._client.ListRuns(req)
        return [
            RunView(rid, r.status.status, r.status.sub_status, r.status.details, r.fab_id)
            # oldest first by when the SuperLink took the run: run ids are random, and status
            # shows the last ten as the newest
            for rid, r in sorted(res.run_dict.items(), key=lambda item: (item[1].pending_at, item[0]))
        ]

    def run_log(self, run_id: int) -> str:
        """The whole log of a *finished* run's ServerApp (what ``flwr log RUN_ID`` prints).

        Only for finished runs: the SuperLink ends the stream once it has sent everything of a
        finished run, but keeps it open (no read timeout) while the run is still going.
        """
        from flwr.proto.control_pb2 import StreamLogsRequest  # pylint: disable=E0611

        return "".join(res.log_output for res in self._client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)))

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest  # pylint: disable=E0611

        self._client.StopRun(StopRunRequest(run_id=run_id))


def flower_public_key_bytes(ssh_public_key_path: Path) -> bytes:
    """A SuperNode public key as the SuperLink stores it (PEM SubjectPublicKeyInfo, like flwr's public_key_to_bytes)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(Path(ssh_public_key_path).read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
