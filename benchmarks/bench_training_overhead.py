"""Training-step overhead of publishing snapshots while a daemon analyses them.

    python benchmarks/bench_training_overhead.py [--steps 60] [--rounds 3] [--vocab 16384 --dim 512]

Runs the same CPU training loop (model.GPT, AdamW) in fresh subprocesses, interleaved:
  baseline  - no hook at all
  publish   - EmbeddingPublisher.publish every --every steps to a live analysis daemon
With at least two cores, the trainer is pinned to core 0 with one torch thread and the daemon
to the last core with one thread (the layout launch.sh uses), so the figure shows what the user
gets, not what an oversubscribed machine gets. Prints mean step times (publishing steps included) and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAINER = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from model import GPT, GPTConfig
steps, every, vocab, dim, endpoint = {steps}, {every}, {vocab}, {dim}, {endpoint!r}
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_embd=dim, dropout=0.0))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
publisher = None
if endpoint:
    from trainer_hook import EmbeddingPublisher
    publisher = EmbeddingPublisher(endpoint, run="bench-overhead")
x = torch.randint(0, vocab, (8, 64)); y = torch.randint(0, vocab, (8, 64))
times, publish_ms = [], []
for step in range(steps):
    t0 = time.perf_counter()
    _, loss = model(x, y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if publisher is not None and step % every == 0:
        p0 = time.perf_counter()
        publisher.publish(model.transformer.wte, step)
        publish_ms.append((time.perf_counter() - p0) * 1e3)
    times.append((time.perf_counter() - t0) * 1e3)
stats = dict(times=times[3:], publish_ms=publish_ms)
if publisher is not None:
    publisher.close()
    stats.update(published=publisher.published, dropped=publisher.dropped)
print("RESULT " + json.dumps(stats))
"""


def pin(cores: str) -> list[str]:
    """taskset prefix where pinning is possible."""
    if (os.cpu_count() or 1) >= 2 and subprocess.run(["which", "taskset"], capture_output=True).returncode == 0:
        return ["taskset", "-c", cores]
    return []


def start_daemon(endpoint: str, results: str) -> subprocess.Popen:
    """A real analysis daemon on the last core, one thread, waiting for its ready line."""
    last = str((os.cpu_count() or 1) - 1)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        pin(last) + [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", results,
                     "--threads", "1", "--no-wandb"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if "ready" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("daemon did not become ready")


def run_trainer(args: argparse.Namespace, endpoint: str) -> dict:
    """One trainer subprocess pinned to core 0; returns its timing record."""
    code = TRAINER.format(root=str(ROOT), steps=args.steps, every=args.every, vocab=args.vocab, dim=args.dim,
                          endpoint=endpoint)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(pin("0") + [sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def main() -> None:
    """Interleaved rounds of baseline and publishing trainers; prints medians and the ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--port", type=int, default=5591)
    args = p.parse_args()
    endpoint = f"tcp://127.0.0.1:{args.port}"
    base, pub, pub_ms, analysed = [], [], [], 0
    with tempfile.TemporaryDirectory() as results:
        daemon = start_daemon(endpoint, results)
        try:
            for _ in range(args.rounds):
                base.append(statistics.mean(run_trainer(args, "")["times"]))
                rec = run_trainer(args, endpoint)
                pub.append(statistics.mean(rec["times"]))
                pub_ms += rec["publish_ms"]
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
        for path in Path(results).rglob("analysis.jsonl"):
            analysed += sum(1 for _ in path.open())
    b, w = statistics.median(base), statistics.median(pub)
    print(f"machine: {os.cpu_count()} cores; trainer pinned to core 0 (1 thread), daemon to the last core (1 thread)")
    print(f"model: vocab {args.vocab} x dim {args.dim}, {args.steps} steps, publish every {args.every}")
    print(f"baseline step time (median over rounds of the mean step): {b:.1f} ms   rounds: {[round(x, 1) for x in base]}")
    print(f"publishing step time (median over rounds of the mean step): {w:.1f} ms   rounds: {[round(x, 1) for x in pub]}")
    print(f"ratio publishing/baseline: {w / b:.3f}")
    print(f"publish() call: median {statistics.median(pub_ms):.2f} ms, max {max(pub_ms):.2f} ms "
          f"({len(pub_ms)} calls); snapshots analysed by the daemon: {analysed}")


if __name__ == "__main__":
    main()
