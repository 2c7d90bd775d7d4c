"""File-system names derived from run names (results and state directories)."""
from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_PLAIN = 100  # longer names are shortened: file names have a 255-byte limit


def run_dirname(run: str) -> str:
    """A directory name for `run`: the name itself when it is path-safe, else a sanitised name + hash.

    Run names come from the network; this keeps them from escaping the results directory
    ("../x", "/etc", "a/b") or the file-name length limit, while leaving ordinary names ("my-run", "gpt2_124M") readable as is.
    """
    if run and len(run) <= _MAX_PLAIN and _SAFE.search(run) is None and not run.startswith("."):
        return run
    digest = hashlib.sha256(run.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    cleaned = _SAFE.sub("_", run).lstrip(".")[:60] or "run"
    return f"{cleaned}-{digest}"
