"""Benchmark: what `--tensorboard` adds per snapshot, beside the analysis it reports.

Run:  .venv/bin/python benchmarks/bench_tensorboard.py [--vocab 50304 --dim 768 --keep 5]

One `pipeline.analyse()` of a snapshot pair (drift, exact geometry, insight, galaxy map and the per-token
arrays, as the daemon runs it with default settings), then, measured side by side in this process: the
TensorBoard sink's scalars and histograms (`handle`) and its projector snapshot (`handle_arrays`: the
float32 matrix, the metadata TSV, the config, each fsynced) into a temporary directory, and the bytes
each projector snapshot costs on disk. (The per-token arrays are the explorer's: bench_explore.py.)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis_daemon.pipeline import TOKEN_ARRAYS, AnalysisSettings, analyse  # noqa: E402
from analysis_daemon.records import HelloInfo, Job, RunInsight, SnapshotData  # noqa: E402
from analysis_daemon.sinks.tensorboard_sink import TensorBoardSink  # noqa: E402
from benchmarks.bench_analysis import make_embeddings  # noqa: E402


def best_of(n: int, fn) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--keep", type=int, default=5, help="--tensorboard-projector-keep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample-rows", type=int, default=None,
                    help="sampled geometry (as the daemon's option): a full-size run in minutes, not hours")
    args = ap.parse_args()
    prev = make_embeddings(args.vocab, args.dim, seed=0)
    cur = prev + 0.01 * torch.randn(prev.shape, generator=torch.Generator().manual_seed(1))
    vocab = [f"tok{i}" for i in range(args.vocab)]
    job = Job("bench", SnapshotData(2, 2, "wte", cur), SnapshotData(1, 1, "wte", prev), [], HelloInfo(vocab=vocab))
    t0 = time.perf_counter()
    record = analyse(job, AnalysisSettings(sample_rows=args.sample_rows), insight_state=RunInsight())
    whole = time.perf_counter() - t0
    arrays = record.pop(TOKEN_ARRAYS)
    record.update(counters={"analysed": 1}, daemon_counters={"rejected": 0})
    with tempfile.TemporaryDirectory() as tmp:
        sink = TensorBoardSink(tmp, projector_keep=args.keep)
        sink.run_hello("bench", HelloInfo(vocab=vocab))
        scalars, scalars_all = best_of(args.repeats, lambda: sink.handle(record))
        projector, projector_all = best_of(args.repeats, lambda: sink.handle_arrays(record, arrays))
        folder = next((Path(tmp) / "bench" / "projector~").iterdir())
        disk = sum(f.stat().st_size for f in folder.iterdir())
        sink.close()
    fmt = lambda ts: ", ".join(f"{t:.3f}" for t in ts)  # noqa: E731
    print(f"matrix {args.vocab} x {args.dim}, threads {torch.get_num_threads()}")
    sampled = f", geometry sampled from {args.sample_rows} rows" if args.sample_rows else ", exact geometry"
    print(f"whole analyse(): {whole:.2f} s (geometry {record['geometry_seconds']:.2f} s{sampled})")
    print(f"sink scalars + histograms: best {scalars:.4f} s ({fmt(scalars_all)})")
    print(f"sink projector snapshot: best {projector:.3f} s ({fmt(projector_all)}), "
          f"{100 * projector / whole:.2f}% of the analysis; {disk / 2**20:.1f} MiB on disk per snapshot "
          f"(x {args.keep} kept)")


if __name__ == "__main__":
    main()
