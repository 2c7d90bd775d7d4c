"""Figures at Llama-3 scale (128256 x 4096 float32): drift, exact geometry, sampled geometry, peak memory.

Run:  nice .venv/bin/python benchmarks/bench_large_vocab.py [--vocab 128256 --dim 4096] [--blocks 4]
      [--sample-rows 4096] [--threads 2] [--chunk-size 512] [--host-cores 16]

One process plays the daemon: it holds two snapshots (generated row block by row block, so generation
adds no temporary of their size) and runs, in this order and side by side under the same load:
(a) drift between them, in full;
(b) the exact geometry pass as the daemon runs it (neighbour lists on), stopped after --blocks row
    blocks of the triangle through its progress callback (the abandonment path the daemon uses on
    shutdown). The set-up (normalised copy, exact mean/std sums) is measured in full; the blocks after
    the first give the cost per similarity, and the rest of the triangle is EXTRAPOLATED from it (every
    block does the same work per similarity; the first also fills the neighbour lists, so it is
    reported on its own and not used for the rate);
(c) the sampled geometry with --sample-rows rows, in full;
(d) the cost ratio (c) / (b extrapolated);
(e) the peak RSS of the process: all buffers of the exact pass are allocated before its first block,
    so the peak of a full analysis is reached within the measured part;
(f) the flop arithmetic, and what it means for a --host-cores host.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis_daemon.drift import measure_semantic_drift  # noqa: E402
from analysis_daemon.geometry import geometry_and_neighbours, pairwise_moments  # noqa: E402

GB = 1e9


class Stop(Exception):
    """Raised from the progress callback once enough blocks are measured."""


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


def main() -> None:
    """Measure and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--blocks", type=int, default=4, help="row blocks of the exact pass to measure (>= 2)")
    p.add_argument("--sample-rows", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--knn-k", type=int, default=10, help="neighbour lists as the daemon's default extras")
    p.add_argument("--host-cores", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    v, d, chunk = args.vocab, args.dim, args.chunk_size
    print(f"bench_large_vocab.py: V={v} d={d} float32 ({v * d * 4 / GB:.2f} GB per snapshot), "
          f"{args.threads} torch threads, chunk {chunk}, neighbour lists k={args.knn_k}")
    print(f"host: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f} (shared machine)")
    base_rss = rss_gib()
    t = time.monotonic()
    prev, cur = snapshots(v, d)
    print(f"two snapshots built in {time.monotonic() - t:.1f} s; peak RSS {base_rss:.2f} -> {rss_gib():.2f} GiB")

    # (a) drift, in full
    t = time.monotonic()
    drift = measure_semantic_drift(prev, cur, top_k=50)
    drift_s = time.monotonic() - t
    print(f"(a) drift, MEASURED in full                 {drift_s:8.1f} s   (cosine {drift['average_cosine_similarity']:.4f})")

    # (b) exact geometry: set-up in full, then the first --blocks blocks of the triangle
    t = time.monotonic()
    pairwise_moments(cur)  # the same normalised copy and float64 sums the pass starts with
    setup_s = time.monotonic() - t
    stamps: list[float] = []

    def progress(fraction: float) -> None:
        stamps.append(time.monotonic())
        if len(stamps) >= args.blocks:
            raise Stop
    t = time.monotonic()
    try:
        geometry_and_neighbours(cur, chunk_size=chunk, knn_k=args.knn_k, progress=progress)
    except Stop:
        pass
    first_block_s = stamps[0] - t - setup_s  # the pass's own set-up equals pairwise_moments' work
    entries = [chunk * (v - r * chunk) for r in range(len(stamps))]  # block r: chunk rows x (V - r0) columns
    rate = (stamps[-1] - stamps[0]) / sum(entries[1:])  # seconds per similarity, blocks 2..K
    blocks_total = -(-v // chunk)
    all_entries = sum(min(chunk, v - r * chunk) * (v - r * chunk) for r in range(blocks_total))
    exact_s = setup_s + first_block_s + rate * (all_entries - entries[0])
    measured_share = sum(entries) / all_entries
    print(f"(b) exact geometry, MEASURED: set-up (normalised copy + exact mean/std sums) {setup_s:.1f} s; "
          f"blocks 1..{len(stamps)} of {blocks_total} ({measured_share:.1%} of the triangle's similarities): "
          f"block 1 {first_block_s:.1f} s (fills the neighbour lists), blocks 2..{len(stamps)} "
          f"{stamps[-1] - stamps[0]:.1f} s = {rate * 1e9:.2f} s per 1e9 similarities")
    print(f"    exact geometry, EXTRAPOLATED to all {blocks_total} blocks "
          f"({all_entries / 1e9:.2f}e9 similarities)      {exact_s:8.1f} s   ({exact_s / 60:.1f} min)")

    # (c) sampled geometry, in full
    t = time.monotonic()
    sampled, _ = geometry_and_neighbours(cur, chunk_size=chunk, knn_k=args.knn_k, sample_rows=args.sample_rows)
    sampled_s = time.monotonic() - t
    lo, hi = sampled["confidence_95"]["average_neighborhood_size"]
    print(f"(c) sampled geometry N={args.sample_rows}, MEASURED in full       {sampled_s:8.1f} s   "
          f"(avg neighbours {sampled['local_density']['average_neighborhood_size']:.3f}, 95% CI "
          f"{lo:.3f}..{hi:.3f}; of it the exact mean/std set-up ~{setup_s:.1f} s, the sampled pass "
          f"~{sampled_s - setup_s:.1f} s)")
    print(f"(d) cost ratio sampled / exact                {sampled_s / exact_s:8.3f}     "
          f"(pass alone: {(sampled_s - setup_s) / (exact_s - setup_s):.3f}; similarities "
          f"{args.sample_rows * v / all_entries:.3f} of the triangle's)")
    print(f"(e) peak RSS holding two snapshots through drift, exact and sampled geometry: {rss_gib():.2f} GiB "
          f"(snapshots {2 * v * d * 4 / 2**30:.2f} GiB + normalised copy {v * (d + 16) * 4 / 2**30:.2f} GiB "
          f"+ block buffers {chunk * v * 5 / 2**30:.2f} GiB + neighbour lists and masks)")

    # (f) flop arithmetic: one multiply-add = 2 flops
    f_exact = 2.0 * d * all_entries
    f_sampled = 2.0 * d * args.sample_rows * v
    f_moments = 2.0 * v * d * d  # U^T U in float64
    f_drift = 2 * 2.0 * v * d * d  # X_c^T Y_c and X_c R (float32), plus an SVD of d x d
    achieved = 2.0 * d / rate  # flop/s in the measured blocks
    per_core = achieved / args.threads
    print(f"(f) flops: exact triangle {f_exact:.2e} (fp32), sampled pass {f_sampled:.2e} (fp32), exact mean/std "
          f"sums {f_moments:.2e} (fp64), drift {f_drift:.2e} (fp32)")
    print(f"    achieved here in the exact blocks: {achieved / 1e9:.0f} GFLOP/s on {args.threads} threads "
          f"({per_core / 1e9:.0f} per thread, the block's binning and neighbour lists included)")
    cores = args.host_cores
    for label, flops_per_s in ((f"{cores} cores at this machine's per-thread rate", per_core * cores),
                               (f"{cores} cores x 100 GFLOP/s fp32 (AVX-512, ~half of peak)", 100e9 * cores)):
        print(f"    {label}: exact geometry ~{f_exact / flops_per_s:.0f} s + set-up, sampled pass "
              f"~{f_sampled / flops_per_s:.1f} s, drift ~{f_drift / flops_per_s:.1f} s "
              f"(fp64 sums at half that rate: ~{2 * f_moments / flops_per_s:.1f} s)")


if __name__ == "__main__":
    main()
