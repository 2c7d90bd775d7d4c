"""Training-step cost of the Hugging Face callback: no callback, callback with no daemon, callback with a daemon.

    python benchmarks/bench_callbacks.py [--steps 40] [--rounds 3] [--every 1] [--vocab 8192 --dim 256]

Each configuration trains the same small randomly initialised GPT-2 on CPU with the transformers Trainer
(one torch thread, pinned to core 0 where there are two cores; the daemon on the last core at one
thread), in fresh subprocesses, interleaved over rounds. Prints the median seconds per optimizer step
(Trainer's own train_runtime / steps) and the ratios to the baseline. --every 1 publishes at every step:
the worst case; a real run publishes every few hundred steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAINER = r"""
import json, logging, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
steps, every, vocab, dim, endpoint, mode = {steps}, {every}, {vocab}, {dim}, {endpoint!r}, {mode!r}
class Tokens(torch.utils.data.Dataset):
    def __len__(self): return 100000
    def __getitem__(self, i):
        x = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(i))
        return {{"input_ids": x, "labels": x}}
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=dim, n_layer=2, n_head=4))
callbacks = []
if mode != "baseline":
    from trainer_hook.hf import EmbeddingMonitorCallback
    callbacks.append(EmbeddingMonitorCallback(endpoint, run="bench-" + mode, every_n_steps=every))
args = TrainingArguments(output_dir={out!r}, max_steps=steps, per_device_train_batch_size=8, report_to=[],
                         save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10**6,
                         dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
out = trainer.train()
print("RESULT", json.dumps({{"step_s": out.metrics["train_runtime"] / steps}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd: list[str], core: str) -> list[str]:
    return ["taskset", "-c", core, *cmd] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else cmd


def train_once(mode: str, endpoint: str, opts: argparse.Namespace, tmp: str) -> float:
    code = TRAINER.format(root=str(ROOT), steps=opts.steps, every=opts.every, vocab=opts.vocab, dim=opts.dim,
                          endpoint=endpoint, mode=mode, out=os.path.join(tmp, "out"))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(pinned([sys.executable, "-c", code], "0"), capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"trainer ({mode}) failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        live, dead = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        last_core = str((os.cpu_count() or 1) - 1)
        env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
        log = open(os.path.join(tmp, "daemon.out"), "w+")
        daemon = subprocess.Popen(pinned([sys.executable, "-m", "analysis_daemon", "--listen", live, "--threads", "1",
                                          "--results-dir", os.path.join(tmp, "runs"), "--no-wandb"], last_core),
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        deadline = time.monotonic() + 120
        while "ready" not in open(log.name).read():
            if time.monotonic() > deadline or daemon.poll() is not None:
                sys.exit("the daemon did not become ready:\n" + open(log.name).read())
            time.sleep(0.1)
        times: dict[str, list[float]] = {"baseline": [], "no-daemon": [], "daemon": []}
        try:
            for _ in range(opts.rounds):
                for mode, endpoint in (("baseline", dead), ("no-daemon", dead), ("daemon", live)):
                    times[mode].append(train_once(mode, endpoint, opts, tmp))
        finally:
            daemon.terminate()
            daemon.wait(60)
        analysed = sum(1 for line in open(log.name) if "analysed in" in line)
    print(f"bench_callbacks.py: GPT-2 vocab {opts.vocab} x {opts.dim}, 2 layers, batch 8 x 64, {opts.steps} steps, "
          f"publish every {opts.every} step(s), {opts.rounds} interleaved rounds, one torch thread")
    base = statistics.median(times["baseline"])
    for mode, label in (("baseline", "no callback"), ("no-daemon", "callback, no daemon running"),
                        ("daemon", "callback, daemon analysing")):
        med = statistics.median(times[mode])
        rounds = " ".join(f"{t * 1000:.1f}" for t in times[mode])
        print(f"{label:32s} {med * 1000:8.1f} ms/step  ratio {med / base:.3f}   (rounds: {rounds})")
    print(f"snapshots analysed by the daemon: {analysed}")


if __name__ == "__main__":
    main()
