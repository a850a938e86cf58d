"""Writing a training run's outputs all at once: a run that fails leaves no output folder.

Files are written into a hidden sibling folder which is renamed into place at the end, so a
reader never sees a model without its config and metrics.
"""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fedtwin.errors import FedTwinError


def refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedTwinError(f"output folder {out} already exists and is not empty", "choose a new --out folder or remove that one")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``out``, on error it is removed."""
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            out.rmdir()  # empty, checked above
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
