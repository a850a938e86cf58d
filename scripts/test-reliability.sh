#!/usr/bin/env bash
# Sets everything up (virtualenv, dependencies) and runs the reliability suite: faults, misuse and
# load on real processes on loopback (tests/reliability/, docs/reliability.md). Slow: CI runs it
# after scripts/test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "${FEDTWIN_VENV:-$root/.venv}/bin/python" -m pytest tests/reliability "$@"
