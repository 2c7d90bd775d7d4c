"""The galaxy map: a 2-D picture of the embedding at one snapshot, with its clusters.

Pure functions on tensors (no sockets, no wandb). The recipe, in order:
- Points: all valid rows when V <= `rows`, else a fixed random subset of `rows` row ids drawn with a
  torch.Generator seeded with `seed`: the same V and seed give the same subset at every iteration of a
  run (and in every run), so one token keeps its place in the sequence of maps. Rows that are not valid
  at this snapshot (non-finite, all zero) are left out of it.
- Projection: PCA of the centred points (the subset's mean removed): the two leading eigenvectors of the
  d x d scatter matrix (or of the n x n Gram matrix when n < d), in float64, by subspace iteration.
  `explained_variance`: each axis' share of the points' total variance.
- Alignment: PCA axes have arbitrary signs and, when two variances are close, an arbitrary rotation.
  With the previous map of the run, the 2-D orthogonal Procrustes rotation (reflections allowed) that
  best maps this map's shared points onto the previous map's is applied, so the picture does not spin
  or flip between snapshots. Without one, each axis is signed so that its largest coordinate is positive.
- Clusters: the neighbour graph among the points, an edge where the cosine of two *centred* rows (the
  points' mean removed, as for the projection and for drift) exceeds the daemon's threshold; a cluster
  is a connected component of two or more points (single linkage); a point with no neighbour is a
  singleton, cluster -1. Centred, because trained embeddings share a large common direction: on raw
  cosines (mean 0.41 in the planted-groups run at iteration 300) threshold links chain the 16 planted
  groups into 4 clusters; on centred rows they come out as 16 separate ones. Cluster ids follow the previous map's where a cluster keeps most of its points, so a
  galaxy keeps its colour over time; new clusters take fresh ids.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

DEFAULT_ROWS = 2000
MAX_CLUSTERS_LISTED = 50  # the clusters list names the largest ones; every point still carries its id
MEMBERS_LISTED = 10  # members named per cluster, largest row norm first


def subset_ids(v: int, rows: int, seed: int) -> torch.Tensor:
    """Row ids of the map: all of range(v) when v <= rows, else `rows` ids drawn with `seed`, sorted."""
    if v <= rows:
        return torch.arange(v, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(v, generator=gen, device="cpu")[:rows].sort().values


def _components(adj: torch.Tensor) -> torch.Tensor:
    """Connected-component label (smallest member index) of each node of a symmetric bool adjacency."""
    n = adj.shape[0]
    labels = torch.arange(n, dtype=torch.int32, device=adj.device)
    big = torch.tensor(n, dtype=torch.int32, device=adj.device)
    while True:
        # each node takes the smallest label among itself and its neighbours, then follows the labels
        # to their roots (pointer jumping): O(log n) rounds on typical graphs, at most n
        nb = torch.where(adj, labels[None, :], big).amin(dim=1)
        new = torch.minimum(labels, nb)
        while True:
            jumped = new[new.long()]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            return labels
        labels = new


def _procrustes_2d(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The 2x2 orthogonal R minimising ||p R - q||_F (SVD of p^T q)."""
    u, _, vt = torch.linalg.svd(p.T @ q)
    return u @ vt


# Subspace (block power) iteration for the two leading eigenvectors: a full eigh of a 768 x 768 matrix
# costs seconds on a busy 2-core machine, this costs milliseconds. A block wider than 2 converges at
# the rate (lambda_{q+1} / lambda_2)^iterations; the Rayleigh-Ritz step orders the block's vectors.
_BLOCK = 8
_ITERATIONS = 60


def _top2(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two largest eigenvalues (descending) and their eigenvectors (columns) of symmetric PSD `c`."""
    m = c.shape[0]
    q = min(_BLOCK, m)
    if m <= 2 * _BLOCK:  # tiny: the exact decomposition is cheap
        evals, evecs = torch.linalg.eigh(c)
    else:
        gen = torch.Generator().manual_seed(0)  # fixed start: the same input gives the same map, any device
        basis = torch.linalg.qr(torch.randn(m, q, generator=gen, dtype=c.dtype, device="cpu").to(c.device)).Q
        threads = torch.get_num_threads()
        # Products this small are dominated by waking the thread pool (~50 ms each on a busy machine
        # against ~2 ms on one thread): run them on this thread alone.
        torch.set_num_threads(1)
        try:
            for _ in range(_ITERATIONS):
                basis = torch.linalg.qr(c @ basis).Q
            evals, small = torch.linalg.eigh(basis.T @ c @ basis)
        finally:
            torch.set_num_threads(threads)
        evecs = basis @ small
    k = min(2, evals.numel())
    return evals[-k:].flip(0).clamp(min=0), evecs[:, -k:].flip(1)


def _project(x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(n, 2) PCA coordinates of the rows of x (float64, centred) and the two axes' variance shares."""
    n, d = x.shape
    if n < 2:
        return torch.zeros(n, 2, dtype=torch.float64, device=x.device), [0.0, 0.0]
    if n < d:  # n x n Gram: its eigenvectors scaled by sqrt(eigenvalue) are the coordinates
        gram = x @ x.T
        top, vecs = _top2(gram)
        coords = vecs * top.sqrt()
        total = float(gram.diagonal().sum())
    else:
        cov = x.T @ x
        top, vecs = _top2(cov)
        coords = x @ vecs
        total = float(cov.diagonal().sum())
    shares = [float(v) / total if total > 0 else 0.0 for v in top]
    if coords.shape[1] < 2:  # d == 1
        coords = torch.cat([coords, torch.zeros(n, 2 - coords.shape[1], dtype=torch.float64, device=x.device)],
                           dim=1)
        shares += [0.0] * (2 - len(shares))
    return coords, shares


def _stable_ids(members: list[torch.Tensor], prev_cluster: dict[int, int]) -> list[int]:
    """An id per cluster (largest first): the previous map's id holding most of its points when that
    is more than half of them and not taken by a larger cluster, else a fresh id."""
    used: set[int] = set()
    fresh = max(prev_cluster.values(), default=-1) + 1
    ids = []
    for token_ids in members:
        votes: dict[int, int] = {}
        for t in token_ids.tolist():
            c = prev_cluster.get(t, -1)
            if c >= 0:
                votes[c] = votes.get(c, 0) + 1
        best = max(votes.items(), key=lambda kv: (kv[1], -kv[0]), default=(-1, 0))
        if best[0] >= 0 and best[0] not in used and 2 * best[1] > len(token_ids):
            ids.append(best[0])
        else:
            ids.append(fresh)
            fresh += 1
        used.add(ids[-1])
    return ids


@torch.no_grad()
def galaxy_map(weights: torch.Tensor, *, rows: int = DEFAULT_ROWS, seed: int = 0, threshold: float = 0.7,
               previous: dict[str, Any] | None = None, vocab: Sequence[str] | None = None,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """The record's "galaxy" section for snapshot `weights` (V, d); see the module docstring.

    The projection and the neighbour graph are computed on `device`; the section is plain Python values.
    `previous`: this run's previous galaxy section (for the alignment and the cluster ids), or None.
    """
    if weights.dim() != 2:
        raise ValueError(f"embedding weights must be 2-D (V, d), got shape {list(weights.shape)}")
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    v = weights.shape[0]
    ids = subset_ids(v, rows, seed)
    w = weights[ids.to(weights.device)].detach().to(device, torch.float64)
    valid = torch.isfinite(w).all(dim=1) & (w != 0).any(dim=1)
    ids, w = ids[valid.cpu()], w[valid]
    n = int(ids.numel())

    coords, shares = _project(w - w.mean(dim=0) if n else w)
    coords = coords.cpu()
    prev_xy = {int(p[0]): (p[1], p[2]) for p in (previous or {}).get("points") or []}
    shared = [i for i, t in enumerate(ids.tolist()) if t in prev_xy]
    aligned_to = None
    if len(shared) >= 2:
        p = coords[shared]
        q = torch.tensor([prev_xy[int(ids[i])] for i in shared], dtype=torch.float64, device="cpu")
        coords = coords @ _procrustes_2d(p, q)
        aligned_to = (previous or {}).get("iter")
    elif n:
        signs = torch.where(coords.gather(0, coords.abs().argmax(dim=0, keepdim=True)) < 0, -1.0, 1.0)
        coords = coords * signs

    norms = torch.linalg.vector_norm(w, dim=1).cpu()
    centred = w - w.mean(dim=0) if n else w
    # a row at the mean has no direction: its zero vector has cosine 0 with everyone (a singleton)
    unit = (centred / torch.linalg.vector_norm(centred, dim=1, keepdim=True).clamp(min=1e-300)).float()
    adj = unit @ unit.T > threshold
    adj.fill_diagonal_(False)
    roots = _components(adj).cpu() if n else torch.zeros(0, dtype=torch.int32, device="cpu")
    uniq, inverse, sizes = torch.unique(roots, return_inverse=True, return_counts=True)
    groups = [torch.nonzero(inverse == g).squeeze(1) for g in range(len(uniq)) if sizes[g] >= 2]
    groups.sort(key=lambda g: (-g.numel(), int(g[0])))  # largest first, then by first token
    prev_cluster = {int(p[0]): int(p[3]) for p in (previous or {}).get("points") or []}
    cluster_ids = _stable_ids([ids[g] for g in groups], prev_cluster)
    point_cluster = torch.full((n,), -1, dtype=torch.int64, device="cpu")
    clusters = []
    for cid, g in zip(cluster_ids, groups):
        point_cluster[g] = cid
        if len(clusters) < MAX_CLUSTERS_LISTED:
            top = g[torch.sort(norms[g], descending=True, stable=True).indices[:MEMBERS_LISTED]]
            clusters.append({"id": cid, "size": int(g.numel()),
                             "members": [[int(ids[i]), token_label(vocab, int(ids[i]))] for i in top.tolist()]})
    points = [[t, round(float(x), 4), round(float(y), 4), c]
              for t, (x, y), c in zip(ids.tolist(), coords.tolist(), point_cluster.tolist())]
    return {"method": "pca", "rows": n, "seed": seed, "explained_variance": [round(s, 6) for s in shares],
            "points": points, "clusters": clusters, "cluster_count": len(groups),
            "clustered_points": int(sum(g.numel() for g in groups)), "threshold": threshold,
            "vocab_rows": v, "aligned_to_iter": aligned_to}


TOKEN_CHARS = 200  # a token string longer than this (a hostile or odd vocabulary) is cut, ending in "..."


def token_label(vocab: Sequence[str] | None, tid: int) -> str | None:
    """Token `tid`'s string, cut to TOKEN_CHARS, or None: the map repeats strings for 2000 points and 500
    members, and a trainer's vocabulary may hold strings of up to 64 KiB."""
    if not vocab or not 0 <= tid < len(vocab):
        return None
    text = vocab[tid]
    return text if len(text) <= TOKEN_CHARS else text[: TOKEN_CHARS - 3] + "..."


def cluster_purity(points: Sequence[Sequence[Any]], labels: Sequence[int]) -> float:
    """Share of clustered points whose cluster's majority label is their own (labels[token_id]; -1 points
    of either side are left out); nan when no labelled point is clustered."""
    by_cluster: dict[int, list[int]] = {}
    for token_id, _, _, c in points:
        if c >= 0 and labels[int(token_id)] >= 0:
            by_cluster.setdefault(int(c), []).append(labels[int(token_id)])
    total = sum(len(v) for v in by_cluster.values())
    if not total:
        return math.nan
    return sum(max(v.count(x) for x in set(v)) for v in by_cluster.values()) / total
