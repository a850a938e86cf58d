#!/usr/bin/env bash
# Sets everything up (virtualenv, dependencies) and runs the test suite (tests/, without the
# process-level fault, attack and load suite in tests/reliability/: scripts/test-reliability.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "${FEDTWIN_VENV:-$root/.venv}/bin/python" -m pytest --ignore=tests/reliability "$@"
