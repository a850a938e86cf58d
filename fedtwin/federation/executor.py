"""FedTwin's fork executor: runs ServerApp/ClientApp tasks for a Flower SuperLink/SuperNode.

Flower 1.41 starts a fresh ``flwr-clientapp`` (or ``flwr-serverapp``) *process* for every task,
i.e. for every message a SuperNode receives: 4 per SecAgg+ round. Each one re-imports Flower
(measured here: 2-4 s of CPU per process on a busy 2-core machine), which dominates the cost of a
round. Flower supports running tasks outside the SuperNode/SuperLink (``--isolation process``):
an external executor polls the Runtime API (``AcquireTask``) and starts the task process with
the token it got. This module is such an executor. It imports Flower (and optional modules)
once, then **forks** one child per task, which runs Flower's own ``run_clientapp`` /
``run_serverapp`` exactly as ``flwr-clientapp`` / ``flwr-serverapp`` would. Every message still
gets a fresh process (no state leaks from one message to the next), but the imports are already
done (copy-on-write), so a child starts in milliseconds.

Linux/POSIX only (``os.fork``). The parent is single-threaded when it forks. Children stay in
the executor's process group, watch the executor's PID (Flower's parent-process monitor) and are
killed with it. The AcquireTask call is authenticated with the SuperExec shared secret
(``--superexec-auth-secret-file``), as Flower's own ``flower-superexec`` does.

``python -m fedtwin.federation.executor --runtime-api-address 127.0.0.1:9094 --insecure
--task-type flwr-clientapp --superexec-auth-secret-file S [--watch-pid PID] [--preload MOD ...]``
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence

CLIENT_APP = "flwr-clientapp"
SERVER_APP = "flwr-serverapp"
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"

PRELOAD = {
    CLIENT_APP: [
        "numpy",
        "flwr.supernode.runtime.run_clientapp",
        "flwr.clientapp",
        "flwr.client",
        "flwr.client.mod",
    ],
    SERVER_APP: [
        "numpy",
        "flwr.superlink.runtime.run_serverapp",
        "flwr.serverapp",
        "flwr.server",
        "flwr.server.strategy",
        "flwr.server.workflow",
    ],
}

_stop = False


def _log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
    print(f"{stamp} [fedtwin-executor {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: object) -> None:
    global _stop
    _stop = True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reachable(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _reap(children: dict[int, tuple[str, float]]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        what, t0 = children.pop(pid, ("?", time.monotonic()))
        code = os.waitstatus_to_exitcode(status)
        _log(f"task process {pid} ({what}) exited with {code} after {time.monotonic() - t0:.2f} s")


def _run_child(task_type: str, token: str, args: argparse.Namespace, certificates: bytes | None) -> None:
    """In the forked child: run one task exactly as flwr-clientapp / flwr-serverapp would, then _exit."""
    code = 0
    prof = None
    if os.environ.get("FEDTWIN_EXECUTOR_PROFILE"):  # debugging aid: cProfile each task into that folder
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        sys.argv = [task_type]  # Flower derives its exit telemetry event from argv[0]
        if task_type == CLIENT_APP:
            from flwr.supernode.runtime.run_clientapp import run_clientapp

            run_clientapp(
                runtime_api_address=args.runtime_api_address,
                token=token,
                insecure=args.insecure,
                certificates=certificates,
                parent_pid=os.getppid(),
                runtime_dependency_install=False,
            )
        else:
            from queue import Queue

            from flwr.supercore.logger import mirror_output_to_queue, restore_output
            from flwr.superlink.runtime.run_serverapp import run_serverapp

            log_queue: Queue[str | None] = Queue()
            mirror_output_to_queue(log_queue)
            try:
                run_serverapp(
                    runtime_api_address=args.runtime_api_address,
                    log_queue=log_queue,
                    token=token,
                    insecure=args.insecure,
                    certificates=certificates,
                    parent_pid=os.getppid(),
                    runtime_dependency_install=False,
                )
            finally:
                restore_output()
    except SystemExit as exc:  # flwr_exit ends every task with sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, then leave the child
        traceback.print_exc()
        code = 1
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(os.path.join(os.environ["FEDTWIN_EXECUTOR_PROFILE"], f"{task_type}-{os.getpid()}.prof"))
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedtwin.federation.executor", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's (or SuperLink's) Runtime API, HOST:PORT")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (the SuperNode's loopback Runtime API)")
    tls.add_argument("--root-certificates", help="CA certificate that signed the Runtime API's TLS certificate")
    p.add_argument("--task-type", action="append", required=True, choices=[CLIENT_APP, SERVER_APP])
    p.add_argument("--superexec-auth-secret-file", help="the shared secret given to the SuperNode/SuperLink")
    p.add_argument("--task-poll-interval", type=float, default=0.05, help="seconds between AcquireTask calls while active")
    p.add_argument("--idle-task-poll-interval", type=float, default=1.0, help="seconds between AcquireTask calls when idle (Flower: 1 s)")
    p.add_argument("--poll-interval", type=float, default=0.0, help="cap (s) on the ServerApp grid's poll of the SuperLink (0: Flower's 3 s and backoffs)")
    p.add_argument("--local-poll-interval", type=float, help="cap (s) on the first object-pull retry (default: --poll-interval)")
    p.add_argument("--active-window", type=float, default=30.0, help="seconds after the last task before polling slows down")
    p.add_argument("--watch-pid", type=int, help="exit when this process (the SuperNode/SuperLink) is gone")
    p.add_argument("--preload", action="append", default=[], help="module to import once before forking (installed modules only)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not hasattr(os, "fork"):
        sys.exit("the FedTwin fork executor needs os.fork (Linux/POSIX); use executor = \"flower\" in consortium.toml")
    t0 = time.monotonic()
    for name in sorted({m for t in args.task_type for m in PRELOAD[t]}) + list(args.preload):
        importlib.import_module(name)
    from fedtwin.federation.polling import plain_timestamped_logs, speed_up

    plain_timestamped_logs()

    caps = speed_up("serverapp" if SERVER_APP in args.task_type else "clientapp", args.poll_interval, args.local_poll_interval)

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    certificates = None if args.insecure else open(args.root_certificates, "rb").read()
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if args.superexec_auth_secret_file:
        secret = open(args.superexec_auth_secret_file, "rb").read()
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK}))
    retry = make_simple_http_retry_invoker()
    retry.max_tries, retry.max_time = 3, 5.0  # our loop retries; never block long on a SuperNode that is gone
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=retry,
    )
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    request = AcquireTaskRequest(supported_task_types=list(args.task_type), agentapp_fab_hashes=[])
    # Wait (quietly) until the Runtime API accepts connections: "ready" means tasks can be taken.
    while not _stop and not _reachable(args.runtime_api_address):
        if args.watch_pid and not _pid_alive(args.watch_pid):
            _log(f"watched process {args.watch_pid} is gone before the Runtime API came up: stopping")
            return
        time.sleep(0.1)
    _log(
        f"ready in {time.monotonic() - t0:.1f} s: {','.join(args.task_type)} tasks from {args.runtime_api_address}, "
        f"task poll {args.task_poll_interval:g} s ({args.idle_task_poll_interval:g} s after {args.active_window:g} s idle); "
        f"in task processes: {'; '.join(caps) or 'Flower defaults'}"
    )
    children: dict[int, tuple[str, float]] = {}
    last_task = float("-inf")
    try:
        while not _stop:
            _reap(children)
            if args.watch_pid and not _pid_alive(args.watch_pid):
                _log(f"watched process {args.watch_pid} is gone: stopping")
                break
            try:
                res = client.AcquireTask(request)
            except Exception as exc:  # noqa: BLE001 - the SuperNode may be restarting; keep polling
                if _stop:
                    break
                _log(f"AcquireTask failed: {exc!r}")
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                task_type = res.task.type
                if task_type not in args.task_type:
                    _log(f"ignoring task {res.task.task_id} of unsupported type {task_type!r}")
                else:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        _run_child(task_type, res.token, args, certificates)
                    last_task = time.monotonic()
                    children[pid] = (f"{task_type} task {res.task.task_id} run {res.task.run_id}", last_task)
                    _log(f"started task process {pid} for {children[pid][0]}")
                    continue  # look for the next task at once
            active = time.monotonic() - last_task < args.active_window or bool(children)
            time.sleep(args.task_poll_interval if active else max(args.task_poll_interval, args.idle_task_poll_interval))
    finally:
        client.close()
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while children and time.monotonic() < deadline:
            _reap(children)
            time.sleep(0.05)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _log("stopped")


if __name__ == "__main__":
    main()
