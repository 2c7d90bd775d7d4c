"""How well `cost.py` (analysis_daemon/cost.py) predicts the time of a whole analysis, over shapes narrow and wide.

    python benchmarks/bench_cost_model.py [--threads 2] [--scale 1.0]

Runs the daemon's full `analyse()` (drift against a previous snapshot, geometry with neighbour lists,
insight, galaxy map, clump search) on matrices of very different shapes: narrow ones (d = 2, 8) where
the per-pair work dominates, GPT-2-like widths where the dot products dominate, a sampled pass, and a
wide matrix where the d x d decompositions dominate. For each it prints the wall seconds, the model's
estimate in multiply-add equivalents, and seconds per 1e12 of estimate: a good model keeps that last
column nearly constant across shapes (the max/min spread is printed at the end). Every shape runs in
the same process, one after another, so the ratios are comparable even on a loaded host.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from analysis_daemon.pipeline import AnalysisSettings, analyse  # noqa: E402
from analysis_daemon.cost import estimate_cost, estimate_memory  # noqa: E402
from analysis_daemon.records import Job, SnapshotData  # noqa: E402

# (rows, cols, sample_rows): narrow first (the case the old model underestimated), then wide
SHAPES = [
    (24000, 2, None),
    (16000, 8, None),
    (12000, 64, None),
    (8000, 768, None),
    (4000, 2048, None),
    (120000, 2, 3000),
    (30000, 768, 1000),
]


def run_one(rows: int, cols: int, sample: int | None, settings: AnalysisSettings) -> float:
    """Wall seconds of one full analysis of a rows x cols snapshot with a previous one."""
    gen = torch.Generator().manual_seed(rows + cols)
    prev = torch.randn(rows, cols, generator=gen)
    cur = prev + 0.1 * torch.randn(rows, cols, generator=gen)
    job = Job(run="bench", current=SnapshotData(iter=1, seq=1, name="wte", tensor=cur, sample_rows=sample),
              previous=SnapshotData(iter=0, seq=0, name="wte", tensor=prev), skipped_iters=[], hello=None)
    t0 = time.perf_counter()
    analyse(job, settings)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every row count by this")
    ap.add_argument("--shapes", nargs="*", metavar="VxD[:SAMPLE]",
                    help="shapes to measure instead of the built-in list, e.g. 60000x2 8000x768 120000x2:3000")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = AnalysisSettings()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores; full analyse() per shape")
    print(f"{'shape':>16} {'sample':>7} {'seconds':>9} {'estimate':>10} {'s per 1e12':>11} {'est. MiB':>9}")
    ratios = []
    run_one(500, 16, None, settings)  # warm-up: LAPACK, thread pool
    shapes = SHAPES
    if args.shapes:
        shapes = []
        for spec in args.shapes:
            dims, _, sample = spec.partition(":")
            rows, cols = (int(x) for x in dims.split("x"))
            shapes.append((rows, cols, int(sample) if sample else None))
    for rows, cols, sample in shapes:
        rows = max(1000, int(rows * args.scale))
        seconds = run_one(rows, cols, sample, settings)
        est = estimate_cost(rows, cols, sample)
        ratio = seconds / est * 1e12
        ratios.append(ratio)
        mib = estimate_memory(rows, cols, settings.chunk_size, settings.knn_k) / 2**20
        print(f"{rows:>9} x {cols:<5} {sample or '-':>7} {seconds:>9.2f} {est:>10.3g} {ratio:>11.1f} {mib:>9.0f}")
    print(f"spread of seconds per 1e12 (max/min): {max(ratios) / min(ratios):.2f}x "
          "(1.0 would be a perfect model; the limit is meant to hold within ~2x)")


if __name__ == "__main__":
    main()
