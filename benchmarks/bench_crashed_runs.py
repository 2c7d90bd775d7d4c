"""Benchmark: a long-lived daemon meets many crashed trainers (SIGKILL: OOM kill, preemption).

Run:  .venv/bin/python benchmarks/bench_crashed_runs.py [--runs 100 --rows 2000 --cols 256] [--repo DIR]

Starts a real daemon (subprocess, code from --repo, default this checkout) and then, one after the
other, `--runs` short-lived publisher processes: each says hello, sends one snapshot through shared
memory (as a trainer on the same host does), waits until the daemon has copied it out, and SIGKILLs
itself, so it never sends `end` and never unlinks its segment. Printed: the daemon's RSS before and
after, the shared-memory segments the dead publishers left, how many runs the daemon closed, and
whether one more (live) run is still served. With `--repo` pointing at an older checkout the same
script measures the "before" figures (a daemon without `--run-timeout` gets none).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon_driver import free_port, rss_mib, start_daemon, wait  # this folder's helpers

ROOT = Path(__file__).resolve().parent.parent


def _crashed_trainer(endpoint: str, run: str, rows: int, cols: int) -> None:
    """Child body: hello, one shared-memory snapshot, wait for the daemon to copy it, SIGKILL self."""
    import numpy as np
    import zmq

    from protocol import ShmWriter, encode_hello, encode_snapshot

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    pid, host = os.getpid(), socket.gethostname()
    sock.send_multipart(encode_hello(run=run, seq=0, pid=pid, host=host, publisher=f"{host}/{pid}/bench"))
    writer = ShmWriter(1)
    nbytes = rows * cols * 4
    slot = writer.acquire(nbytes)
    np.frombuffer(slot.payload(), dtype=np.float32)[:] = np.random.default_rng(len(run)).standard_normal(rows * cols)
    ref = writer.commit(slot)
    sock.send_multipart(encode_snapshot(run=run, iter=10, seq=1, name="wte", dtype="float32", shape=[rows, cols],
                                        shm=ref, publisher=f"{host}/{pid}/bench"))
    deadline = time.monotonic() + 20
    while writer.busy() and time.monotonic() < deadline:  # the daemon releases the slot once copied out
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)


def main() -> int:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--cols", type=int, default=256)
    ap.add_argument("--run-timeout", type=float, default=3.0, help="passed to the daemon when it knows the option")
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose daemon and protocol to run")
    args = ap.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled")
    helptext = subprocess.run([sys.executable, "-m", "analysis_daemon", "--help"], env=env, capture_output=True,
                              text=True, cwd=repo).stdout
    liveness = "--run-timeout" in helptext
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        daemon, _, err = start_daemon(Path(tmp), env, endpoint, "--no-wandb", "--no-console", "--no-extras",
                                      *(["--run-timeout", str(args.run_timeout)] if liveness else []))
        try:
            rss0 = rss_mib(daemon.pid)
            pids = []
            series = []  # RSS after every quarter of the runs: a plateau, or growth per run?
            t0 = time.monotonic()
            for i in range(args.runs):
                pid = os.fork()
                if pid == 0:
                    try:
                        _crashed_trainer(endpoint, f"crash-{i}", args.rows, args.cols)
                    finally:
                        os._exit(1)
                os.waitpid(pid, 0)
                pids.append(pid)
                if (i + 1) % max(1, args.runs // 4) == 0:
                    series.append((i + 1, round(rss_mib(daemon.pid))))
            spawn_s = time.monotonic() - t0
            if liveness:  # every run closed by the liveness check (or the time it takes, at most)
                wait(lambda: err.read_text().count(": closed") >= args.runs, 60 + args.runs, "the runs to close")
            else:
                time.sleep(args.run_timeout + 2)
            time.sleep(1.0)
            rss1 = rss_mib(daemon.pid)
            left = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"emon-{p}-") for p in pids)]
            log = err.read_text()
            # One more trainer, alive: is it still served?
            import zmq
            from protocol import encode_snapshot
            ctx = zmq.Context()
            push = ctx.socket(zmq.PUSH)
            push.connect(endpoint)
            import numpy as np
            payload = np.random.default_rng(0).standard_normal(64 * 8).astype(np.float32).tobytes()
            push.send_multipart(encode_snapshot(run="alive", iter=1, seq=0, name="wte", dtype="float32",
                                                shape=[64, 8], payload=payload))
            results = Path(tmp, "runs", "alive", "analysis.jsonl")
            try:
                wait(lambda: results.exists() and results.read_text().endswith("\n"), 30, "the live run's result")
                served = "yes"
            except TimeoutError:
                served = "NO (" + next((ln.split(" WARNING ")[-1] for ln in reversed(err.read_text().splitlines())
                                        if "alive" in ln), "no result") + ")"
            push.close(0)
            ctx.term()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    snap_mib = args.rows * args.cols * 4 / 2**20
    print(f"daemon from {repo} ({'with' if liveness else 'without'} --run-timeout {args.run_timeout:g})")
    print(f"{args.runs} trainers SIGKILLed after one {args.rows}x{args.cols} fp32 snapshot ({snap_mib:.1f} MiB) "
          f"each, spawned in {spawn_s:.1f} s")
    print(f"daemon RSS: {rss0:.0f} MiB before, {rss1:.0f} MiB after ({rss1 - rss0:+.0f} MiB); "
          "during: " + ", ".join(f"{n} runs {r} MiB" for n, r in series))
    print(f"runs closed by the daemon: {log.count(': closed')}; refused as too many open: "
          f"{log.count('runs are open already')}")
    print(f"shared-memory segments left by the dead trainers: {len(left)}")
    print(f"a new run served afterwards: {served}")
    print(json.dumps({"rss_before_mib": round(rss0), "rss_after_mib": round(rss1), "segments_left": len(left),
                      "closed": log.count(": closed"), "new_run_served": served == "yes"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
