"""Sampled geometry: the pairwise-cosine statistics estimated from N rows, each against all V rows.

For a very large vocabulary the exact pass (V^2 d / 2 multiply-adds) costs minutes per snapshot. Here N
packed (valid) rows are drawn uniformly without replacement and each is compared with all n valid rows,
itself excluded: N (n - 1) ordered pairs, cost N n d. Every ordered pair (i, j) belongs to row i, so the
exact totals are sums over rows of per-row counts (neighbours above the threshold, histogram bins); the
estimate of a total is n times the sample mean of the per-row counts, and its 95% interval is the usual
one for a mean under simple random sampling without replacement:

    mean +- 1.96 * sqrt((1 - N/n) * s^2 / N),   s^2 the sample variance (ddof=1) of the per-row counts

(the finite-population correction 1 - N/n shrinks it to zero as N -> n). It is a normal-approximation
interval: close to 95% once N is a few dozen and no handful of rows dominates the counts. The mean and
std of all cosines stay exact (O(V d^2) sums, computed by the caller).

The sample is reproducible: the same seed and the same number of valid rows give the same rows, so the
neighbour lists of consecutive snapshots (neighbourhood drift) are compared on the same tokens.
"""
from __future__ import annotations

import math
from typing import Callable, Final

import torch

from .bins import HIST_RANGE

Z_95: Final = 1.959963984540054  # two-sided 95% quantile of the standard normal
_SELF: Final = 255  # uint8 bin given to a row's similarity with itself: never a real bin (see geometry._bin_map)


def sample_index(n: int, sample_rows: int, seed: int) -> torch.Tensor:
    """Sorted positions of `sample_rows` of `n` rows, drawn uniformly without replacement from `seed`."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen, device="cpu")[: min(sample_rows, n)].sort().values


def interval(per_row: torch.Tensor, n: int, lo: float, hi: float) -> tuple[float, list[float]]:
    """(estimate of the mean over all n rows, its 95% interval clipped to [lo, hi]) from per-row values.

    With a single sampled row there is no variance estimate: the interval is the whole range [lo, hi].
    """
    m = per_row.numel()
    values = per_row.double()
    mean = float(values.mean())
    if m >= n:
        return mean, [mean, mean]
    if m < 2:
        return mean, [lo, hi]
    se = math.sqrt(max(0.0, (1.0 - m / n) * float(values.var(correction=1)) / m))
    return mean, [max(lo, mean - Z_95 * se), min(hi, mean + Z_95 * se)]


def row_bincounts(q: torch.Tensor, batched: bool) -> torch.Tensor:
    """(m, 256) counts of each row of the uint8 block `q`: one bincount per row (CPU), or one bincount
    over (row, bin) pairs (`batched`: a GPU, where m small kernel launches would cost more)."""
    m = q.shape[0]
    if not batched:
        return torch.stack([torch.bincount(q[r], minlength=256) for r in range(m)]) if m else \
            torch.zeros(0, 256, dtype=torch.int64, device=q.device)
    flat = q.to(torch.int64) + 256 * torch.arange(m, device=q.device)[:, None]
    return torch.bincount(flat.view(-1), minlength=256 * m).view(m, 256)


@torch.no_grad()
def sampled_pass(
    packed: torch.Tensor,
    d: int,
    k: float,
    c: float,
    chunk_size: int,
    sample: torch.Tensor,
    x_threshold: float,
    above_bin: int | None,
    knn_k: int,
    progress: Callable[[float], None] | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Per sampled row: its 256 uint8-bin counts against all other rows, its count above the threshold
    and (knn_k > 0) its knn_k nearest rows (packed ids, values in x units), from blocks of sampled rows.

    `packed` and the map x = k*cos + c are those of the exact pass (geometry.py); `above_bin` is the
    first bin above the threshold when the threshold lies on a bin edge, else None (then x > x_threshold
    is counted directly).
    """
    n, inner = packed.shape
    dev = packed.device
    sample = sample.to(dev)
    packed[:, d] = 1.0
    m_all = sample.numel()
    hist = torch.zeros(m_all, 256, dtype=torch.int64, device=dev)
    above = torch.zeros(m_all, dtype=torch.int64, device=dev)
    kk = min(knn_k, n - 1)
    knn_vals = torch.empty(m_all, kk, dtype=torch.float32, device=dev) if knn_k else None
    knn_ids = torch.empty(m_all, kk, dtype=torch.int64, device=dev) if knn_k else None
    m_max = min(chunk_size, m_all)
    a_buf = torch.zeros(m_max, inner, dtype=torch.float32, device=dev)
    a_buf[:, d] = c
    x_buf = torch.empty(m_max * n, dtype=torch.float32, device=dev)
    q_buf = torch.empty(m_max * n, dtype=torch.uint8, device=dev)
    for r0 in range(0, m_all, m_max):
        rows = sample[r0 : r0 + m_max]
        m = rows.numel()
        a = a_buf[:m]
        torch.mul(packed.index_select(0, rows)[:, :d], k, out=a[:, :d])
        x = x_buf[: m * n].view(m, n)
        torch.mm(a, packed.T, out=x)
        q = q_buf[: m * n].view(m, n)
        q.copy_(x)  # floor, as in the exact pass (x > 0)
        local = torch.arange(m, device=dev)
        q[local, rows] = _SELF  # a row is not its own neighbour: its bin is dropped below
        # each row's own counts: what the interval needs
        hist[r0 : r0 + m] = row_bincounts(q, batched=dev.type != "cpu")
        x[local, rows] = -math.inf
        if above_bin is None:
            above[r0 : r0 + m] = (x > x_threshold).sum(dim=1)
        if knn_vals is not None and kk > 0:
            v, j = x.topk(kk, dim=1)
            knn_vals[r0 : r0 + m], knn_ids[r0 : r0 + m] = v, j
        if progress is not None:
            progress((r0 + m) / m_all)
    hist[:, _SELF] = 0
    if above_bin is not None:
        above = hist[:, above_bin:].sum(dim=1)
    knn = (knn_ids.cpu(), knn_vals.cpu()) if knn_vals is not None and knn_ids is not None else None
    return hist.cpu(), above.cpu(), knn


def estimates(hist: torch.Tensor, above: torch.Tensor, n: int, off: int, bins: int) -> dict:
    """The estimated totals and their 95% intervals from the per-row counts of `sampled_pass`."""
    pairs_per_row = n - 1
    avg, avg_ci = interval(above, n, 0.0, float(pairs_per_row))

    def total(per_row: torch.Tensor) -> tuple[int, list[float]]:
        mean, (lo, hi) = interval(per_row, n, 0.0, float(pairs_per_row))
        return round(n * mean), [n * lo, n * hi]

    hist_counts, hist_ci = [], []
    last = hist[:, off + bins - 1] + hist[:, off + bins]  # the closed last bin takes cos == 1 too
    for b in range(bins):
        est, ci = total(hist[:, off + b] if b < bins - 1 else last)
        hist_counts.append(est)
        hist_ci.append(ci)
    below, below_ci = total(hist[:, :off].sum(dim=1))
    above_range, above_range_ci = total(hist[:, off + bins + 1 :].sum(dim=1))
    pairs_est, pairs_ci = total(above)
    return {
        "average_neighborhood_size": avg,
        "neighbor_pairs": pairs_est,
        "histogram_counts": hist_counts,
        "below_range_count": below,
        "above_range_count": above_range,
        "confidence_95": {
            "average_neighborhood_size": avg_ci,
            "neighbor_pairs": pairs_ci,
            "histogram_counts": hist_ci,
            "below_range_count": below_ci,
            "above_range_count": above_range_ci,
        },
    }


def sampled_geometry(
    packed: torch.Tensor,
    index: torch.Tensor,
    rows: int,
    d: int,
    bin_map: tuple[float, float, int, int],
    threshold: float,
    above_bin: int | None,
    moments: tuple[int, float | None, float | None],
    invalid: tuple[int, int],
    sample_rows: int,
    seed: int,
    chunk_size: int,
    knn_k: int,
    progress: Callable[[float], None] | None,
    sizes: bool = False,
) -> tuple[dict, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """`geometry_neighbours_and_sizes`' answer estimated from `sample_rows` of the n packed rows (n > sample_rows).

    `bin_map` = (k, c, off, bins) of the exact pass, `index` the original row id of each packed row,
    `moments` = (pairs, mean, std) and `invalid` = (nonfinite, zero) as the exact pass has them. The
    neighbour lists are those of the sampled rows (exact for them: each is compared with every row);
    the other rows have none (-1 / nan), so the neighbourhood drift averages over the sampled rows.
    So with the neighbourhood sizes (`sizes`): exact for the sampled rows, -1 (unknown) for the others.
    """
    k, c, off, bins = bin_map
    n = packed.shape[0]
    sample = sample_index(n, sample_rows, seed)
    hist, above, knn = sampled_pass(packed, d, k, c, chunk_size, sample, k * threshold + c, above_bin,
                                    knn_k, progress)
    est = estimates(hist, above, n, off, bins)
    pairs, mean, std = moments
    lo, hi = HIST_RANGE
    neighbours = None
    if knn_k:
        ids = torch.full((rows, knn_k), -1, dtype=torch.int32, device="cpu")
        cos = torch.full((rows, knn_k), math.nan, dtype=torch.float32, device="cpu")
        assert knn is not None
        knn_ids, knn_vals = knn
        index = index.cpu()
        targets = index[sample]
        kk = knn_ids.shape[1]
        ids[targets, :kk] = index[knn_ids].to(torch.int32)
        cos[targets, :kk] = (knn_vals - c) / k
        neighbours = (ids, cos)
    row_sizes = None
    if sizes:
        row_sizes = torch.full((rows,), -1, dtype=torch.int32, device="cpu")
        row_sizes[index.cpu()[sample]] = above.to(torch.int32)
    return {
        "rows": rows,
        "valid_rows": n,
        "nonfinite_rows": invalid[0],
        "zero_rows": invalid[1],
        "pairs": pairs,
        "sampled_rows": int(sample.numel()),
        "sampled_pairs": int(sample.numel()) * (n - 1),
        "sample_seed": int(seed),
        "local_density": {
            "average_neighborhood_size": est["average_neighborhood_size"],
            "threshold": threshold,
            "neighbor_pairs": est["neighbor_pairs"],
        },
        "global_sparsity": {
            "histogram_counts": est["histogram_counts"],
            "histogram_bins": torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device="cpu").tolist(),
            "mean_similarity": mean,
            "std_similarity": std,
            "below_range_count": est["below_range_count"],
            "above_range_count": est["above_range_count"],
        },
        "confidence_95": est["confidence_95"],
    }, neighbours, row_sizes
