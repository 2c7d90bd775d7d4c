"""2-D coordinates for every token of a snapshot, aligned with the run's previous ones (the explorer's map).

Pure functions on tensors. The recipe mirrors the galaxy map (galaxy.py) but covers the whole
vocabulary instead of a subset:
- Projection: PCA of the centred rows, the two leading eigenvectors of the d x d scatter matrix
  (float32 row blocks summed in float64: O(V d^2), no V x d float64 copy).
- Alignment: PCA axes have arbitrary signs and, when two variances are close, an arbitrary rotation.
  With the previous coordinates of the run (same V), the 2-D orthogonal Procrustes rotation that best
  maps this snapshot's points onto the previous ones is applied (reflections allowed), so the map does
  not spin or flip between iterations. Without them, each axis is signed so that its largest coordinate
  is positive, the galaxy map's convention.
Rows with a non-finite value get NaN coordinates and take no part in the fit or the alignment.
"""
from __future__ import annotations

import torch

from .galaxy import _procrustes_2d, _top2

_ROWS = 8192  # rows per float32 block of the scatter sums


@torch.no_grad()
def token_coordinates(weights: torch.Tensor, previous: torch.Tensor | None = None, *,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(V, 2) float32 CPU PCA coordinates of every row of `weights` (V, d), aligned to `previous` (V, 2) if given.

    The sums and the projection run on `device`; only the (V, 2) coordinates come back.
    """
    if weights.dim() != 2:
        raise ValueError(f"embedding weights must be 2-D (V, d), got shape {list(weights.shape)}")
    v, d = weights.shape
    x = weights.detach().to(device, torch.float32)
    finite = torch.isfinite(x).all(dim=1)
    out = torch.full((v, 2), float("nan"), dtype=torch.float32, device=device)
    n = int(finite.sum())
    if n < 2:
        if n:
            out[finite] = 0.0
        return out.cpu()
    ids = finite.nonzero().squeeze(1) if n < v else None
    rows = x if ids is None else x[ids]
    mean = rows.double().sum(dim=0) / n
    mean32 = mean.float()
    scatter = torch.zeros(d, d, dtype=torch.float64, device=device)
    for a in range(0, n, _ROWS):
        block = rows[a:a + _ROWS] - mean32
        scatter += (block.T @ block).double()
    _, vecs = _top2(scatter)
    if vecs.shape[1] < 2:  # d == 1: a second axis of zeros
        vecs = torch.cat([vecs, torch.zeros(d, 2 - vecs.shape[1], dtype=vecs.dtype, device=device)], dim=1)
    basis = vecs.float()
    coords = torch.empty(n, 2, dtype=torch.float32, device=device)
    for a in range(0, n, _ROWS):
        coords[a:a + _ROWS] = (rows[a:a + _ROWS] - mean32) @ basis
    coords = coords.double()
    prev = None
    if previous is not None and tuple(previous.shape) == (v, 2):
        previous = previous.to(device)
        prev = previous.double() if ids is None else previous[ids].double()
        shared = torch.isfinite(prev).all(dim=1)
        if int(shared.sum()) >= 2:
            coords = coords @ _procrustes_2d(coords[shared], prev[shared])
        else:
            prev = None
    if prev is None:
        biggest = coords.gather(0, coords.abs().argmax(dim=0, keepdim=True))
        coords = coords * torch.where(biggest < 0, -1.0, 1.0)
    if ids is None:
        return coords.float().cpu()
    out[ids] = coords.float()
    return out.cpu()
