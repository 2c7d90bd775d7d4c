#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(scripts/setup.sh)
# The HTML report test renders the page in headless Chromium (Debian package `chromium`).
# Installed here when we can (root with apt-get, as on CI); elsewhere that one test says it skipped.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing chromium for the report rendering test" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) >&2 \
        || echo "test: could not install chromium; the rendering test will be skipped" >&2
fi
export WANDB_MODE=offline WANDB_SILENT=true
exec "$PY" -m pytest "$@"
