"""Per-token norm and neighbourhood size (metrics.insight.token_stats) against a dense float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from analysis_daemon.metrics.insight import token_stats
from analysis_daemon.pipeline import followed_tokens

THRESHOLD = 0.7


def _planted(seed: int = 0) -> torch.Tensor:
    """9000 x 32 rows (over two row blocks): clusters of 1..40 rows around random centres, invalid rows."""
    g = torch.Generator().manual_seed(seed)
    d, rows, parts = 32, 9000, []
    size = 1
    while sum(len(p) for p in parts) < rows:
        centre = torch.randn(d, generator=g)
        centre = 3.0 * centre / centre.norm()
        # members within ~0.05 of their centre: cosines ~0.99 inside, |cos| << 0.7 across (random directions)
        parts.append(centre + 0.05 * torch.randn(size, d, generator=g) * torch.rand(size, 1, generator=g) * 3)
        size = size % 40 + 1
    w = torch.cat(parts)[:rows]
    w *= torch.rand(rows, 1, generator=g) * 4 + 0.1  # norms vary: cosines do not
    w[17] = math.nan
    w[4500, 3] = math.inf
    w[8000] = 0.0
    return w


def _reference(w: torch.Tensor, ids: list[int], threshold: float) -> list[list]:
    """Dense float64: all V x V cosines, self and invalid rows excluded."""
    x = w.double()
    valid = torch.isfinite(x).all(dim=1) & (x != 0).any(dim=1)
    u = torch.where(valid[:, None], x, 0.0)
    u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-300)
    cos = u @ u.T
    cos.fill_diagonal_(-2.0)
    cos[:, ~valid] = -2.0
    out = []
    for t in ids:
        norm = float(x[t].norm())
        out.append([t, norm if math.isfinite(norm) else None,
                    int((cos[t] > threshold).sum()) if bool(valid[t]) else None])
    return out, cos


def test_norms_and_neighbourhood_sizes_match_a_dense_reference() -> None:
    w = _planted()
    ids = [0, 1, 2, 5, 17, 4500, 8000, 4095, 4096, 4097, 8999, 1234, 6000, 77, 77, -1, 9000]  # dupes, out of range
    got = token_stats(w, ids, THRESHOLD)
    want, cos = _reference(w, list(dict.fromkeys(t for t in ids if 0 <= t < 9000)), THRESHOLD)
    # no cosine within 0.05 of the threshold: the float32 counts must equal the float64 ones exactly
    near = cos[[t for t, _, _ in want]]
    assert not bool(((near - THRESHOLD).abs() < 0.05).any())
    assert got["threshold"] == THRESHOLD
    assert [t for t, _, _ in got["tokens"]] == [t for t, _, _ in want]
    for (t, norm, size), (_, rnorm, rsize) in zip(got["tokens"], want):
        assert size == rsize, t
        assert (norm is None) == (rnorm is None) and (norm is None or norm == pytest.approx(rnorm, rel=1e-5))
    sizes = {t: s for t, _, s in got["tokens"]}
    assert sizes[17] is None and sizes[4500] is None and sizes[8000] is None  # invalid rows: no size
    assert got["tokens"][[t for t, _, _ in got["tokens"]].index(8000)][1] == 0.0  # a zero row's norm is 0
    assert len({s for s in sizes.values() if s is not None}) > 5  # planted clusters of many sizes
    # the geometry's definition: the mean of the per-token sizes over every valid row is its average
    from analysis_daemon.metrics.geometry import analyze_embedding_geometry
    every = token_stats(w, range(9000), THRESHOLD)["tokens"]
    mean = sum(s for _, _, s in every if s is not None) / sum(1 for _, _, s in every if s is not None)
    assert mean == pytest.approx(
        analyze_embedding_geometry(w, threshold=THRESHOLD)["local_density"]["average_neighborhood_size"], rel=1e-12)


def test_other_thresholds_empty_and_bad_input() -> None:
    w = _planted(1)[:600]
    for thr in (-0.5, 0.3, 0.95):
        got = token_stats(w, [0, 3, 17, 599], thr)["tokens"]
        want, _ = _reference(w, [0, 3, 17, 599], thr)
        assert [s for _, _, s in got] == [s for _, _, s in want]
    assert token_stats(w, [], 0.7) == {"threshold": 0.7, "tokens": []}
    assert token_stats(w, [600, -3], 0.7)["tokens"] == []
    with pytest.raises(ValueError, match="2-D"):
        token_stats(w[0], [0], 0.7)
    with pytest.raises(ValueError, match="finite"):
        token_stats(w, [0], math.nan)


def test_followed_set_keeps_earlier_tokens_and_stays_bounded() -> None:
    assert followed_tokens([], [5], [9, 2, 5], rows=10) == [5, 9, 2]
    assert followed_tokens([5, 9, 2], [5], [3], rows=10) == [5, 3, 9, 2]  # 9 and 2 keep their lines
    assert followed_tokens([5, 9, 2], [], [40], rows=10) == [5, 9, 2]  # ids beyond the matrix left out
    ids = followed_tokens(list(range(1000, 1300)), [7], list(range(10, 110)), rows=5000, limit=256)
    assert len(ids) == 256 and ids[:101] == [7, *range(10, 110)] and ids[101:] == list(range(1000, 1155))
