"""Replace a file all at once or not at all: checkpoints, round records, allow-lists.

A temp file in the same folder is written, flushed and fsynced, then ``os.replace``d over the
target (atomic on POSIX), and the folder is fsynced so the rename survives a crash. A reader sees
the old file or the new one, never half of one; a failed write leaves no temp file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, mode: int | None = None) -> Path:
    """Write ``path`` through ``write(binary file)``; ``mode`` (default: the old file's, else 0644)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = p.stat().st_mode & 0o777 if p.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
