"""Benchmark of the daemon's receive loop: does it keep receiving while a long analysis runs?

Run:  .venv/bin/python benchmarks/bench_daemon.py [--vocab 16384 --dim 768 --probes 10 --threads 1]

Starts a real daemon (subprocess), publishes one large snapshot (run `big`) through the trainer hook,
and while that is being analysed publishes small probe snapshots, each under a run of its own so each
one is analysed (and gets a result line) instead of being skipped. The receive latency of a probe is
the daemon's `received_at` minus the publisher's `sent_at` (same host, same clock). Printed: the large
analysis time, and the probes' receive latencies during it (median, max) next to the same figures
with the daemon idle.
"""
from __future__ import annotations

import argparse
import json
import os
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer_hook import EmbeddingPublisher  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def _results(results_dir: Path, run: str) -> list[dict]:
    path = results_dir / run / "analysis.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _probe(endpoint: str, results_dir: Path, run: str) -> float:
    pub = EmbeddingPublisher(endpoint, run=run)
    _wait(lambda: pub.connected, 30, f"{run} to connect")
    assert pub.publish(torch.randn(64, 8), 1)
    (r,) = _wait(lambda: _results(results_dir, run), 600, f"{run}'s result")
    pub.close()
    return r["received_at"] - r["sent_at"]


def main() -> None:
    """Print the figures described in the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=16384, help="rows of the large snapshot")
    ap.add_argument("--dim", type=int, default=768, help="columns of the large snapshot")
    ap.add_argument("--probes", type=int, default=10, help="small snapshots sent during the analysis")
    ap.add_argument("--threads", type=int, default=1, help="daemon --threads")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    endpoint = f"tcp://127.0.0.1:{_port()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled")
    results_dir = tmp / "runs"
    cmd = [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", str(results_dir),
           "--threads", str(args.threads), "--no-console", "--no-wandb", "--nice", "0"]
    with open(tmp / "out", "w") as out, open(tmp / "err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    try:
        _wait(lambda: "ready" in (tmp / "out").read_text(), 60, "the ready line")
        idle = [_probe(endpoint, results_dir, f"idle-{i}") for i in range(3)]

        big = EmbeddingPublisher(endpoint, run="big")
        _wait(lambda: big.connected, 30, "big to connect")
        w = torch.randn(args.vocab, args.dim)
        t0 = time.monotonic()
        assert big.publish(w, 1)
        _wait(lambda: "run big iter 1: analysing" in (tmp / "err").read_text(), 60, "the analysis to start")
        busy = []
        for i in range(args.probes):
            busy.append(_probe_async(endpoint, f"busy-{i}"))
            time.sleep(0.05)
        (rb,) = _wait(lambda: _results(results_dir, "big"), 3600, "the large result")
        wall = time.monotonic() - t0
        lat = []
        for i, pub in enumerate(busy):
            (r,) = _wait(lambda: _results(results_dir, f"busy-{i}"), 600, f"busy-{i}")
            pub.close()
            lat.append(r["received_at"] - r["sent_at"])
            during = r["received_at"] < rb["finished_at"]
            assert during, "probe arrived after the large analysis finished: use a larger --vocab"
        big.close()
        print(f"daemon --threads {args.threads}, large snapshot {args.vocab}x{args.dim} float32 "
              f"({args.vocab * args.dim * 4 / 2**20:.0f} MiB)")
        print(f"  large analysis: {rb['seconds']:.2f} s (drift {rb['drift_seconds']:.2f} s, geometry "
              f"{rb['geometry_seconds']:.2f} s); publish -> result {wall:.2f} s")
        print(f"  receive latency, daemon idle:      median {1e3 * statistics.median(idle):7.2f} ms, "
              f"max {1e3 * max(idle):7.2f} ms ({len(idle)} probes)")
        print(f"  receive latency, during analysis:  median {1e3 * statistics.median(lat):7.2f} ms, "
              f"max {1e3 * max(lat):7.2f} ms ({len(lat)} probes, all received before it finished)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _probe_async(endpoint: str, run: str) -> EmbeddingPublisher:
    pub = EmbeddingPublisher(endpoint, run=run)
    _wait(lambda: pub.connected, 30, f"{run} to connect")
    assert pub.publish(torch.randn(64, 8), 1)
    return pub


if __name__ == "__main__":
    main()
