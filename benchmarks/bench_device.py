"""Geometry on the CPU vs a CUDA GPU (--device): GPT-2's 50304 x 768 and Llama-3's 128256 x 4096.

Run:  .venv/bin/python benchmarks/bench_device.py [--sample-rows 1024] [--threads N] [--full-cpu]

CPU: the exact pass at these sizes takes minutes here, so by default it is measured as a sampled pass of
`--sample-rows` rows (each against all V rows, the same blocked matmul + bincount) and extrapolated to the
exact triangle's V(V-1)/2 pairs from its time per pair; `--full-cpu` runs the exact 50304 x 768 pass
instead. CUDA (when there is a device): the exact pass at both sizes, with the chunk size the daemon
would choose (metrics/device.py), timed after a warm-up and a synchronize. Without CUDA it says
"no CUDA device" and prints the CPU figures only.
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

from analysis_daemon.metrics.device import chunk_rows  # noqa: E402
from analysis_daemon.metrics.geometry import geometry_and_neighbours  # noqa: E402

SIZES = [(50304, 768), (128256, 4096)]


def embeddings(v: int, d: int, device: str) -> torch.Tensor:
    """Low rank plus noise with a shared offset, like trained token embeddings (seeded)."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(v, 32, generator=g, device=device) @ torch.randn(32, d, generator=g, device=device) / 6
    return w + torch.randn(v, d, generator=g, device=device) + 0.5


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample-rows", type=int, default=1024, help="CPU: rows of the sampled pass timed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--full-cpu", action="store_true", help="CPU: the exact 50304 x 768 pass instead")
    p.add_argument("--knn-k", type=int, default=10, help="neighbour lists as the daemon keeps them")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {torch.get_num_threads()} torch thread(s); geometry with knn_k={args.knn_k}")
    cpu_rate = None
    for v, d in SIZES:
        pairs = v * (v - 1) / 2
        if args.full_cpu and (v, d) == SIZES[0]:
            w = embeddings(v, d, "cpu")
            s = timed(lambda: geometry_and_neighbours(w, chunk_size=512, knn_k=args.knn_k))
            cpu_rate = s / (pairs * d)
            print(f"cpu   {v:>6} x {d:<5} exact            {s:9.1f} s")
            continue
        if cpu_rate is None:
            w = embeddings(v, d, "cpu")
            n = args.sample_rows
            # Two sample sizes: their difference is the per-pair cost alone, without the O(V d^2) packing
            # and moments that every pass pays once.
            s1 = timed(lambda: geometry_and_neighbours(w, chunk_size=512, knn_k=args.knn_k, sample_rows=n))
            s2 = timed(lambda: geometry_and_neighbours(w, chunk_size=512, knn_k=args.knn_k, sample_rows=2 * n))
            cpu_rate = max(s2 - s1, 1e-9) / (n * v * d)  # seconds per pair per dimension (multiply-add)
            fixed = max(0.0, s1 - cpu_rate * n * v * d)
            print(f"cpu   {v:>6} x {d:<5} sampled {n}/{2 * n} rows {s1:6.1f}/{s2:6.1f} s -> exact "
                  f"~{fixed + cpu_rate * pairs * d:7.0f} s ({cpu_rate * 1e12:.0f} ps per multiply-add, "
                  f"{fixed:.1f} s per pass)")
            del w
        else:
            print(f"cpu   {v:>6} x {d:<5} extrapolated     ~{cpu_rate * pairs * d:9.0f} s "
                  f"(= {cpu_rate * pairs * d / 3600:.1f} h; same rate per multiply-add)")
    if not torch.cuda.is_available():
        print("no CUDA device: GPU figures not measured (run this on a GPU host)")
        return
    dev = torch.device("cuda")
    print(f"CUDA: {torch.cuda.get_device_name(dev)}")
    for v, d in SIZES:
        w = embeddings(v, d, "cuda")
        chunk = chunk_rows(dev, v, 512)
        geometry_and_neighbours(w[:4096], chunk_size=chunk, knn_k=args.knn_k, device=dev)  # warm-up
        s = timed(lambda: geometry_and_neighbours(w, chunk_size=chunk, knn_k=args.knn_k, device=dev))
        cpu_s = cpu_rate * v * (v - 1) / 2 * d if cpu_rate else float("nan")
        print(f"cuda  {v:>6} x {d:<5} exact, chunk {chunk:<5} {s:9.2f} s  ({cpu_s / s:,.0f}x the CPU estimate; "
              f"peak {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB)")
        del w
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


if __name__ == "__main__":
    main()
