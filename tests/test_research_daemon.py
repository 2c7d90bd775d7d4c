"""The research metrics through a real daemon: records, memory accounting, console, W&B offline history, report."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis_daemon import measure_semantic_drift
from analysis_daemon.metrics.undertrained import precision_recall
from analysis_daemon.report.page import build_report, load_results
from benchmarks.validate_undertrained import constructed_run
from tests import wandb_history
from tests.test_daemon import env, publisher_for, start_daemon  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(180)


def test_cka_since_init_and_undertrained_tokens_reach_every_sink(start_daemon, tmp_path: Path,  # noqa: F811
                                                                 tcp_endpoint: str) -> None:
    torch.set_num_threads(1)
    early = constructed_run(tied=False, weight_decay=0.1, steps=60, seed=3)
    late = constructed_run(tied=False, weight_decay=0.1, steps=200, seed=3)  # the same run, trained longer
    snaps = [(0, early.head_first), (60, early.head_last), (200, late.head_last)]
    d = start_daemon("--exit-on-end", "--galaxy-rows", "0")
    vocab = [f"t{i}" for i in range(256)]
    pub = publisher_for(tcp_endpoint, "research", vocab=vocab, wandb_info={"project": "emb-test"})
    for n, (it, w) in enumerate(snaps, 1):
        assert pub.publish(w, it)
        d.wait_results("research", n)
    pub.close()
    assert d.wait_exit() == 0
    results = d.results("research")

    first, second, third = results
    assert first["drift_since_init"] is None and first["drift_since_init_skipped_reason"] == "first snapshot of this run"
    assert first["insight"]["undertrained"]["method"] == "weights"  # no earlier snapshot yet
    # the previous snapshot is the first: the since-init numbers are the drift's own
    assert second["drift_since_init"]["first_iter"] == 0
    assert second["drift_since_init"]["linear_cka"] == second["drift"]["linear_cka"]
    ref = measure_semantic_drift(snaps[0][1], snaps[2][1])
    since = third["drift_since_init"]
    assert since["first_iter"] == 0 and third["prev_iter"] == 60
    assert since["average_cosine_similarity"] == pytest.approx(ref["average_cosine_similarity"], rel=1e-9)
    assert since["linear_cka"] == pytest.approx(ref["linear_cka"], rel=1e-9)
    assert third["drift"]["linear_cka"] == pytest.approx(
        measure_semantic_drift(snaps[1][1], snaps[2][1])["linear_cka"], rel=1e-9)
    # the first snapshot is held for the run's life and counted
    assert third["memory_held_bytes"] >= 2 * 256 * 32 * 4

    under = third["insight"]["undertrained"]
    flagged = [t for t, _ in third["insight"]["undertrained_tokens"]]
    assert under["method"] == "since_init" and under["first_iter"] == 0
    precision, recall = precision_recall(flagged, late.unused)
    assert precision >= 0.9 and recall >= 0.9
    assert under["token_strings"] == [vocab[t] for t in flagged]
    jumps = [a for r in results for a in r["alerts"] if a["kind"] == "undertrained_jump"]
    assert jumps and jumps[0]["metric"] == "insight.undertrained.count"

    out = d.out_path.read_text()
    assert "[Drift] Linear CKA" in out and "[Drift] since iter 0 (the run's first snapshot)" in out
    assert f"[Insight] Under-trained tokens {under['count']} " in out

    (run_file,) = wandb_history.find_run_files(tmp_path)
    rows = {row["analysis/iter"]: row for row in wandb_history.history(run_file)}
    assert rows[200]["analysis/drift_linear_cka"] == pytest.approx(third["drift"]["linear_cka"])
    assert rows[200]["analysis/drift_since_init_linear_cka"] == pytest.approx(since["linear_cka"])
    assert rows[200]["analysis/mean_shift"] == pytest.approx(third["drift"]["common_mode"]["mean_shift"])
    assert rows[200]["analysis/undertrained_count"] == under["count"]
    table = wandb_history.table(run_file, rows[200]["analysis/undertrained_tokens.path"])
    assert [row[1] for row in table["data"]] == flagged

    html = build_report(load_results(d.results_dir / "research" / "analysis.jsonl"))
    assert 'id="research"' in html and f"Under-trained tokens at iter 200: {under['count']}" in html


def test_no_since_init_keeps_no_first_snapshot(start_daemon, tcp_endpoint: str) -> None:  # noqa: F811
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(300, 16, generator=g) for _ in range(3)]
    d = start_daemon("--exit-on-end", "--no-console", "--no-since-init", "--no-undertrained")
    pub = publisher_for(tcp_endpoint, "plain")
    for n, w in enumerate(mats, 1):
        assert pub.publish(w, n)
        d.wait_results("plain", n)
    pub.close()
    assert d.wait_exit() == 0
    last = d.results("plain")[-1]
    assert last["drift_since_init"] is None and last["drift_since_init_skipped_reason"] == "off (--no-since-init)"
    assert "undertrained" not in last["insight"]
    assert last["memory_held_bytes"] < 2 * 300 * 16 * 4  # the baseline only (nothing queued at the end)
    assert last["drift"]["linear_cka"] is not None


def test_named_tensors_keep_their_own_state_and_keys(start_daemon, tmp_path: Path, tcp_endpoint: str) -> None:  # noqa: F811
    g = torch.Generator().manual_seed(4)
    wte = [torch.randn(300, 16, generator=g) for _ in range(3)]
    head = [torch.randn(300, 16, generator=g) for _ in range(3)]
    d = start_daemon("--exit-on-end", "--galaxy-rows", "0")
    pub = publisher_for(tcp_endpoint, "two", wandb_info={"project": "emb-test"})
    assert not pub.publish(head[0], 1, name="lm head/../x")  # refused on the trainer side: a W&B key part
    for n, it in enumerate((10, 20, 30)):
        assert pub.publish(wte[n], it, metrics={"train/loss": 1.0 / it})
        assert pub.publish(head[n], it, name="lm_head")
        d.wait_results("two", 2 * (n + 1))
    pub.close()
    assert d.wait_exit() == 0
    records = d.results("two")
    by = {name: [r for r in records if r["tensor"] == name] for name in ("wte", "lm_head")}
    assert len(records) == 6 and all(len(v) == 3 for v in by.values())
    assert [r["default_tensor"] for r in by["wte"]] == [True] * 3 and not any(r["default_tensor"] for r in by["lm_head"])
    for name, mats in (("wte", wte), ("lm_head", head)):
        rs = by[name]
        assert [r["prev_iter"] for r in rs] == [None, 10, 20]  # its own previous, not the other tensor's
        assert rs[2]["drift"]["average_cosine_similarity"] == pytest.approx(
            measure_semantic_drift(mats[1], mats[2])["average_cosine_similarity"], rel=1e-9)
        assert rs[2]["drift_since_init"]["first_iter"] == 10
        assert not any(r.get("repeat") for r in rs)  # the other tensor at the same iteration is no repeat
    # both tensors' previous and first snapshots are held and counted
    assert records[-1]["memory_held_bytes"] >= 4 * 300 * 16 * 4
    assert "(run two, tensor lm_head) ---" in d.out_path.read_text()

    (run_file,) = wandb_history.find_run_files(tmp_path)
    rows = wandb_history.history(run_file)
    plain = [row for row in rows if "analysis/drift_cosine_sim" in row]
    named = [row for row in rows if "analysis/lm_head/drift_cosine_sim" in row]
    assert [row["analysis/iter"] for row in plain] == [20, 30] and [row["analysis/iter"] for row in named] == [20, 30]
    assert named[-1]["analysis/lm_head/drift_cosine_sim"] == pytest.approx(by["lm_head"][2]["drift"]["average_cosine_similarity"])
    assert not any("train/loss" in row for row in rows if "analysis/lm_head/seconds" in row)  # the loss once

    path = d.results_dir / "two" / "analysis.jsonl"
    assert {r["tensor"] for r in load_results(path).records} == {"wte"}
    assert {r["tensor"] for r in load_results(path, tensor="lm_head").records} == {"lm_head"}


def test_token_counts_travel_with_the_next_snapshot_and_are_reset(start_daemon, tmp_path: Path,  # noqa: F811
                                                                 tcp_endpoint: str) -> None:
    from analysis_daemon.metrics.frequency import drift_by_frequency

    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(200, 16, generator=g) for _ in range(3)]
    d = start_daemon("--exit-on-end", "--galaxy-rows", "0")
    pub = publisher_for(tcp_endpoint, "counts", wandb_info={"project": "emb-test"})
    pub.count_tokens(torch.tensor([1, 2]))  # no rows known yet (no publish, no vocab): left out, logged once
    assert pub.publish(mats[0], 0)
    d.wait_results("counts", 1)
    batches = [torch.randint(0, 60, (4, 8), generator=g) for _ in range(3)]
    for b in batches:
        pub.count_tokens(b)
    pub.count_tokens(torch.tensor([[199, 200, -1]]))  # out of range ids: counted apart, never sent
    assert pub.publish(mats[1], 10)
    assert pub.publish(mats[1] * 0 + mats[1], 10, name="lm_head")  # counts belong to the main tensor only
    d.wait_results("counts", 3)
    assert pub.publish(mats[2], 20)  # nothing counted since: zeros
    d.wait_results("counts", 4)
    pub.close()
    assert d.wait_exit() == 0
    main = [r for r in d.results("counts") if r["tensor"] == "wte"]
    head = [r for r in d.results("counts") if r["tensor"] == "lm_head"]
    assert main[0]["tokens_seen"] is None and head[0]["tokens_seen"] is None
    assert main[1]["tokens_seen"] == 3 * 32 + 1 and main[2]["tokens_seen"] == 0
    counts = torch.bincount(torch.cat([b.reshape(-1) for b in batches] + [torch.tensor([199])]), minlength=200)
    per_token = measure_semantic_drift(mats[0], mats[1], per_token=True)["per_token_cosine"]
    ref = drift_by_frequency(per_token, counts)
    got = main[1]["insight"]["drift_by_frequency"]
    assert [(b["min_count"], b["tokens"]) for b in got["bins"]] == [(b["min_count"], b["tokens"]) for b in ref["bins"]]
    assert [b["mean_drift_cosine"] for b in got["bins"]] == pytest.approx([b["mean_drift_cosine"] for b in ref["bins"]])
    assert got["never_seen"] == int((counts == 0).sum())
    assert got["spearman_count_vs_drift"] == pytest.approx(ref["spearman_count_vs_drift"], rel=1e-9)
    assert "[Insight] Drift by frequency (97 tokens fed" in d.out_path.read_text()
    (run_file,) = wandb_history.find_run_files(tmp_path)
    rows = {row["analysis/iter"]: row for row in wandb_history.history(run_file) if "analysis/tokens_seen" in row}
    assert rows[10]["analysis/tokens_seen"] == 97
    assert rows[10]["analysis/drift_frequency_spearman"] == pytest.approx(got["spearman_count_vs_drift"])


def test_counts_past_uint32_reach_the_record_and_the_token_data_uncapped(start_daemon, tcp_endpoint: str) -> None:  # noqa: F811
    # A trainer whose counts outgrew uint32 (many ranks' sums, a long daemon outage carried on) sends them as
    # uint64; the daemon keeps them as they are, in the record and in tokens_seen.npy. A count over the
    # protocol's bound is refused as a malformed message, counted, and the daemon goes on.
    import numpy as np
    import zmq

    from protocol import encode_end, encode_snapshot, pack_token_counts

    d = start_daemon("--exit-on-end", "--galaxy-rows", "0")
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(50, 8, generator=g) for _ in range(3)]
    counts = np.zeros(50, dtype=np.int64)
    counts[[0, 7]] = [6_000_000_000, 5]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(tcp_endpoint)
    try:
        def send(it: int, w: torch.Tensor, token_counts: bytes | None) -> None:
            sock.send_multipart(encode_snapshot(run="wide", iter=it, seq=it, name="wte", dtype="float32",
                                                shape=list(w.shape), payload=w.numpy().tobytes(),
                                                token_counts=token_counts))

        send(0, mats[0], None)
        d.wait_results("wide", 1)
        send(1, mats[1], np.concatenate([np.zeros(49), [2**47]]).astype("<u8").tobytes())  # over 2^46: refused
        send(2, mats[2], pack_token_counts(counts))
        d.wait_results("wide", 2)
        sock.send_multipart(encode_end(run="wide", seq=3, final_iter=2, published=3, dropped=0))
        assert d.wait_exit() == 0  # every sink (the token data too) has finished
    finally:
        sock.close()
        ctx.term()
    records = d.results("wide")
    assert [r["iter"] for r in records] == [0, 2]
    assert records[1]["tokens_seen"] == 6_000_000_005
    assert "a token count exceeds" in d.log()
    assert "rejected=1" in d.log()
    seen = np.load(d.results_dir / "wide" / "tokens" / f"{2:012d}" / "tokens_seen.npy")
    assert seen.dtype == np.int64 and seen.tolist() == counts.tolist()
    total = np.load(d.results_dir / "wide" / "tokens" / f"{2:012d}" / "tokens_total.npy")
    assert total.tolist() == counts.tolist()
