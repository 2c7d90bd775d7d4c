"""Figures at Llama-3 scale (128256 x 4096 float32): drift, exact geometry, sampled geometry, peak memory.

Run:  nice .venv/bin/python benchmarks/bench_large_vocab.py [--vocab 128256 --dim 4096] [--blocks 4]
      [--sample-rows 4096] [--sample-blocks 2] [--threads 2] [--chunk-size 512] [--host-cores 16]

One process plays the daemon: it holds two snapshots at full size (generated row block by row block, so
generation adds no temporary of their size) and measures, side by side under the same load, what is
affordable on a small shared host; the rest is EXTRAPOLATED from costs that are linear by construction.
Every figure is printed as wall time and as this process's CPU time (on a shared machine the wall time
mostly measures the other users; CPU seconds are what a dedicated host would spend).

(a) drift: its cost is rows x d^2 (two d x d products over all rows) plus one SVD of d x d. MEASURED at
    V/16 and V/8 rows, EXTRAPOLATED linearly to V (the two points give the per-row cost and the constant).
(b) exact geometry = set-up + the triangle of row blocks. Set-up: the normalised copy (MEASURED at full V)
    and the exact mean/std sums in float64 (linear in V: MEASURED at V/16, EXTRAPOLATED). Triangle: the
    daemon's own pass (`geometry_and_neighbours`, neighbour lists on) at full V, stopped through its
    progress callback after --blocks row blocks (the mean/std sums are skipped in this run: they are
    the set-up measured above); blocks 2..K give the cost per similarity (block 1 also fills the
    neighbour lists and is reported on its own) and the rest of the triangle is EXTRAPOLATED from it.
(c) sampled geometry with --sample-rows rows: the same set-up, plus N/chunk identical blocks of N x V;
    --sample-blocks of them MEASURED at full V, the rest EXTRAPOLATED.
(d) the cost ratio sampled / exact.
(e) the peak RSS: two snapshots, the pass's normalised copy and block buffers (all allocated before the
    first block, so a full pass peaks no higher) plus the float64 mean/std temporaries (computed).
(f) the flop arithmetic, and what it means for a --host-cores host.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import analysis_daemon.metrics.geometry as geometry  # noqa: E402
from analysis_daemon.metrics.drift import measure_semantic_drift  # noqa: E402
from analysis_daemon.metrics.geometry import geometry_and_neighbours, pairwise_moments  # noqa: E402

GB = 1e9


class Stop(Exception):
    """Raised from the progress callback once enough blocks are measured."""


class Clock:
    """Wall and CPU seconds of one measured part."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __str__(self) -> str:
        return f"{self.wall:8.1f} s wall {self.cpu:8.1f} s CPU"


@contextmanager
def clock() -> Iterator[Clock]:
    c = Clock()
    w, p = time.monotonic(), time.process_time()
    try:
        yield c
    finally:
        c.wall, c.cpu = time.monotonic() - w, time.process_time() - p


def snapshots(vocab: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two trained-embedding-like snapshots (low rank + noise + offset + groups of 16 tokens; the second
    moved a little), built in place, 8192 rows at a time."""
    g = torch.Generator().manual_seed(seed)
    rank = 64
    basis = torch.randn(rank, dim, generator=g) / math.sqrt(rank)
    offset = 0.4 * torch.randn(1, dim, generator=g)
    prev, cur = torch.empty(vocab, dim), torch.empty(vocab, dim)
    for a in range(0, vocab, 8192):
        b = min(a + 8192, vocab)
        block = torch.randn(b - a, rank, generator=g) @ basis + 0.7 * torch.randn(b - a, dim, generator=g) + offset
        # groups of 16 consecutive tokens around a shared centre: within-group cosines around 0.7
        block += 2.0 * torch.randn(-(-(b - a) // 16), dim, generator=g).repeat_interleave(16, dim=0)[: b - a]
        prev[a:b] = block
        cur[a:b] = block + 0.1 * torch.randn(b - a, dim, generator=g)
    return prev, cur


def rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextmanager
def without_moments() -> Iterator[None]:
    """Skip the float64 mean/std sums inside the pass (measured separately as part of the set-up)."""
    real = geometry._moments_of_unit_rows
    geometry._moments_of_unit_rows = lambda u: (u.shape[0] * (u.shape[0] - 1), 0.0, 0.0)
    try:
        yield
    finally:
        geometry._moments_of_unit_rows = real


def blocks_of_pass(cur: torch.Tensor, chunk: int, knn_k: int, stop_after: int,
                   sample_rows: int | None = None) -> tuple[Clock, list[tuple[float, float]]]:
    """Run the daemon's geometry pass until `stop_after` progress calls; (whole clock, per-call stamps)."""
    stamps: list[tuple[float, float]] = []

    def progress(fraction: float) -> None:
        stamps.append((time.monotonic(), time.process_time()))
        if len(stamps) >= stop_after:
            raise Stop
    with without_moments(), clock() as c:
        try:
            geometry_and_neighbours(cur, chunk_size=chunk, knn_k=knn_k, progress=progress, sample_rows=sample_rows)
        except Stop:
            pass
    return c, stamps


def main() -> None:
    """Measure and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--blocks", type=int, default=4, help="row blocks of the exact pass to measure (>= 2)")
    p.add_argument("--sample-rows", type=int, default=4096)
    p.add_argument("--sample-blocks", type=int, default=2, help="blocks of the sampled pass to measure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--knn-k", type=int, default=10, help="neighbour lists as the daemon's default extras")
    p.add_argument("--host-cores", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    v, d, chunk, n_s = args.vocab, args.dim, args.chunk_size, args.sample_rows
    print(f"bench_large_vocab.py: V={v} d={d} float32 ({v * d * 4 / GB:.2f} GB per snapshot), "
          f"{args.threads} torch threads, chunk {chunk}, neighbour lists k={args.knn_k}")
    print(f"host: {os.cpu_count()} cores shared with other users, load average at start {os.getloadavg()[0]:.1f}")
    base_rss = rss_gib()
    with clock() as c:
        prev, cur = snapshots(v, d)
    print(f"two snapshots built: {c}; peak RSS {base_rss:.2f} -> {rss_gib():.2f} GiB")

    # (a) drift at V/16 and V/8 rows, linear extrapolation to V
    points = []
    for rows in (v // 16, v // 8):
        with clock() as c:
            measure_semantic_drift(prev[:rows], cur[:rows], top_k=50)
        points.append((rows, c))
    (r1, c1), (r2, c2) = points
    drift_wall = c1.wall + (c2.wall - c1.wall) / (r2 - r1) * (v - r1)
    drift_cpu = c1.cpu + (c2.cpu - c1.cpu) / (r2 - r1) * (v - r1)
    print(f"(a) drift MEASURED at {r1} rows: {c1}; at {r2} rows: {c2}")
    print(f"    drift EXTRAPOLATED to {v} rows (linear in rows + one d x d SVD): {drift_wall:8.1f} s wall "
          f"{drift_cpu:8.1f} s CPU")

    # (b) exact geometry: set-up (normalised copy at full V, float64 sums at V/16) + the triangle
    inner = -(-(d + 1) // 16) * 16
    with clock() as c_norm:
        packed, _, _ = geometry._valid_unit_rows(cur, extra_cols=inner - d)
    with clock() as c_mom:
        pairwise_moments(cur[: v // 16])
    with clock() as c_mom_norm:  # the small call's own normalisation, not part of the sums
        geometry._valid_unit_rows(cur[: v // 16])
    del packed
    mom_wall = max(0.0, c_mom.wall - c_mom_norm.wall) * 16
    mom_cpu = max(0.0, c_mom.cpu - c_mom_norm.cpu) * 16
    setup_wall, setup_cpu = c_norm.wall + mom_wall, c_norm.cpu + mom_cpu
    print(f"(b) set-up MEASURED: normalised copy at {v} rows {c_norm}; float64 mean/std sums at {v // 16} rows "
          f"{c_mom.cpu - c_mom_norm.cpu:.1f} s CPU -> EXTRAPOLATED x16: {mom_wall:.1f} s wall {mom_cpu:.1f} s CPU")
    c_pass, stamps = blocks_of_pass(cur, chunk, args.knn_k, args.blocks)
    entries = [chunk * (v - r * chunk) for r in range(len(stamps))]  # block r: chunk rows x (V - r0) columns
    rate_wall = (stamps[-1][0] - stamps[0][0]) / sum(entries[1:])
    rate_cpu = (stamps[-1][1] - stamps[0][1]) / sum(entries[1:])
    blocks_total = -(-v // chunk)
    all_entries = sum(min(chunk, v - r * chunk) * (v - r * chunk) for r in range(blocks_total))
    print(f"    exact pass MEASURED at full V: blocks 1..{len(stamps)} of {blocks_total} "
          f"({sum(entries) / all_entries:.1%} of the triangle's {all_entries / 1e9:.2f}e9 similarities) in {c_pass} "
          f"(normalisation included); blocks 2..{len(stamps)}: {rate_wall * 1e9:.2f} s wall "
          f"{rate_cpu * 1e9:.2f} s CPU per 1e9 similarities")
    exact_wall = setup_wall + rate_wall * all_entries
    exact_cpu = setup_cpu + rate_cpu * all_entries
    print(f"    exact geometry EXTRAPOLATED (set-up + all blocks at that rate): {exact_wall:8.1f} s wall "
          f"{exact_cpu:8.1f} s CPU ({exact_cpu / 60:.1f} CPU-min)")

    # (c) sampled geometry: the same set-up + N/chunk identical blocks of chunk x V
    c_s, s_stamps = blocks_of_pass(cur, chunk, args.knn_k, args.sample_blocks + 1, sample_rows=n_s)
    s_blocks = -(-n_s // chunk)
    per_block_wall = (s_stamps[-1][0] - s_stamps[0][0]) / (len(s_stamps) - 1)
    per_block_cpu = (s_stamps[-1][1] - s_stamps[0][1]) / (len(s_stamps) - 1)
    sampled_wall = setup_wall + per_block_wall * s_blocks
    sampled_cpu = setup_cpu + per_block_cpu * s_blocks
    print(f"(c) sampled pass N={n_s} MEASURED at full V: blocks 2..{len(s_stamps)} of {s_blocks}: "
          f"{per_block_wall:.1f} s wall {per_block_cpu:.1f} s CPU per block of {chunk} x {v}")
    print(f"    sampled geometry EXTRAPOLATED (set-up + {s_blocks} blocks): {sampled_wall:8.1f} s wall "
          f"{sampled_cpu:8.1f} s CPU; the pass alone {per_block_cpu * s_blocks:.1f} s CPU")
    print(f"(d) cost ratio sampled / exact (CPU): {sampled_cpu / exact_cpu:.3f}; passes alone "
          f"{per_block_cpu * s_blocks / (rate_cpu * all_entries):.3f}; similarities {n_s * v / all_entries:.3f} "
          f"of the triangle's")
    extra = 2 * min(v, d) ** 2 * 8 / 2**30 + 4096 * d * 8 / 2**30
    print(f"(e) peak RSS holding two snapshots through drift and the geometry passes: {rss_gib():.2f} GiB measured "
          f"(+{extra:.2f} GiB float64 mean/std temporaries in a full pass, computed): snapshots "
          f"{2 * v * d * 4 / 2**30:.2f} GiB, normalised copy {v * inner * 4 / 2**30:.2f} GiB, block buffers "
          f"{chunk * v * 6 / 2**30:.2f} GiB, neighbour lists {v * args.knn_k * 12 / 2**30:.2f} GiB")

    # (f) flop arithmetic: one multiply-add = 2 flops
    f_exact = 2.0 * d * all_entries
    f_sampled = 2.0 * d * n_s * v
    f_moments = 2.0 * v * d * d  # U^T U in float64
    f_drift = 2 * 2.0 * v * d * d  # X_c^T Y_c and X_c R in float32, plus an SVD of d x d
    per_cpu = 2.0 * d / rate_cpu  # flop per CPU-second in the exact blocks (binning and lists included)
    print(f"(f) flops: exact triangle {f_exact:.2e} (fp32), sampled pass {f_sampled:.2e} (fp32), exact mean/std "
          f"sums {f_moments:.2e} (fp64), drift {f_drift:.2e} (fp32)")
    print(f"    achieved in the exact blocks: {per_cpu / 1e9:.0f} GFLOP per CPU-second (binning and neighbour "
          f"lists included)")
    cores = args.host_cores
    for label, rate in ((f"{cores} cores at this machine's rate per CPU-second", per_cpu * cores),
                        (f"{cores} cores x 100 GFLOP/s fp32 (AVX-512 FMA, about half of peak)", 100e9 * cores)):
        print(f"    {label}: exact triangle ~{f_exact / rate:.0f} s, sampled pass ~{f_sampled / rate:.1f} s, "
              f"drift ~{f_drift / rate:.1f} s, float64 sums ~{2 * f_moments / rate:.1f} s (fp64 at half rate)")


if __name__ == "__main__":
    main()
