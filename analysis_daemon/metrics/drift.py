"""Semantic drift between two embedding snapshots: orthogonal Procrustes on centred rows, then per-token change.

Semantics (DESIGN.md, "Semantics of the numbers"): centre both snapshots, find the orthogonal R minimising
||X_c R - Y_c||_F (from the SVD of X_c^T Y_c), and compare X_c R with Y_c row by row. So Y = X Q + b
(any orthogonal Q, any translation b) gives cosine 1 and distance 0 for every token, up to rounding.

The centred matrices are never materialised: rows are centred a chunk at a time, while the chunk is in
cache, once to accumulate X_c^T Y_c and once to compare; so memory beyond the inputs is O(chunk x d).
"""
from __future__ import annotations

import math
from typing import Final

import torch

# Rows per chunk: small enough that a chunk's temporaries stay in cache, big enough for an efficient matmul.
_ROWS: Final = 2048
# A centred row shorter than this fraction of the snapshot's size is float32 rounding noise: no direction.
_DEGENERATE_REL: Final = 1e-6


class DriftShapeMismatch(ValueError):
    """The two snapshots cannot be compared token by token: their shapes differ (or are not 2-D)."""


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows of `x` are all finite: one summing pass, the exact check only where a row sum is not finite."""
    finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    suspect = ~torch.isfinite(x.sum(dim=1))  # a non-finite entry always spoils the sum; overflow may too
    if suspect.any():
        finite[suspect] = torch.isfinite(x[suspect]).all(dim=1)
    return finite


def _power_of_two_scale(x: torch.Tensor) -> float:
    """1.0 for ordinary magnitudes, else the power of two just above the largest |entry|.

    Dividing by it is exact and keeps every float32 product and sum below far from overflow/underflow.
    """
    if x.numel() == 0:
        return 1.0
    lo, hi = torch.aminmax(x)
    biggest = max(-float(lo), float(hi))
    if biggest == 0.0 or 2.0**-40 <= biggest <= 2.0**40:
        return 1.0
    return 2.0 ** math.frexp(biggest)[1]


class _Centred:
    """Rows of one snapshot, scaled by an exact power of two and centred on demand, chunk by chunk."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.scale = _power_of_two_scale(x)
        acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)  # float64 sums, no float64 copy of x
        for a in range(0, x.shape[0], _ROWS):
            acc += x[a : a + _ROWS].sum(dim=0, dtype=torch.float64)
        self.mean = acc / (x.shape[0] * self.scale)  # in scaled units
        self.mean32 = self.mean.float()

    def chunk(self, a: int) -> torch.Tensor:
        """Centred (scaled) rows a : a + _ROWS as a fresh float32 tensor."""
        rows = self.x[a : a + _ROWS]
        if self.scale != 1.0:
            rows = rows * (1.0 / self.scale)
        return rows - self.mean32


def linear_cka_from_grams(cross: torch.Tensor, gram_x: torch.Tensor, gram_y: torch.Tensor) -> float | None:
    """Linear CKA = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) from the three d x d products.

    Kornblith et al. 2019, eq. for linear CKA in the feature (d x d) form: O(V d^2), never V x V. 1 for
    Y = s X Q + b (Q orthogonal, s != 0); None when either centred matrix is zero (no direction at all).
    """
    den = float(torch.linalg.matrix_norm(gram_x)) * float(torch.linalg.matrix_norm(gram_y))
    if not den > 0 or not math.isfinite(den):
        return None
    return min(1.0, max(0.0, float(cross.square().sum()) / den))  # in [0, 1]; rounding may step past 1


def common_mode_shift(cx: "_Centred", cy: "_Centred") -> dict[str, float | None]:
    """The mean row's change and size (Bis et al. 2021, "Too Much in Common"), apart from the Procrustes drift.

    `mean_shift`: ||mean(Y) - mean(X)||; `mean_shift_relative`: that / the average row norm of Y;
    `mean_norm_ratio` / `prev_mean_norm_ratio`: ||mean row|| / average row norm of Y / of X (0: no common
    direction; 1: every row is the same vector). Procrustes drift centres both snapshots, so a shift of
    every row by one vector is invisible to it and shows here.
    """
    mx, my = cx.mean * cx.scale, cy.mean * cy.scale
    avg_x, avg_y = _average_row_norm(cx), _average_row_norm(cy)
    shift = float(torch.linalg.vector_norm(my - mx))
    return {"mean_shift": shift,
            "mean_shift_relative": shift / avg_y if avg_y > 0 else None,
            "mean_norm_ratio": float(torch.linalg.vector_norm(my)) / avg_y if avg_y > 0 else None,
            "prev_mean_norm_ratio": float(torch.linalg.vector_norm(mx)) / avg_x if avg_x > 0 else None}


def _average_row_norm(c: "_Centred") -> float:
    total = 0.0
    for a in range(0, c.x.shape[0], _ROWS):
        rows = c.x[a : a + _ROWS]
        if c.scale != 1.0:
            rows = rows * (1.0 / c.scale)
        total += float(torch.linalg.vector_norm(rows, dim=1).double().sum())
    return total * c.scale / max(c.x.shape[0], 1)


def _token_list(ids: torch.Tensor, cos: torch.Tensor) -> list[list]:
    """[[token_id, cosine], ...] as plain Python numbers (JSON-ready)."""
    return [[int(i), float(c)] for i, c in zip(ids.tolist(), cos.tolist())]


@torch.no_grad()
def measure_semantic_drift(prev: torch.Tensor, curr: torch.Tensor, top_k: int = 50, *, per_token: bool = False,
                           cka: bool = True, common_mode: bool = True,
                           grams: dict[str, torch.Tensor] | None = None,
                           device: torch.device | str = "cpu") -> dict:
    """Per-token drift from snapshot `prev` (X) to snapshot `curr` (Y), both (V, d), after Procrustes alignment.

    Contract:
    - Raises DriftShapeMismatch (a ValueError) when the shapes differ or are not 2-D; the message names
      both shapes. Raises ValueError for a negative top_k. Never returns NaN.
    - Rows with a non-finite entry in either snapshot are left out of the fit and of every statistic,
      counted in `nonfinite_rows`.
    - A row whose centred vector (in X or in Y) is zero, up to float32 rounding, has no direction: it is
      left out of `average_cosine_similarity` and the token lists, counted in `degenerate_rows`, and kept
      in `average_euclidean_distance`.
    - `most_drifted_tokens`: the top_k lowest cosines, ascending; `least_drifted_tokens`: the top_k
      highest, descending; each a list of [token_id, cosine] with token_id the row index in the input;
      ties keep token order. Averages are None (and lists empty) when no row qualifies.
    - `linear_cka` (with `cka`): linear CKA of the centred finite rows (`linear_cka_from_grams`); the
      `common_mode` figures (with `common_mode`): see `common_mode_shift`.
    - `grams`: an in/out cache of the centred Gram matrices X_c^T X_c ("x") and Y_c^T Y_c ("y"), float64
      d x d: given ones are used instead of computed (a snapshot's Gram is the same in the next drift and
      in the drift since init), computed ones are stored. Used only when every row is finite.
    Inputs may be float16/bfloat16/float32/float64; the work is float32 with float64 sums (float64 values
    beyond float32's range count as non-finite).
    With `per_token`, the result also holds "per_token_cosine": a (V,) float32 tensor of every token's
    cosine, NaN where a token has none (non-finite or degenerate rows); not JSON, for the caller to store.
    The math runs on `device` (metrics/device.py); every value returned is on the CPU.
    """
    if prev.dim() != 2 or curr.dim() != 2 or prev.shape != curr.shape:
        raise DriftShapeMismatch(
            f"snapshot shapes differ: prev {list(prev.shape)} vs curr {list(curr.shape)}; drift needs equal (V, d)"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    v, d = prev.shape
    x = prev.detach().to(device, torch.float32)  # no copy when it already is float32 on `device`
    y = curr.detach().to(device, torch.float32)
    finite = _finite_rows(x) & _finite_rows(y)
    n = int(finite.sum())
    result: dict = {
        "rows": v,
        "nonfinite_rows": v - n,
        "degenerate_rows": 0,
        "average_cosine_similarity": None,
        "average_euclidean_distance": None,
        "most_drifted_tokens": [],
        "least_drifted_tokens": [],
    }
    if cka:
        result["linear_cka"] = None
    if common_mode:
        result["common_mode"] = None
    if per_token:
        result["per_token_cosine"] = torch.full((v,), float("nan"), dtype=torch.float32, device="cpu")
    if n == 0:
        return result
    ids = None
    if n < v:
        ids = finite.nonzero().squeeze(1)
        x, y = x[ids], y[ids]
    cx, cy = _Centred(x), _Centred(y)
    if common_mode:
        result["common_mode"] = common_mode_shift(cx, cy)

    # X_c^T Y_c is d x d: float32 chunk products summed in float64; its SVD in float64 is cheap.
    # The Gram matrices X_c^T X_c and Y_c^T Y_c of the same chunks give linear CKA (when asked for).
    dev = x.device
    m = torch.zeros(d, d, dtype=torch.float64, device=dev)
    cache = grams if grams is not None and ids is None else None  # cached Grams cover every row
    known = {k: cache[k].to(dev) / scale**2 for k, scale in (("x", cx.scale), ("y", cy.scale))
             if cache is not None and cache.get(k) is not None and tuple(cache[k].shape) == (d, d)}
    gx = known.get("x", torch.zeros(d, d, dtype=torch.float64, device=dev)) if cka else None
    gy = known.get("y", torch.zeros(d, d, dtype=torch.float64, device=dev)) if cka else None
    for a in range(0, n, _ROWS):
        xa, ya = cx.chunk(a), cy.chunk(a)
        m += (xa.T @ ya).double()
        if gx is not None and "x" not in known:
            gx += (xa.T @ xa).double()
        if gy is not None and "y" not in known:
            gy += (ya.T @ ya).double()
    if gx is not None and gy is not None:
        result["linear_cka"] = linear_cka_from_grams(m, gx, gy)
        if cache is not None:
            cache["x"], cache["y"] = (gx * cx.scale**2).cpu(), (gy * cy.scale**2).cpu()  # kept on the CPU
    u, _, vh = torch.linalg.svd(m)
    rot = (u @ vh).float()

    dot = torch.empty(n, dtype=torch.float64, device=x.device)
    norm_x = torch.empty(n, dtype=torch.float64, device=x.device)
    norm_y = torch.empty(n, dtype=torch.float64, device=x.device)
    dist = torch.empty(n, dtype=torch.float64, device=x.device)
    for a in range(0, n, _ROWS):
        xr = cx.chunk(a) @ rot
        yc = cy.chunk(a)
        b = a + xr.shape[0]
        dot[a:b] = torch.linalg.vecdot(xr, yc).double() * (cx.scale * cy.scale)
        norm_x[a:b] = torch.linalg.vector_norm(xr, dim=1).double() * cx.scale
        norm_y[a:b] = torch.linalg.vector_norm(yc, dim=1).double() * cy.scale
        if cx.scale == cy.scale:
            dist[a:b] = torch.linalg.vector_norm(xr - yc, dim=1).double() * cx.scale
        else:  # different scales: subtract in float64, where both magnitudes fit
            dist[a:b] = torch.linalg.vector_norm(xr.double() * cx.scale - yc.double() * cy.scale, dim=1)
    # Centring rounds at ~eps * (|mean| + |row|); a centred norm this far below the snapshot's size is noise.
    size_x = cx.scale * float(cx.mean.norm()) + float(norm_x.square().mean().sqrt())
    size_y = cy.scale * float(cy.mean.norm()) + float(norm_y.square().mean().sqrt())
    directed = (norm_x > _DEGENERATE_REL * size_x) & (norm_y > _DEGENERATE_REL * size_y)
    result["degenerate_rows"] = n - int(directed.sum())
    result["average_euclidean_distance"] = float(dist.mean())

    keep = directed.nonzero().squeeze(1)
    if keep.numel() == 0:
        return result
    cos = (dot[keep] / (norm_x[keep] * norm_y[keep])).clamp_(-1.0, 1.0)
    token_ids = keep if ids is None else ids[keep]
    result["average_cosine_similarity"] = float(cos.mean())
    if per_token:
        result["per_token_cosine"][token_ids.cpu()] = cos.float().cpu()
    k = min(top_k, cos.numel())
    order = torch.sort(cos, stable=True).indices
    result["most_drifted_tokens"] = _token_list(token_ids[order[:k]], cos[order[:k]])
    order = torch.sort(cos, descending=True, stable=True).indices
    result["least_drifted_tokens"] = _token_list(token_ids[order[:k]], cos[order[:k]])
    return result
