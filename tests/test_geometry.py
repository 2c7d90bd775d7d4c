"""Geometry analysis against an independent dense float64 reference, plus the seed sketch's defects and edge cases."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis_daemon import analyze_embedding_geometry, pairwise_moments

EDGES = np.linspace(-0.5, 1.0, 101)
BIN_WIDTH = 1.5 / 100
# float32 matmul of unit vectors: cosines are good to ~1e-7; a reference value this close to a bin edge
# or to the threshold may land on either side, and only those values may move.
ROUNDING = 2e-6


def dense_reference(w: torch.Tensor, threshold: float) -> dict:
    """All ordered pairs i != j of the valid rows, dense, in float64 numpy: the definition, computed naively."""
    x = w.to(torch.float64).numpy()
    finite = np.isfinite(x).all(axis=1)
    norms = np.zeros(len(x))
    norms[finite] = np.linalg.norm(x[finite], axis=1)
    valid = finite & (norms > 0)
    u = x[valid] / norms[valid, None]
    n = len(u)
    sims = (u @ u.T)[~np.eye(n, dtype=bool)]
    hist = np.histogram(sims, bins=100, range=(-0.5, 1.0))[0] if n else np.zeros(100, dtype=int)
    pos = (sims + 0.5) / BIN_WIDTH
    return {
        "sims": sims,
        "valid": int(valid.sum()),
        "nonfinite": int((~finite).sum()),
        "zero": int((finite & (norms == 0)).sum()),
        "hist": hist,
        "below": int((sims < -0.5).sum()),
        "above": int((sims > 1.0).sum()),
        "neighbors": int((sims > threshold).sum()),
        "near_edge": int((np.abs(pos - np.round(pos)) * BIN_WIDTH <= ROUNDING).sum()),
        "near_threshold": int((np.abs(sims - threshold) <= ROUNDING).sum()),
        "mean": float(sims.mean()) if len(sims) else None,
        "std": float(sims.std(ddof=1)) if len(sims) > 1 else None,
    }


def assert_matches(result: dict, ref: dict) -> None:
    """Counts equal except for values within rounding of an edge; moments to 1e-6."""
    gs = result["global_sparsity"]
    ours = np.array([gs["below_range_count"], *gs["histogram_counts"], gs["above_range_count"]])
    theirs = np.array([ref["below"], *ref["hist"], ref["above"]])
    assert np.abs(ours - theirs).sum() <= 2 * ref["near_edge"], (ours - theirs, ref["near_edge"])
    assert abs(result["local_density"]["neighbor_pairs"] - ref["neighbors"]) <= ref["near_threshold"]
    assert result["valid_rows"] == ref["valid"]
    assert result["pairs"] == len(ref["sims"]) == ours.sum()
    n = ref["valid"]
    expected_avg = ref["neighbors"] / n if n else 0.0
    slack = ref["near_threshold"] / n if n else 0.0
    assert abs(result["local_density"]["average_neighborhood_size"] - expected_avg) <= slack
    for key, ref_key in (("mean_similarity", "mean"), ("std_similarity", "std")):
        if ref[ref_key] is None:
            assert gs[key] is None
        else:
            assert gs[key] == pytest.approx(ref[ref_key], abs=1e-6)


def structured(v: int, d: int, seed: int = 0) -> torch.Tensor:
    """Low-rank + noise + shared offset, with a few antipodal pairs: cosines spread over [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, 3, generator=g) @ torch.randn(3, d, generator=g) + 0.3 * torch.randn(v, d, generator=g)
    w += 0.5 * torch.randn(1, d, generator=g)
    w[1::17] = -w[0::17][: len(w[1::17])]
    return w


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 97, 1000])
@pytest.mark.parametrize("threshold", [0.7, 0.33])
def test_matches_dense_reference_for_any_chunk_size(chunk_size: int, threshold: float) -> None:
    w = structured(150, 24)
    result = analyze_embedding_geometry(w, threshold=threshold, chunk_size=chunk_size)
    ref = dense_reference(w, threshold)
    assert ref["below"] > 0 and ref["neighbors"] > 0  # the data exercise every path
    assert_matches(result, ref)
    assert result["global_sparsity"]["histogram_bins"] == pytest.approx(EDGES.tolist(), abs=1e-12)
    assert len(result["global_sparsity"]["histogram_counts"]) == 100
    assert result["local_density"]["threshold"] == threshold


def test_self_similarity_is_excluded_from_mean_and_std() -> None:
    w = structured(60, 8, seed=1)
    gs = analyze_embedding_geometry(w, chunk_size=16)["global_sparsity"]
    u = torch.nn.functional.normalize(w.double(), dim=1)
    full = u @ u.T
    off_diagonal = full[~torch.eye(60, dtype=torch.bool)]
    seed_style = full.clone().fill_diagonal_(-1.0).flatten()  # the sketch's -1.0 on the diagonal, counted
    assert gs["mean_similarity"] == pytest.approx(float(off_diagonal.mean()), abs=1e-6)
    assert gs["std_similarity"] == pytest.approx(float(off_diagonal.std()), abs=1e-6)
    assert abs(float(seed_style.mean()) - gs["mean_similarity"]) > 1e-3
    assert abs(float(seed_style.std()) - gs["std_similarity"]) > 1e-3
    # Nothing at -1 in the histogram either: the only counts below range are real antipodal pairs.
    assert sum(gs["histogram_counts"]) + gs["below_range_count"] == 60 * 59


@pytest.mark.parametrize("threshold", [0.7, 0.5])
@pytest.mark.parametrize("chunk_size", [5, 512])
def test_clusters_have_their_known_neighbourhood_size(threshold: float, chunk_size: int) -> None:
    groups, per_group, d = 6, 4, 10
    g = torch.Generator().manual_seed(2)
    base = torch.eye(d)[:groups].repeat_interleave(per_group, dim=0)  # orthogonal between groups
    w = base + 1e-3 * torch.randn(groups * per_group, d, generator=g)
    w = w * torch.rand(groups * per_group, 1, generator=g).add(0.5)  # scale must not matter
    result = analyze_embedding_geometry(w, threshold=threshold, chunk_size=chunk_size)
    assert result["local_density"]["average_neighborhood_size"] == per_group - 1
    counts = result["global_sparsity"]["histogram_counts"]
    n = groups * per_group
    assert counts[99] == groups * per_group * (per_group - 1)  # cos ~ 1 within a group: the closed last bin
    assert counts[33] == n * (n - 1) - groups * per_group * (per_group - 1)  # cos ~ 0 between: [-0.005, 0.01)
    assert sum(counts) == n * (n - 1)


def test_exact_duplicates_land_in_the_closed_last_bin() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0]] * 5 + [[-3.0, 0.5, 0.0]])
    gs = analyze_embedding_geometry(w)["global_sparsity"]
    assert gs["histogram_counts"][99] == 5 * 4
    assert gs["above_range_count"] == 0


def test_values_outside_the_range_are_counted_not_dropped() -> None:
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 1.0]])
    result = analyze_embedding_geometry(w)
    gs = result["global_sparsity"]
    ref = dense_reference(w, 0.7)
    # cos -1 for rows (0,1) and (2,3), cos -0.707 for rows (4,1) and (4,3): 4 pairs, both orders
    assert gs["below_range_count"] == ref["below"] == 8
    assert sum(gs["histogram_counts"]) + gs["below_range_count"] + gs["above_range_count"] == result["pairs"] == 20
    # The seed's torch.histogram over the same cosines silently loses them:
    sims = torch.from_numpy(ref["sims"])
    assert int(torch.histogram(sims, bins=100, range=(-0.5, 1.0)).hist.sum()) == 20 - 8


def test_only_one_triangle_of_blocks_is_multiplied() -> None:
    n, d, chunk = 600, 8, 50
    w = structured(n, d, seed=3)
    with torch.profiler.profile(record_shapes=True) as prof:
        analyze_embedding_geometry(w, chunk_size=chunk)
    outputs = 0
    for event in prof.events():
        if event.name == "aten::mm":
            (rows, _), (_, cols) = event.input_shapes[:2]
            outputs += rows * cols
    triangle = n * (n + 1) // 2 + n * chunk // 2  # block triangle incl. the square blocks
    gram = (n // 4096 + 1) * d * d
    assert outputs <= triangle + gram
    assert outputs < 0.6 * n * n  # the seed computes all n^2


def test_memory_stays_bounded_by_the_chunk_not_v_squared(subprocess_env: dict) -> None:
    """Peak RSS growth in a fresh process: the V x V matrix would be 256 MiB (the seed's sketch twice that)."""
    script = textwrap.dedent(
        """
        import json, resource, torch
        from analysis_daemon import analyze_embedding_geometry
        torch.manual_seed(0)
        w = torch.randn(8000, 16)
        analyze_embedding_geometry(w[:600], chunk_size=64)  # warm up: allocator, MKL, thread pool
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        analyze_embedding_geometry(w, chunk_size=256)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"growth_mib": (after - before) / 1024}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
    # Buffers: 256 x 8000 float32 + uint8 (~10 MiB) and the packed unit rows (~1 MiB).
    assert growth < 48, growth


def test_progress_reports_each_chunk_and_its_exception_propagates() -> None:
    w = structured(100, 8, seed=4)
    seen: list[float] = []
    reference = analyze_embedding_geometry(w, chunk_size=30, progress=seen.append)
    assert len(seen) == 4 and seen == sorted(seen) and seen[-1] == 1.0 and seen[0] > 0

    class Abandon(Exception):
        pass

    def stop_midway(fraction: float) -> None:
        if fraction > 0.3:
            raise Abandon

    with pytest.raises(Abandon):
        analyze_embedding_geometry(w, chunk_size=30, progress=stop_midway)
    assert analyze_embedding_geometry(w, chunk_size=30) == reference  # nothing left broken


def test_nonfinite_and_zero_rows_are_excluded_and_counted() -> None:
    clean = structured(40, 6, seed=5)
    w = torch.cat([clean[:10], torch.full((1, 6), float("nan")), clean[10:30], torch.zeros(2, 6), clean[30:]])
    w[5, 2] = float("inf")
    w[20, 0] = float("-inf")
    result = analyze_embedding_geometry(w, chunk_size=7)
    assert result["nonfinite_rows"] == 3
    assert result["zero_rows"] == 2
    assert result["rows"] == 43 and result["valid_rows"] == 38
    assert_matches(result, dense_reference(w, 0.7))
    json.dumps(result, allow_nan=False)  # no NaN sneaks into the JSON line


def test_tiny_and_huge_finite_rows_normalise_correctly() -> None:
    w = structured(30, 5, seed=6)
    scaled = w.clone()
    scaled[0] *= 1e-30  # float32 squares underflow
    scaled[1] *= 1e25  # float32 squares overflow
    ours = analyze_embedding_geometry(scaled)
    assert ours["valid_rows"] == 30 and ours["zero_rows"] == 0
    assert_matches(ours, dense_reference(w, 0.7))


@pytest.mark.parametrize("v", [0, 1])
def test_fewer_than_two_rows_have_no_pairs(v: int) -> None:
    result = analyze_embedding_geometry(torch.randn(v, 4))
    gs = result["global_sparsity"]
    assert result["pairs"] == 0
    assert gs["mean_similarity"] is None and gs["std_similarity"] is None
    assert gs["histogram_counts"] == [0] * 100 and gs["below_range_count"] == gs["above_range_count"] == 0
    assert result["local_density"]["average_neighborhood_size"] == 0.0
    json.dumps(result, allow_nan=False)


def test_all_rows_invalid_is_a_defined_empty_answer() -> None:
    w = torch.zeros(5, 3)
    w[0] = float("nan")
    result = analyze_embedding_geometry(w)
    assert (result["nonfinite_rows"], result["zero_rows"], result["valid_rows"], result["pairs"]) == (1, 4, 0, 0)
    assert result["global_sparsity"]["mean_similarity"] is None


def test_more_dimensions_than_rows() -> None:
    w = torch.randn(9, 50, generator=torch.Generator().manual_seed(7))
    assert_matches(analyze_embedding_geometry(w, chunk_size=4), dense_reference(w, 0.7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    w = structured(80, 12, seed=8).to(dtype)
    result = analyze_embedding_geometry(w, chunk_size=32)
    assert_matches(result, dense_reference(w, 0.7))  # the reference sees the same (rounded) values
    assert result == analyze_embedding_geometry(w.float(), chunk_size=32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": torch.randn(10)}, "2-D"),
        ({"weights": torch.ones(3, 3, dtype=torch.int64)}, "float"),
        ({"weights": torch.randn(4, 3), "chunk_size": 0}, "chunk_size"),
        ({"weights": torch.randn(4, 3), "chunk_size": 2.5}, "chunk_size"),
        ({"weights": torch.randn(4, 3), "threshold": float("nan")}, "threshold"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        analyze_embedding_geometry(**kwargs)


def test_pairwise_moments_match_the_dense_reference() -> None:
    for v, d in ((200, 16), (7, 30), (2, 3)):
        w = structured(v, d, seed=v)
        ref = dense_reference(w, 0.7)
        moments = pairwise_moments(w)
        assert moments["pairs"] == v * (v - 1)
        assert moments["mean_similarity"] == pytest.approx(ref["mean"], abs=1e-6)
        assert moments["std_similarity"] == pytest.approx(ref["std"], abs=1e-6)
    assert pairwise_moments(torch.randn(1, 4))["mean_similarity"] is None


def test_geometry_takes_its_moments_from_pairwise_moments() -> None:
    w = structured(120, 10, seed=9)
    gs = analyze_embedding_geometry(w)["global_sparsity"]
    moments = pairwise_moments(w)
    assert (gs["mean_similarity"], gs["std_similarity"]) == (moments["mean_similarity"], moments["std_similarity"])


@settings(max_examples=25, deadline=None)
@given(
    v=st.integers(0, 40),
    d=st.integers(1, 6),
    chunk_size=st.integers(1, 50),
    seed=st.integers(0, 2**16),
    threshold=st.floats(-1.2, 1.2),
)
def test_every_pair_is_counted_once_and_matches_the_reference(v: int, d: int, chunk_size: int, seed: int, threshold: float) -> None:
    w = torch.randn(v, d, generator=torch.Generator().manual_seed(seed))
    result = analyze_embedding_geometry(w, threshold=threshold, chunk_size=chunk_size)
    gs = result["global_sparsity"]
    assert sum(gs["histogram_counts"]) + gs["below_range_count"] + gs["above_range_count"] == result["pairs"] == v * (v - 1)
    assert_matches(result, dense_reference(w, threshold))


@settings(max_examples=15, deadline=None)
@given(v=st.integers(2, 30), seed=st.integers(0, 2**16))
def test_row_order_and_row_scale_do_not_matter(v: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, 5, generator=g)
    moved = w[torch.randperm(v, generator=g)] * torch.rand(v, 1, generator=g).add(0.1)
    a = analyze_embedding_geometry(w, chunk_size=4)
    b = analyze_embedding_geometry(moved, chunk_size=7)
    ref = dense_reference(w, 0.7)
    for result in (a, b):
        assert_matches(result, ref)


def test_zero_width_rows_are_all_zero_rows() -> None:
    result = analyze_embedding_geometry(torch.zeros(5, 0))
    assert (result["zero_rows"], result["valid_rows"], result["pairs"]) == (5, 0, 0)


@pytest.mark.parametrize("threads", [1, 3])
def test_large_blocks_counted_across_threads_match_the_reference(threads: int) -> None:
    """Blocks of over 2^20 similarities are bincounted in slices by a pool sized to torch's thread count."""
    w = structured(1100, 8, seed=10)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = analyze_embedding_geometry(w, threshold=0.41, chunk_size=1024)
    finally:
        torch.set_num_threads(before)
    assert_matches(result, dense_reference(w, 0.41))
