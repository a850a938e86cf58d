#!/usr/bin/env bash
# Sets everything up (virtualenv, dependencies) and runs the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "${FEDTWIN_VENV:-$root/.venv}/bin/python" -m pytest "$@"
