"""Shared-memory slots: round trips, seqlock checks, release by the reader, stale segments swept."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from protocol import ProtocolError, ShmReader, ShmWriter, decode, encode_snapshot, remove_stale_segments, snapshot_tensor
from protocol.shm import SHM_DIR, segments_of, shm_available

pytestmark = pytest.mark.skipif(not shm_available(), reason="needs /dev/shm")


@pytest.fixture
def writer():
    w = ShmWriter(2, reclaim_after_s=0.2)
    yield w
    w.close()


@pytest.fixture
def reader():
    r = ShmReader()
    yield r
    r.close()


def publish(writer: ShmWriter, tensor: torch.Tensor, dtype: str):
    """Write a tensor into a slot the way the hook does and return the decoded header."""
    raw = tensor.contiguous().view(torch.uint8).view(-1)
    slot = writer.acquire(raw.numel())
    assert slot is not None
    np.copyto(np.frombuffer(slot.payload(), dtype=np.uint8), raw.numpy())
    ref = writer.commit(slot)
    return decode(encode_snapshot(run="r", iter=3, seq=0, name="wte", dtype=dtype, shape=tuple(tensor.shape), shm=ref))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1), (33, 7), (500, 64)])
def test_round_trip_and_release(writer, reader, dtype, shape):
    sent = torch.randn(shape).to(getattr(torch, dtype))
    snap = publish(writer, sent, dtype)
    assert writer.busy() == 1
    got = snapshot_tensor(snap, reader)
    assert got.dtype == sent.dtype and torch.equal(got, sent)
    assert writer.busy() == 0, "the reader did not release the slot"
    assert writer.note_released() == 1
    # the copy is ours: overwriting the slot later does not change it
    publish(writer, torch.zeros(shape).to(sent.dtype), dtype)
    assert torch.equal(got, sent)


def test_slots_are_reused_and_bounded(writer, reader):
    for i in range(10):
        snap = publish(writer, torch.full((8, 4), float(i)), "float32")
        assert snapshot_tensor(snap, reader)[0, 0].item() == i
    assert len(writer.names()) == 1  # always released in time, so one slot sufficed
    publish(writer, torch.ones(8, 4), "float32")
    publish(writer, torch.ones(8, 4), "float32")
    assert writer.acquire(128) is None, "a third slot appeared although both are held"


def test_overwritten_slot_is_detected(writer, reader):
    first = publish(writer, torch.ones(8, 4), "float32")
    publish(writer, torch.ones(8, 4), "float32")
    time.sleep(0.3)  # past reclaim_after_s: the writer may take back slots nobody released
    publish(writer, torch.zeros(8, 4), "float32")
    with pytest.raises(ProtocolError, match="overwritten or released"):
        snapshot_tensor(first, reader)
    assert writer.reclaimed == 1


def test_reading_twice_fails_because_the_slot_was_released(writer, reader):
    snap = publish(writer, torch.ones(4, 4), "float32")
    snapshot_tensor(snap, reader)
    with pytest.raises(ProtocolError, match="overwritten or released"):
        snapshot_tensor(snap, reader)


def test_missing_segment_and_size_mismatch(writer, reader):
    snap = publish(writer, torch.ones(4, 4), "float32")
    bigger = decode(encode_snapshot(run="r", iter=0, seq=0, name="w", dtype="float32", shape=(40, 40), shm=snap.shm))
    with pytest.raises(ProtocolError, match="cannot hold 6400 bytes"):
        snapshot_tensor(bigger, reader)
    writer.close()
    with pytest.raises(ProtocolError, match="does not exist"):
        snapshot_tensor(snap, reader)


def test_reader_lets_go_of_unlinked_segments(writer, reader):
    snapshot_tensor(publish(writer, torch.ones(64, 64), "float32"), reader)
    name = writer.names()[0]
    writer.close()  # unlinks; the reader still maps it
    other = ShmWriter(1)
    try:
        snapshot_tensor(publish(other, torch.ones(2, 2), "float32"), reader)  # opening a new one sweeps
    finally:
        other.close()
    assert name not in reader._open


def test_writer_close_leaves_nothing(writer):
    publish(writer, torch.ones(16, 16), "float32")
    publish(writer, torch.ones(16, 16), "float32")
    assert len(segments_of(os.getpid())) == 2
    writer.close()
    writer.close()
    assert segments_of(os.getpid()) == []


_CHILD = """
import sys, torch, numpy as np
from protocol import ShmWriter
w = ShmWriter(2)
slot = w.acquire(1024)
w.commit(slot)
print(slot.name, flush=True)
sys.stdin.read()
"""


def test_stale_segments_of_a_killed_publisher_are_swept(subprocess_env):
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=subprocess_env, text=True)
    try:
        name = child.stdout.readline().strip()
        assert (SHM_DIR / name).exists()
        assert remove_stale_segments() == 0 or (SHM_DIR / name).exists()  # alive: never swept
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert (SHM_DIR / name).exists(), "a SIGKILLed process cannot clean up: the sweep has work to do"
    assert remove_stale_segments() >= 1
    assert not (SHM_DIR / name).exists()
    assert segments_of(child.pid) == []
