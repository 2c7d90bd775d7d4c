"""Overhead of token counting on the training step (target: < 1% of a step): explicit and hook-based.

Run:  .venv/bin/python benchmarks/bench_count_tokens.py [--vocab 50304 --batch 8 --seq 256 --dim 256] [--steps 10]

A small causal language model (embedding, one transformer block, head; GPT-2's vocabulary) trains on
random tokens on this machine's CPU three ways, interleaved step by step so all see the same load: without
counting, with `publisher.count_tokens(input_ids)` called each step, and with `publisher.watch_tokens(emb)`
(the forward pre-hook the callbacks register), in an order rotated each round. Printed: the median step of each and its ratio to the plain
one (wall clock and the process's CPU time; paired: a step over the same round's plain step), and, since
the step medians move with the machine's load by more than 1%, the counting's own cost
timed apart: the median of count_tokens alone, and of the embedding's forward with the hook minus without
(interleaved, many repetitions), each as a share of the plain step. On a GPU each is one scatter_add_
queued on the stream (no host sync), so its share there is smaller still; this machine has no GPU.
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


def _hook_cost(emb: torch.nn.Module, pub: EmbeddingPublisher, ids: torch.Tensor, reps: int) -> float:
    """Median of (embedding forward with the counting hook) - (without), interleaved, in seconds."""
    with_hook, without = [], []
    for _ in range(reps):
        handle = pub.watch_tokens(emb)
        t0 = time.perf_counter()
        emb(ids)
        with_hook.append(time.perf_counter() - t0)
        handle.remove()
        t0 = time.perf_counter()
        emb(ids)
        without.append(time.perf_counter() - t0)
    return statistics.median(with_hook) - statistics.median(without)


def main() -> None:
    """Print the step time without counting, with count_tokens and with the hook, and counting's own cost."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50304, help="vocabulary size (rows of the embedding)")
    ap.add_argument("--dim", type=int, default=256, help="model width")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    ap.add_argument("--reps", type=int, default=300, help="repetitions of the isolated hook timing")
    args = ap.parse_args()
    torch.manual_seed(0)
    emb = torch.nn.Embedding(args.vocab, args.dim)
    block = torch.nn.TransformerEncoderLayer(args.dim, 4, 4 * args.dim, batch_first=True)
    head = torch.nn.Linear(args.dim, args.vocab, bias=False)
    params = [*emb.parameters(), *block.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(args.seq)
    # no daemon listens: counting still accumulates (it never waits for one), which is what is timed
    pub = EmbeddingPublisher("tcp://127.0.0.1:9", run="bench-count", vocab=[str(i) for i in range(args.vocab)],
                             connect_grace_s=0.0)

    def step(kind: str) -> tuple[float, float, float]:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
        handle = pub.watch_tokens(emb) if kind == "hook" else None  # registered outside the timed step
        t0, cpu0 = time.perf_counter(), time.process_time()
        counted = 0.0
        if kind == "explicit":
            c0 = time.perf_counter()
            pub.count_tokens(ids[:, :-1])
            counted = time.perf_counter() - c0
        logits = head(block(emb(ids[:, :-1]), src_mask=mask, is_causal=True))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if handle is not None:
            handle.remove()
        return elapsed, cpu, counted

    kinds = ("plain", "explicit", "hook")
    for kind in kinds:
        step(kind)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    calls = []
    for round_ in range(args.steps):
        for kind in kinds[round_ % 3:] + kinds[:round_ % 3]:  # rotated: no kind always runs first
            elapsed, cpu, counted = step(kind)
            times[kind].append(elapsed)
            cpus[kind].append(cpu)
            if kind == "explicit":
                calls.append(counted)
    hook = _hook_cost(emb, pub, torch.randint(0, args.vocab, (args.batch, args.seq)), args.reps)
    total = int(pub._tokens.counts.sum())
    pub.close(timeout=0.5)
    med = {k: statistics.median(v) for k, v in times.items()}
    p, k = med["plain"], statistics.median(calls)
    print(f"vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, d {args.dim}, threads {torch.get_num_threads()}, "
          f"{args.steps} steps each (interleaved)")
    for label, series in (("wall", times), ("process CPU", cpus)):
        # the paired ratio: each round's step over the same round's plain step (they share the load of the moment)
        paired = {kind: statistics.median(a / b for a, b in zip(series[kind], series["plain"])) for kind in kinds}
        print(f"median step, {label}: " + ", ".join(
            f"{kind} {1e3 * statistics.median(series[kind]):.1f} ms (paired {paired[kind]:.3f}x)" for kind in kinds))
    print(f"count_tokens alone: median {1e6 * k:.0f} us = {100 * k / p:.3f}% of a step")
    print(f"hook alone (embedding forward with it minus without, {args.reps} reps): {1e6 * hook:.0f} us = "
          f"{100 * hook / p:.3f}% of a step")
    print(f"tokens counted: {total}")


if __name__ == "__main__":
    main()
