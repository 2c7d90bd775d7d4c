"""Partial collapse: a large set of tokens that are all each other's neighbours (a clump).

Full collapse moves the mean pairwise cosine towards 1. A partial one does not: 3,500 never-trained
tokens of a 5,000-token vocabulary collapsed onto one point give an average neighbourhood of 2449.3 while
the mean cosine stays near 0.36. The rule, with s = ceil(share x valid rows):

1. Candidates, from the geometry pass at no extra pass: a member of a clump of s tokens has at least
   s - 1 neighbours (cosine > threshold), so when s - 1 >= k its k-th nearest neighbour (from the pass's
   neighbour lists, k = --knn-k) is above the threshold. Fewer than s candidates: no clump, done (the
   usual case, at no cost). Without neighbour lists every valid row is a candidate.
2. Seeds: R candidates drawn at random (a fixed seed; R = enough that a clump holding a share p of the
   candidates is missed with probability (1 - p)^R <= 1e-6, at least 64, at most 512) get their exact
   neighbour counts over all rows (one R x V product). A seed is a sampled row with >= s - 1 neighbours.
3. The clump of a seed is the seed and its neighbours. It is confirmed when it has >= s members and the
   sampled rows inside it are, on average, neighbours of at least 90% of its other members (mutual
   membership checked on the sample, not assumed from one row's view). Up to three seeds are tried,
   most neighbours first.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

MUTUAL = 0.9  # mean share of the clump each sampled member must see as neighbours
_MISS = 1e-6  # chance of sampling no member of a clump that holds `share` of the candidates
_MIN_SAMPLE, _MAX_SAMPLE = 64, 512
_SEEDS_TRIED = 3
_BLOCK = 64  # sampled rows per product: bounds the temporaries to 64 x V
EXAMPLES = 10


def sample_size(share: float, candidates: int) -> int:
    """R of the module docstring: rows sampled from `candidates` when looking for a clump of `share`."""
    need = math.ceil(math.log(_MISS) / math.log1p(-share)) if share < 1 else 1
    return min(candidates, max(_MIN_SAMPLE, min(_MAX_SAMPLE, need)))


@torch.no_grad()
def find_clump(weights: torch.Tensor, *, threshold: float, share: float, kth_cosine: torch.Tensor | None = None,
               knn_k: int = 0, seed: int = 0, vocab: Sequence[str] | None = None,
               device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The largest confirmed clump of at least ceil(share x valid rows) tokens, or None (see the module doc).

    `kth_cosine` (V,): each row's k-th nearest-neighbour cosine from the geometry pass (nan: none), with
    k = `knn_k`; None when the pass kept no neighbour lists. The products run on `device`.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    w = weights.detach().to(device, torch.float32)
    norms = torch.linalg.vector_norm(w, dim=1)
    valid = torch.isfinite(norms) & (norms > 0)  # a finite positive norm: every entry finite, not all zero
    n = int(valid.sum())
    s = math.ceil(share * n)
    if n < 2 or s < 2:
        return None
    candidates = valid
    if kth_cosine is not None and knn_k >= 1 and s - 1 >= knn_k:
        candidates = valid & (kth_cosine.to(w.device) > threshold)  # nan (no k-th neighbour) compares False
    cand_ids = torch.nonzero(candidates).squeeze(1)
    if cand_ids.numel() < s:
        return None

    r = sample_size(share, int(cand_ids.numel()))
    gen = torch.Generator().manual_seed(seed)
    pick = cand_ids[torch.randperm(cand_ids.numel(), generator=gen, device="cpu")[:r].to(w.device)]
    inv = torch.where(valid, 1.0 / norms, 0.0)

    def neighbour_rows(rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), V) bool: which rows are neighbours of each of `rows` (invalid rows and itself never)."""
        out = (w[rows] * inv[rows, None]) @ w.T * inv > threshold
        out &= valid
        out[torch.arange(rows.numel(), device=w.device), rows] = False
        return out

    # Exact neighbour counts of the sampled rows, a block at a time: memory stays O(_BLOCK x V).
    counts = torch.cat([neighbour_rows(pick[a : a + _BLOCK]).sum(dim=1) for a in range(0, r, _BLOCK)])
    order = torch.sort(counts, descending=True, stable=True).indices
    for best in order[:_SEEDS_TRIED].tolist():
        if int(counts[best]) < s - 1:
            break
        clump = neighbour_rows(pick[best : best + 1])[0]
        clump[pick[best]] = True
        size = int(clump.sum())
        if size < s:
            continue
        members = pick[clump[pick]]  # the sampled rows inside the clump, the seed included
        # each sampled member's neighbours within the clump, over the clump's other members
        seen = torch.cat([(neighbour_rows(members[a : a + _BLOCK]) & clump).sum(dim=1)
                          for a in range(0, members.numel(), _BLOCK)]).double() / (size - 1)
        mutual = float(seen.mean())
        if mutual >= MUTUAL:
            examples = torch.nonzero(clump).squeeze(1)[:EXAMPLES].tolist()
            return {"size": size, "fraction": size / n, "share": share, "threshold": threshold,
                    "mutual": mutual, "min_mutual": float(seen.min()), "sampled_members": int(members.numel()),
                    "sampled": r, "candidates": int(cand_ids.numel()), "valid_rows": n,
                    "token_ids": examples,
                    "token_strings": [vocab[t] if vocab and t < len(vocab) else None for t in examples]}
    return None
