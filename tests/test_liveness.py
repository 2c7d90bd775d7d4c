"""Crashed, stopped and duplicated trainers: run liveness, the open-run limit, shared-memory clean-up.

Real daemon subprocesses, real trainer processes, real signals; short --run-timeout values keep it quick.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zmq

from analysis_daemon.service.liveness import publisher_tag
from analysis_daemon.report.page import load_results
from protocol import encode_end, encode_heartbeat, encode_hello, segments_of, shm_available
from tests.test_daemon import (assert_drift_matches, env, matrices, push, snapshot,  # noqa: F401  (fixtures)
                               start_daemon, wait_for)

pytestmark = pytest.mark.timeout(120)

TRAINER = textwrap.dedent("""
    import os, signal, sys, time, torch
    from trainer_hook import EmbeddingPublisher
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # the trainer's own handler: must still run
    pub = EmbeddingPublisher(sys.argv[1], run="sig", heartbeat_s=0.2, shared_memory=True)
    deadline = time.monotonic() + 60
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    w = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert pub.publish(w, 1)
    print("published 1", flush=True)
    time.sleep(2.0)  # quiet, longer than --run-timeout: only the heartbeats keep the run open
    print("quiet done", flush=True)
    while not got:
        time.sleep(0.01)
    print("trainer handler ran", flush=True)
    time.sleep(0.5)
    assert pub.publish(w * 2, 2)  # fresh segments after the handler removed the old ones
    print("published 2", flush=True)
    time.sleep(600)  # until the test kills it
""")


def _lines(proc_out: Path) -> str:
    return proc_out.read_text() if proc_out.exists() else ""


@pytest.mark.skipif(not shm_available(), reason="needs /dev/shm")
def test_signals_chain_heartbeats_keep_open_and_a_sigkilled_trainer_is_closed(
        start_daemon, tmp_path: Path, env: dict[str, str], tcp_endpoint: str) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--run-timeout", "1.5")
    out = tmp_path / "trainer.out"
    with open(out, "w") as f:
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, tcp_endpoint], stdout=f,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        wait_for("the first publish", lambda: "published 1" in _lines(out) or trainer.poll() is not None)
        first = segments_of(trainer.pid)
        assert first, _lines(out)
        d.wait_results("sig", 1)
        wait_for("the quiet spell", lambda: "quiet done" in _lines(out) or trainer.poll() is not None)
        assert "closing" not in d.log()  # 2 s without a snapshot, timeout 1.5 s: the heartbeats kept it open
        trainer.send_signal(signal.SIGTERM)
        wait_for("the trainer's own handler", lambda: "published 2" in _lines(out) or trainer.poll() is not None)
        assert trainer.poll() is None, _lines(out)  # its handler decided not to exit: still running
        assert not set(first) & set(segments_of(trainer.pid))  # ours removed the segments before chaining
        d.wait_results("sig", 2)
        trainer.send_signal(signal.SIGKILL)  # OOM killer: no atexit, no handler, segments left behind
        assert trainer.wait(30) == -signal.SIGKILL
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    # Same host, process gone: closed at once (not after the timeout), segments removed by the daemon.
    wait_for("the run to close", lambda: "run sig: closed" in d.log(), proc=d)
    log = d.log()
    assert f"run sig: closing: pid {trainer.pid} on {socket.gethostname()}: publisher process {trainer.pid} is gone" in log
    assert segments_of(trainer.pid) == []
    # Removed by this daemon (`removed 1 shared-memory segment(s) of dead publisher pid N`), or, where tests
    # of several checkouts run at once, by another daemon's start-up sweep: /dev/shm is machine-wide.
    removed_here = f"removed 1 shared-memory segment(s) of dead publisher pid {trainer.pid}" in log
    print("segment removed by", "this daemon" if removed_here else "another daemon's start-up sweep")
    results = d.results("sig")
    assert [r["iter"] for r in results] == [1, 2] and results[1]["prev_iter"] == 1


def test_silent_publishers_are_closed_like_end_and_released(start_daemon, push: zmq.Socket, tmp_path: Path) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--run-timeout", "1", "--exit-on-end")
    # Six trainers on another host (their pid cannot be checked here): each sends a hello and one
    # snapshot, then goes silent forever, as a SIGKILLed trainer does.
    for n in range(6):
        push.send_multipart(encode_hello(run=f"gone-{n}", seq=0, pid=4242, host="elsewhere", publisher=f"p{n}",
                                         meta={"heartbeat_s": 0.2 if n else 5.0}))
        snapshot(push, f"gone-{n}", 7, torch.randn(40, 8), publisher=f"p{n}")
    # A heartbeat of a publisher never introduced creates nothing.
    push.send_multipart(encode_heartbeat(run="ghost", seq=0, publisher="nobody"))
    assert d.wait_exit() == 0  # every run closed by the timeout counts as ended for --exit-on-end
    log = d.log()
    for n in range(6):
        assert f"run gone-{n}: closing: pid 4242 on elsewhere: silent for 1 s (--run-timeout 1)" in log
        (r,) = d.results(f"gone-{n}")  # its last snapshot analysed before closing
        assert r["iter"] == 7
    # Memory: the two oldest closed runs are released (four ended runs are kept for resumption).
    assert log.count("state released from memory") == 2
    assert "ghost" not in log and not (d.results_dir / "ghost").exists()
    # The hook tells its heartbeat interval: a timeout shorter than two of them is called out.
    assert log.count("heartbeats every") == 1
    assert "run gone-0: its publisher heartbeats every 5 s but --run-timeout is 1 s" in log


def test_dead_local_publisher_segments_removed_and_open_run_limit_refuses_newcomers(
        start_daemon, push: zmq.Socket, tmp_path: Path) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--no-extras", "--run-timeout", "600")
    # A publisher process on this host that died without a word: its pid is gone, its segment stays.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    seg = Path("/dev/shm") / f"emon-{dead.pid}-deadbeef-0-1"
    if shm_available():
        seg.write_bytes(b"\0" * 128)
    push.send_multipart(encode_hello(run="local", seq=0, pid=dead.pid, host=socket.gethostname(), publisher="L"))
    snapshot(push, "local", 1, torch.randn(40, 8), publisher="L")
    wait_for("the dead publisher's run to close", lambda: "run local: closed" in d.log(), proc=d)
    assert f"publisher process {dead.pid} is gone" in d.log()
    assert not seg.exists()
    # 64 runs open (the limit), each with a live publisher: a 65th is refused and counted; no run with
    # live publishers is ever closed for a newcomer (issue 21: eviction of a live run).
    for n in range(64):
        push.send_multipart(encode_hello(run=f"r{n}", seq=0, pid=1, host="elsewhere", publisher=f"q{n}"))
        snapshot(push, f"r{n}", 1, torch.randn(20, 4), publisher=f"q{n}")
    d.wait_results("r63", 1)
    snapshot(push, "new-run", 1, torch.randn(20, 4), publisher="new")
    wait_for("the newcomer's refusal", lambda: "new run 'new-run' refused: 64 runs are open (limit 64), all "
             "with live publishers" in d.log(), proc=d)
    # Once one of them ends, its place is free and the newcomer is served.
    push.send_multipart(encode_end(run="r1", seq=9, final_iter=1, published=1, dropped=0, publisher="q1"))
    wait_for("r1 to close", lambda: "run r1: closed" in d.log(), proc=d)
    snapshot(push, "new-run", 1, torch.randn(20, 4), publisher="new")
    d.wait_results("new-run", 1)
    log = d.log()
    assert "evicted" not in log and "closed to serve" not in log
    snapshot(push, "r0", 2, torch.randn(20, 4), publisher="q0")  # the other runs go on as before
    d.wait_results("r0", 2)


def test_two_publishers_one_run_name_are_kept_apart(start_daemon, push: zmq.Socket) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--exit-on-end")
    a, b = matrices(3, (200, 16), seed=1), matrices(3, (200, 16), seed=2)
    push.send_multipart(encode_hello(run="twin", seq=0, pid=11, host="h1", publisher="h1/11/aaaa"))
    push.send_multipart(encode_hello(run="twin", seq=0, pid=22, host="h2", publisher="h2/22/bbbb"))
    for i in range(3):  # interleaved, as two trainers started with one name would send
        snapshot(push, "twin", i * 10, a[i], publisher="h1/11/aaaa")
        snapshot(push, "twin", i * 10, b[i], publisher="h2/22/bbbb")
    other = f"twin.pub-{publisher_tag('h2/22/bbbb')}"
    for pub, run in (("h1/11/aaaa", "twin"), ("h2/22/bbbb", "twin")):
        push.send_multipart(encode_end(run=run, seq=9, final_iter=20, published=3, dropped=0, publisher=pub))
    assert d.wait_exit() == 0
    first, second = d.results("twin"), d.results(other)
    assert [r["iter"] for r in first] == [0, 10, 20] and [r["iter"] for r in second] == [0, 10, 20]
    assert all(r["run"] == other for r in second)
    for i in (1, 2):  # each trainer's drift is against its own previous snapshot, never the other's
        assert_drift_matches(first[i]["drift"], a[i - 1], a[i])
        assert_drift_matches(second[i]["drift"], b[i - 1], b[i])
    # The log names the publisher without its secret (the part after the pid binds its shm segments).
    from protocol.shm import public_publisher_id
    assert f"run twin: a second publisher ('{public_publisher_id('h2/22/bbbb')}') while pid 11 on h1 still " \
           f"publishes it: kept apart as run {other}" in d.log()
    assert "bbbb" not in d.log()


def test_resumed_trainer_repeats_iterations_and_both_records_are_kept(start_daemon, push: zmq.Socket) -> None:
    # No --exit-on-end: with it the daemon may exit between the first trainer's end and the second one's
    # hello (every run it has seen has ended and its work is done), which is what --exit-on-end promises.
    d = start_daemon("--no-wandb", "--no-console")
    w = matrices(6, (200, 16), seed=3)
    push.send_multipart(encode_hello(run="res", seq=0, pid=11, host="h", publisher="first"))
    for i, it in enumerate((0, 10, 20)):
        snapshot(push, "res", it, w[i], publisher="first")
        d.wait_results("res", i + 1)  # one at a time: this test is about repeats, not the backlog
    push.send_multipart(encode_end(run="res", seq=9, final_iter=20, published=3, dropped=0, publisher="first"))
    # The trainer is restarted from its checkpoint of iter 10: a new process, the same run name.
    push.send_multipart(encode_hello(run="res", seq=0, pid=12, host="h", publisher="second"))
    for i, it in enumerate((10, 20, 30), 3):
        snapshot(push, "res", it, w[i], publisher="second")
    push.send_multipart(encode_end(run="res", seq=9, final_iter=30, published=3, dropped=0, publisher="second"))
    results = d.wait_results("res", 6)
    wait_for("the second trainer's end", lambda: d.log().count("run res: end") == 2, proc=d)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.results("res") == results  # nothing more came after the sixth record
    assert [r["iter"] for r in results] == [0, 10, 20, 10, 20, 30]
    assert [r.get("repeat", False) for r in results] == [False, False, False, True, True, False]
    assert results[3]["resumed_after_iter"] == 20 and results[3]["prev_iter"] == 20
    assert_drift_matches(results[3]["drift"], w[2], w[3])  # resumed model vs where the first attempt got
    assert "run res iter 10: repeats an iteration (iter 20 was analysed already)" in d.log()
    # The report keeps one record per iteration, the newer (both have drift) and says so.
    res = load_results(d.results_dir / "res" / "analysis.jsonl")
    assert [r["iter"] for r in res.records] == [0, 10, 20, 30] and res.duplicates == 2
    assert res.records[1].get("repeat") is True
