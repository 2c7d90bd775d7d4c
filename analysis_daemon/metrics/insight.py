"""Insight beyond drift and geometry: spectrum, isotropy, row norms, frozen rows, neighbourhoods, probes.

Pure functions on tensors (no sockets, no wandb). Conventions:
- Valid rows are those `geometry` keeps: every entry finite and not all zero. Every metric below runs
  over the valid rows only, on the raw vectors (not normalised, not centred) unless it says otherwise.
- Effective rank (RankMe, Garrido et al. 2023): exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j, s the
  singular values of the raw valid rows (not centred, as RankMe does; zero p_i contribute 0). A matrix
  with k equal non-zero singular values has effective rank k. s comes from the eigenvalues of W^T W
  (d x d, accumulated in float64 from float32 blocks): O(V d^2), no SVD of the V x d matrix; eigenvalues
  below 1e-6 of the largest are float32 rounding noise and count as 0.
- Isotropy (Mu & Viswanath 2018, "All-but-the-Top"): min_c Z(c) / max_c Z(c), Z(c) = sum_i exp(c . w_i),
  c over the eigenvectors of W^T W (their approximation of the unit sphere); 1 means isotropic. Raw
  rows, as in the paper; computed in log space, so large norms cannot overflow.
  With it, the norm of the mean unit row: 0 when no direction is preferred, 1 when every row points
  the same way (the narrow cone of Gao et al. 2019, "Representation Degeneration").
- Neighbourhood overlap: |kNN_prev(i) & kNN_curr(i)| / k, cosine neighbours without i itself; it only
  depends on cosines, so any rotation of the whole matrix leaves it at 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

_ROWS = 4096  # rows per block of every pass: bounds the float32 temporaries
NORM_BINS = 50


@dataclass
class Spectrum:
    """What one pass over the raw rows gives: enough for rank, isotropy and row-norm figures."""

    gram: torch.Tensor  # (d, d) float64: W^T W over the valid raw rows
    norms: torch.Tensor  # (n,) float64 L2 norms of the valid rows
    unit_sum: torch.Tensor  # (d,) float64: sum of the valid rows scaled to unit length
    valid: torch.Tensor  # (V,) bool: which rows are valid
    _eig: tuple[torch.Tensor, torch.Tensor] | None = None

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of W^T W, computed once (rank and isotropy share them)."""
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.gram)
        return self._eig


def _blocks(weights: torch.Tensor, device: torch.device | str) -> Iterator[tuple[int, torch.Tensor]]:
    for a in range(0, weights.shape[0], _ROWS):
        yield a, weights[a : a + _ROWS].detach().to(device, torch.float32)


def _valid_rows(w: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Rows all finite and not all zero; with `norms` (float32 row norms of `w`), exact checks only where
    the norm is not finite and positive (a finite positive norm proves the row valid)."""
    if norms is None:
        return torch.isfinite(w).all(dim=1) & (w != 0).any(dim=1)
    ok = torch.isfinite(norms) & (norms > 0)
    if not bool(ok.all()):  # rare: non-finite entries, zero rows, or a float32 norm out of range
        suspect = ~ok
        ok[suspect] = _valid_rows(w[suspect])
    return ok


# Column slabs of W^T W: slab r takes W_r^T [W_r .. W_last], the upper triangle of blocks only, mirrored
# at the end: 5/8 of the full product's flops, the same float32 products entry by entry.
_GRAM_SLABS = 4


@torch.no_grad()
def spectrum(weights: torch.Tensor, *, device: torch.device | str = "cpu") -> Spectrum:
    """W^T W, row norms and the sum of unit rows of the valid rows of `weights` (V, d), in one pass on `device`."""
    if weights.dim() != 2:
        raise ValueError(f"embedding weights must be 2-D (V, d), got shape {list(weights.shape)}")
    d = weights.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    unit_sum = torch.zeros(d, dtype=torch.float64, device=device)
    edges = sorted({d * r // _GRAM_SLABS for r in range(_GRAM_SLABS + 1)})
    norms, valid = [], []
    for _, w in _blocks(weights, device):
        ok = _valid_rows(w, torch.linalg.vector_norm(w, dim=1))
        valid.append(ok)
        w = w[ok] if not bool(ok.all()) else w
        # float32 products (the cost is the matmul), summed in float64 across blocks
        for c0, c1 in zip(edges, edges[1:]):
            gram[c0:c1, c0:] += (w[:, c0:c1].T @ w[:, c0:]).double()
        nrm = torch.linalg.vector_norm(w, dim=1, dtype=torch.float64)  # float32 could overflow to inf
        norms.append(nrm)
        unit_sum += torch.mv(w.T, (1.0 / nrm).float()).double()  # sum of w_i/|w_i|, no V x d temporary
    gram = torch.triu(gram) + torch.triu(gram, diagonal=1).T  # exactly symmetric: eigh reads one triangle
    return Spectrum(gram, torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64, device=device),
                    unit_sum, torch.cat(valid) if valid else torch.zeros(0, dtype=torch.bool, device=device))


def effective_rank(singular_values: torch.Tensor) -> float | None:
    """RankMe: exp of the entropy of the singular values normalised to sum 1; None if they are all 0."""
    s = singular_values.double().clamp(min=0)
    total = float(s.sum())
    if not total > 0 or not math.isfinite(total):
        return None
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


@torch.no_grad()
def isotropy(weights: torch.Tensor, spec: Spectrum) -> dict[str, float | None]:
    """Mu & Viswanath's partition ratio and the mean unit row's norm (see the module docstring)."""
    n = int(spec.norms.numel())
    if n == 0 or not bool(torch.isfinite(spec.gram).all()):
        return {"partition_ratio": None, "mean_unit_vector_norm": None}
    c = spec.eigh()[1].float()
    log_z = torch.full((c.shape[1],), -math.inf, dtype=torch.float64, device=c.device)
    for a, w in _blocks(weights, c.device):
        ok = spec.valid[a : a + w.shape[0]]
        w = w[ok] if not bool(ok.all()) else w  # no copy of the block when every row is valid
        if w.shape[0]:
            log_z = torch.logaddexp(log_z, torch.logsumexp(w @ c, dim=0).double())
    return {"partition_ratio": math.exp(float(log_z.min() - log_z.max())),
            "mean_unit_vector_norm": float(torch.linalg.vector_norm(spec.unit_sum)) / n}


# Eigenvalues of the float32-accumulated W^T W below this fraction of the largest are rounding noise
# (their square roots would add a spurious tail of singular values ~1e-3 of the largest): count them as 0.
_EIG_NOISE = 1e-6


def singular_values(spec: Spectrum) -> torch.Tensor:
    """Singular values of the valid raw rows, from the eigenvalues of W^T W (rounding noise zeroed)."""
    if not bool(torch.isfinite(spec.gram).all()):  # float32 products overflowed (entries beyond ~1e19)
        return torch.zeros(0, dtype=torch.float64, device=spec.gram.device)
    eig = spec.eigh()[0]
    if eig.numel() == 0:
        return eig
    return torch.where(eig > _EIG_NOISE * float(eig.max()), eig, 0.0).sqrt()


def row_norm_stats(norms: torch.Tensor, bins: int = NORM_BINS) -> dict[str, Any] | None:
    """min/mean/max and a `bins`-bin histogram (on [min, max], last bin closed) of the row norms."""
    if norms.numel() == 0:
        return None
    norms = norms.cpu()  # torch.histogram runs on the CPU only (and V values are cheap to move)
    lo, hi = float(norms.min()), float(norms.max())
    if hi <= lo:  # all equal: one bin's worth of width around the value keeps the edges increasing
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = torch.histogram(norms.double(), bins=bins, range=(lo, hi))
    return {"min": float(norms.min()), "mean": float(norms.mean()), "max": float(norms.max()),
            "histogram_counts": [int(v) for v in counts], "histogram_bins": edges.tolist()}


_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                  torch.float16: torch.int16, torch.bfloat16: torch.int16}


@torch.no_grad()
def frozen_rows(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Bool (V,): rows bit-identical in `prev` and `cur` (same shape; values compared if dtypes differ)."""
    if prev.shape != cur.shape:
        raise ValueError(f"shapes differ: {list(prev.shape)} vs {list(cur.shape)}")
    if prev.dtype == cur.dtype and prev.dtype in _SAME_SIZE_INT:
        as_int = _SAME_SIZE_INT[prev.dtype]  # bits, so NaN == NaN and -0.0 != 0.0
        return (prev.view(as_int) == cur.view(as_int)).all(dim=1)
    return (prev.double() == cur.double()).all(dim=1)


@torch.no_grad()
def neighbourhood_overlap(prev_ids: torch.Tensor, cur_ids: torch.Tensor) -> torch.Tensor:
    """Float (V,): |prev_ids[i] & cur_ids[i]| / k per row; nan where either list is incomplete (-1)."""
    if prev_ids.shape != cur_ids.shape:
        raise ValueError(f"neighbour lists differ in shape: {list(prev_ids.shape)} vs {list(cur_ids.shape)}")
    k = cur_ids.shape[1]
    if k == 0:
        return torch.full((cur_ids.shape[0],), math.nan, device=cur_ids.device)
    shared = (prev_ids[:, :, None] == cur_ids[:, None, :]).any(dim=2).sum(dim=1).float() / k
    complete = (prev_ids >= 0).all(dim=1) & (cur_ids >= 0).all(dim=1)
    return torch.where(complete, shared, math.nan)


@torch.no_grad()
def probe_neighbours(weights: torch.Tensor, probe_ids: Sequence[int], k: int = 10,
                     spec: Spectrum | None = None, *, device: torch.device | str = "cpu") -> list[list[tuple[int, float]]]:
    """For each probe row, its k most cosine-similar other valid rows as (id, cosine), best first.

    `spec` (from `spectrum(weights)`) saves normalising every row: its norms divide the raw products.
    """
    if not probe_ids:
        return []
    p = weights[list(probe_ids)].detach().to(device, torch.float32)
    p_ok = _valid_rows(p)
    p = p / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp(min=1e-30)
    if spec is not None:
        inv_norm = torch.zeros(weights.shape[0], device=device)
        inv_norm[spec.valid] = (1.0 / spec.norms).float()
    sims = torch.empty(weights.shape[0], len(probe_ids), device=device)
    for a, w in _blocks(weights, device):
        if spec is not None:
            ok = spec.valid[a : a + w.shape[0]]
            s = (w @ p.T) * inv_norm[a : a + w.shape[0], None]
        else:
            ok = _valid_rows(w)
            s = (w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp(min=1e-30)) @ p.T
        s[~ok] = -math.inf  # an invalid row is nobody's neighbour
        sims[a : a + w.shape[0]] = s
    out: list[list[tuple[int, float]]] = []
    for j, tid in enumerate(probe_ids):
        col = sims[:, j]
        col[tid] = -math.inf  # not its own neighbour
        if not bool(p_ok[j]):
            out.append([])
            continue
        vals, ids = col.topk(min(k, col.numel()))
        out.append([(int(i), float(v)) for i, v in zip(ids, vals) if math.isfinite(float(v))])
    return out


def resolve_probes(specs: Sequence[str], vocab: Sequence[str] | None, rows: int) -> tuple[list[int], list[str]]:
    """Token ids for `specs` and the specs that name nothing.

    A number is a token id (kept if < rows); anything else is looked up in `vocab` as written, then with
    a leading space and with GPT-2's leading "Ġ" (how BPE vocabularies spell a word after a space).
    """
    index: dict[str, int] = {}
    for i, tok in enumerate(vocab or []):
        index.setdefault(tok, i)
    ids: list[int] = []
    unknown: list[str] = []
    for spec in specs:
        if spec.isdigit():
            tid: int | None = int(spec) if int(spec) < rows else None
        else:
            tid = next((index[s] for s in (spec, " " + spec, "\u0120" + spec) if s in index), None)
            tid = tid if tid is not None and tid < rows else None
        if tid is None:
            unknown.append(spec)
        elif tid not in ids:
            ids.append(tid)
    return ids, unknown


def _token(vocab: Sequence[str] | None, tid: int) -> str | None:
    return vocab[tid] if vocab and 0 <= tid < len(vocab) else None


def compute_insight(cur: torch.Tensor, *, prev: torch.Tensor | None = None,
                    knn_ids: torch.Tensor | None = None, prev_knn_ids: torch.Tensor | None = None,
                    probe_ids: Sequence[int] = (), vocab: Sequence[str] | None = None,
                    top_k: int = 50, probe_k: int = 10, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The result record's "insight" section (plain JSON types) for snapshot `cur`.

    `prev`: the previous snapshot (frozen rows; None or another shape: null). `knn_ids` / `prev_knn_ids`:
    this and the previous analysed snapshot's neighbour lists (V, k) from `geometry_and_neighbours`
    (neighbourhood drift; null when either is missing or their shapes differ). The math runs on `device`.
    """
    cur = cur.detach().to(device)  # once: every pass below reads it (no copy when it is there already)
    spec = spectrum(cur, device=device)
    out: dict[str, Any] = {"effective_rank": effective_rank(singular_values(spec)),
                           "isotropy": isotropy(cur, spec), "row_norms": row_norm_stats(spec.norms)}
    out["frozen_tokens"] = None
    if prev is not None and prev.shape == cur.shape:
        ids = torch.nonzero(frozen_rows(prev.detach().to(device), cur)).squeeze(1).cpu()
        out["frozen_tokens"] = {"count": int(ids.numel()), "token_ids": ids[:top_k].tolist()}
        if vocab:
            out["frozen_tokens"]["token_strings"] = [_token(vocab, int(t)) for t in ids[:top_k]]
    out["neighbourhood_drift"] = None
    if knn_ids is not None and prev_knn_ids is not None and knn_ids.shape == prev_knn_ids.shape:
        overlap = neighbourhood_overlap(prev_knn_ids, knn_ids)
        defined = ~torch.isnan(overlap)
        ids = torch.nonzero(defined).squeeze(1)
        # lowest overlap first; the stable sort keeps ties in token order
        order = torch.sort(overlap[ids], stable=True).indices[:top_k]
        changed = [[int(ids[i]), float(overlap[ids[i]])] for i in order]
        out["neighbourhood_drift"] = {
            "k": int(knn_ids.shape[1]),
            "mean_overlap": float(overlap[defined].mean()) if ids.numel() else None,
            "tokens": int(ids.numel()),
            "most_changed_tokens": changed,
        }
        if vocab:
            out["neighbourhood_drift"]["most_changed_token_strings"] = [_token(vocab, t) for t, _ in changed]
    out["probes"] = [
        {"token_id": tid, "token": _token(vocab, tid),
         "neighbours": [[nid, _token(vocab, nid), cos] for nid, cos in found]}
        for tid, found in zip(probe_ids, probe_neighbours(cur, list(probe_ids), probe_k, spec, device=device))
    ]
    return out


def _sig(x: float, digits: int = 6) -> float | None:
    """`x` to `digits` significant digits (None when not finite): enough for a plot, short in JSON."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


@torch.no_grad()
def token_stats(weights: torch.Tensor, token_ids: Sequence[int], threshold: float, *,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """Per followed token: its row's L2 norm and its neighbourhood size, as the record's "token_stats".

    Neighbourhood size = number of other valid rows with cosine > `threshold` (geometry's
    average_neighborhood_size, per token: unit rows, self excluded, non-finite or all-zero rows excluded).
    One (n x V) product over row blocks: O(n V d) for n tokens, float32 like geometry. An invalid followed
    row has a null size (and a null norm when it is not finite). Ids outside the matrix are left out.
    """
    if weights.dim() != 2:
        raise ValueError(f"embedding weights must be 2-D (V, d), got shape {list(weights.shape)}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    rows = int(weights.shape[0])
    ids = list(dict.fromkeys(int(t) for t in token_ids if 0 <= int(t) < rows))
    if not ids:
        return {"threshold": threshold, "tokens": []}
    p = weights[ids].detach().to(device, torch.float32)
    norms = torch.linalg.vector_norm(p.double(), dim=1)  # float64: a float32 norm could overflow
    p_ok = _valid_rows(p)
    p = p / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp(min=1e-30)
    p[~p_ok] = 0.0  # no NaN into the product; these tokens get a null size anyway
    pt = p.T.contiguous()
    counts = torch.zeros(len(ids), dtype=torch.int64, device=device)
    where = torch.tensor(ids, device=device)
    for a, w in _blocks(weights, device):
        ok = _valid_rows(w, torch.linalg.vector_norm(w, dim=1))
        u = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp(min=1e-30)
        above = (u @ pt) > threshold  # (block rows, n)
        above[~ok] = False  # an invalid row is nobody's neighbour
        mine = (where >= a) & (where < a + w.shape[0])  # followed tokens in this block: not their own neighbour
        if bool(mine.any()):
            cols = torch.nonzero(mine).squeeze(1)
            above[where[cols] - a, cols] = False
        counts += above.sum(dim=0)
    return {"threshold": threshold,
            "tokens": [[tid, _sig(float(norms[j])), int(counts[j]) if bool(p_ok[j]) else None]
                       for j, tid in enumerate(ids)]}
