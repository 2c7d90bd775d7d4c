"""Daemon and trainer on two hosts: two network namespaces joined by a veth pair, CurveZMQ over tcp.

Both sides are started through launch.sh's `daemon` and `trainer` modes, as a user would on two machines.
Needs root and `ip netns` (CI runs as root); elsewhere the tests skip with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import follow

ROOT = Path(__file__).resolve().parent.parent

DAEMON_HOST, TRAINER_HOST = "10.213.7.1", "10.213.7.2"


def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    # Root in a container may still lack CAP_SYS_ADMIN: try the real thing once.
    name = f"em-probe{os.getpid() % 100000}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None if probe.returncode == 0 else f"ip netns unusable here: {probe.stderr.strip()}"


_NETNS_PROBLEM = _netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_NETNS_PROBLEM is not None, reason=str(_NETNS_PROBLEM))]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two namespaces, 'daemon' and 'trainer', linked by a veth pair; removed afterwards."""
    tag = f"{os.getpid() % 100000}"
    a, b = f"em-d{tag}", f"em-t{tag}"
    va, vb = f"emd{tag}", f"emt{tag}"
    _ip("netns", "add", a)
    _ip("netns", "add", b)
    try:
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        _ip("-n", a, "addr", "add", f"{DAEMON_HOST}/24", "dev", va)
        _ip("-n", b, "addr", "add", f"{TRAINER_HOST}/24", "dev", vb)
        for ns, dev in ((a, va), (b, vb)):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    proc.kill()
    raise AssertionError(f"no line with {needle!r} within {timeout}s; stdout so far:\n{''.join(seen)}")


def test_trainer_and_daemon_on_two_hosts_with_curve_keys(two_hosts, tmp_path, subprocess_env):
    daemon_ns, trainer_ns = two_hosts
    keys = tmp_path / "keys"
    env = dict(subprocess_env, EM_PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "runs"))
    subprocess.run([str(ROOT / "launch.sh"), "keygen", str(keys)], check=True, env=env, capture_output=True,
                   timeout=60)
    # An intruder with a well-formed keypair that the daemon was never told about.
    subprocess.run([sys.executable, "-m", "protocol.keygen", str(tmp_path / "intruder"), "--name", "intruder"],
                   check=True, env=env, capture_output=True, timeout=60)

    endpoint = f"tcp://{DAEMON_HOST}:5599"
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", daemon_ns, str(ROOT / "launch.sh"), "daemon", "--listen", endpoint,
         "--keys", str(keys), "--exit-on-end", "--no-wandb", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(env, RUN="two-host-daemon"))
    try:
        _wait_for_line(daemon, "ready", timeout=60)

        intruder = subprocess.run(
            ["ip", "netns", "exec", trainer_ns, sys.executable, "-c",
             "import torch, time\n"
             "from trainer_hook import EmbeddingPublisher\n"
             f"p = EmbeddingPublisher({endpoint!r}, run='intruder', "
             f"curve_client_secret={str(tmp_path / 'intruder' / 'intruder.key_secret')!r}, "
             f"curve_server_public={str(keys / 'server.key')!r})\n"
             "for i in range(5):\n"
             "    p.publish(torch.randn(64, 16), i)\n"
             "    time.sleep(0.2)\n"
             "p.close(timeout=1.0)\n"],
            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert intruder.returncode == 0, intruder.stderr

        trainer = subprocess.run(
            ["ip", "netns", "exec", trainer_ns, str(ROOT / "launch.sh"), "trainer", "--connect", endpoint,
             "--keys", str(keys), "--", "--max_iters=20", "--eval_interval=10", "--eval_iters=2",
             "--wandb_log=False", f"--out_dir={tmp_path / 'out'}"],
            env=dict(env, RUN="two-host"), capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert trainer.returncode == 0, trainer.stderr[-3000:]
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    results = tmp_path / "runs" / "two-host" / "analysis.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 10, 20]
    assert records[0]["drift"] is None
    assert all(r["drift"] is not None for r in records[1:])
    # The intruder's snapshots never got past the CURVE handshake.
    assert not (tmp_path / "runs" / "intruder").exists()

    # On the daemon host, `tail RUN` (or `tail HOST`, the trainer's host name) follows the daemon's log
    # filtered to that run: its log lines and its result blocks with the metrics.
    block = "--- ASYNC ANALYSIS RESULTS FOR ITERATION 20 (run two-host) ---"
    for name in ("two-host", socket.gethostname()):
        tail = follow([str(ROOT / "launch.sh"), "tail", name], [block, "[Drift] vs iter 10", "run two-host: end"],
                      env=env, cwd=ROOT)
        assert block in tail.stdout, tail.stderr
        assert "[Drift] vs iter 10" in tail.stdout and "run two-host: end" in tail.stdout
        assert "ready on" not in tail.stdout  # other lines of the daemon's log are left out
