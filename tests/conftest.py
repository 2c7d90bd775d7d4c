"""Fixtures shared by every test file: real sockets, real processes, nothing left behind."""
from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Property tests are reproducible by default: the `ci` profile derives every example from the test itself
# (derandomize), so a run on CI and a fresh clone try the same examples. `HYPOTHESIS_PROFILE=explore`
# draws new random examples on every run (and remembers failures in .hypothesis/): see docs/contributing.md.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests never talk to the W&B servers: offline mode writes the run files locally, and we read them back.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def follow(cmd: list[str], needles: list[str], *, env: dict[str, str], cwd: Path | None = None, timeout: float = 60.0,
           quiet: float = 0.5) -> subprocess.CompletedProcess:
    """Run a command that never ends by itself (`launch.sh tail` follows a file) until its stdout holds every
    one of `needles` and then nothing more for `quiet` seconds (or `timeout` passed), then stop it and its
    children (SIGTERM to its process group). Its stdout and stderr as text, as subprocess.run gives them."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out, deadline, last = b"", time.monotonic() + timeout, time.monotonic()
    try:
        while time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.05)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break  # it ended by itself
                out, last = out + chunk, time.monotonic()
            elif time.monotonic() - last >= quiet and all(n.encode() in out for n in needles):
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(cmd, proc.returncode, (out + rest).decode(errors="replace"),
                                       err.decode(errors="replace"))


@pytest.fixture
def tcp_endpoint() -> str:
    """A fresh loopback endpoint for one test."""
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def child_env(tmp: Path) -> dict[str, str]:
    """Environment for child processes: repo on the path, wandb offline into `tmp`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["WANDB_MODE"] = "offline"
    env["WANDB_SILENT"] = "true"
    env["WANDB_DIR"] = str(tmp)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for child processes: repo on the path, wandb offline into tmp_path."""
    return child_env(tmp_path)


@pytest.fixture(autouse=True)
def _seeded_randomness(request: pytest.FixtureRequest) -> None:
    """Every test starts torch, numpy and random from a seed of its own name: an unseeded torch.randn in a
    test draws the same numbers on every run, whatever ran before it."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
