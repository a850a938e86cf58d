"""The FedTwin code version a site approves and a manifest carries: package version + git commit.

``0.1.0`` from an installed package; ``0.1.0+g1a2b3c4d5e6f`` when the code runs from a git checkout
(the commit of HEAD, with ``.dirty`` when tracked files differ from it), so that two sites that run
different edits of the same release do not claim the same version.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from fedtwin import __version__

_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The version string of the code running in this process (cached: git is asked once)."""
    if not (_ROOT / ".git").exists():
        return __version__
    try:
        head = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_ROOT), "diff", "--quiet", "HEAD", "--", "fedtwin", "site_agent", "coordinator"],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{head}{'.dirty' if dirty else ''}" if head else __version__
