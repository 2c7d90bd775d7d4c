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

from tests.test_daemon import wait_for
from tests.test_daemon import env, publisher_for, start_daemon  # noqa: F401 (fixtures)
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
