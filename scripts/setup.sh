#!/usr/bin/env bash
# Creates ./.venv with torch and the project installed (idempotent, quick when nothing changed).
#   scripts/setup.sh
# TORCH_SPEC picks the torch wheel (default torch==2.13.0; pinned so pip never pulls an
# unexpected multi-GB build). Set EM_PYTHON to use an existing interpreter instead of a venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${EM_PYTHON:-}" ]; then echo "$EM_PYTHON"; exit 0; fi
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC" >&2
    .venv/bin/pip install -q "$TORCH_SPEC" >&2
fi
# Reinstall the project only when its metadata changed (editable install: code edits need nothing).
stamp=.venv/.embedding-monitor-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing embedding-monitor and its dependencies" >&2
    .venv/bin/pip install -q -e ".[test]" >&2
    echo "$want" > "$stamp"
fi
echo "$PWD/.venv/bin/python"
