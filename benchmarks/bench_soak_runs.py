"""Benchmark: a long-lived daemon serves many honest runs, one after the other; does it grow with them?

Run:  .venv/bin/python benchmarks/bench_soak_runs.py [--rounds 3 --runs 20 --vocab 50257] [--no-wandb] [--repo DIR]

Starts a real daemon (subprocess, code from --repo, default this checkout; W&B offline unless
--no-wandb) and then, per round, `--runs` trainer processes (real EmbeddingPublishers, two at a time):
each says hello with a GPT-2-sized vocabulary, W&B run info and a few kB of meta, publishes
`--snapshots` snapshots over shared memory, and ends. After each round (every run closed, its W&B run
finished) the daemon's RSS is printed: it must stay flat, not grow by the runs served (issue 21: the
W&B sink kept every run's hello, +2.3 GiB per 20 runs). With `--repo` pointing at an older checkout
the same script measures the "before" figures.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon_driver import free_port, rss_mib, start_daemon, wait  # this folder's helpers

ROOT = Path(__file__).resolve().parent.parent

TRAINER = r"""
import sys, torch
from trainer_hook import EmbeddingPublisher
endpoint, run, vocab_n, snapshots, rows, cols = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
vocab = [f"tok{i}-{run}" for i in range(vocab_n)]  # distinct strings per run: nothing shared between runs
meta = {"note": "x" * 4000, "config": {f"k{i}": i for i in range(100)}}
wandb_info = {"project": "soak", "run_id": run, "run_name": run, "group": "soak", "mode": "offline"}
g = torch.Generator().manual_seed(len(run))
w = torch.randn(rows, cols, generator=g)
pub = EmbeddingPublisher(endpoint, run=run, vocab=vocab, wandb_info=wandb_info, meta=meta)
pub.wait_connected(30)
pub.prepare(w)
import time
for i in range(snapshots):
    w = w + 0.05 * torch.randn(rows, cols, generator=g)
    while not pub.publish(w, 10 * (i + 1)):
        time.sleep(0.05)
    time.sleep(0.2)
pub.close(timeout=30)
"""


def main() -> int:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20, help="runs per round")
    ap.add_argument("--vocab", type=int, default=50257, help="tokens in each run's hello")
    ap.add_argument("--snapshots", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=2, help="trainers running at once")
    ap.add_argument("--no-wandb", action="store_true", help="run the daemon without its W&B sink")
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose daemon and hook to run")
    args = ap.parse_args()
    repo = args.repo.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(repo), OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline",
                   WANDB_SILENT="true", WANDB_DIR=tmp)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        daemon, _, err = start_daemon(Path(tmp), env, endpoint, "--no-console", "--no-extras", "--wandb-finish-timeout",
                                      "60", *(["--no-wandb"] if args.no_wandb else []))
        series: list[tuple[int, float, float]] = []
        try:
            rss0 = rss_mib(daemon.pid)
            t0 = time.monotonic()
            served = 0
            for rnd in range(args.rounds):
                names = [f"soak-{rnd}-{i}" for i in range(args.runs)]
                running: list[subprocess.Popen] = []
                for name in names:
                    while len(running) >= args.parallel:
                        running = [p for p in running if p.poll() is None]
                        time.sleep(0.05)
                    running.append(subprocess.Popen(
                        [sys.executable, "-c", TRAINER, endpoint, name, str(args.vocab), str(args.snapshots),
                         str(args.rows), str(args.cols)], env=env, cwd=tmp,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                for p in running:
                    p.wait(300)
                served += len(names)
                wait(lambda: err.read_text().count(": closed") >= served, 600, f"{served} runs to close")
                if not args.no_wandb:  # the W&B sink finishes a run on its own thread, after the close
                    wait(lambda: all(Path(tmp, "runs", n, "analysis.jsonl").exists() for n in names), 60, "results")
                    time.sleep(3.0)
                series.append((served, rss_mib(daemon.pid), time.monotonic() - t0))
                print(f"round {rnd + 1}: {served} runs served, daemon RSS {series[-1][1]:.0f} MiB "
                      f"({series[-1][2]:.0f} s)", flush=True)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(120)
        log = err.read_text()
    held = next((line.split("per-run state at exit: ")[1] for line in log.splitlines()
                 if "per-run state at exit" in line), "(not reported by this daemon)")
    lost = next((line.split("stopped: ")[1] for line in log.splitlines() if "stopped: " in line), "?")
    print(f"daemon from {repo}, W&B {'off' if args.no_wandb else 'offline'}; {args.rounds} rounds x {args.runs} runs, "
          f"each a {args.vocab}-token vocabulary and {args.snapshots} snapshots of {args.rows}x{args.cols}")
    print(f"daemon RSS: {rss0:.0f} MiB at start; after each round: "
          + ", ".join(f"{r:.0f}" for _, r, _ in series) + " MiB"
          + (f"; growth from round 1 to {len(series)}: {series[-1][1] - series[0][1]:+.0f} MiB" if series else ""))
    print(f"per-run state at exit: {held}")
    print(f"counters: {lost}")
    print(json.dumps({"rss_start_mib": round(rss0), "rss_after_rounds_mib": [round(r) for _, r, _ in series],
                      "runs": args.rounds * args.runs, "wandb": not args.no_wandb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
