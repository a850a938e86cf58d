#!/usr/bin/env bash
# Sets everything up (virtualenv, dependencies) and runs FedTwin's main job: `fedtwin demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "${FEDTWIN_VENV:-$root/.venv}/bin/fedtwin" demo "$@"
