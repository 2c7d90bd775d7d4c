"""The galaxy map and the partial-collapse clump, against dense references and constructed structure."""
from __future__ import annotations

import math

import pytest
import torch

from analysis_daemon.metrics.alerts import AlertSettings, RunAlerts, check
from analysis_daemon.metrics.clump import find_clump, sample_size
from analysis_daemon.metrics.galaxy import MAX_CLUSTERS_LISTED, cluster_purity, galaxy_map, subset_ids
from analysis_daemon.metrics.geometry import geometry_and_neighbours


def planted(groups: int = 12, size: int = 6, noise: float = 0.15, extra: int = 60, d: int = 48, seed: int = 0):
    """`groups` tight groups of `size` rows around random centres, then `extra` random rows; labels (-1: none)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, d, generator=g)
    w = torch.cat([centres.repeat_interleave(size, 0) + noise * torch.randn(groups * size, d, generator=g),
                   torch.randn(extra, d, generator=g)])
    return w, [i // size for i in range(groups * size)] + [-1] * extra


def reference_components(w: torch.Tensor, threshold: float) -> list[set[int]]:
    """Connected components (>= 2 nodes) of the centred-cosine > threshold graph, by breadth-first search."""
    u = torch.nn.functional.normalize(w.double() - w.double().mean(0), dim=1)
    adj = (u @ u.T > threshold).fill_diagonal_(False)
    seen, comps = set(), []
    for start in range(w.shape[0]):
        if start in seen:
            continue
        comp, todo = {start}, [start]
        while todo:
            for j in torch.nonzero(adj[todo.pop()]).squeeze(1).tolist():
                if j not in comp:
                    comp.add(j)
                    todo.append(j)
        seen |= comp
        if len(comp) > 1:
            comps.append(comp)
    return comps


def test_subset_is_fixed_by_seed_and_covers_small_vocabularies() -> None:
    assert subset_ids(100, 2000, 0).tolist() == list(range(100))
    a, b = subset_ids(50304, 2000, 0), subset_ids(50304, 2000, 0)
    assert torch.equal(a, b) and a.numel() == 2000 and torch.equal(a, a.sort().values) and a.unique().numel() == 2000
    assert not torch.equal(a, subset_ids(50304, 2000, 1))
    w = torch.randn(3000, 16)
    m = galaxy_map(w, rows=500, seed=4)
    assert [p[0] for p in m["points"]] == subset_ids(3000, 500, 4).tolist() and m["rows"] == 500


def test_projection_is_the_pca_of_the_centred_rows() -> None:
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([6.0, 3.0] + [0.5] * 30, dtype=torch.float64)  # two clear leading axes
    rot = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64)).Q
    w = (torch.randn(400, 32, generator=g, dtype=torch.float64) * scales) @ rot + 2.0
    m = galaxy_map(w.float(), rows=2000)
    x = w - w.mean(0)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    ref = x @ vt[:2].T
    got = torch.tensor([p[1:3] for p in m["points"]], dtype=torch.float64)
    for axis in range(2):  # PCA axes are defined up to sign
        assert torch.allclose(got[:, axis].abs(), ref[:, axis].abs(), atol=2e-3)
    var = s.square()
    assert m["explained_variance"] == pytest.approx((var[:2] / var.sum()).tolist(), abs=1e-5)
    # without a previous map, each axis' largest coordinate is positive
    assert all(got[got[:, a].abs().argmax(), a] > 0 for a in range(2))
    # fewer rows than dimensions: the n x n Gram path gives the same map
    small = galaxy_map(w[:20].float(), rows=2000)
    x = w[:20] - w[:20].mean(0)
    ref = x @ torch.linalg.svd(x, full_matrices=False)[2][:2].T
    got = torch.tensor([p[1:3] for p in small["points"]], dtype=torch.float64)
    assert torch.allclose(got.abs(), ref.abs(), atol=2e-3)


def test_alignment_undoes_rotation_and_translation_and_keeps_cluster_ids() -> None:
    w, _ = planted()
    first = galaxy_map(w, threshold=0.7)
    g = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(48, 48, generator=g)).Q
    for moved in (w @ q, w @ q + 0.3):
        # centred PCA ignores the rotation and the shift, so aligned to the first map it is the first map
        again = galaxy_map(moved, threshold=0.7, previous={"iter": 10, "points": first["points"]})
        assert again["aligned_to_iter"] == 10
        diff = max(abs(a[i] - b[i]) for a, b in zip(first["points"], again["points"]) for i in (1, 2))
        assert diff < 2e-3
    rotated = galaxy_map(w @ q, threshold=0.7, previous={"iter": 10, "points": first["points"]})
    assert [p[3] for p in rotated["points"]] == [p[3] for p in first["points"]]  # cosines unchanged: same ids


def test_clusters_are_the_components_of_the_neighbour_graph() -> None:
    w, labels = planted()
    w[5] = float("nan")  # invalid rows are left out of the map
    m = galaxy_map(w, threshold=0.7)
    assert m["rows"] == w.shape[0] - 1 and 5 not in [p[0] for p in m["points"]]
    ref = reference_components(torch.cat([w[:5], w[6:]]), 0.7)
    ref = sorted(({i if i < 5 else i + 1 for i in comp} for comp in ref), key=lambda c: (-len(c), min(c)))
    got: dict[int, set[int]] = {}
    for t, _, _, c in m["points"]:
        if c >= 0:
            got.setdefault(c, set()).add(t)
    assert sorted(got.values(), key=lambda c: (-len(c), min(c))) == ref
    assert m["cluster_count"] == len(ref) and m["clustered_points"] == sum(len(c) for c in ref)
    assert [c["size"] for c in m["clusters"]] == sorted((len(c) for c in ref), reverse=True)
    norms = w.norm(dim=1)
    for c in m["clusters"]:  # members: the largest row norms of the cluster first, at most 10
        ids = [t for t, _ in c["members"]]
        assert ids == sorted(got[c["id"]], key=lambda t: -float(norms[t]))[:10]
    assert cluster_purity(m["points"], labels) == 1.0
    assert m["clusters"][0]["members"][0][1] is None  # no vocabulary: no strings
    vocab = [f"t{i}" for i in range(w.shape[0])]
    vocab[0] = "x" * 70_000  # a hostile vocabulary: strings are cut, the record stays small
    named = galaxy_map(w, threshold=0.7, vocab=vocab)
    assert all(s == f"t{t}" for c in named["clusters"] for t, s in c["members"] if t != 0)
    assert [s for c in named["clusters"] for t, s in c["members"] if t == 0] == ["x" * 197 + "..."]


def test_cluster_list_is_capped_but_every_point_keeps_its_cluster() -> None:
    w, _ = planted(groups=70, size=2, noise=0.05, extra=0, d=256)
    m = galaxy_map(w, threshold=0.9)
    assert m["cluster_count"] == 70 and len(m["clusters"]) == MAX_CLUSTERS_LISTED
    assert len({p[3] for p in m["points"]}) == 70


def test_cluster_purity() -> None:
    points = [[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 1], [4, 0, 0, -1], [5, 0, 0, 1]]
    assert cluster_purity(points, [7, 7, 8, 9, 9, -1]) == pytest.approx(3 / 4)
    assert math.isnan(cluster_purity([[0, 0, 0, -1]], [1]))


# ------------------------------------------------------------------ partial collapse


def clumped(v: int = 5000, d: int = 64, start: int = 1000, count: int = 3500, seed: int = 0) -> torch.Tensor:
    """The issue's case: `count` of `v` rows collapsed onto one point (plus a little noise), the rest random."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g)
    w[start : start + count] = torch.randn(d, generator=g) + 0.05 * torch.randn(count, d, generator=g)
    return w


def test_clump_of_the_issue_is_found_from_the_geometry_pass() -> None:
    w = clumped()
    geom, (_, cos) = geometry_and_neighbours(w, knn_k=10)
    # exactly the numbers of the report: average neighbourhood 3500 x 3499 / 5000, mean cosine far below 0.9
    assert geom["local_density"]["average_neighborhood_size"] == pytest.approx(2449.3)
    assert geom["global_sparsity"]["mean_similarity"] < 0.6
    vocab = [f"[unused{i}]" for i in range(5000)]
    found = find_clump(w, threshold=0.7, share=0.2, kth_cosine=cos[:, -1], knn_k=10, vocab=vocab)
    assert (found["size"], found["fraction"], found["mutual"], found["candidates"]) == (3500, 0.7, 1.0, 3500)
    assert found["token_ids"] == list(range(1000, 1010)) and found["token_strings"][0] == "[unused1000]"
    unfiltered = find_clump(w, threshold=0.7, share=0.2)  # no neighbour lists: every row is a candidate
    assert (unfiltered["size"], unfiltered["candidates"], unfiltered["token_ids"]) == (3500, 5000, found["token_ids"])
    assert find_clump(w, threshold=0.7, share=0.75) is None  # 70% < 75%
    (alert,) = check({"iter": 7, "clump": found}, AlertSettings(), RunAlerts(), now=0.0)
    assert alert["message"].startswith("iter 7: 3,500 tokens, 70% of the vocabulary, in one clump")
    assert alert["message"].endswith("'[unused1000]', '[unused1001]', '[unused1002]', '[unused1003]', "
                                     "'[unused1004]', ...")


def test_no_clump_in_healthy_or_merely_crowded_embeddings() -> None:
    w = torch.randn(3000, 64, generator=torch.Generator().manual_seed(2))
    _, (_, cos) = geometry_and_neighbours(w, knn_k=10)
    assert find_clump(w, threshold=0.7, share=0.2, kth_cosine=cos[:, -1], knn_k=10) is None
    assert find_clump(w, threshold=0.7, share=0.2) is None
    # a star: 1000 rows each close to one hub row but not to each other (cosine 0.5 between two spokes,
    # 0.71 to the hub): the hub has 1000 neighbours, yet the spokes are no clump
    d = 1200
    hub = torch.zeros(d)
    hub[0] = 1.0
    spokes = hub + torch.eye(d)[1:1001]
    star = torch.cat([hub[None], spokes, torch.randn(1000, d, generator=torch.Generator().manual_seed(3))])
    assert find_clump(star, threshold=0.7, share=0.2) is None
    assert find_clump(star, threshold=0.49, share=0.2)["size"] == 1001  # spokes are neighbours at 0.49
    # too few rows for any clump, bad share
    assert find_clump(torch.randn(1, 4), threshold=0.7, share=0.2) is None
    with pytest.raises(ValueError, match="share"):
        find_clump(w, threshold=0.7, share=0.0)


def test_sample_size_bounds_the_chance_of_missing_a_clump() -> None:
    assert sample_size(0.2, 10_000) == 64 and 0.8 ** 64 < 1e-6
    assert sample_size(0.05, 10_000) == 270 and 0.95 ** 270 < 1e-5
    assert sample_size(0.001, 10_000) == 512 and sample_size(0.2, 30) == 30
