"""Several runs publishing at once into one real daemon: throughput and latency, in-process vs Ray tasks.

Run:  .venv/bin/python benchmarks/bench_executors.py [--runs 4 --snapshots 5 --vocab 4000 --dim 128]
      [--interval 0.2] [--threads 1] [--max-concurrent 2] [--executors inprocess,ray]

Each executor gets a fresh daemon (`--exit-on-end --no-wandb --no-console`; Ray: a local instance the daemon
starts, or RAY_ADDRESS) and the same publishers: `--runs` EmbeddingPublishers in threads, each publishing
`--snapshots` snapshots `--interval` s apart. Timing starts at the first publish after the ready line (Ray's
start-up is reported apart). Latency = a record's finished_at - sent_at (publish to result, wall clock);
throughput = analysed snapshots / (last finished_at - first sent_at).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer_hook import EmbeddingPublisher  # noqa: E402


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(executor: str, results: Path, endpoint: str, args: argparse.Namespace) -> tuple[subprocess.Popen, float]:
    """The daemon child and its start-up time (to the ready line)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", str(results),
           "--exit-on-end", "--no-wandb", "--no-console", "--threads", str(args.threads), "--nice", "0",
           "--executor", executor, "--log-level", "WARNING"]
    if executor == "ray":
        cmd += ["--max-concurrent", str(args.max_concurrent)]
    out = open(results.parent / f"{executor}.out", "w")
    err = open(results.parent / f"{executor}.err", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    while "ready" not in (results.parent / f"{executor}.out").read_text():
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            raise SystemExit(f"daemon ({executor}) did not start:\n{(results.parent / f'{executor}.err').read_text()}")
        time.sleep(0.05)
    return proc, time.monotonic() - t0


def publish_all(endpoint: str, args: argparse.Namespace) -> int:
    """Every run publishes its snapshots from its own thread; the number dropped by the publishers."""
    dropped = [0]

    def one(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        w = torch.randn(args.vocab, args.dim, generator=g)
        pub = EmbeddingPublisher(endpoint, run=f"run{i}")
        for s in range(args.snapshots):
            w = w + 0.05 * torch.randn(args.vocab, args.dim, generator=g)
            if not pub.publish(w, 100 * s):
                dropped[0] += 1
            time.sleep(args.interval)
        pub.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dropped[0]


def measure(executor: str, args: argparse.Namespace, tmp: Path) -> dict:
    results = tmp / executor / "runs"
    results.mkdir(parents=True)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc, startup = start_daemon(executor, results, endpoint, args)
    dropped = publish_all(endpoint, args)
    code = proc.wait(600)
    records = [json.loads(line) for f in results.glob("*/analysis.jsonl") for line in f.read_text().splitlines()]
    if code != 0 or not records:
        raise SystemExit(f"daemon ({executor}) exit {code}, {len(records)} records:\n"
                         f"{(tmp / executor / f'{executor}.err').read_text()[-3000:]}")
    lat = sorted(r["finished_at"] - r["sent_at"] for r in records)
    span = max(r["finished_at"] for r in records) - min(r["sent_at"] for r in records)
    return {"executor": executor, "startup_s": startup, "records": len(records), "dropped": dropped,
            "throughput": len(records) / span, "span_s": span, "lat_p50": statistics.median(lat),
            "lat_p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "lat_max": lat[-1],
            "analysis_s": statistics.median(r["seconds"] for r in records)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--snapshots", type=int, default=5)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--executors", default="inprocess,ray")
    args = p.parse_args()
    print(f"{args.runs} runs x {args.snapshots} snapshots of {args.vocab} x {args.dim} float32, "
          f"{args.interval} s apart; daemon --threads {args.threads}; {os.cpu_count()} CPU(s) on this host")
    print(f"{'executor':<10} {'start-up':>9} {'records':>8} {'dropped':>8} {'snap/s':>7} {'span':>7} "
          f"{'lat p50':>8} {'lat p90':>8} {'lat max':>8} {'analysis':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for executor in args.executors.split(","):
            m = measure(executor, args, Path(tmp))
            print(f"{m['executor']:<10} {m['startup_s']:>8.1f}s {m['records']:>8} {m['dropped']:>8} "
                  f"{m['throughput']:>7.2f} {m['span_s']:>6.1f}s {m['lat_p50']:>7.2f}s {m['lat_p90']:>7.2f}s "
                  f"{m['lat_max']:>7.2f}s {m['analysis_s']:>8.2f}s")


if __name__ == "__main__":
    main()
