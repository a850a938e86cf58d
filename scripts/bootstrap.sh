#!/usr/bin/env bash
# Creates (or reuses) .venv and installs FedTwin with everything it needs. Idempotent: a stamp
# file records the hash of pyproject.toml, so a second run with nothing changed takes a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDTWIN_VENV:-$root/.venv}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating virtualenv $venv" >&2
    "$py" -m venv "$venv"
fi
stamp="$venv/.fedtwin-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[bootstrap] installing dependencies into $venv" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first, so that pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -e "$root[dev]"
    echo "$want" > "$stamp"
fi
