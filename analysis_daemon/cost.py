"""What analysing one snapshot will cost, decided from its shape before any work is done.

The analysis has four parts whose cost grows differently with V (rows) and d (columns):
- geometry over all V(V-1)/2 pairs: a dot product of length d per pair plus a per-pair overhead
  (threshold count, histogram, neighbour lists) that is memory-bound: each pair's similarity is
  written to and read back from a chunk x V block several times. Measured on this project's 2-core
  machine with the whole analysis: a 175000 x 2 snapshot (1.5e10 pairs) held the worker 95 s, 4.8x a
  GPT-2 snapshot (50304 x 768, 1.3e9 pairs), so a pair costs about 400 multiply-adds besides its dot
  product (the first model's 128, timed on small blocks that stay in cache, let such narrow matrices
  through at 3x the intended bound). benchmarks/bench_cost_model.py prints the model against the
  measured time over narrow and wide shapes;
- drift and the insight spectrum: V x d^2 Gram products and d x d decompositions (d^3);
- the insight extras that visit every row for a few hundred tokens (followed tokens' neighbourhood
  sizes, the clump search's seeds, probes): about EXTRA_ROWS x V x d;
- memory: the current and previous V x d matrices in float32 with working copies, a chunk x V block
  of similarities, neighbour lists, and d x d float64 matrices.
A 131072 x 1 snapshot is 512 KiB on the wire but 8.6e9 pairs; a 16 x 65536 one is tiny in pairs
but a 65536 x 65536 decomposition. Both are refused here instead of holding the only worker for an hour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PAIR_OVERHEAD: Final[int] = 400  # per-pair cost beyond the dot product, in multiply-add equivalents
EXTRA_ROWS: Final[int] = 320  # rows compared with the whole matrix by the extras (256 followed + 64 seeds)
DEFAULT_MAX_COST: Final[float] = 2e12  # ~1.2 GPT-2 snapshots (50304 x 768: 1.6e12); ~25 s on 2 cores here
DEFAULT_MAX_MEMORY: Final[int] = 4 * 1024**3


@dataclass(frozen=True)
class CostLimits:
    """Bounds on one snapshot's analysis (from --max-cost, --max-analysis-memory, --min-cols)."""

    max_cost: float = DEFAULT_MAX_COST
    max_memory: int = DEFAULT_MAX_MEMORY
    min_cols: int = 2  # a 1-wide embedding has only cosines of +-1


MIN_SAMPLE_ROWS: Final[int] = 1000  # fewer sampled rows give intervals too wide to be worth a result


def estimate_cost(rows: int, cols: int, sample_rows: int | None = None) -> float:
    """Work of one analysis in multiply-add equivalents: pairs x (d + overhead) + Gram and decompositions.

    With `sample_rows` = N < rows the geometry compares N rows with all rows (N x V pairs).
    """
    if sample_rows is not None and sample_rows < rows:
        pairs = float(sample_rows) * rows
    else:
        pairs = rows * (rows - 1) / 2
    return pairs * (cols + PAIR_OVERHEAD) + _fixed_cost(rows, cols)


def _fixed_cost(rows: int, cols: int) -> float:
    # Gram products and decompositions (drift, spectrum), plus the extras' passes over every row
    return 3.0 * rows * cols * cols + 20.0 * cols**3 + float(EXTRA_ROWS) * rows * cols


def plan(rows: int, cols: int, limits: CostLimits, chunk_size: int = 512, knn_k: int = 10,
         sample_rows: int | None = None, can_sample: bool = True) -> tuple[str | None, int | None]:
    """(reason to refuse or None, rows to sample the geometry from or None for the configured pass).

    A snapshot whose exact pass is over --max-cost is analysed sampled instead when the largest
    sample that fits has at least MIN_SAMPLE_ROWS rows (drift and the other parts stay exact).
    """
    reason = check(rows, cols, limits, chunk_size, knn_k, sample_rows)
    if reason is None or not can_sample or "--max-cost" not in reason:
        return reason, None
    budget = limits.max_cost - _fixed_cost(rows, cols)
    fit = int(budget / (rows * (cols + PAIR_OVERHEAD))) if budget > 0 else 0
    if sample_rows is not None:
        fit = min(fit, sample_rows)
    if fit < MIN_SAMPLE_ROWS or fit >= rows:
        return reason, None
    again = check(rows, cols, limits, chunk_size, knn_k, fit)
    return (again, None) if again is not None else (None, fit)


def estimate_memory(rows: int, cols: int, chunk_size: int = 512, knn_k: int = 10) -> int:
    """Peak bytes of one analysis beyond the daemon's baseline (float32 copies, blocks, d x d float64)."""
    matrices = 4 * rows * cols * 4  # current + previous as float32, and a working copy of each
    block = 2 * min(chunk_size, rows) * rows * 4  # similarities of one row chunk (+ its mask/scratch)
    neighbours = rows * max(knn_k, 0) * 12 * 2  # ids + values, previous and current lists
    square = 6 * cols * cols * 8  # Gram matrices, eigenvectors, SVD factors
    return matrices + block + neighbours + square


def check(rows: int, cols: int, limits: CostLimits, chunk_size: int = 512, knn_k: int = 10,
          sample_rows: int | None = None) -> str | None:
    """None when a rows x cols snapshot may be analysed (geometry sampled from `sample_rows`); else the reason."""
    if cols < limits.min_cols:
        return (f"snapshot {rows}x{cols} is narrower than --min-cols {limits.min_cols} "
                "(an embedding this thin is not worth its V^2 pairs)")
    cost = estimate_cost(rows, cols, sample_rows)
    if cost > limits.max_cost:
        return (f"snapshot {rows}x{cols}: estimated analysis cost {cost:.2g} multiply-adds exceeds --max-cost "
                f"{limits.max_cost:.2g} (one job may not hold the worker that long; raise --max-cost to allow it)")
    memory = estimate_memory(rows, cols, chunk_size, knn_k)
    if memory > limits.max_memory:
        return (f"snapshot {rows}x{cols}: estimated analysis memory {memory / 2**20:.0f} MiB exceeds "
                f"--max-analysis-memory {limits.max_memory / 2**20:.0f} MiB")
    return None
