"""A legitimate trainer during a connection flood by another local user (issue 21 item 1).

Run (as root: the attacker runs as uid 65534 through setpriv):
    .venv/bin/python benchmarks/bench_connection_flood.py [--repo DIR] [--snapshots 10] [--peers 300]

`--repo` runs the daemon of another checkout (e.g. an older commit in a git worktree) for a before/after
comparison. Scenarios (the daemon's default timeouts): no attack; --peers (400) TCP connections that
never send a ZMTP greeting, reopened when dropped; as many ZeroMQ peers that greet and fall silent, reopened when dropped. Printed per scenario: the
legitimate trainer's snapshots served (a result written within 30 s of the publish) of those published,
the median publish-to-result seconds, and the daemon's `connections:` line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario(repo: Path, attack: str | None, snapshots: int, peers: int, work: Path) -> dict:
    """Run one daemon, the attack (if any) and a trainer; the figures of that run."""
    from trainer_hook import EmbeddingPublisher

    port = _port()
    endpoint = f"tcp://127.0.0.1:{port}"
    results = work / "runs"
    err = work / "daemon.err"
    daemon = subprocess.Popen([sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--threads", "1",
                               "--nice", "0", "--no-wandb", "--no-console", "--no-extras", "--results-dir",
                               str(results), "--reject-log-interval", "60"],  # default timeouts
                              stdout=subprocess.PIPE, stderr=open(err, "w"), text=True, cwd=repo,
                              env=dict(os.environ, PYTHONPATH=str(repo), OMP_WAIT_POLICY="PASSIVE"))
    attacker = None
    try:
        assert "ready" in daemon.stdout.readline()
        if attack:
            script = work / "attacker.py"
            shutil.copy(ROOT / "tests" / "attacker.py", script)
            os.chmod(work, 0o755)
            script.chmod(0o644)
            attacker = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                                         str(script), str(port), attack, str(peers), "120"],
                                        stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
            json.loads(attacker.stdout.readline())  # holding its connections
        pub = EmbeddingPublisher(endpoint, run="legit", shared_memory=False, connect_grace_s=10.0)
        served, waits = 0, []
        path = results / "legit" / "analysis.jsonl"
        for i in range(snapshots):
            t0 = time.monotonic()
            while not pub.publish(torch.randn(300, 16), 10 * (i + 1)) and time.monotonic() - t0 < 30:
                time.sleep(0.05)
            while time.monotonic() - t0 < 30:
                if path.exists() and len(path.read_text().splitlines()) > served:
                    served += 1
                    waits.append(time.monotonic() - t0)
                    break
                time.sleep(0.02)
        pub.close()
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait(10)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    line = next((ln.split("connections: ", 1)[1] for ln in err.read_text().splitlines() if "connections: " in ln), "?")
    return {"served": served, "published": snapshots,
            "median_s": round(statistics.median(waits), 3) if waits else None, "gate": line}


def main() -> int:
    """Entry point: print one line per scenario."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose daemon runs (default: this one)")
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument("--peers", type=int, default=400)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        print("bench_connection_flood: needs root and setpriv (the attacker runs as uid 65534); nothing measured")
        return 0
    for attack in (None, "raw-flood", "idle-flood"):
        with tempfile.TemporaryDirectory(prefix="emon-flood-") as work:
            figures = scenario(args.repo.resolve(), attack, args.snapshots, args.peers, Path(work))
        print(f"{attack or 'no attack':>10}: legit served {figures['served']}/{figures['published']}, median "
              f"publish->result {figures['median_s']} s; daemon {figures['gate']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
