"""Token counts end to end: the embedding's counting hook, counts that survive dropped snapshots, real daemons.

The hook (publisher.watch_tokens, trainer_hook/tokens.py) counts the ids an input embedding sees in
training-mode forwards. Each check compares with a reference counted independently from the batches
(torch.bincount of what the test fed), never from the publisher's own state alone.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.test_daemon import env, publisher_for, start_daemon, wait_for  # noqa: F401 (fixtures)
from tests.test_sharded import daemons  # noqa: F401 (fixture)
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(180)

V = 50


def bincount(batches: list[torch.Tensor], rows: int = V) -> torch.Tensor:
    """The reference: occurrences of each id in [0, rows) over `batches`."""
    flat = torch.cat([b.reshape(-1) for b in batches]) if batches else torch.zeros(0, dtype=torch.int64)
    return torch.bincount(flat[(flat >= 0) & (flat < rows)], minlength=rows)


def offline_publisher(**kw) -> EmbeddingPublisher:
    """A publisher with no daemon (nothing listens on the discard port): counting never needs one."""
    return EmbeddingPublisher("tcp://127.0.0.1:9", run="counts-offline", connect_grace_s=0.0, **kw)


def test_watch_counts_training_forwards_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(V, 8)
    pub = offline_publisher()
    handle = pub.watch_tokens(emb)
    fed = [torch.randint(0, V, (3, 5)) for _ in range(3)]
    for b in fed:
        emb(b)
    emb(input=torch.tensor([4, 4]))  # by keyword too
    fed.append(torch.tensor([4, 4]))
    emb.eval()
    emb(torch.randint(0, V, (9, 9)))  # evaluation: not counted
    emb.train()
    # activation checkpointing (non-reentrant) runs the embedding again in backward: counted once
    ck = torch.randint(0, V, (2, 6))
    checkpoint(lambda ids: emb(ids).pow(2).sum(), ck, use_reentrant=False).backward()
    fed.append(ck)
    ref = bincount(fed)
    got = pub._tokens.counts
    assert got[:V].tolist() == ref.tolist() and int(got[V]) == 0
    # out-of-range ids reach the hook before the embedding refuses them: the spare bin, never a crash here
    with pytest.raises(IndexError):
        emb(torch.tensor([V + 3, -2, 7]))
    assert int(pub._tokens.counts[V]) == 2 and int(pub._tokens.counts[7]) == int(ref[7]) + 1
    handle.remove()
    emb(torch.tensor([1]))
    assert int(pub._tokens.counts[1]) == int(ref[1])  # removed: no longer counted
    # a broken count (counts on a device the ids are not on cannot happen on CPU: a wrong dtype can) never raises
    pub.watch_tokens(emb)
    pub._tokens.counts = pub._tokens.counts.to(torch.int32)  # scatter_add_ of int64 ones into int32 fails
    with caplog.at_level(logging.ERROR, logger="embedding_monitor.hook"):
        emb(torch.tensor([2]))
        emb(torch.tensor([2]))
    assert pub._tokens.failures == 2 and caplog.text.count("counting a batch's tokens failed") == 1
    pub.close(timeout=0.2)
    assert not emb._forward_pre_hooks  # close() removed the hook it registered
    with pytest.raises(TypeError, match="needs the embedding module"):
        offline_publisher().watch_tokens(emb.weight)


def test_counts_of_dropped_snapshots_reach_the_next_record(start_daemon, tcp_endpoint: str) -> None:  # noqa: F811
    """No daemon at first: one snapshot is dropped by the sender thread after it was queued (the connection
    grace ran out), the next one on the training thread before its copy; both leave their counts for the
    first snapshot a daemon receives. Then a full backlog at the daemon skips snapshots: their counts join
    the next analysed record. tokens_seen over all records equals every token counted."""
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(V, 8, generator=g) for _ in range(8)]
    emb = nn.Embedding(V, 8)
    # over the socket with room for every snapshot in flight: the daemon receives them all at once
    pub = EmbeddingPublisher(tcp_endpoint, run="dropped", connect_grace_s=1.0, shared_memory=False, max_in_flight=8)
    pub.watch_tokens(emb)
    fed: list[torch.Tensor] = []

    def train(n: int) -> None:
        for _ in range(n):
            ids = torch.randint(0, V, (4, 6), generator=g)
            emb(ids)
            fed.append(ids)

    train(2)
    assert pub.publish(mats[0], 0)  # within the grace: queued; the sender drops it when the grace ends
    wait_for("the sender's drop", lambda: pub.dropped == 1)
    train(1)
    assert not pub.publish(mats[1], 1) and pub.dropped == 2  # dropped before the copy: counts left in place
    # The backlog holds one snapshot (the budget is below two): snapshots published back to back while the
    # worker analyses one are skipped at the daemon, and their counts join the next one analysed.
    d = start_daemon("--exit-on-end", "--galaxy-rows", "0", "--max-pending-bytes", str(V * 8 * 4 + 1))
    wait_for("the publisher to connect", lambda: pub.connected)
    for it in range(2, 7):
        train(1)
        pub.publish(mats[it], it)  # a drop here keeps its counts too
    train(1)
    wait_for("the last snapshot handed off", lambda: pub.publish(mats[7], 7))
    pub.close()
    assert d.wait_exit() == 0
    records = d.results("dropped")
    # it + 2 batches of 24 tokens were fed before the publish of iteration it (2 <= it <= 7): each record's
    # tokens_seen covers every batch since the previous record, dropped and skipped snapshots' included
    assert records[-1]["iter"] == 7 and sum(b.numel() for b in fed) == 9 * 24
    seen = 0
    for r in records:
        seen += r["tokens_seen"]
        assert seen == (r["iter"] + 2) * 24, records
    print(f"{pub.dropped} dropped by the trainer, {records[-1]['counters']['skipped']} skipped by the daemon")


def test_compiled_model_counts_without_a_graph_break_or_recompile(start_daemon,  # noqa: F811
                                                                   tcp_endpoint: str) -> None:
    """torch.compile traces the hook into the graph (aot_eager: dynamo and AOTAutograd as in production);
    publishing resets the counts in place, which neither breaks the graph nor recompiles it. Gradient
    accumulation: every micro-batch is counted."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tests.test_training_stacks import BATCH, SEQ, VOCAB, Tiny, batch, train

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Tiny()
    d = start_daemon("--galaxy-rows", "0")
    pub = publisher_for(tcp_endpoint, "compiled")
    pub.watch_tokens(model.tok_embeddings)  # before the first compiled call, as the callbacks do
    compiled = torch.compile(model, backend="aot_eager")
    train(model, 1, None, step_fn=compiled)  # compiles forward and backward
    frames = dict(counters["frames"])
    assert frames.get("ok", 0) >= 1 and sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    posted: list[int] = []

    def publish(where: str, step: int, loss: float) -> None:
        if where == "post":
            assert pub.publish(model.tok_embeddings, len(posted))
            posted.append(step)
            d.wait_results("compiled", len(posted))

    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation from here on raises
        train(model, 3, publish, step_fn=compiled, accumulate=2)
    assert dict(counters["frames"]) == frames and sum(counters["graph_break"].values()) == 0
    assert not counters["recompiles"], dict(counters["recompiles"])
    pub.close()
    records = d.results("compiled")
    # the compile step (1 batch) and then 2 micro-batches per step, in train()'s order of batch()es
    fed = [[batch(0)], [batch(0), batch(1)], [batch(2), batch(3)], [batch(4), batch(5)]]
    fed[1] = fed[0] + fed[1]
    del fed[0]
    for r, batches in zip(records, fed, strict=True):
        ref = bincount([b[:, :-1] for b in batches], VOCAB)
        assert r["tokens_seen"] == len(batches) * BATCH * SEQ == int(ref.sum())
        if r["drift"] is not None:
            assert r["insight"]["drift_by_frequency"]["never_seen"] == int((ref == 0).sum())


class Recorder:
    """A data collator that keeps every batch it builds: training batches (length SEQ) and evaluation ones
    (shorter sequences) apart, in the order the Trainer asked for them."""

    def __init__(self, train_len: int) -> None:
        self.train_len, self.train, self.eval = train_len, [], []

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.stack([f["input_ids"] for f in features])
        (self.train if ids.shape[1] == self.train_len else self.eval).append(ids.clone())
        return {"input_ids": ids, "labels": ids.clone()}


def test_hf_trainer_records_count_the_training_batches_since_the_previous_snapshot(start_daemon,  # noqa: F811
                                                                                   tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from tests.test_hf_callback import SEQ, V as HF_V, Pacer, Tokens, gpt2, training_args
    from transformers import Trainer

    from trainer_hook.hf import EmbeddingMonitorCallback

    class Short(Tokens):  # evaluation data: shorter sequences, so the recorder tells them apart
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x = super().__getitem__(i + 1000)["input_ids"][: SEQ - 4]
            return {"input_ids": x, "labels": x}

    class Paced(Pacer):  # waits for each record, without Pacer's reference forward (a training-mode one)
        def _at(self, state, model) -> None:
            if state.global_step in self.expected:
                self.refs[state.global_step] = None

    d = start_daemon("--exit-on-end", "--no-wandb", "--galaxy-rows", "0")
    expected = [0, 2, 4, 5]  # start, every 2 steps (with an evaluation), the last step
    pacer = Paced(d, "hf-counts", expected)
    recorder = Recorder(SEQ)
    args = training_args(tmp_path, max_steps=5, gradient_accumulation_steps=2, eval_strategy="steps",
                         eval_steps=2, run_name="hf-counts")
    trainer = Trainer(model=gpt2(), args=args, train_dataset=Tokens(), eval_dataset=Short(), data_collator=recorder,
                      callbacks=[EmbeddingMonitorCallback(d.endpoint, every_n_steps=2), pacer])
    trainer.train()
    assert d.wait_exit() == 0
    records = d.results("hf-counts")
    assert [r["iter"] for r in records] == expected
    # (the data loader may collate one batch ahead of training: only the first 2 x 5 were trained on)
    assert len(recorder.train) >= 2 * 5 and len(recorder.eval) >= 2  # evaluation ran, on its own batches
    # optimizer step s (1-based) trained on micro-batches 2(s-1) and 2s-1; a snapshot of step s leaves before
    # step s+1's first forward, so it counts the training batches of the steps since the previous snapshot
    for r, prev in zip(records, [0, *expected]):
        batches = recorder.train[2 * prev:2 * r["iter"]]
        ref = bincount(batches, HF_V)
        assert r["tokens_seen"] == sum(b.numel() for b in batches) == int(ref.sum()), (r["iter"], r["tokens_seen"])
        if r["drift"] is not None:
            assert r["insight"]["drift_by_frequency"]["never_seen"] == int((ref == 0).sum())
    assert not trainer.model.get_input_embeddings()._forward_pre_hooks  # removed at the end of training


def test_lightning_counts_tuple_batches_in_training_not_validation(start_daemon) -> None:  # noqa: F811
    """Lightning with gradient accumulation and validation: tuple batches (no "input_ids" key) are counted where
    they meet the embedding; the sanity check and validation are not. count_tokens=False sends no counts."""
    pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from tests.test_lightning_callback import V as PL_V, TinyLM
    from trainer_hook.lightning import EmbeddingMonitorCallback

    d = start_daemon("--no-wandb", "--galaxy-rows", "0")
    data = torch.randint(0, PL_V, (64, 8), generator=torch.Generator().manual_seed(0))
    train_batches: list[torch.Tensor] = []
    val_batches: list[int] = []

    def recorded(batch: list) -> list[torch.Tensor]:
        ids = torch.stack([row[0] for row in batch])
        train_batches.append(ids)
        return [ids]

    class Paced(pl.Callback):  # after ours: each snapshot analysed before the next batch (none is dropped)
        def __init__(self, run: str, ours: EmbeddingMonitorCallback) -> None:
            self.run, self.ours, self.pub = run, ours, None

        def on_train_start(self, trainer, module):
            self.pub = self.ours.publisher

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            d.wait_results(self.run, self.pub.published)

    def fit(run: str, steps: int, **options) -> list[dict]:
        train_batches.clear()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4, collate_fn=recorded)
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:8]), batch_size=4,
                                          collate_fn=lambda rows: val_batches.append(len(rows)) or
                                          [torch.stack([row[0] for row in rows])])
        cb = EmbeddingMonitorCallback(d.endpoint, run=run, every_n_steps=2, **options)
        paced = Paced(run, cb)
        trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=2, val_check_interval=4, limit_val_batches=2,
                             num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             callbacks=[cb, paced])
        trainer.fit(TinyLM(), loader, val)
        assert paced.pub.dropped == 0
        return d.wait_results(run, paced.pub.published)

    records = fit("pl-counts", 4)
    assert len(val_batches) == 1 + 2 + 2  # the sanity check's batch and two validations ran, uncounted
    assert [r["iter"] for r in records] == [0, 2, 4]
    for r, prev in zip(records, [0, 0, 2]):
        batches = train_batches[2 * prev:2 * r["iter"]]
        assert r["tokens_seen"] == sum(b[:, :-1].numel() for b in batches), r["iter"]  # TinyLM feeds x[:, :-1]
        if r["drift"] is not None:
            ref = bincount([b[:, :-1] for b in batches], PL_V)
            assert r["insight"]["drift_by_frequency"]["never_seen"] == int((ref == 0).sum())
    off = fit("pl-off", 2, count_tokens=False)
    assert [r["iter"] for r in off] == [0, 2] and all(r["tokens_seen"] is None for r in off)


def test_sharded_parts_carry_their_ranks_counts_summed_once_per_batch(daemons, subprocess_env: dict,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    """2 torchrun gloo ranks: FSDP2 data parallel (each rank its own batches: the parts' counts are summed) and
    Megatron TP=2 (one batch per TP group: counted once, not twice)."""
    import importlib.util
    import subprocess
    import sys

    from tests.conftest import ROOT

    scenarios = {"fsdp-counts": 101} | ({"mg-counts": 102} if importlib.util.find_spec("megatron") else {})
    d = daemons("--galaxy-rows", "0")
    out = tmp_path / "fed"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "count_ranks.py"), d.endpoint, str(out), str(d.results_dir), *scenarios]
    proc = subprocess.run(cmd, env={**subprocess_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for run, rows in scenarios.items():
        records = d.wait_results(run, 2)
        assert [r["iter"] for r in records] == [0, 1]
        for r in records:
            fed = [torch.load(out / f"{run}-{rank}-{r['iter']}.pt") for rank in (0, 1)]
            if run == "mg-counts":
                assert torch.equal(fed[0], fed[1])  # one TP group, one batch
                fed = fed[:1]
            ref = bincount(fed, rows)
            assert r["tokens_seen"] == int(ref.sum()) == sum(f.numel() for f in fed), (run, r["iter"])
            if r["drift"] is not None:
                assert r["insight"]["drift_by_frequency"]["never_seen"] == int((ref == 0).sum())
        assert records[-1]["counters"]["incomplete"] == 0 and records[-1]["counters"]["rejected"] == 0


def test_assembly_sums_the_parts_counts_and_refuses_a_wrong_length_before_any_work() -> None:
    """Made by the protocol's own encoder and decoder; a hand-made Snapshot gets past the decoder's check."""
    import dataclasses

    import numpy as np

    from analysis_daemon.service.assembly import Assembler, PartRejected
    from protocol import decode, encode_snapshot

    full = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)

    def part(start: int, end: int, counts: list[int] | None, publisher: str):
        data = full.reshape(-1)[start:end].clone()
        raw = None if counts is None else np.asarray(counts, dtype="<u4").tobytes()
        return decode(encode_snapshot(run="r", iter=1, seq=0, name="wte", dtype="float32", shape=(end - start,),
                                      payload=data.numpy().tobytes(), global_shape=(6, 2), start=start,
                                      publisher=publisher, token_counts=raw)), data

    asm, drops = Assembler(timeout_s=60), []
    assert asm.add("r", *part(0, 5, [1, 0, 2, 0, 0, 2**32 - 1], "a"), drops) is None
    assert asm.add("r", *part(5, 9, None, "b"), drops) is None  # e.g. a TP rank other than 0: no counts
    done = asm.add("r", *part(9, 12, [0, 3, 0, 0, 1, 1], "c"), drops)
    assert done is not None and torch.equal(done.tensor, full) and drops == []
    assert done.token_counts.tolist() == [1, 3, 2, 0, 1, 2**32]  # summed in int64: no wrap-around
    # counts for another row count (the decoder refuses them: test_research_metrics.py) are refused by the
    # assembler too, before it allocates anything
    msg, data = part(0, 5, None, "a")
    with pytest.raises(PartRejected, match="token counts of 20 bytes, the matrix's 6 rows need 24"):
        asm.add("r", dataclasses.replace(msg, iter=2, token_counts=b"\0" * 20), data, drops)
    assert not asm.has("r") and asm.in_progress() == 0
