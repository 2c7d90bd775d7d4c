"""Many runs through one daemon: ended runs are forgotten in order, so memory stays bounded."""
from __future__ import annotations

import torch
import zmq

from protocol import encode_end, encode_hello
from tests.test_daemon import env, push, snapshot, start_daemon, wait_for  # noqa: F401  (fixtures)


def _run_once(d, sock: zmq.Socket, run: str, iters: list[int]) -> None:
    sock.send_multipart(encode_hello(run=run, seq=0, pid=1, host="test"))
    before = len(d.results(run))
    for n, it in enumerate(iters, 1):
        snapshot(sock, run, it, torch.randn(50, 8, generator=torch.Generator().manual_seed(it)))
        d.wait_results(run, before + n)  # one at a time: back-to-back snapshots would be skipped
    sock.send_multipart(encode_end(run=run, seq=99, final_iter=iters[-1], published=len(iters), dropped=0))


def test_ended_runs_are_released_oldest_first(start_daemon, push: zmq.Socket) -> None:
    d = start_daemon("--no-wandb", "--no-console")
    for n in range(6):
        _run_once(d, push, f"run-{n}", [1, 2])
        wait_for(f"run-{n} closed", lambda n=n: f"run run-{n}: closed" in d.log(), proc=d)
    log = d.log()
    # Four ended runs are kept (a resumed trainer continues its drift); the two oldest are released.
    assert "run run-0: state released from memory" in log and "run run-1: state released from memory" in log
    assert "run run-2: state released" not in log
    # A kept run continues its drift against its last snapshot; a released one starts over.
    _run_once(d, push, "run-5", [3])
    _run_once(d, push, "run-0", [3])
    assert d.wait_results("run-5", 3)[-1]["prev_iter"] == 2
    last = d.wait_results("run-0", 3)[-1]
    assert last["prev_iter"] is None and last["drift"] is None


def test_a_released_run_comes_back_from_the_state_dir(start_daemon, push: zmq.Socket, tmp_path) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--state-dir", str(tmp_path / "state"))
    for n in range(6):
        _run_once(d, push, f"run-{n}", [1, 2])
        wait_for(f"run-{n} closed", lambda n=n: f"run run-{n}: closed" in d.log(), proc=d)
    assert "run run-0: state released from memory" in d.log()
    # Released from memory, not forgotten: its baseline is read back from disk (that run's only).
    _run_once(d, push, "run-0", [3])
    last = d.wait_results("run-0", 3)[-1]
    assert last["prev_iter"] == 2 and last["drift"] is not None
