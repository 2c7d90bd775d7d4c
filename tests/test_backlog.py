"""The bounded backlog, fair scheduling between runs, and what a restarted daemon takes back from --state-dir."""
from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import torch
import zmq

from analysis_daemon.service.backlog import enqueue, next_run, parse_bytes, trim
from analysis_daemon.records import SnapshotData
from analysis_daemon.service.state import RunState
from analysis_daemon.service.state_store import StateStore
from protocol import encode_end
from tests.conftest import free_tcp_port
from tests.test_daemon import (assert_drift_matches, env, matrices, push, snapshot,  # noqa: F401  (fixtures)
                               start_daemon, wait_for)

pytestmark = pytest.mark.timeout(120)


def _snap(it: int, nbytes: int = 400) -> SnapshotData:
    return SnapshotData(iter=it, seq=it, name="wte", tensor=torch.zeros(nbytes // 4))


def test_trim_skips_the_biggest_runs_oldest_never_the_new_one_and_hands_on_skipped_iters() -> None:
    a, b = RunState(run="a"), RunState(run="b")
    for it in range(4):
        enqueue(a, _snap(it))
    enqueue(b, _snap(0))
    new = _snap(4)
    enqueue(a, new)
    skipped = trim([a, b], budget=1200, keep=new)  # 6 x 400 queued, 3 fit: a (the flood) pays
    assert [(s.run, v.iter) for s, v in skipped] == [("a", 0), ("a", 1), ("a", 2)]
    assert [q.iter for q in a.queue] == [3, 4] and a.queue[0].skipped_before == [0, 1, 2]
    assert [q.iter for q in b.queue] == [0] and a.queued_bytes == 800
    # A budget below one snapshot still keeps the newest of a run (newest-wins, not nothing).
    assert [v.iter for _, v in trim([a], budget=10, keep=new)] == [3] and list(a.queue) == [new]
    assert new.skipped_before == [0, 1, 2, 3]
    # Round-robin: the run served least recently goes first, whatever its queue holds.
    a.served, b.served = 5, 2
    assert next_run([a, b]) is b
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("1.5g") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_slow_worker_analyses_a_burst_in_order_and_serves_runs_fairly(start_daemon, push: zmq.Socket) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--exit-on-end", "--chunk-size", "64")
    w = matrices(10, (3000, 32), seed=4)  # each analysis takes far longer than a send: a real backlog
    for it in range(10):
        snapshot(push, "burst", it, w[it])
    snapshot(push, "small", 1, torch.randn(100, 8))  # arrives behind the whole burst
    for run, last in (("burst", 9), ("small", 1)):
        push.send_multipart(encode_end(run=run, seq=99, final_iter=last, published=1, dropped=0))
    assert d.wait_exit() == 0
    burst = d.results("burst")
    assert [r["iter"] for r in burst] == list(range(10))  # all of them, in order, none skipped
    assert all(r["skipped_iters"] == [] for r in burst) and burst[-1]["counters"]["skipped"] == 0
    assert [r["prev_iter"] for r in burst] == [None] + list(range(9))
    assert_drift_matches(burst[5]["drift"], w[4], w[5])
    assert burst[-1]["waited_seconds"] > burst[0]["waited_seconds"]  # late, but at its own iteration
    # Round-robin: the other run is served right after the analysis that was running when it arrived,
    # not after the nine snapshots queued before it.
    (small,) = d.results("small")
    assert small["finished_at"] < burst[2]["finished_at"]


def test_lazy_state_dir_and_an_analysis_killed_midway_is_redone(start_daemon, push: zmq.Socket,
                                                                tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = StateStore(state)
    for n in range(12):  # old runs: 12 x 4 MiB of baselines that nobody asks for
        store.save_snapshot(f"old-{n}", SnapshotData(iter=5, seq=5, name="wte", tensor=torch.randn(8192, 128)))
    d1 = start_daemon("--state-dir", str(state), "--no-wandb", "--no-console", "--no-extras", "--chunk-size", "64",
                      "--progress-interval", "0.1")
    bare = start_daemon("--no-wandb", "--no-console", endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", tag="bare")
    grew = (psutil.Process(d1.proc.pid).memory_info().rss - psutil.Process(bare.proc.pid).memory_info().rss) / 2**20
    assert grew < 24, f"a daemon with 48 MiB of old state uses {grew:.0f} MiB more than one without"
    bare.kill()
    # Large enough that the kill lands mid-analysis also on an idle machine (~1 s of geometry at 1 thread)
    w1, w2, w3 = matrices(3, (24000, 128), seed=6)
    snapshot(push, "mid", 1, w1[:300])
    d1.wait_results("mid", 1)
    snapshot(push, "mid", 2, w2)
    wait_for("the analysis of iter 2 to be under way", lambda: "run mid iter 2: geometry" in d1.log(), proc=d1)
    d1.proc.send_signal(signal.SIGKILL)
    assert d1.wait_exit() == -signal.SIGKILL

    d2 = start_daemon("--state-dir", str(state), "--no-wandb", "--no-console", "--no-extras", "--chunk-size", "64")
    assert "run mid: iter 2 was being analysed when the daemon stopped" in d2.log()
    assert "old-" not in d2.log()  # the other runs stay on disk
    first_two = d2.wait_results("mid", 2)
    assert first_two[1]["iter"] == 2 and first_two[1]["recovered"] is True and first_two[1]["prev_iter"] == 1
    snapshot(push, "mid", 3, w3)
    r3 = d2.wait_results("mid", 3)[2]
    assert r3["prev_iter"] == 2  # names an iteration that has a record
    assert_drift_matches(r3["drift"], w2, w3)


def test_a_skipped_snapshots_token_counts_go_on_with_its_tensors_next_snapshot() -> None:
    """tokens_seen then covers everything fed since the previous analysed snapshot: no count is lost to a skip."""
    def counted(it: int, ids: list[int], name: str = "wte") -> SnapshotData:
        snap = _snap(it)
        snap.name, snap.token_counts = name, torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=6)
        return snap

    a = RunState(run="a")
    first, head = counted(1, [0, 0, 5]), counted(1, [1], name="lm_head")
    enqueue(a, first)
    enqueue(a, head)
    last = counted(2, [5, 2])
    enqueue(a, last)
    assert [v for _, v in trim([a], budget=800, keep=last)] == [first]  # the oldest goes
    assert last.token_counts.tolist() == [2, 0, 1, 0, 0, 2] and head.token_counts.tolist() == [0, 1, 0, 0, 0, 0]
    # nothing of the tensor queued after the skipped one: held until its next snapshot arrives
    assert [v for _, v in trim([a], budget=400, keep=last)] == [head]
    assert a.skipped_counts["lm_head"].tolist() == [0, 1, 0, 0, 0, 0]
    plain = _snap(3)
    plain.name = "lm_head"  # a snapshot without counts of its own takes the held ones
    enqueue(a, plain)
    assert plain.token_counts.tolist() == [0, 1, 0, 0, 0, 0] and a.skipped_counts == {}
