"""EmbeddingPublisher against a real receiving process: delivery, drops, stalls, kills, cleanup."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from torch import nn

from protocol.shm import segments_of, shm_available
from trainer_hook import EmbeddingPublisher

HANG = 5.0  # seconds: a hang detector only (the first publish creates and pre-faults its slot); speed is in benchmarks/bench_hook.py
TRANSPORTS = [pytest.param(True, id="shm", marks=pytest.mark.skipif(not shm_available(), reason="no /dev/shm")),
              pytest.param(False, id="tcp")]


class Listener:
    """`python -m protocol.listen` in its own process; lines are read by a thread so waits can time out."""

    def __init__(self, endpoint: str, env: dict, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "protocol.listen", endpoint, "--digest", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        ready = self.lines.get(timeout=30)
        assert ready.startswith("listen ready on"), ready

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next(self, timeout: float = 10.0) -> dict:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s; listener stderr: {self.stderr()}") from None

    def next_snapshot(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            assert msg["kind"] != "rejected", msg
            if msg["kind"] == "snapshot":
                return msg

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.poll() is not None else "(still running)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def listeners(subprocess_env):
    started: list[Listener] = []

    def start(endpoint: str, *args: str) -> Listener:
        started.append(Listener(endpoint, subprocess_env, *args))
        return started[-1]

    yield start
    for listener in started:
        listener.kill()


def wait_connected(pub: EmbeddingPublisher, timeout: float = 10.0) -> None:
    assert pub.wait_connected(timeout), "publisher never connected"


def digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def timed_publish(pub: EmbeddingPublisher, weight, iter_num: int) -> bool:
    start = time.perf_counter()
    ok = pub.publish(weight, iter_num)
    assert time.perf_counter() - start < HANG, "publish() blocked"
    return ok


class Wrapper(nn.Module):
    """The seed's wrapper: the real embedding lives at .main_weight."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.main_weight = emb


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_every_dtype_and_input_kind_arrives_intact(tcp_endpoint, listeners, shared_memory):
    listener = listeners(tcp_endpoint)
    emb = nn.Embedding(300, 48)
    cases = [(torch.randn(7, 3), None, torch.float32), (torch.randn(64, 32).half(), None, torch.float16),
             (torch.randn(129, 16).bfloat16(), None, torch.bfloat16), (emb, None, torch.float32),
             (Wrapper(emb), torch.float16, torch.float16), (torch.randn(5, 5, dtype=torch.float64), None, torch.float32)]
    with EmbeddingPublisher(tcp_endpoint, run="dtypes", shared_memory=shared_memory, vocab=["a", "b"]) as pub:
        wait_connected(pub)
        hello = listener.next()
        assert hello["kind"] == "hello" and hello["run"] == "dtypes" and hello["vocab_len"] == 2
        for i, (obj, send_dtype, wire) in enumerate(cases):
            pub.send_dtype = send_dtype
            assert timed_publish(pub, obj, i)
            got = listener.next_snapshot()
            weight = obj.main_weight.weight if isinstance(obj, Wrapper) else getattr(obj, "weight", obj)
            assert got["iter"] == i and got["dtype"] == str(wire)[len("torch."):]
            assert got["shape"] == list(weight.shape)
            assert got["via"] == ("shm" if shared_memory else "inline")
            assert got["digest"] == digest(weight.detach().to(wire))
    end = listener.next()
    assert end["kind"] == "end" and end["published"] == len(cases) and end["dropped"] == 0
    assert end["final_iter"] == len(cases) - 1
    assert segments_of(os.getpid()) == []


def test_no_daemon_publish_returns_fast_and_logs_once(tcp_endpoint, caplog):
    caplog.set_level(logging.INFO, logger="embedding_monitor.hook")
    weight = torch.randn(1000, 64)
    pub = EmbeddingPublisher(tcp_endpoint, run="alone", connect_grace_s=0)
    results = [timed_publish(pub, weight, i) for i in range(50)]
    assert results == [False] * 50
    assert (pub.published, pub.dropped) == (0, 50)
    start = time.monotonic()
    pub.close(timeout=2.0)
    assert time.monotonic() - start < 3.5
    warnings = [r for r in caplog.records if r.name == "embedding_monitor.hook" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no analysis daemon connected" in warnings[0].getMessage()
    assert not pub.publish(weight, 99)  # closed: a no-op
    pub.close()  # twice is fine
    assert segments_of(os.getpid()) == []


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_publish_right_after_start_up_is_not_lost_to_the_handshake(tcp_endpoint, listeners, shared_memory):
    listener = listeners(tcp_endpoint)
    weight = torch.randn(100, 8)
    with EmbeddingPublisher(tcp_endpoint, run="eager", shared_memory=shared_memory) as pub:
        # No wait_connected(): a trainer publishes at iteration 0 milliseconds after creating the hook.
        assert timed_publish(pub, weight, 0)
        assert listener.next()["kind"] == "hello"
        got = listener.next_snapshot()
        assert got["iter"] == 0 and got["digest"] == digest(weight)
    assert (pub.published, pub.dropped) == (1, 0)


def test_start_up_grace_without_daemon_is_bounded(tcp_endpoint):
    weight = torch.randn(100, 8)
    pub = EmbeddingPublisher(tcp_endpoint, run="early-alone", connect_grace_s=1.5)
    assert timed_publish(pub, weight, 0)  # within the grace: copied and handed to the sender thread
    deadline = time.monotonic() + 5
    while pub.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (pub.published, pub.dropped) == (0, 1)  # the sender gave up once the grace was over
    assert not timed_publish(pub, weight, 1)  # after the grace: dropped at once, no copy
    pub.close(timeout=1.0)
    assert (pub.published, pub.dropped) == (0, 2)
    assert segments_of(os.getpid()) == []


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_receiver_that_never_reads_cannot_block_or_grow_memory(tcp_endpoint, listeners, shared_memory):
    listeners(tcp_endpoint, "--stall")
    weight = torch.randn(1024, 1024)  # 4 MiB per snapshot
    me = psutil.Process()
    pub = EmbeddingPublisher(tcp_endpoint, run="stalled", shared_memory=shared_memory, shm_reclaim_s=3600)
    try:
        wait_connected(pub)
        for i in range(20):  # warm up: buffers, slots and socket queues fill
            timed_publish(pub, weight, i)
        time.sleep(0.2)
        rss = me.memory_info().rss
        for i in range(20, 220):
            timed_publish(pub, weight, i)
        time.sleep(0.2)
        growth = me.memory_info().rss - rss
        assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 publishes"
        assert pub.dropped >= 200 and pub.published <= 20
    finally:
        pub.close(timeout=0.5)
    assert pub.published + pub.dropped == 220
    assert segments_of(os.getpid()) == []


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_receiver_killed_mid_stream_then_restarted(tcp_endpoint, listeners, shared_memory):
    weight = torch.randn(512, 64)
    first = listeners(tcp_endpoint)
    # default shm_reclaim_s (minutes): slots the dead reader held are freed because it disconnected
    pub = EmbeddingPublisher(tcp_endpoint, run="killed", shared_memory=shared_memory)
    try:
        wait_connected(pub)
        assert timed_publish(pub, weight, 0)
        assert first.next_snapshot()["iter"] == 0
        first.kill()
        for i in range(1, 40):
            timed_publish(pub, weight, i)
            time.sleep(0.005)
        second = listeners(tcp_endpoint)
        wait_connected(pub)
        hello = second.next()
        assert hello["kind"] == "hello" and hello["run"] == "killed", "the restarted daemon got no hello"
        calls = 40
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "delivery never resumed"
            calls += 1
            if timed_publish(pub, weight, 100):
                break
            time.sleep(0.05)
        got = second.next_snapshot()
        assert got["iter"] == 100 and got["digest"] == digest(weight)
    finally:
        pub.close(timeout=1.0)
    assert pub.dropped >= 1 and pub.published + pub.dropped == calls
    assert segments_of(os.getpid()) == []


@pytest.mark.skipif(not shm_available(), reason="no /dev/shm")
def test_slots_held_by_a_killed_receiver_are_reused_at_once(tcp_endpoint, listeners):
    weight = torch.randn(256, 32)
    stuck = listeners(tcp_endpoint, "--stall")  # receives headers into its queue, never releases a slot
    pub = EmbeddingPublisher(tcp_endpoint, run="stuck", shared_memory=True, max_in_flight=2)
    try:
        wait_connected(pub)
        assert timed_publish(pub, weight, 0) and timed_publish(pub, weight, 1)
        assert not timed_publish(pub, weight, 2), "a third slot appeared"
        deadline = time.monotonic() + 10
        while pub.published < 2:  # both headers are with ZeroMQ, the slots wait for a reader that never comes
            assert time.monotonic() < deadline, "the sender never sent the two snapshots"
            time.sleep(0.01)
        stuck.kill()
        fresh = listeners(tcp_endpoint)
        wait_connected(pub)
        assert fresh.next()["kind"] == "hello"
        assert timed_publish(pub, weight, 3), "slots of the dead receiver were not freed on disconnect"
        assert fresh.next_snapshot()["digest"] == digest(weight)
        assert pub._writer.reclaimed >= 1 and pub._sender.shm_enabled
    finally:
        pub.close(timeout=1.0)
    assert segments_of(os.getpid()) == []


class GateEvent:
    """A stand-in for torch.cuda.Event: synchronize() waits until the test opens the gate."""

    gate = threading.Event()
    recorded = 0

    def record(self) -> None:
        GateEvent.recorded += 1

    def synchronize(self) -> None:
        assert GateEvent.gate.wait(10), "gate never opened"


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_async_copy_path_waits_for_the_event_off_the_training_thread(tcp_endpoint, listeners, shared_memory):
    GateEvent.gate.clear()
    listener = listeners(tcp_endpoint)
    weights = [torch.full((16, 8), float(i)) for i in range(3)]
    pub = EmbeddingPublisher(tcp_endpoint, run="async", shared_memory=shared_memory, max_in_flight=2,
                             _event_factory=GateEvent)
    try:
        wait_connected(pub)
        assert listener.next()["kind"] == "hello"
        assert timed_publish(pub, weights[0], 0) and timed_publish(pub, weights[1], 1)
        assert not timed_publish(pub, weights[2], 2), "a third snapshot was accepted with two in flight"
        with pytest.raises(queue.Empty):
            listener.lines.get(timeout=0.3)  # nothing is sent before the copy event completes
        GateEvent.gate.set()
        assert [listener.next_snapshot()["digest"] for _ in range(2)] == [digest(w) for w in weights[:2]]
        assert timed_publish(pub, weights[2], 3)  # buffers came back after the send
        assert listener.next_snapshot()["digest"] == digest(weights[2])
    finally:
        GateEvent.gate.set()
        pub.close(timeout=1.0)
    assert (pub.published, pub.dropped) == (3, 1)


_CHILD = """
import sys, time, torch
from trainer_hook import EmbeddingPublisher
pub = EmbeddingPublisher(sys.argv[1], run="child")
deadline = time.monotonic() + 10
while not pub.connected and time.monotonic() < deadline:
    time.sleep(0.01)
import os
print(os.getpid(), pub.publish(torch.ones(8, 4), 7), flush=True)
# no close(): interpreter exit must send `end` and unlink the slots
"""


def test_interpreter_exit_closes_the_publisher(tcp_endpoint, listeners, subprocess_env):
    listener = listeners(tcp_endpoint)
    child = subprocess.run([sys.executable, "-c", _CHILD, tcp_endpoint], env=subprocess_env, capture_output=True,
                           text=True, timeout=60)
    pid, handed_off = child.stdout.split()
    assert child.returncode == 0 and handed_off == "True", child.stderr
    msgs = [listener.next() for _ in range(3)]
    assert [m["kind"] for m in msgs] == ["hello", "snapshot", "end"]
    assert msgs[2]["published"] == 1 and msgs[1]["via"] == ("shm" if shm_available() else "inline")
    assert segments_of(int(pid)) == []


def test_only_rank_zero_publishes_a_plain_tensor(tcp_endpoint, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    pub = EmbeddingPublisher(tcp_endpoint, run="rank1")  # every rank may hold one (for DTensor shards)
    assert not pub.enabled and not pub.publish(torch.ones(2, 2), 0)  # a plain tensor: rank 0 sends it
    pub.prepare(torch.ones(2, 2))
    assert (pub.published, pub.dropped) == (0, 0) and pub._sender is None  # never even connected
    pub.close()
    monkeypatch.setenv("RANK", "0")
    forced = EmbeddingPublisher(tcp_endpoint, run="forced-off", enabled=False)
    assert not forced.publish(torch.ones(2, 2), 0)


def test_metrics_travel_with_the_snapshot_and_bad_entries_are_left_out(tcp_endpoint, listeners, caplog):
    import numpy as np

    listener = listeners(tcp_endpoint)
    w = torch.randn(16, 8)
    with EmbeddingPublisher(tcp_endpoint, run="metrics", shared_memory=False) as pub:
        wait_connected(pub)
        assert listener.next()["kind"] == "hello"
        good = {"train/loss": 2.5, "val/loss": np.float32(2.75), "tokens": np.int64(4096), "step": torch.tensor(3),
                "lr": torch.tensor(0.5, dtype=torch.float64)}
        bad = {"nan": float("nan"), "flag": True, "bad name!": 1.0, "vec": torch.ones(2), "text": "x"}
        # the second "nan" is the same problem again: not logged again; a list is not a dict: the
        # snapshot still goes, without metrics
        got = []
        with caplog.at_level(logging.WARNING, logger="embedding_monitor.hook"):
            for i, metrics in enumerate([None, {**good, **bad}, {"nan": float("nan")}, [1.0]]):
                assert pub.publish(w, i, metrics=metrics)
                got.append(listener.next_snapshot())  # one at a time: at most 2 may be in flight
    assert got[0]["metrics"] is None and got[2]["metrics"] is None and got[3]["metrics"] is None
    assert got[1]["metrics"] == {"train/loss": 2.5, "val/loss": 2.75, "tokens": 4096, "step": 3, "lr": 0.5}
    assert pub.metrics_rejected == len(bad) + 2
    warnings = [r.getMessage() for r in caplog.records if "metric left out" in r.getMessage()]
    assert len(warnings) == len(bad) + 1, warnings
    assert any("'vec' is a multi-element tensor; pass a Python number" in m for m in warnings)
    assert any("nan must be a finite number" in m for m in warnings)


def test_bad_inputs_fail_loudly(tcp_endpoint):
    with EmbeddingPublisher(tcp_endpoint, run="bad") as pub:
        with pytest.raises(ValueError, match="2-D floating tensor"):
            pub.publish(torch.ones(4), 0)
        with pytest.raises(ValueError, match="2-D floating tensor"):
            pub.publish(torch.ones(4, 4, dtype=torch.int64), 0)
        with pytest.raises(TypeError, match="cannot find an embedding weight"):
            pub.publish(object(), 0)
    with pytest.raises(ValueError, match="run"):
        EmbeddingPublisher(tcp_endpoint, run="../escape")
    with pytest.raises(ValueError, match="cannot be sent"):
        EmbeddingPublisher(tcp_endpoint, run="r", send_dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot connect the embedding publisher to 'tcp://127.0.0.1:abc'"):
        EmbeddingPublisher("tcp://127.0.0.1:abc", run="r")
    assert segments_of(os.getpid()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_cuda_weights_arrive_intact(tcp_endpoint, listeners, shared_memory):
    listener = listeners(tcp_endpoint)
    weight = torch.randn(50304, 768, device="cuda")
    with EmbeddingPublisher(tcp_endpoint, run="cuda", shared_memory=shared_memory) as pub:
        wait_connected(pub)
        for dtype in (None, torch.bfloat16):
            pub.send_dtype = dtype
            assert pub.publish(weight, 1)
            got = listener.next_snapshot(timeout=30)
            assert got["digest"] == digest(weight.to(dtype or torch.float32).cpu())
