#!/usr/bin/env bash
# Builds the manual (docs/, mkdocs.yml) strictly into site/: a broken link, a page missing from the nav or
# an included snippet that does not exist fails the build. CI runs it after the tests (.ci/run).
#   scripts/docs.sh            build into site/ (open site/index.html)
#   scripts/docs.sh serve      live preview on http://127.0.0.1:8000
# The doc tools are pinned in docs/requirements.txt and installed into .venv beside the pinned torch.
set -euo pipefail
export NO_MKDOCS_2_WARNING=1  # Material's end-of-life notice, printed on every build
cd "$(dirname "$0")/.."
PY=$(scripts/setup.sh)
stamp=.venv/.docs-requirements-stamp
want=$(sha256sum docs/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null; then
    echo "docs: installing the doc tools (docs/requirements.txt)" >&2
    "$PY" -m pip install -q -c <(echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')") \
        -r docs/requirements.txt >&2
    [ -d .venv ] && echo "$want" > "$stamp"
fi
if [ "${1:-}" = serve ]; then
    exec "$PY" -m mkdocs serve
fi
exec "$PY" -m mkdocs build --strict --site-dir site
