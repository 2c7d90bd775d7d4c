"""Cost of the research metrics (linear CKA, common mode, drift since init, under-trained search) vs the whole analysis.

Run:  .venv/bin/python benchmarks/bench_research.py [--vocab 50304 --dim 768] [--repeats 3]

One whole analyse() with every addition on (the run's first snapshot is an earlier one than the previous,
so the drift since initialisation is computed, not copied), then each addition alone, best of --repeats,
on the same matrices and with the Gram matrices the daemon has cached by then (the previous and the first
snapshot's): CKA and the common mode as the difference between measure_semantic_drift with and without
them, the since-init drift as one more measure_semantic_drift, the under-trained search since init.
Target (issue 22): the additions within 10% of the analysis without them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis_daemon.metrics.drift import measure_semantic_drift  # noqa: E402
from analysis_daemon.metrics.undertrained import find_undertrained  # noqa: E402
from analysis_daemon.pipeline import AnalysisSettings, analyse  # noqa: E402
from analysis_daemon.records import Job, RunInsight, SnapshotData  # noqa: E402
from benchmarks.bench_analysis import make_embeddings  # noqa: E402


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fastest of `repeats` timed calls of `fn`, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Print the whole analysis time and each addition's, and the additions' share."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50304, help="rows V")
    ap.add_argument("--dim", type=int, default=768, help="columns d")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per addition (the best is shown)")
    args = ap.parse_args()
    first = make_embeddings(args.vocab, args.dim, seed=0)
    gen = torch.Generator().manual_seed(1)
    prev = first + 0.05 * torch.randn(first.shape, generator=gen)
    cur = prev + 0.01 * torch.randn(first.shape, generator=gen)
    s_first, s_prev, s_cur = (SnapshotData(i, i, "wte", t) for i, t in ((0, first), (1, prev), (2, cur)))
    job = Job("bench", s_cur, s_prev, [], None, first=s_first)
    t0 = time.perf_counter()
    record = analyse(job, AnalysisSettings(), insight_state=RunInsight())
    whole = time.perf_counter() - t0
    print(f"matrix {args.vocab} x {args.dim}, threads {torch.get_num_threads()}")
    print(f"whole analyse() with the additions: {whole:.2f} s (geometry {record['geometry_seconds']:.2f} s, "
          f"drift incl. since-init {record['drift_seconds']:.2f} s, insight incl. under-trained "
          f"{record['insight_seconds']:.2f} s, galaxy {record['galaxy_seconds']:.2f} s)")
    g_first, g_prev = {}, {}
    measure_semantic_drift(first, prev, grams=g_first)  # the Grams the daemon has cached by now
    measure_semantic_drift(prev, first, grams=g_prev)
    g_cur: dict = {"x": g_prev["x"]}
    measure_semantic_drift(prev, cur, grams=g_cur)
    parts = {  # interleaved round by round, so every part sees the same load; the best round of each is kept
        "plain": lambda: measure_semantic_drift(prev, cur, cka=False, common_mode=False),
        "full": lambda: measure_semantic_drift(prev, cur, grams={"x": g_prev["x"]}),
        "since": lambda: measure_semantic_drift(first, cur, grams={"x": g_first["x"], "y": g_cur["y"]}),
        "uncached": lambda: measure_semantic_drift(first, cur),
        "under_w": lambda: find_undertrained(cur),
        "under_i": lambda: find_undertrained(cur, initial=first),
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(args.repeats):
        for key, fn in parts.items():
            times[key].append(best_of(1, fn))
    plain, full, since, uncached, under_w, under_i = (min(times[k]) for k in parts)
    added = (full - plain) + since + under_i
    print(f"drift as before (no CKA, no common mode) {plain:.3f} s; with CKA (previous Gram cached) and the common "
          f"mode {full:.3f} s ({full - plain:+.3f} s)")
    print(f"drift since init with both Grams cached {since:.3f} s (uncached {uncached:.3f} s)")
    print(f"under-trained search: weights alone {under_w:.3f} s, since init {under_i:.3f} s")
    base = whole - added
    print(f"additions in total {added:.2f} s = {100 * added / base:.1f}% of the analysis without them ({base:.2f} s)")
    print(f"(when the previous snapshot is the first, the since-init drift is copied: "
          f"{100 * (added - since) / (whole - added):.1f}%)")
    under = record["insight"]["undertrained"]
    print(f"record: linear_cka {record['drift']['linear_cka']:.6f}, since-init cosine "
          f"{record['drift_since_init']['average_cosine_similarity']:.6f}, under-trained count {under['count']} "
          f"({under['method']})")


if __name__ == "__main__":
    main()
