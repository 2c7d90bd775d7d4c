"""Semantic drift against an independent dense float64 Procrustes reference, plus the seed sketch's defects and edge cases."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from analysis_daemon import DriftShapeMismatch, measure_semantic_drift


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A random d x d orthogonal matrix (float64), reflections included."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def embeddings(v: int, d: int, seed: int) -> torch.Tensor:
    """Rows with a shared offset, like trained token embeddings."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g) + 2.0 * torch.randn(1, d, generator=g)


def moved(x: torch.Tensor, seed: int, translation: float = 5.0) -> torch.Tensor:
    """x Q + b in float64, rounded once to float32: the same geometry, rotated and shifted."""
    d = x.shape[1]
    b = translation * torch.randn(1, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return (x.double() @ random_orthogonal(d, seed) + b).float()


def dense_reference(prev: torch.Tensor, curr: torch.Tensor) -> dict:
    """The definition, naively in float64 numpy: centre, Procrustes by SVD, compare row by row."""
    x, y = prev.double().numpy(), curr.double().numpy()
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    x, y = x[keep], y[keep]
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    u, _, vt = np.linalg.svd(xc.T @ yc)
    aligned = xc @ (u @ vt)
    cos = (aligned * yc).sum(axis=1) / (np.linalg.norm(aligned, axis=1) * np.linalg.norm(yc, axis=1))
    return {"ids": np.nonzero(keep)[0], "cos": cos, "dist": np.linalg.norm(aligned - yc, axis=1)}


def test_rotation_plus_translation_is_no_drift_at_all() -> None:
    x = embeddings(300, 16, seed=0)
    y = moved(x, seed=1)
    result = measure_semantic_drift(x, y, top_k=300)
    cosines = [c for _, c in result["most_drifted_tokens"]]
    assert len(cosines) == 300 and min(cosines) > 1 - 1e-5
    assert result["average_cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert result["average_euclidean_distance"] < 1e-4 * float(x.norm(dim=1).mean())
    # The seed's sketch fitted R on centred matrices but applied it to the uncentred X: far from zero here.
    x64, y64 = x.double(), y.double()
    xc, yc = x64 - x64.mean(0), y64 - y64.mean(0)
    u, _, vh = torch.linalg.svd(yc.T @ xc)
    seed_distance = float(torch.linalg.norm(x64 @ (vh.T @ u.T) - y64, dim=1).mean())
    assert seed_distance > 1.0


def test_both_inputs_are_snapshots_not_a_live_model() -> None:
    params = list(inspect.signature(measure_semantic_drift).parameters.values())
    assert [p.name for p in params[:3]] == ["prev", "curr", "top_k"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])  # options, never a model
    x = embeddings(50, 8, seed=2)
    y = x.clone()
    y[7] += 3.0 * torch.randn(8, generator=torch.Generator().manual_seed(3))
    snapshot = y.clone()
    result = measure_semantic_drift(x, y)
    y.zero_()  # whatever happens to the live tensor later does not matter: the result is already final
    assert result["most_drifted_tokens"][0][0] == 7
    assert measure_semantic_drift(x, snapshot) == result
    assert measure_semantic_drift(x, x.clone())["average_cosine_similarity"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("v, d", [(200, 12), (40, 3), (6, 20)])
def test_matches_dense_reference(v: int, d: int) -> None:
    x = embeddings(v, d, seed=v)
    noise = torch.randn(v, d, generator=torch.Generator().manual_seed(d)) * torch.linspace(0, 1.5, v)[:, None]
    y = moved(x, seed=4) + noise
    ref = dense_reference(x, y)
    k = min(10, v)
    result = measure_semantic_drift(x, y, top_k=k)
    assert result["rows"] == v and result["nonfinite_rows"] == 0 and result["degenerate_rows"] == 0
    assert result["average_cosine_similarity"] == pytest.approx(ref["cos"].mean(), abs=1e-5)
    assert result["average_euclidean_distance"] == pytest.approx(ref["dist"].mean(), rel=1e-5)
    order = np.argsort(ref["cos"], kind="stable")
    assert [t for t, _ in result["most_drifted_tokens"]] == order[:k].tolist()
    assert [t for t, _ in result["least_drifted_tokens"]] == order[::-1][:k].tolist()
    for token, cos in result["most_drifted_tokens"] + result["least_drifted_tokens"]:
        assert cos == pytest.approx(ref["cos"][token], abs=1e-5)
    most = [c for _, c in result["most_drifted_tokens"]]
    least = [c for _, c in result["least_drifted_tokens"]]
    assert most == sorted(most) and least == sorted(least, reverse=True)


def test_permuting_rows_permutes_the_token_lists() -> None:
    v = 120
    x = embeddings(v, 10, seed=5)
    y = moved(x, seed=6) + 0.5 * torch.randn(v, 10, generator=torch.Generator().manual_seed(7))
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(8))
    plain = measure_semantic_drift(x, y, top_k=15)
    shuffled = measure_semantic_drift(x[perm], y[perm], top_k=15)
    for key in ("most_drifted_tokens", "least_drifted_tokens"):
        assert [int(perm[t]) for t, _ in shuffled[key]] == [t for t, _ in plain[key]]
        assert [c for _, c in shuffled[key]] == pytest.approx([c for _, c in plain[key]], abs=1e-6)
    assert shuffled["average_cosine_similarity"] == pytest.approx(plain["average_cosine_similarity"], abs=1e-6)


@pytest.mark.parametrize(
    "prev_shape, curr_shape",
    [((100, 8), (120, 8)), ((100, 8), (100, 16)), ((100,), (100,)), ((2, 3, 4), (2, 3, 4))],
)
def test_shape_mismatch_raises_one_narrow_error_naming_both_shapes(prev_shape: tuple, curr_shape: tuple) -> None:
    with pytest.raises(DriftShapeMismatch) as info:
        measure_semantic_drift(torch.zeros(prev_shape), torch.zeros(curr_shape))
    assert isinstance(info.value, ValueError)
    assert str(list(prev_shape)) in str(info.value) and str(list(curr_shape)) in str(info.value)


def test_nonfinite_rows_are_left_out_of_the_fit_and_counted() -> None:
    x = embeddings(60, 6, seed=9)
    y = moved(x, seed=10) + 0.3 * torch.randn(60, 6, generator=torch.Generator().manual_seed(11))
    x_bad, y_bad = x.clone(), y.clone()
    x_bad[3, 1] = float("nan")
    y_bad[10] = float("inf")
    y_bad[59, 5] = float("-inf")
    result = measure_semantic_drift(x_bad, y_bad, top_k=60)
    assert result["nonfinite_rows"] == 3
    ref = dense_reference(x_bad, y_bad)  # the reference fits on the finite rows only
    assert result["average_cosine_similarity"] == pytest.approx(ref["cos"].mean(), abs=1e-5)
    assert result["average_euclidean_distance"] == pytest.approx(ref["dist"].mean(), rel=1e-5)
    listed = {t for t, _ in result["most_drifted_tokens"]}
    assert listed == set(ref["ids"].tolist()) and not listed & {3, 10, 59}
    json.dumps(result, allow_nan=False)


def test_a_row_at_the_centre_has_no_direction_and_is_counted() -> None:
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [0.0, 0.0]])
    y = x.clone()
    y[0] = torch.tensor([0.9, 0.3])
    y[1] = torch.tensor([-0.9, -0.3])
    result = measure_semantic_drift(x, y, top_k=10)
    assert result["degenerate_rows"] == 1
    assert 4 not in [t for t, _ in result["most_drifted_tokens"]]
    assert len(result["most_drifted_tokens"]) == 4
    ref = dense_reference(x[:4], y[:4])
    assert result["average_cosine_similarity"] == pytest.approx(ref["cos"].mean(), abs=1e-6)
    # The distance is defined for every finite row, the centred one included (it stays at the centre).
    assert result["average_euclidean_distance"] == pytest.approx(ref["dist"].sum() / 5, rel=1e-5)


def test_identical_rows_give_a_defined_answer() -> None:
    x = torch.ones(10, 4)
    result = measure_semantic_drift(x, x * 3)
    assert result["degenerate_rows"] == 10
    assert result["average_cosine_similarity"] is None
    assert result["average_euclidean_distance"] == 0.0
    assert result["most_drifted_tokens"] == result["least_drifted_tokens"] == []


@pytest.mark.parametrize("v", [0, 1])
def test_fewer_than_two_rows(v: int) -> None:
    result = measure_semantic_drift(torch.randn(v, 5), torch.randn(v, 5))
    assert result["average_cosine_similarity"] is None
    assert result["most_drifted_tokens"] == []
    assert result["average_euclidean_distance"] == (0.0 if v else None)
    json.dumps(result, allow_nan=False)


def test_all_rows_nonfinite() -> None:
    result = measure_semantic_drift(torch.full((4, 3), float("nan")), torch.zeros(4, 3))
    assert result["nonfinite_rows"] == 4 and result["average_euclidean_distance"] is None


def test_more_dimensions_than_rows_still_aligns_exactly() -> None:
    x = embeddings(5, 20, seed=12)
    result = measure_semantic_drift(x, moved(x, seed=13))
    assert result["average_cosine_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert result["average_euclidean_distance"] < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype(dtype: torch.dtype) -> None:
    x = embeddings(80, 8, seed=14).to(dtype)
    y = (moved(x.float(), seed=15) + 0.2 * torch.randn(80, 8, generator=torch.Generator().manual_seed(16))).to(dtype)
    result = measure_semantic_drift(x, y, top_k=5)
    ref = dense_reference(x, y)  # the same rounded values, in float64
    assert result["average_cosine_similarity"] == pytest.approx(ref["cos"].mean(), abs=1e-5)
    assert [t for t, _ in result["most_drifted_tokens"]] == np.argsort(ref["cos"], kind="stable")[:5].tolist()


def test_top_k_bounds() -> None:
    x = embeddings(8, 3, seed=17)
    y = x + 0.1 * torch.randn(8, 3, generator=torch.Generator().manual_seed(18))
    assert len(measure_semantic_drift(x, y, top_k=100)["least_drifted_tokens"]) == 8
    assert measure_semantic_drift(x, y, top_k=0)["most_drifted_tokens"] == []
    with pytest.raises(ValueError, match="top_k"):
        measure_semantic_drift(x, y, top_k=-1)


@settings(max_examples=30, deadline=None)
@given(v=st.integers(2, 60), d=st.integers(1, 12), seed=st.integers(0, 2**16), shift=st.floats(-100, 100))
def test_drift_is_invariant_to_any_rotation_and_translation(v: int, d: int, seed: int, shift: float) -> None:
    x = embeddings(v, d, seed)
    centred = torch.linalg.vector_norm(x.double() - x.double().mean(0), dim=1)
    # A row within float32 rounding of the centre has no direction and is rightly counted degenerate.
    assume(float(centred.min()) > 1e-3 * float(centred.max()))
    result = measure_semantic_drift(x, moved(x, seed + 1, translation=shift), top_k=v)
    assert result["degenerate_rows"] == 0
    assert all(c > 1 - 1e-4 for _, c in result["most_drifted_tokens"])
    assert result["average_euclidean_distance"] < 1e-4 * (1 + abs(shift))


def test_zero_width_rows_have_no_direction() -> None:
    result = measure_semantic_drift(torch.zeros(5, 0), torch.zeros(5, 0))
    assert result["degenerate_rows"] == 5 and result["average_cosine_similarity"] is None
    assert result["average_euclidean_distance"] == 0.0


@pytest.mark.parametrize("factor", [1e-30, 1e30])
def test_extreme_but_finite_magnitudes(factor: float) -> None:
    x = embeddings(50, 6, seed=19)
    y = moved(x, seed=20) + 0.3 * torch.randn(50, 6, generator=torch.Generator().manual_seed(21))
    plain = measure_semantic_drift(x, y)
    scaled = measure_semantic_drift(x * factor, y * factor)
    assert scaled["nonfinite_rows"] == scaled["degenerate_rows"] == 0
    assert scaled["average_cosine_similarity"] == pytest.approx(plain["average_cosine_similarity"], abs=1e-6)
    assert scaled["average_euclidean_distance"] == pytest.approx(plain["average_euclidean_distance"] * factor, rel=1e-5)
    assert [t for t, _ in scaled["most_drifted_tokens"]] == [t for t, _ in plain["most_drifted_tokens"]]


def test_a_finite_row_whose_sum_overflows_is_still_finite() -> None:
    x = embeddings(20, 4, seed=22)
    x[3] = 3e38  # every entry finite, the row sum is inf in float32
    result = measure_semantic_drift(x, x.clone())
    assert result["nonfinite_rows"] == 0
    assert result["average_cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
