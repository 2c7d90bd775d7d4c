"""A full /dev/shm: both publish paths fall back to the socket, one line, nothing dropped (issue 21, item 12).

The trainer runs in a mount namespace of its own whose /dev/shm is a 16 kB tmpfs (the rest of the host,
the daemon included, keeps the real one), so creating a slot for a 25.6 kB snapshot fails with ENOSPC,
as on a host whose /dev/shm is full. The CPU path used to drop that snapshot; the CUDA path dropped
every snapshot with a traceback each (9 of 10). Both now go through `Sender.shm_slot`: one warning,
and this snapshot and every later one goes over the socket.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_daemon import env, start_daemon  # noqa: F401

pytestmark = pytest.mark.timeout(180)

_can_unshare = os.geteuid() == 0 and shutil.which("unshare") is not None
needs_root = pytest.mark.skipif(not _can_unshare, reason="a private small /dev/shm needs root (unshare --mount)")
HERE = Path(__file__).resolve().parent


@needs_root
@pytest.mark.parametrize("path", ["cpu", "cuda"])
def test_full_dev_shm_falls_back_to_the_socket(path: str, start_daemon, env: dict[str, str]) -> None:
    d = start_daemon("--no-wandb", "--no-console")
    run, n = f"full-shm-{path}", 10
    script = (f"mount -t tmpfs -o size=16k tmpfs /dev/shm && exec {sys.executable} {HERE / 'shm_full_publisher.py'} "
              f"{d.endpoint} {run} {d.results_dir / run / 'analysis.jsonl'} {path} {n}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=env, timeout=150)
    assert done.returncode == 0, done.stderr
    counters = json.loads(done.stdout.strip().splitlines()[-1])
    assert counters == {"published": n, "dropped": 0, "shm_enabled_at_end": False}, done.stderr
    results = d.wait_results(run, n)
    assert [r["iter"] for r in results] == [10 * (i + 1) for i in range(n)]
    assert all(r["drift"] is not None for r in results[1:])
    # One line says what happened; no traceback, no per-snapshot noise.
    warnings = [line for line in done.stderr.splitlines() if "shared memory failed" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    print(f"\n{path} path, /dev/shm full: {counters}; the one line: {warnings[0]}")
