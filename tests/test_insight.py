"""Insight metrics against cases whose answer is known, and the neighbour lists against a dense reference."""
from __future__ import annotations

import math

import pytest
import torch

from analysis_daemon.metrics.drift import measure_semantic_drift
from analysis_daemon.metrics.geometry import analyze_embedding_geometry, geometry_and_neighbours
from analysis_daemon.metrics.insight import (compute_insight, effective_rank, frozen_rows, isotropy,
                                     neighbourhood_overlap, probe_neighbours, resolve_probes,
                                     row_norm_stats, singular_values, spectrum)


def orthonormal(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """`rows` orthonormal rows of width `dim` (rows <= dim)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q[:rows].float()


def dense_knn(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: each row's k most cosine-similar other rows from the full similarity matrix."""
    u = torch.nn.functional.normalize(w.double(), dim=1)
    s = u @ u.T
    s.fill_diagonal_(-math.inf)
    vals, ids = s.topk(k, dim=1)
    return ids, vals


# --- effective rank ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7, 32])
def test_effective_rank_of_k_equal_singular_values_is_k(k: int) -> None:
    w = 2.5 * orthonormal(k, 32, seed=k)  # k singular values, all 2.5
    w = torch.cat([w, -w, torch.zeros(5, 32)])  # duplicated and zero rows change no singular direction
    assert effective_rank(singular_values(spectrum(w))) == pytest.approx(k, rel=1e-6)


def test_effective_rank_follows_the_entropy_formula_for_unequal_values() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    expected = math.exp(-float((p * p.log()).sum()))
    w = orthonormal(4, 16) * s[:, None]  # singular values exactly s
    assert effective_rank(singular_values(spectrum(w))) == pytest.approx(expected, rel=1e-6)
    assert effective_rank(torch.zeros(3)) is None


# --- isotropy -------------------------------------------------------------------------------------
def test_isotropy_of_a_symmetric_orthonormal_set_is_one_and_of_a_cone_is_low() -> None:
    q = orthonormal(16, 16)
    sym = torch.cat([q, -q])  # every direction and its opposite: Z(c) = sum 2 cosh(c.q_i), nearly flat
    iso = isotropy(sym, spectrum(sym))
    # W^T W = 2I, so eigh may return any basis; Z(c) then differs only in its 4th-order terms
    assert iso["partition_ratio"] == pytest.approx(1.0, abs=2e-3)
    assert iso["mean_unit_vector_norm"] == pytest.approx(0.0, abs=1e-6)

    g = torch.Generator().manual_seed(1)
    axis = torch.zeros(16)
    axis[0] = 1.0
    cone = 3.0 * axis + 0.1 * torch.randn(400, 16, generator=g)  # every row near one direction
    iso = isotropy(cone, spectrum(cone))
    # Z(axis) ~ 400 e^3, Z(c) ~ 400 for the other eigenvectors: the ratio is ~e^-3
    assert iso["partition_ratio"] == pytest.approx(math.exp(-3), rel=0.05)
    assert iso["mean_unit_vector_norm"] > 0.99


def test_mean_unit_vector_norm_ignores_row_lengths() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 10.0]])  # unit rows (1,0) and (0,1): mean has norm sqrt(2)/2
    assert isotropy(w, spectrum(w))["mean_unit_vector_norm"] == pytest.approx(math.sqrt(0.5), rel=1e-6)


# --- row norms, frozen rows --------------------------------------------------------------------------
def test_row_norm_stats_and_histogram() -> None:
    w = torch.zeros(6, 3)
    w[:, 0] = torch.tensor([1.0, 2.0, 2.0, 3.0, 4.0, 0.0])  # last row is zero: not valid, not counted
    w[1, 1] = float("nan")  # non-finite row: not counted either
    stats = row_norm_stats(spectrum(w).norms, bins=3)
    assert (stats["min"], stats["mean"], stats["max"]) == (1.0, pytest.approx(2.5), 4.0)
    assert stats["histogram_counts"] == [1, 1, 2]  # norms 1, 3, 2, 4 (row 1 dropped) in [1,2) [2,3) [3,4]
    assert stats["histogram_bins"] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    same = row_norm_stats(torch.ones(4, dtype=torch.float64), bins=2)
    assert sum(same["histogram_counts"]) == 4 and same["min"] == same["max"] == 1.0


def test_frozen_rows_are_exactly_the_bit_identical_ones() -> None:
    g = torch.Generator().manual_seed(2)
    prev = torch.randn(50, 8, generator=g)
    cur = prev.clone()
    touched = [0, 7, 13, 49]
    cur[touched, 3] += 1e-7 * torch.tensor([1.0, 1.0, 1.0, 1.0]) + torch.nextafter(cur[touched, 3], cur[touched, 3] + 1) - cur[touched, 3]
    cur[20, 5] = -0.0 if prev[20, 5] == 0 else cur[20, 5]
    frozen = frozen_rows(prev, cur)
    assert torch.nonzero(~frozen).squeeze(1).tolist() == touched
    z = torch.zeros(2, 2)
    assert frozen_rows(z, torch.tensor([[0.0, -0.0], [0.0, 0.0]])).tolist() == [False, True]  # bits, not values
    for dtype in (torch.float16, torch.bfloat16):
        assert int(frozen_rows(prev.to(dtype), cur.to(dtype)).sum()) >= 50 - len(touched)


# --- neighbour lists from the geometry pass ----------------------------------------------------------
@pytest.mark.parametrize("rows,dim,chunk,k", [(700, 16, 64, 10), (300, 8, 512, 5), (130, 6, 7, 3)])
def test_neighbours_from_the_pass_match_the_dense_reference(rows: int, dim: int, chunk: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, dim, generator=g)
    geo, (ids, cos) = geometry_and_neighbours(w, chunk_size=chunk, knn_k=k)
    ref_ids, ref_cos = dense_knn(w, k)
    assert torch.allclose(cos.double(), ref_cos, atol=2e-6)
    # the ids found are a true top k: their exact cosines are the reference's (near-ties may swap order)
    u = torch.nn.functional.normalize(w.double(), dim=1)
    exact = (u[:, None, :] * u[ids.long()]).sum(dim=2)
    assert torch.allclose(exact, ref_cos, atol=2e-6)
    assert (ids.long() == ref_ids).float().mean() > 0.99
    assert not (ids.long() == torch.arange(rows)[:, None]).any()
    assert geo == analyze_embedding_geometry(w, chunk_size=chunk)  # the extra work changes nothing else


def test_neighbours_skip_invalid_rows_and_pad_short_lists() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 4, generator=g)
    w[1] = 0.0
    w[4, 2] = float("inf")
    _, (ids, cos) = geometry_and_neighbours(w, chunk_size=2, knn_k=5)
    assert (ids[[1, 4]] == -1).all() and torch.isnan(cos[[1, 4]]).all()
    valid = [0, 2, 3, 5]
    for r in valid:  # 3 other valid rows, so 3 neighbours and two empty places
        assert sorted(ids[r, :3].tolist()) == sorted(set(valid) - {r})
        assert (ids[r, 3:] == -1).all()
    with pytest.raises(ValueError, match="knn_k"):
        geometry_and_neighbours(w, knn_k=-1)


# --- neighbourhood drift ---------------------------------------------------------------------------
def test_neighbourhood_overlap_is_one_under_rotation_and_zero_for_a_constructed_swap() -> None:
    g = torch.Generator().manual_seed(3)
    centres = 5.0 * orthonormal(13, 16, seed=3)
    noise = 0.05 * torch.randn(143, 16, generator=g)
    cluster = torch.arange(143) // 11  # 13 clusters of 11: each token's 10 neighbours are its cluster
    member = torch.arange(143) % 11
    w = centres[cluster] + noise
    _, (before, _) = geometry_and_neighbours(w, knn_k=10)
    q = orthonormal(16, 16, seed=4)
    _, (rotated, _) = geometry_and_neighbours(w @ q, knn_k=10)
    assert torch.all(neighbourhood_overlap(before, rotated) == 1.0)

    # Transpose the first 11 clusters: token (cluster i, member j) moves to cluster j. Its new
    # neighbours are the j-th members of the other clusters, none of its old ones; clusters 11-12 stay.
    moved_cluster = torch.where(cluster < 11, member, cluster)
    moved = centres[moved_cluster] + noise
    _, (after, _) = geometry_and_neighbours(moved, knn_k=10)
    overlap = neighbourhood_overlap(before, after)
    assert torch.all(overlap[:121] == 0.0) and torch.all(overlap[121:] == 1.0)
    partial = before.clone()
    partial[0, :3] = 999  # three neighbours replaced
    assert neighbourhood_overlap(before, partial)[0] == pytest.approx(0.7)
    short = before.clone()
    short[5, -1] = -1
    assert math.isnan(neighbourhood_overlap(before, short)[5])


def test_neighbourhood_overlap_is_uncentred_by_design_unlike_drift() -> None:
    # README, "Two kinds of similarity": drift (centred) reads 1.0 for Y = XQ and for Y = XQ + b; the
    # neighbourhood overlap (raw cosines, lists from the geometry pass) reads 1.0 for Y = XQ only.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64)
    q = orthonormal(32, 32, seed=12).double()
    b = torch.randn(32, generator=g, dtype=torch.float64)
    b *= float(x.norm(dim=1).mean()) / float(b.norm())  # an offset as long as a typical row
    lists = {name: geometry_and_neighbours(y.float(), knn_k=10)[1][0]
             for name, y in (("x", x), ("rotated", x @ q), ("shifted", x @ q + b))}
    rotated = neighbourhood_overlap(lists["x"], lists["rotated"])
    shifted = float(neighbourhood_overlap(lists["x"], lists["shifted"]).mean())
    assert float(rotated.mean()) >= 0.999  # float32 pass: a near-tie at the 10th place may swap
    print(f"overlap: rotated {float(rotated.mean()):.4f}, rotated + offset {shifted:.4f}")
    assert 0.4 < shifted < 0.8, shifted  # about 0.6: the offset pulls every raw cosine towards 1
    drift = measure_semantic_drift(x, x @ q + b)
    assert drift["average_cosine_similarity"] == pytest.approx(1.0, abs=1e-6)


# --- probes --------------------------------------------------------------------------------------
def test_probes_return_the_planted_neighbours_in_order() -> None:
    g = torch.Generator().manual_seed(6)
    w = torch.randn(200, 32, generator=g)
    king = w[10] / w[10].norm()
    w[50] = king * 2 + 0.02 * torch.randn(32, generator=g)  # closest (cos ~0.99)
    w[51] = king + 0.08 * torch.randn(32, generator=g)  # second (cos ~0.9; random rows stay below ~0.6)
    w[52] = torch.zeros(32)  # invalid: never a neighbour
    found = probe_neighbours(w, [10, 52], k=2)
    assert [t for t, _ in found[0]] == [50, 51]
    u = torch.nn.functional.normalize(w, dim=1)
    assert found[0][0][1] == pytest.approx(float(u[10] @ u[50]), abs=1e-5)
    assert found[1] == []  # a zero probe has no direction


def test_resolve_probes_by_string_and_id() -> None:
    vocab = ["<pad>", "king", "\u0120queen", " paris", "17"]
    ids, unknown = resolve_probes(["king", "queen", "paris", "3", "nope", "99", "king"], vocab, rows=5)
    assert ids == [1, 2, 3] and unknown == ["nope", "99"]
    assert resolve_probes(["king", "0"], None, rows=5) == ([0], ["king"])


def test_compute_insight_record_has_the_fixed_keys() -> None:
    g = torch.Generator().manual_seed(7)
    prev = torch.randn(120, 8, generator=g)
    cur = prev.clone()
    cur[5:] += 0.01 * torch.randn(115, 8, generator=g)  # rows 0-4 untouched
    _, (k_prev, _) = geometry_and_neighbours(prev, knn_k=4)
    _, (k_cur, _) = geometry_and_neighbours(cur, knn_k=4)
    vocab = [f"t{i}" for i in range(120)]
    out = compute_insight(cur, prev=prev, knn_ids=k_cur, prev_knn_ids=k_prev, probe_ids=[3],
                          vocab=vocab, top_k=3, probe_k=2)
    assert 1 <= out["effective_rank"] <= 8
    assert set(out["isotropy"]) == {"partition_ratio", "mean_unit_vector_norm"}
    assert out["frozen_tokens"] == {"count": 5, "token_ids": [0, 1, 2], "token_strings": ["t0", "t1", "t2"]}
    nd = out["neighbourhood_drift"]
    assert nd["k"] == 4 and 0 <= nd["mean_overlap"] <= 1 and len(nd["most_changed_tokens"]) == 3
    overlaps = [o for _, o in nd["most_changed_tokens"]]
    assert overlaps == sorted(overlaps)
    assert out["probes"][0]["token"] == "t3" and len(out["probes"][0]["neighbours"]) == 2
    first = compute_insight(cur)
    assert first["frozen_tokens"] is None and first["neighbourhood_drift"] is None and first["probes"] == []


def test_probe_neighbours_with_and_without_the_spectrum_agree() -> None:
    g = torch.Generator().manual_seed(8)
    w = torch.randn(300, 16, generator=g)
    w[7] = 0.0
    w[9, 1] = float("nan")
    plain = probe_neighbours(w, [0, 5], k=6)
    fast = probe_neighbours(w, [0, 5], k=6, spec=spectrum(w))
    assert [[t for t, _ in p] for p in plain] == [[t for t, _ in p] for p in fast]
    assert all(t not in (7, 9) for p in fast for t, _ in p)
    assert [c for _, c in fast[0]] == pytest.approx([c for _, c in plain[0]], abs=1e-5)


def test_neighbours_when_cosines_are_bunched_use_exact_values() -> None:
    # Every row close to one direction: all cosines fall in the top one or two histogram bins, so the
    # 8-bit pre-filter selects nearly everything and the exact comparison takes over.
    g = torch.Generator().manual_seed(9)
    axis = torch.zeros(24)
    axis[0] = 10.0
    w = axis + 0.3 * torch.randn(1500, 24, generator=g)
    _, (ids, cos) = geometry_and_neighbours(w, chunk_size=128, knn_k=8)
    ref_ids, ref_cos = dense_knn(w, 8)
    assert torch.allclose(cos.double(), ref_cos, atol=2e-6)
    assert (ids.long() == ref_ids).float().mean() > 0.99


def test_huge_finite_rows_give_none_instead_of_failing() -> None:
    w = torch.randn(20, 4)
    w[3] = 3e38  # finite, but its products overflow float32
    out = compute_insight(w)
    assert out["effective_rank"] is None and out["isotropy"]["partition_ratio"] is None
    assert out["row_norms"]["max"] > 1e38


@pytest.mark.parametrize("dim", [1, 3, 7, 64])
def test_spectrum_gram_is_the_symmetric_product_of_the_valid_rows(dim: int) -> None:
    # The Gram is built from column slabs (upper triangle of blocks) and mirrored: it must still be
    # W^T W over exactly the valid rows, and exactly symmetric (eigh reads one triangle).
    g = torch.Generator().manual_seed(dim)
    w = torch.randn(5000, dim, generator=g)
    w[7] = 0.0  # zero row: left out
    w[11, 0] = math.nan  # non-finite row: left out
    w[13] = 1e-30  # float32 norm underflows to 0, yet the row is valid
    spec = spectrum(w)
    keep = torch.ones(5000, dtype=torch.bool)
    keep[[7, 11]] = False
    assert torch.equal(spec.valid, keep)
    ref = w[keep].double().T @ w[keep].double()
    assert torch.equal(spec.gram, spec.gram.T)
    assert torch.allclose(spec.gram, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.allclose(spec.norms, torch.linalg.vector_norm(w[keep].double(), dim=1), rtol=1e-12)
