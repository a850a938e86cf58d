"""Starting, tracking and stopping the consortium's processes (POSIX).

Every process is started in its own session (so its own process group): stopping it sends
SIGTERM to the whole group (the process and whatever it forked or spawned: ClientApp/ServerApp
processes, Flower's SuperExec), waits, then SIGKILLs the group. Each process gets
``FEDTWIN_CONSORTIUM=<folder>`` in its environment, inherited by everything it starts; after the
groups are gone, :func:`stray_processes` finds anything that escaped its group (Flower starts its
SuperLink-side SuperExec with ``start_new_session=True``) by that tag or by a command line that
mentions the folder, and it is stopped too.

A record ``run/<name>.json`` (pid, process group, start time from /proc, command, log) and a pid
file ``run/<name>.pid`` are written for each process; the start time guards against a recycled
pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedtwin.federation.commands import ProcessSpec
from coordinator.consortium.layout import Layout

TAG = "FEDTWIN_CONSORTIUM"

# Popen objects of processes started by this Python process, so that they are reaped (no zombies
# when `up` and `down` run in the same interpreter, e.g. in tests).
_children: dict[int, subprocess.Popen] = {}
_exit_codes: dict[int, int] = {}


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    pgid: int
    start_ticks: int
    argv: list[str]
    log: str
    started_at: float
    log_offset: int = 0  # size of the log file before this start: what this run wrote comes after

    def alive(self) -> bool:
        _reap()
        return _start_ticks(self.pid) == self.start_ticks


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22); None if gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _reap() -> None:
    for pid, proc in list(_children.items()):
        code = proc.poll()
        if code is not None:
            _exit_codes[pid] = code
            _children.pop(pid, None)


def start(layout: Layout, spec: ProcessSpec, base_env: dict[str, str] | None = None) -> ProcessRecord:
    """Start ``spec`` in a new session, stdout+stderr appended to ``logs/<name>.log``; record it."""
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = layout.log(spec.name)
    env = dict(os.environ if base_env is None else base_env)
    env.update(spec.env)
    env[TAG] = str(layout.root)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}: {spec.shell()}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=layout.root,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    ticks = None
    for _ in range(50):
        ticks = _start_ticks(proc.pid)
        if ticks is not None or proc.poll() is not None:
            break
        time.sleep(0.01)
    rec = ProcessRecord(
        name=spec.name, pid=proc.pid, pgid=proc.pid, start_ticks=ticks or -1, argv=spec.argv, log=str(log_path), started_at=time.time(),
        log_offset=offset,
    )
    layout.record(spec.name).write_text(json.dumps(asdict(rec), indent=2))
    layout.pidfile(spec.name).write_text(f"{proc.pid}\n")
    return rec


def exit_code(rec: ProcessRecord) -> int | None:
    """The exit code if this interpreter started the process and it has ended, else None."""
    _reap()
    return _exit_codes.get(rec.pid)


def records(layout: Layout) -> list[ProcessRecord]:
    out = []
    if not layout.run_dir.is_dir():
        return out
    for p in sorted(layout.run_dir.glob("*.json")):
        try:
            out.append(ProcessRecord(**json.loads(p.read_text())))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


def forget(layout: Layout, name: str) -> None:
    layout.record(name).unlink(missing_ok=True)
    layout.pidfile(name).unlink(missing_ok=True)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def _group_alive(pgid: int) -> bool:
    _reap()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # only zombies left in the group count as gone
    return any(_start_ticks(pid) is not None for pid in _pids_in_group(pgid))


def _pids_in_group(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def stop(rec: ProcessRecord, timeout: float = 10.0) -> str:
    """SIGTERM the record's process group, SIGKILL it after ``timeout`` s; return what happened."""
    if rec.start_ticks >= 0 and _start_ticks(rec.pid) not in (None, rec.start_ticks):
        return "gone (pid reused)"
    if not _group_alive(rec.pgid):
        return "not running"
    _signal_group(rec.pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(rec.pgid):
            _wait_child(rec.pid)
            return "stopped (SIGTERM)"
        time.sleep(0.05)
    _signal_group(rec.pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(rec.pgid):
        time.sleep(0.05)
    _wait_child(rec.pid)
    return "killed (SIGKILL after timeout)"


def _wait_child(pid: int) -> None:
    proc = _children.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, PermissionError):
            break
        pid = int(raw[raw.rindex(")") + 2 :].split()[1])
    return out


def _pgid(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[2])


def stray_processes(root: Path, *, by_cmdline: bool = False, exclude_groups: frozenset[int] = frozenset()) -> list[tuple[int, str]]:
    """Live processes tagged ``FEDTWIN_CONSORTIUM=root`` in their environment (inherited by
    everything the consortium started); with ``by_cmdline`` also those whose command line
    mentions ``root``. This process and its ancestors (e.g. the shell running ``down DIR``)
    are never listed, nor members of ``exclude_groups``."""
    skip = _ancestors()
    tag = f"{TAG}={root}".encode()
    needle = str(root).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        if exclude_groups and _pgid(pid) in exclude_groups:
            continue
        cmdline = _read(entry / "cmdline")
        if not cmdline:  # kernel thread or zombie
            continue
        if tag in _read(entry / "environ").split(b"\0") or (by_cmdline and needle in cmdline):
            if _start_ticks(pid) is not None:
                out.append((pid, cmdline.replace(b"\0", b" ").decode(errors="replace").strip()))
    return out


def kill_strays(root: Path, timeout: float = 5.0, exclude_groups: frozenset[int] = frozenset()) -> list[tuple[int, str]]:
    """SIGTERM, then SIGKILL, every stray process of the consortium; return those found."""
    strays = stray_processes(root, exclude_groups=exclude_groups)
    for pid, _ in strays:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_start_ticks(p) is not None for p, _ in strays):
        time.sleep(0.05)
    for pid, _ in strays:
        if _start_ticks(pid) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _reap()
    return strays


def log_since_start(rec: ProcessRecord) -> str:
    """What the process wrote to its log since it was started."""
    try:
        with open(rec.log, "rb") as fh:
            fh.seek(rec.log_offset)
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log yet)"
    return "\n".join(text.splitlines()[-lines:])
