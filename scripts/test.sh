#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(scripts/setup.sh)
export WANDB_MODE=offline WANDB_SILENT=true
exec "$PY" -m pytest "$@"
