"""Linear CKA, the common-mode shift and the under-trained token indicator (metrics/drift.py, undertrained.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis_daemon import measure_semantic_drift
from analysis_daemon.metrics.undertrained import find_undertrained, precision_recall
from benchmarks.validate_undertrained import constructed_run, evaluate
from tests.test_drift import embeddings, random_orthogonal


def cka_reference(prev: torch.Tensor, curr: torch.Tensor) -> float:
    """Linear CKA by its definition in float64 numpy, on the rows finite in both (HSIC form via Gram products)."""
    x, y = prev.double().numpy(), curr.double().numpy()
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    xc, yc = x[keep] - x[keep].mean(axis=0), y[keep] - y[keep].mean(axis=0)
    # The V x V form (Kornblith et al. eq. 5 with linear kernels): independent of the d x d shortcut.
    kx, ky = xc @ xc.T, yc @ yc.T
    return float((kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky)))


@pytest.mark.parametrize("v,d,noise", [(300, 16, 0.5), (2500, 24, 2.0), (40, 64, 1.0)])
def test_linear_cka_equals_the_float64_reference(v: int, d: int, noise: float) -> None:
    x = embeddings(v, d, seed=v)
    y = x @ torch.randn(d, d, generator=torch.Generator().manual_seed(1)) + noise * torch.randn(
        v, d, generator=torch.Generator().manual_seed(2))
    result = measure_semantic_drift(x, y)
    # float32 chunk products summed in float64: relative error ~ sqrt(chunk) x 2^-24 per Gram entry
    assert result["linear_cka"] == pytest.approx(cka_reference(x, y), rel=1e-5)
    assert 0.0 < result["linear_cka"] < 1.0


@settings(max_examples=25, deadline=None, derandomize=True)
@given(v=st.integers(3, 80), d=st.integers(1, 12), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 0.5, 1.0, 7.0, 1e4]), shift=st.floats(-50, 50))
def test_linear_cka_is_one_for_rotation_translation_and_isotropic_scaling(v: int, d: int, seed: int, scale: float,
                                                                        shift: float) -> None:
    x = embeddings(v, d, seed)
    b = shift * torch.randn(1, d, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    y = (scale * (x.double() @ random_orthogonal(d, seed + 1)) + b).float()
    assert measure_semantic_drift(x, y)["linear_cka"] == pytest.approx(1.0, abs=1e-5)


def test_linear_cka_leaves_nonfinite_rows_out_and_is_none_without_any_direction() -> None:
    x = embeddings(200, 8, seed=5)
    y = x + torch.randn(200, 8, generator=torch.Generator().manual_seed(6))
    y[[3, 50]] = float("nan")
    assert measure_semantic_drift(x, y)["linear_cka"] == pytest.approx(cka_reference(x, y), rel=1e-5)
    same = torch.ones(10, 4)  # every row equal: nothing left after centring
    assert measure_semantic_drift(same, same)["linear_cka"] is None
    assert "linear_cka" not in measure_semantic_drift(x, y, cka=False)


def test_common_mode_shift_is_seen_where_procrustes_drift_is_blind() -> None:
    x = embeddings(400, 16, seed=7)
    b = torch.full((1, 16), 0.75)
    result = measure_semantic_drift(x, x + b)
    assert result["average_cosine_similarity"] == pytest.approx(1.0, abs=1e-6)  # centring removes the shift
    common = result["common_mode"]
    assert common["mean_shift"] == pytest.approx(float(b.norm()), rel=1e-5)
    x64, y64 = x.double(), (x + b).double()
    avg_y = float(y64.norm(dim=1).mean())
    assert common["mean_shift_relative"] == pytest.approx(float(b.norm()) / avg_y, rel=1e-5)
    assert common["mean_norm_ratio"] == pytest.approx(float(y64.mean(0).norm()) / avg_y, rel=1e-5)
    assert common["prev_mean_norm_ratio"] == pytest.approx(float(x64.mean(0).norm() / x64.norm(dim=1).mean()),
                                                           rel=1e-5)
    identical = torch.ones(6, 3)
    assert measure_semantic_drift(identical, identical)["common_mode"]["mean_norm_ratio"] == pytest.approx(1.0)


def group_plus_trained(v: int, d: int, members: list[int], seed: int) -> torch.Tensor:
    """Trained-looking rows (shared structure, norm ~3) with `members` at one common vector + init noise (norm ~0.2)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, 4, generator=g) @ torch.randn(4, d, generator=g) + torch.randn(v, d, generator=g)
    w[members] = torch.randn(1, d, generator=g) + 0.2 / math.sqrt(d) * torch.randn(len(members), d, generator=g)
    return w


def test_undertrained_group_found_from_the_weights_alone() -> None:
    members = list(range(7, 500, 23))
    w = group_plus_trained(500, 32, members, seed=1)
    w[0] = float("inf")  # a non-finite row is never flagged
    found = find_undertrained(w)
    assert found["method"] == "weights" and found["count"] == len(members)
    assert sorted(t for t, _ in found["tokens"]) == members
    scores = [s for _, s in found["tokens"]]
    assert scores == sorted(scores, reverse=True) and 0.0 <= scores[-1] <= scores[0] <= 1.0
    assert len(find_undertrained(w, limit=5)["tokens"]) == 5  # the list is bounded, the count is not
    assert find_undertrained(w, limit=5)["count"] == len(members)


def test_no_group_no_flags_and_bad_shapes_fail_clearly() -> None:
    g = torch.Generator().manual_seed(2)
    assert find_undertrained(torch.randn(400, 32, generator=g))["count"] == 0  # all rows alike: no group
    assert find_undertrained(torch.zeros(4, 3))["count"] == 0  # too few rows to call any group
    with pytest.raises(ValueError, match="2-D"):
        find_undertrained(torch.zeros(3))


def test_since_init_uses_the_change_and_finds_rows_only_decayed() -> None:
    g = torch.Generator().manual_seed(3)
    first = 0.02 * torch.randn(300, 16, generator=g)
    last = 0.9 * first + 0.3 * torch.randn(300, 16, generator=g)  # everyone trained and decayed...
    never = [5, 17, 99, 200, 250]
    last[never] = 0.9 * first[never]  # ...but these only decayed
    found = find_undertrained(last, initial=first)
    assert found["method"] == "since_init" and sorted(t for t, _ in found["tokens"]) == never


def test_precision_recall_counts() -> None:
    assert precision_recall([1, 2, 3, 4], [2, 3, 4, 5, 6]) == (0.75, 0.6)
    assert precision_recall([], []) == (1.0, 1.0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_undertrained_tokens_of_a_trained_tiny_model(tied: bool, weight_decay: float) -> None:
    torch.set_num_threads(1)
    run = constructed_run(tied=tied, weight_decay=weight_decay, steps=200, seed=11)
    results = evaluate(run, tied)
    assert len(results) == (2 if tied else 4)  # input embedding (and untied head), weights and since-init
    for matrix, method, count, precision, recall in results:
        assert precision >= 0.9 and recall >= 0.9, (matrix, method, count, precision, recall)


def test_a_tiny_model_that_sees_every_token_has_none_flagged() -> None:
    torch.set_num_threads(1)
    run = constructed_run(tied=False, weight_decay=0.1, unused=0, steps=200, seed=12)
    assert [count for _, _, count, _, _ in evaluate(run, tied=False)] == [0, 0, 0, 0]


def test_cached_grams_give_the_same_cka_and_are_not_used_with_nonfinite_rows() -> None:
    g = torch.Generator().manual_seed(8)
    first, prev = embeddings(3000, 12, seed=8), embeddings(3000, 12, seed=9)
    cur = prev + torch.randn(3000, 12, generator=g)
    grams: dict[str, torch.Tensor] = {}
    fresh = measure_semantic_drift(prev, cur, grams=grams)["linear_cka"]
    assert set(grams) == {"x", "y"} and grams["y"].shape == (12, 12)
    # the current snapshot's Gram serves the drift since init (where it is "y" again) and the next drift ("x")
    since = measure_semantic_drift(first, cur)["linear_cka"]
    assert measure_semantic_drift(first, cur, grams={"y": grams["y"]})["linear_cka"] == pytest.approx(since, rel=1e-12)
    nxt = cur * 2.0**70 + 1.0  # a power-of-two scale inside: the cache is kept in real units
    assert measure_semantic_drift(cur, nxt, grams={"x": grams["y"]})["linear_cka"] == pytest.approx(
        measure_semantic_drift(cur, nxt)["linear_cka"], rel=1e-9)
    assert fresh == pytest.approx(cka_reference(prev, cur), rel=1e-5)
    bad = cur.clone()
    bad[5] = float("nan")
    wrong = {"x": torch.eye(12, dtype=torch.float64), "y": torch.eye(12, dtype=torch.float64)}
    assert measure_semantic_drift(prev, bad, grams=wrong)["linear_cka"] == pytest.approx(cka_reference(prev, bad),
                                                                                         rel=1e-5)


def test_untied_output_embedding_only_when_it_is_a_separate_weight() -> None:
    from trainer_hook.callbacks import untied_output_embedding

    class LM(torch.nn.Module):
        def __init__(self, tied: bool) -> None:
            super().__init__()
            self.wte, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
            if tied:
                self.head.weight = self.wte.weight

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

    untied, tied = LM(False), LM(True)
    assert untied_output_embedding([untied], untied.wte) is untied.head
    assert untied_output_embedding([tied], tied.wte) is None  # one parameter: sent once
    shared = LM(False)
    shared.head.weight = torch.nn.Parameter(shared.wte.weight.data)  # another Parameter, the same storage
    assert untied_output_embedding([shared], shared.wte) is None
    assert untied_output_embedding([torch.nn.Linear(2, 2)], untied.wte) is None  # no get_output_embeddings


def spearman_reference(a: list[float], b: list[float]) -> float:
    """Spearman's rho by the textbook: average ranks by hand, then Pearson in float64 numpy."""
    def ranks(x: list[float]) -> np.ndarray:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = np.empty(len(x))
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_drift_by_frequency_bins_and_rank_correlation() -> None:
    from analysis_daemon.metrics.frequency import drift_by_frequency

    g = torch.Generator().manual_seed(13)
    counts = torch.tensor([0, 0, 1, 1, 2, 3, 4, 7, 8, 100, 5, 0])
    cos = torch.rand(12, generator=g, dtype=torch.float32)
    cos[3] = float("nan")  # no cosine: left out of the bins and of rho
    out = drift_by_frequency(cos, counts)
    assert [(b["min_count"], b["max_count"], b["tokens"]) for b in out["bins"]] == [
        (0, 0, 3), (1, 1, 1), (2, 3, 2), (4, 7, 3), (8, 15, 1), (64, 127, 1)]
    assert out["bins"][0]["mean_drift_cosine"] == pytest.approx(float(cos[[0, 1, 11]].double().mean()))
    assert out["never_seen"] == 3 and out["tokens"] == 11
    keep = [i for i in range(12) if i != 3]
    ref = spearman_reference([float(counts[i]) for i in keep], [1.0 - float(cos[i]) for i in keep])
    assert out["spearman_count_vs_drift"] == pytest.approx(ref, abs=1e-12)
    # frequent tokens drift less (the law of conformity): rho -1
    rising = torch.linspace(0.5, 0.99, 20)
    assert drift_by_frequency(rising, torch.arange(20))["spearman_count_vs_drift"] == pytest.approx(-1.0)
    assert drift_by_frequency(rising, torch.zeros(20, dtype=torch.int64))["spearman_count_vs_drift"] is None
    with pytest.raises(ValueError, match="one length"):
        drift_by_frequency(rising, torch.zeros(3))


def test_token_counts_in_the_snapshot_header_are_bounded() -> None:
    from protocol import ProtocolError, decode, encode_snapshot

    payload = torch.zeros(5, 2).numpy().tobytes()
    counts = np.arange(5, dtype="<u4").tobytes()
    msg = decode(encode_snapshot(run="r", iter=1, seq=0, name="wte", dtype="float32", shape=[5, 2],
                                 payload=payload, token_counts=counts))
    assert np.frombuffer(msg.token_counts, dtype="<u4").tolist() == [0, 1, 2, 3, 4]
    plain = decode(encode_snapshot(run="r", iter=1, seq=0, name="wte", dtype="float32", shape=[5, 2], payload=payload))
    assert plain.token_counts is None
    with pytest.raises(ValueError, match="token_counts has 16 bytes"):
        encode_snapshot(run="r", iter=1, seq=0, name="wte", dtype="float32", shape=[5, 2], payload=payload,
                        token_counts=counts[:16])
    import msgpack
    frames = encode_snapshot(run="r", iter=1, seq=0, name="wte", dtype="float32", shape=[5, 2], payload=payload)
    header = msgpack.unpackb(frames[0])
    for bad in (counts[:8], "text", [1, 2, 3, 4, 5]):
        header["token_counts"] = bad
        with pytest.raises(ProtocolError, match=r"token_counts must be (20 \(uint32\) or 40 \(uint64\) bytes|bytes, got)"):
            decode([msgpack.packb(header, use_bin_type=True), frames[1]])
    header["token_counts"] = None
    header["name"] = "a/b"
    with pytest.raises(ProtocolError, match="tensor name"):
        decode([msgpack.packb(header, use_bin_type=True), frames[1]])


def test_a_bytes_field_longer_than_eight_per_row_is_refused_before_allocation() -> None:
    import msgpack
    from protocol import Limits, ProtocolError, decode

    limits = Limits(max_rows=100)
    with pytest.raises(ProtocolError, match="not a valid msgpack map"):
        # token counts are at most 8 bytes (uint64) a row: msgpack refuses a longer bytes field before allocating
        decode([msgpack.packb({"v": 1, "kind": "snapshot", "token_counts": b"\0" * 801}, use_bin_type=True)], limits)
