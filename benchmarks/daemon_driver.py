"""What the benchmarks that drive a real daemon subprocess share: a free port, the daemon's start, waits, its RSS.

Imported by the scripts beside it (run as `python benchmarks/bench_x.py`, which puts this folder on sys.path).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB (OSError once the process is gone)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy, which is returned; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


def start_daemon(tmp: Path, env: dict[str, str], endpoint: str, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """`python -m analysis_daemon` on `endpoint` (results in tmp/runs, one thread, stdout and stderr in tmp/d.out
    and tmp/d.err), once it has printed its ready line: (process, out path, err path)."""
    out, err = Path(tmp, "d.out"), Path(tmp, "d.err")
    cmd = [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", f"{tmp}/runs",
           "--threads", "1", "--nice", "0", *args]
    with open(out, "w") as o, open(err, "w") as e:
        daemon = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=tmp)
    try:
        wait(lambda: "ready" in out.read_text(), 120, "the daemon's ready line")
    except BaseException:
        daemon.kill()
        daemon.wait(30)
        raise
    return daemon, out, err
