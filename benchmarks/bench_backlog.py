"""Benchmark: a burst of snapshots faster than the daemon can analyse them (a slow, loaded analysis host).

Run:  .venv/bin/python benchmarks/bench_backlog.py [--snapshots 12 --rows 4000 --cols 128] [--repo DIR]

Starts a real daemon (code from --repo, default this checkout; one analysis thread), sends a burst of
snapshots of one run back to back, then `end`, and waits for the daemon to exit (--exit-on-end).
Printed: how many were analysed and skipped, how late the last one was analysed, and the daemon's peak
RSS. With --repo pointing at an older checkout (newest-wins) the same script gives the "before" figures.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> int:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=12)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--cols", type=int, default=128)
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose daemon and protocol to run")
    args = ap.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))
    import numpy as np
    import zmq

    from protocol import encode_end, encode_snapshot

    env = dict(os.environ, PYTHONPATH=str(repo), OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"tcp://127.0.0.1:{_port()}"
        out, err = Path(tmp, "d.out"), Path(tmp, "d.err")
        cmd = [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", f"{tmp}/runs",
               "--threads", "1", "--nice", "0", "--no-wandb", "--no-console", "--exit-on-end"]
        with open(out, "w") as o, open(err, "w") as e:
            daemon = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=tmp)
        deadline = time.monotonic() + 120
        while "ready" not in out.read_text():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"daemon did not start:\n{err.read_text()}")
            time.sleep(0.02)
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(endpoint)
        rng = np.random.default_rng(0)
        w = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
        t0 = time.monotonic()
        for it in range(args.snapshots):
            w = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
            push.send_multipart(encode_snapshot(run="burst", iter=it, seq=it, name="wte", dtype="float32",
                                                shape=list(w.shape), payload=w.tobytes()))
        push.send_multipart(encode_end(run="burst", seq=args.snapshots, final_iter=args.snapshots - 1,
                                       published=args.snapshots, dropped=0))
        peak = 0.0
        while daemon.poll() is None:
            peak = max(peak, _rss_mib(daemon.pid))
            time.sleep(0.05)
        total_s = time.monotonic() - t0
        push.close()
        ctx.term()
        path = Path(tmp, "runs", "burst", "analysis.jsonl")
        recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    analysed = [r["iter"] for r in recs]
    skipped = sorted(i for r in recs for i in r.get("skipped_iters", []))
    snap_mib = args.rows * args.cols * 4 / 2**20
    print(f"daemon from {repo}; burst of {args.snapshots} snapshots {args.rows}x{args.cols} fp32 "
          f"({snap_mib:.1f} MiB each), one analysis thread")
    print(f"analysed {len(analysed)}: {analysed}")
    print(f"skipped {len(skipped)}: {skipped}")
    if recs:
        print(f"last result waited {recs[-1]['waited_seconds']:.1f} s; all done in {total_s:.1f} s; "
              f"analysis {sum(r['seconds'] for r in recs) / len(recs):.2f} s each")
    print(f"daemon peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
