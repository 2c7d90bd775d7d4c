"""Sampled geometry: exact at N >= V, estimates against a dense float64 reference, interval coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis_daemon import analyze_embedding_geometry
from analysis_daemon.metrics.geometry import geometry_and_neighbours
from analysis_daemon.metrics.sampled import sample_index
from analysis_daemon.records import HelloInfo, Job, RunInsight, SnapshotData
from analysis_daemon.pipeline import AnalysisSettings, analyse

EDGES = np.linspace(-0.5, 1.0, 101)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: a second torch thread only spins against other processes on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(v: int = 300, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Clusters of very different sizes (1 to 40 rows) with noise that puts many within-cluster
    cosines near the 0.7 threshold: per-row neighbour counts vary a lot, as in a real vocabulary."""
    g = torch.Generator().manual_seed(seed)
    sizes, total = [], 0
    while total < v:
        size = min(v - total, int(torch.randint(1, 41, (1,), generator=g)))
        sizes.append(size)
        total += size
    centres = torch.randn(len(sizes), d, generator=g)
    rows = [c + torch.randn(s, d, generator=g) * float(torch.rand(1, generator=g) * 0.8 + 0.2)
            for c, s in zip(centres, sizes)]
    return torch.cat(rows)[torch.randperm(v, generator=g)]


def per_row_reference(w: torch.Tensor, rows: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64: for each of `rows`, its count above the threshold and its 100-bin histogram over all
    other rows (self excluded), plus below/above-range columns: shape (N,), (N, 102)."""
    x = w.double().numpy()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    counts, hists = [], []
    for i in rows.tolist():
        sims = np.delete(u @ u[i], i)
        counts.append(int((sims > threshold).sum()))
        hists.append([int((sims < -0.5).sum()), *np.histogram(sims, bins=EDGES)[0], int((sims > 1.0).sum())])
    return np.array(counts), np.array(hists)


def interval_reference(values: np.ndarray, n: int) -> tuple[float, float, float]:
    """Mean and normal 95% interval of the mean under sampling without replacement (FPC), in numpy."""
    m = len(values)
    mean = values.mean()
    half = 1.959963984540054 * math.sqrt((1 - m / n) * values.var(ddof=1) / m)
    return mean, mean - half, mean + half


@pytest.mark.parametrize("n_rows", [300, 301, 10_000])
def test_sample_at_least_v_is_the_exact_pass(n_rows: int) -> None:
    w = planted()
    exact, exact_nb = geometry_and_neighbours(w, knn_k=5)
    sampled, sampled_nb = geometry_and_neighbours(w, knn_k=5, sample_rows=n_rows, seed=7)
    assert sampled == exact
    assert "confidence_95" not in sampled and "sampled_rows" not in sampled
    assert torch.equal(sampled_nb[0], exact_nb[0])


def test_estimates_and_intervals_match_a_dense_float64_reference() -> None:
    w, threshold, n_sample = planted(seed=1), 0.55, 50  # threshold off the bin edges: the direct count
    result, nb = geometry_and_neighbours(w, threshold=threshold, knn_k=4, sample_rows=n_sample, seed=3,
                                         chunk_size=16)
    rows = sample_index(300, n_sample, 3)
    counts, hists = per_row_reference(w, rows, threshold)
    assert result["sampled_rows"] == n_sample and result["sampled_pairs"] == n_sample * 299
    mean, lo, hi = interval_reference(counts, 300)
    density = result["local_density"]
    assert density["average_neighborhood_size"] == pytest.approx(mean, abs=1e-9)
    assert density["neighbor_pairs"] == round(300 * mean)
    assert result["confidence_95"]["average_neighborhood_size"] == pytest.approx([lo, hi], abs=1e-9)
    gs = result["global_sparsity"]
    ours = np.array([gs["below_range_count"], *gs["histogram_counts"], gs["above_range_count"]])
    assert np.abs(ours - np.round(300 * hists.mean(axis=0))).max() <= 300 * 2 / n_sample  # bin-edge rounding
    assert ours.sum() == pytest.approx(300 * 299, abs=102)  # estimates of a partition: sum ~ all pairs
    bin_ci = result["confidence_95"]["histogram_counts"]
    for b in (40, 60, 80):  # a few bins: interval of 300 x the per-row mean
        ref = interval_reference(hists[:, b + 1].astype(float), 300)
        assert bin_ci[b][0] == pytest.approx(max(0.0, 300 * ref[1]), rel=0.05, abs=300 * 2 / n_sample)
        assert bin_ci[b][1] == pytest.approx(300 * ref[2], rel=0.05, abs=300 * 2 / n_sample)
    # mean and std stay exact: the exact pass's own values
    exact = analyze_embedding_geometry(w, threshold=threshold)
    assert gs["mean_similarity"] == exact["global_sparsity"]["mean_similarity"]
    assert gs["std_similarity"] == exact["global_sparsity"]["std_similarity"]
    # neighbour lists: exact for the sampled rows, none for the others
    exact_nb = geometry_and_neighbours(w, threshold=threshold, knn_k=4)[1]
    assert torch.equal(nb[0][rows], exact_nb[0][rows])
    others = torch.ones(300, dtype=torch.bool)
    others[rows] = False
    assert bool((nb[0][others] == -1).all()) and bool(torch.isnan(nb[1][others]).all())


def test_the_95_percent_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    w = planted(seed=2)
    truth = analyze_embedding_geometry(w)  # default threshold 0.7: on a bin edge, counted from the bins
    true_avg = truth["local_density"]["average_neighborhood_size"]
    true_bin = truth["global_sparsity"]["histogram_counts"][80]  # cos in [0.7, 0.715)
    seeds = 200
    covered = covered_bin = 0
    widths = []
    for seed in range(seeds):
        r = analyze_embedding_geometry(w, sample_rows=40, seed=seed)
        lo, hi = r["confidence_95"]["average_neighborhood_size"]
        covered += lo <= true_avg <= hi
        widths.append(hi - lo)
        blo, bhi = r["confidence_95"]["histogram_counts"][80]
        covered_bin += blo <= true_bin <= bhi
    assert 0.90 <= covered / seeds <= 0.99, covered
    assert 0.88 <= covered_bin / seeds <= 0.99, covered_bin
    assert min(widths) > 0  # the data is not degenerate: the interval has to work for its coverage


def test_same_seed_same_rows_and_interval_shrinks_to_the_value_at_full_sample() -> None:
    w = planted(seed=3)
    a = analyze_embedding_geometry(w, sample_rows=60, seed=5)
    assert a == analyze_embedding_geometry(w, sample_rows=60, seed=5)
    assert a != analyze_embedding_geometry(w, sample_rows=60, seed=6)
    near_all = analyze_embedding_geometry(w, sample_rows=299, seed=5)
    lo, hi = near_all["confidence_95"]["average_neighborhood_size"]
    assert hi - lo < (lambda c: c[1] - c[0])(a["confidence_95"]["average_neighborhood_size"]) / 5


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_sample_rows_is_one_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="sample_rows must be a positive integer"):
        analyze_embedding_geometry(torch.randn(10, 4), sample_rows=bad)


def test_invalid_rows_are_never_sampled() -> None:
    w = planted(seed=4)
    w[::7] = 0.0
    w[3] = float("nan")
    r = analyze_embedding_geometry(w, sample_rows=30, seed=1)
    n = r["valid_rows"]
    assert r["zero_rows"] + r["nonfinite_rows"] == 300 - n
    assert sum(r["global_sparsity"]["histogram_counts"]) + r["global_sparsity"]["below_range_count"] \
        + r["global_sparsity"]["above_range_count"] == pytest.approx(n * (n - 1), abs=102)


def test_the_worker_samples_and_the_neighbourhood_drift_uses_the_sampled_rows() -> None:
    w0 = planted(seed=5)
    w1 = w0 + 0.05 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(9))
    settings = AnalysisSettings(sample_rows=50, knn_k=5)
    state = RunInsight()
    hello = HelloInfo(vocab=[f"t{i}" for i in range(300)])
    s0, s1 = SnapshotData(iter=0, seq=0, name="wte", tensor=w0), SnapshotData(iter=1, seq=1, name="wte", tensor=w1)
    analyse(Job("r", s0, None, [], hello), settings, None, state)
    rec = analyse(Job("r", s1, s0, [], hello), settings, None, state)
    assert rec["geometry"]["sampled_rows"] == 50
    assert len(rec["geometry"]["confidence_95"]["average_neighborhood_size"]) == 2
    nd = rec["insight"]["neighbourhood_drift"]
    assert nd["tokens"] == 50  # the same 50 rows in both snapshots (same seed, same V)
    assert 0.0 <= nd["mean_overlap"] <= 1.0
    assert rec["drift"]["average_cosine_similarity"] is not None  # drift is never sampled


@pytest.mark.timeout(120)
def test_daemon_with_sample_rows_reports_estimates_and_intervals(tmp_path, subprocess_env, tcp_endpoint) -> None:
    import zmq

    from tests.test_daemon import DaemonProc, snapshot

    daemon = DaemonProc(tmp_path, dict(subprocess_env, OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled"),
                        tcp_endpoint, "--sample-rows", "64", "--sample-seed", "3")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(tcp_endpoint)
    try:
        w = planted(seed=6)
        snapshot(sock, "sampled", 10, w)
        rec = daemon.wait_results("sampled", 1)[0]
    finally:
        sock.close()
        ctx.term()
        daemon.kill()
    expected = analyze_embedding_geometry(w, sample_rows=64, seed=3)
    geom = rec["geometry"]
    assert geom["sampled_rows"] == 64 and geom["sample_seed"] == 3
    assert geom["local_density"] == expected["local_density"]
    assert geom["confidence_95"]["average_neighborhood_size"] == pytest.approx(
        expected["confidence_95"]["average_neighborhood_size"])
    assert "estimated from 64 rows: 95% CI" in daemon.out_path.read_text()
