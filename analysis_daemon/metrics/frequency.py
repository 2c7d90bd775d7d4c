"""Drift by token frequency: do rare tokens drift more? (Hamilton et al. 2016's law of conformity.)

Inputs: every token's drift cosine (Procrustes-aligned, `measure_semantic_drift(per_token=True)`; NaN
where a token has none) and how often the trainer fed each token since the previous snapshot
(`publisher.count_tokens`). Bins: tokens never seen are their own bin (count 0); the others go into
bins of log2 count, [1, 2), [2, 4), [4, 8), ... Per bin: the number of tokens and their mean drift
cosine. Spearman's rank correlation between count and drift (1 - cosine) over the tokens with a cosine:
negative when frequent tokens drift less (the law of conformity), positive when they drift more.
Ties get average ranks; None when fewer than 3 tokens or either side is constant.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of `x` (float64), ties sharing the average of the ranks they span."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return (ends - (counts.double() - 1.0) / 2.0)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of `a` and `b` (1-D, same length); None when undefined."""
    if a.numel() < 3:
        return None
    ra, rb = average_ranks(a.double()), average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(torch.linalg.vector_norm(ra) * torch.linalg.vector_norm(rb))
    if not den > 0:
        return None
    return max(-1.0, min(1.0, float((ra * rb).sum()) / den))


@torch.no_grad()
def drift_by_frequency(cosines: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
    """The record's insight.drift_by_frequency: bins of log2 count (never-seen first) and Spearman's rho."""
    if cosines.dim() != 1 or counts.dim() != 1 or cosines.shape != counts.shape:
        raise ValueError(f"cosines and counts must be 1-D of one length, got {list(cosines.shape)} "
                         f"and {list(counts.shape)}")
    counts = counts.to(torch.int64)
    has = ~torch.isnan(cosines.double())
    cos, cnt = cosines.double()[has], counts[has]
    top = int(cnt.max()) if cnt.numel() else 0
    bins = []
    edges = [(0, 0)] + [(2**k, 2 ** (k + 1) - 1) for k in range(max(top, 1).bit_length())]
    for lo, hi in edges:
        inside = (cnt >= lo) & (cnt <= hi)
        n = int(inside.sum())
        if n or lo == 0:
            mean = float(cos[inside].mean()) if n else None
            bins.append({"min_count": lo, "max_count": hi, "tokens": n,
                         "mean_drift_cosine": mean if mean is None or math.isfinite(mean) else None})
    return {"bins": bins, "tokens": int(has.sum()), "never_seen": int((counts == 0).sum()),
            "spearman_count_vs_drift": spearman(cnt.double(), 1.0 - cos)}
