"""Benchmark: the record's token_stats (norm and neighbourhood size of the followed tokens) against the whole analysis.

Run:  .venv/bin/python benchmarks/bench_token_stats.py [--vocab 50304 --dim 768 --tokens 110 --probes 10]

One `pipeline.analyse()` of a snapshot pair (drift, exact geometry, insight, galaxy map, clump search, as
the daemon runs it with default settings and --probe), then `token_stats` alone for the same followed
tokens, measured side by side in this process (the input is bench_analysis's trained-like matrix). The
analyse() time includes the token_stats it computes; the ratio is token_stats / analyse().
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis_daemon.metrics.insight import token_stats  # noqa: E402
from analysis_daemon.pipeline import AnalysisSettings, analyse  # noqa: E402
from analysis_daemon.records import Job, RunInsight, SnapshotData  # noqa: E402
from benchmarks.bench_analysis import make_embeddings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prev = make_embeddings(args.vocab, args.dim, seed=0)
    cur = prev + 0.01 * torch.randn(prev.shape, generator=torch.Generator().manual_seed(1))
    settings = AnalysisSettings(top_k=args.top_k, probes=tuple(str(7 * i + 3) for i in range(args.probes)))
    job = Job("bench", SnapshotData(2, 2, "wte", cur), SnapshotData(1, 1, "wte", prev), [], None)
    state = RunInsight()
    t0 = time.perf_counter()
    record = analyse(job, settings, insight_state=state)
    whole = time.perf_counter() - t0
    ids = [t for t, _, _ in record["token_stats"]["tokens"]]
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        token_stats(cur, ids, settings.threshold)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"matrix {args.vocab} x {args.dim}, threads {torch.get_num_threads()}, followed tokens {len(ids)} "
          f"(top-k {args.top_k} most + least, {args.probes} probes)")
    print(f"whole analyse(): {whole:.2f} s (geometry {record['geometry_seconds']:.2f} s, drift "
          f"{record['drift_seconds']:.2f} s, insight incl. token_stats {record['insight_seconds']:.2f} s, "
          f"galaxy {record['galaxy_seconds']:.2f} s)")
    print(f"token_stats alone: best {best:.3f} s of {args.repeats} ({', '.join(f'{t:.3f}' for t in times)})")
    print(f"ratio token_stats / whole analysis: {100 * best / whole:.2f}%")


if __name__ == "__main__":
    main()
