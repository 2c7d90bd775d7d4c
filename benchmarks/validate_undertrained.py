"""Validation of the under-trained token indicator on constructed runs: precision and recall.

    .venv/bin/python benchmarks/validate_undertrained.py [--steps 300] [--vocab 256] [--dim 32] [--unused 32]

A tiny language model (embedding, one residual MLP layer, LayerNorm, output head; GPT-style init with
std 0.02) is trained with AdamW on bigram data over part of the vocabulary: a known, random set of
tokens never occurs as an input or a target. For each configuration (untied/tied head, weight decay 0
and 0.1) the indicator (analysis_daemon/metrics/undertrained.py) is run on the input embedding and the
output head, from the weights alone and from the change since the first snapshot, and compared with
the known set. A control run in which every token occurs must flag none. tests/test_research_metrics.py
runs the same construction (fewer configurations' worth of steps) and asserts precision/recall >= 0.9.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis_daemon.metrics.undertrained import find_undertrained, precision_recall  # noqa: E402


class TinyLM(torch.nn.Module):
    """Embedding -> x + GELU(Linear(x)) -> LayerNorm -> head (tied to the embedding when asked)."""

    def __init__(self, vocab: int, dim: int, tied: bool) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, dim)
        self.fc = torch.nn.Linear(dim, dim)
        self.ln = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        torch.nn.init.normal_(self.wte.weight, std=0.02)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wte(x)
        return self.head(self.ln(h + torch.nn.functional.gelu(self.fc(h))))


@dataclass
class ConstructedRun:
    """What a constructed run leaves: the never-used token ids and both matrices at start and end."""

    unused: list[int]
    input_first: torch.Tensor
    input_last: torch.Tensor
    head_first: torch.Tensor
    head_last: torch.Tensor
    loss: float


def constructed_run(*, tied: bool, weight_decay: float, vocab: int = 256, dim: int = 32, unused: int = 32,
                    steps: int = 300, lr: float = 3e-3, batch: int = 512, seed: int = 0) -> ConstructedRun:
    """Train TinyLM on bigrams over all tokens but `unused` random ones (never an input, never a target)."""
    gen = torch.Generator().manual_seed(seed)
    never = torch.randperm(vocab, generator=gen)[:unused]
    used = torch.ones(vocab, dtype=torch.bool)
    used[never] = False
    ids = used.nonzero().squeeze(1)
    successors = ids[torch.randint(len(ids), (len(ids), 4), generator=gen)]
    successors[:, 0] = ids[torch.randperm(len(ids), generator=gen)]  # every used token is also a target
    torch.manual_seed(seed)
    model = TinyLM(vocab, dim, tied)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    input_first = model.wte.weight.detach().clone()
    head_first = model.head.weight.detach().clone()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        k = torch.randint(len(ids), (batch,), generator=gen)
        x, y = ids[k], successors[k, torch.randint(4, (batch,), generator=gen)]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ConstructedRun(sorted(never.tolist()), input_first, model.wte.weight.detach().clone(), head_first,
                          model.head.weight.detach().clone(), float(loss.detach()))


def evaluate(run: ConstructedRun, tied: bool) -> list[tuple[str, str, int, float, float]]:
    """(matrix, method, count, precision, recall) for each matrix (the head only when untied) and method."""
    out = []
    matrices = [("input", run.input_first, run.input_last)]
    if not tied:
        matrices.append(("head", run.head_first, run.head_last))
    for name, first, last in matrices:
        for initial in (None, first):
            found = find_undertrained(last, initial=initial, limit=last.shape[0])
            p, r = precision_recall([t for t, _ in found["tokens"]], run.unused)
            out.append((name, found["method"], found["count"], p, r))
    return out


def main() -> None:
    """Print precision/recall per configuration, matrix and method, and the control's false positives."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per constructed run")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary size V")
    ap.add_argument("--dim", type=int, default=32, help="embedding width d")
    ap.add_argument("--unused", type=int, default=32, help="tokens that never occur (inputs or targets)")
    ap.add_argument("--seeds", type=int, default=2, help="runs per configuration (different seeds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"V={args.vocab} d={args.dim} unused={args.unused} steps={args.steps} (AdamW lr 3e-3, init std 0.02)")
    print(f"{'head':6s} {'wd':>4s} {'seed':>4s} {'matrix':6s} {'method':10s} {'count':>5s} {'prec':>5s} {'recall':>6s}")
    worst = 1.0
    for tied in (False, True):
        for wd in (0.0, 0.1):
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                run = constructed_run(tied=tied, weight_decay=wd, vocab=args.vocab, dim=args.dim,
                                      unused=args.unused, steps=args.steps, seed=seed)
                for name, method, count, p, r in evaluate(run, tied):
                    worst = min(worst, p, r)
                    print(f"{'tied' if tied else 'untied':6s} {wd:4.1f} {seed:4d} {name:6s} {method:10s} "
                          f"{count:5d} {p:5.2f} {r:6.2f}   (loss {run.loss:.2f}, {time.perf_counter() - t0:.1f} s)")
    false_positives = 0
    for tied in (False, True):
        run = constructed_run(tied=tied, weight_decay=0.1, vocab=args.vocab, dim=args.dim, unused=0,
                              steps=args.steps)
        for name, method, count, _, _ in evaluate(run, tied):
            false_positives += count
            print(f"control (every token used) {'tied' if tied else 'untied'} {name} {method}: flagged {count}")
    print(f"worst precision/recall {worst:.2f}; tokens flagged in the controls: {false_positives}")


if __name__ == "__main__":
    main()
