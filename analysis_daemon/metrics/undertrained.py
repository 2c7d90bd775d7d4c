"""Under-trained tokens from the weights: rows that training has not moved beyond a common mode.

After Land & Bartolo 2024 ("Fishing for Magikarp"): tokens that never occur in the training data keep
their initial vectors in an input embedding (shrunk by weight decay, which is the same factor for every
row), and in an output head they all receive the same gradient direction (the softmax pushes every
unseen token's logit down along the mean hidden state; Adam's per-coordinate normalisation even makes
the steps equal). So the untrained rows are one tight group: a common vector plus each row's own init
noise, isotropic and small, while trained rows carry their own, larger, learned content.

The search works on rows z_i of a matrix Z: the change since the run's first snapshot (W - W_0) when
that is known ("since_init": the untrained group then sits at 0 or at the common push, with no init
noise at all), else the weights themselves ("weights": the group's spread is the init noise).
1. Seeds: rows at both ends of ||z_i - mean|| and of the top principal directions, and the tokens the
   trainer never fed (counts, when given): the untrained group is an extreme of at least one of these.
2. From each seed, the distances to every row, sorted: a tight group shows as a run of small distances
   followed by a jump. The group is kept when the jump is at least `min_separation` (nearest outsider
   over the farthest member) and its size is between `min_size` and `max_share` of the valid rows.
3. Refined once around the group's mean: members are the rows closer than the widest gap in the sorted
   distances from that centre; score = 1 - distance / (distance of the nearest outsider), so 1 is the
   centre and 0 the edge. The best-separated group over all seeds wins.
Cost: O(seeds x V x d) plus one d x d eigendecomposition; no V x V work.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

_ROWS = 4096
MAX_LIST = 200  # tokens listed in a record (the count is exact)
_SEED_SAMPLE = 4096  # rows whose covariance gives the principal directions the seeds are taken along


def _distances(z: torch.Tensor, centres: torch.Tensor, z_sq: torch.Tensor) -> torch.Tensor:
    """(V, m) Euclidean distances from every row of `z` to each of `centres` (m, d), in blocks."""
    c_sq = centres.square().sum(dim=1)
    out = torch.empty(z.shape[0], centres.shape[0])
    ct = centres.T.contiguous()
    for a in range(0, z.shape[0], _ROWS):
        block = z[a : a + _ROWS]
        d2 = z_sq[a : a + _ROWS, None] + c_sq[None, :] - 2.0 * (block @ ct)
        out[a : a + block.shape[0]] = d2.clamp_(min=0.0).sqrt_()
    return out


def _seeds(z: torch.Tensor, z_sq: torch.Tensor, never_seen: torch.Tensor | None, per_end: int) -> torch.Tensor:
    """Row ids to start from: extremes of the distance to the mean and of the top principal directions."""
    v = z.shape[0]
    mean = z.mean(dim=0, dtype=torch.float64).float()
    # ||z - mean||^2 and the projections without a V x d temporary (one product with [mean, 3 directions])
    zc_norm = (z_sq - 2.0 * (z @ mean) + mean.square().sum()).clamp(min=0.0)
    k = min(per_end, v)
    picks = [zc_norm.topk(k).indices, (-zc_norm).topk(k).indices]
    # principal directions from an evenly spread sample of rows: seeds need directions, not exact ones
    # (O(sample x d^2) instead of O(V d^2))
    sample = z[torch.linspace(0, v - 1, min(v, _SEED_SAMPLE)).long()] - mean
    _, vecs = torch.linalg.eigh((sample.T @ sample).double())
    top = vecs[:, -min(3, vecs.shape[1]):].float()
    projections = z @ top - mean @ top
    for j in range(top.shape[1]):
        proj = projections[:, j]
        picks += [proj.topk(k).indices, (-proj).topk(k).indices]
    if never_seen is not None and bool(never_seen.any()):
        picks.append(never_seen.nonzero().squeeze(1)[:per_end])
    return torch.unique(torch.cat(picks))


def _group(dist: torch.Tensor, min_size: int, max_size: int) -> tuple[int, float] | None:
    """(size, separation) of the tight group at the start of sorted distances `dist`, or None."""
    if dist.numel() <= min_size:
        return None
    hi = min(max_size, dist.numel() - 1)
    head = dist[: hi + 1]
    # the widest relative jump between consecutive sorted distances (from the min_size-th member on)
    ratio = head[min_size:] / head[min_size - 1 : -1].clamp(min=1e-30)
    if ratio.numel() == 0:
        return None
    j = int(ratio.argmax())
    return min_size + j, min(float(ratio[j]), 1e6)  # 1e6: "apart", whatever the exact figure


@torch.no_grad()
def find_undertrained(weights: torch.Tensor, *, initial: torch.Tensor | None = None,
                      never_seen: torch.Tensor | None = None, min_size: int = 3, max_share: float = 0.5,
                      min_separation: float = 1.5, seeds_per_end: int = 8,
                      limit: int = MAX_LIST) -> dict[str, Any]:
    """The under-trained tokens of `weights` (V, d): {"count", "method", "separation", "tokens": [[id, score]]}.

    `initial`: the run's first snapshot (same shape) when known: the change since it is searched instead
    of the weights. `never_seen`: bool (V,) of tokens the trainer never fed (extra seeds; not required).
    Rows with non-finite entries are never flagged. `tokens` lists at most `limit`, most confident first.
    """
    if weights.dim() != 2:
        raise ValueError(f"embedding weights must be 2-D (V, d), got shape {list(weights.shape)}")
    w = weights.detach().to("cpu", torch.float32)
    method = "weights"
    if initial is not None and tuple(initial.shape) == tuple(w.shape):
        w = w - initial.detach().to("cpu", torch.float32)
        method = "since_init"
    empty = {"count": 0, "method": method, "separation": None, "tokens": []}
    finite = torch.isfinite(w).all(dim=1)
    ids = finite.nonzero().squeeze(1)
    z = w[ids] if ids.numel() < w.shape[0] else w
    n = z.shape[0]
    max_size = int(max_share * n)
    if n < 2 * min_size or max_size < min_size:
        return empty
    seen = never_seen[ids] if never_seen is not None and never_seen.shape[0] == w.shape[0] else None
    z_sq = torch.linalg.vecdot(z, z)
    seeds = _seeds(z, z_sq, seen, seeds_per_end)
    best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    dists = _distances(z, z[seeds], z_sq)
    for col in range(dists.shape[1]):
        order = torch.argsort(dists[:, col])
        found = _group(dists[order, col], min_size, max_size)
        if found is None or found[1] < min_separation:
            continue
        # refine around the group's mean: the seed itself may sit at the group's edge
        members = order[: found[0]]
        centre = z[members].mean(dim=0, keepdim=True)
        d_c = _distances(z, centre, z_sq)[:, 0]
        order_c = torch.argsort(d_c)
        again = _group(d_c[order_c], min_size, max_size)
        if again is None or again[1] < min_separation:
            continue
        if best is None or again[1] > best[0]:
            size = again[0]
            edge = float(d_c[order_c[size]])  # the nearest outsider
            best = (again[1], order_c[:size], d_c[order_c[:size]], edge)
    if best is None:
        return empty
    separation, members, member_dist, edge = best
    scores = (1.0 - member_dist / edge).clamp(min=0.0, max=1.0) if edge > 0 else torch.ones_like(member_dist)
    token_ids = ids[members] if ids.numel() < w.shape[0] else members
    listed = [[int(t), round(float(s), 6)] for t, s in zip(token_ids[:limit].tolist(), scores[:limit].tolist())]
    return {"count": int(members.numel()), "method": method, "separation": round(separation, 4),
            "tokens": listed}


def precision_recall(flagged: Sequence[int], truth: Sequence[int]) -> tuple[float, float]:
    """(precision, recall) of `flagged` token ids against the `truth` ids (1.0 for empty sets on both sides)."""
    f, t = set(int(i) for i in flagged), set(int(i) for i in truth)
    hit = len(f & t)
    precision = hit / len(f) if f else (1.0 if not t else 0.0)
    recall = hit / len(t) if t else 1.0
    return precision, recall


