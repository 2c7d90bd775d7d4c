"""Overhead of publisher.count_tokens on the training step (target: < 1% of a step).

Run:  .venv/bin/python benchmarks/bench_count_tokens.py [--vocab 50304 --batch 8 --seq 256 --dim 256] [--steps 20]

A small causal language model (embedding, one transformer block, head; GPT-2's vocabulary) trains on
random tokens on this machine's CPU, with and without count_tokens(input_ids) every step, interleaved
step by step so both see the same load; the median step times and the median cost of count_tokens
alone are printed. On a GPU the call is one scatter_add_ queued on the stream (no host sync), so its
share there is smaller still; this machine has no GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer_hook import EmbeddingPublisher  # noqa: E402


def main() -> None:
    """Print the step time with and without counting and count_tokens' own cost."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50304, help="vocabulary size (rows of the embedding)")
    ap.add_argument("--dim", type=int, default=256, help="model width")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    args = ap.parse_args()
    torch.manual_seed(0)
    emb = torch.nn.Embedding(args.vocab, args.dim)
    block = torch.nn.TransformerEncoderLayer(args.dim, 4, 4 * args.dim, batch_first=True)
    head = torch.nn.Linear(args.dim, args.vocab, bias=False)
    params = [*emb.parameters(), *block.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(args.seq)
    # no daemon listens: count_tokens still accumulates (it never waits for one), which is what is timed
    pub = EmbeddingPublisher("tcp://127.0.0.1:9", run="bench-count", vocab=[str(i) for i in range(args.vocab)],
                             connect_grace_s=0.0)

    def step(count: bool) -> tuple[float, float]:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
        t0 = time.perf_counter()
        counted = 0.0
        if count:
            c0 = time.perf_counter()
            pub.count_tokens(ids[:, :-1])
            counted = time.perf_counter() - c0
        logits = head(block(emb(ids[:, :-1]), src_mask=mask, is_causal=True))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, counted

    step(True), step(False)  # warm-up
    plain, counting, calls = [], [], []
    for _ in range(args.steps):
        plain.append(step(False)[0])
        total, counted = step(True)
        counting.append(total)
        calls.append(counted)
    pub.close(timeout=0.5)
    p, c, k = statistics.median(plain), statistics.median(counting), statistics.median(calls)
    print(f"vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, d {args.dim}, threads {torch.get_num_threads()}")
    print(f"median step without counting {1e3 * p:.1f} ms, with counting {1e3 * c:.1f} ms")
    print(f"count_tokens alone: median {1e6 * k:.0f} us = {100 * k / p:.3f}% of a step")


if __name__ == "__main__":
    main()
