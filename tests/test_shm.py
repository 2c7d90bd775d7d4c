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


def test_reader_holds_nothing_between_reads(writer, reader):
    snapshot_tensor(publish(writer, torch.ones(64, 64), "float32"), reader)
    fds = len(os.listdir("/proc/self/fd"))
    snapshot_tensor(publish(writer, torch.ones(64, 64), "float32"), reader)
    assert len(os.listdir("/proc/self/fd")) == fds  # no descriptor or mapping is cached


def test_truncated_segment_is_an_error_not_sigbus(writer, reader):
    snap = publish(writer, torch.ones(256, 64), "float32")
    os.truncate(SHM_DIR / writer.names()[0], 64 + 1000)  # the owner shrinks it after sending the header
    with pytest.raises(ProtocolError, match="cannot hold 65536 bytes"):
        snapshot_tensor(snap, reader)


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_segment_writable_by_others_is_refused(writer, reader, mode):
    snap = publish(writer, torch.ones(4, 4), "float32")
    os.chmod(SHM_DIR / writer.names()[0], mode)
    with pytest.raises(ProtocolError, match="writable by group or others"):
        snapshot_tensor(snap, reader)


def test_segment_of_another_uid_is_refused_unless_allowed(writer):
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    snap = publish(writer, torch.ones(4, 4), "float32")
    os.chown(SHM_DIR / writer.names()[0], 65534, 65534)
    with pytest.raises(ProtocolError, match="owned by uid 65534"):
        snapshot_tensor(snap, ShmReader())
    got = snapshot_tensor(snap, ShmReader(allowed_uids=[65534]))
    assert torch.equal(got, torch.ones(4, 4))


def test_symlinked_segment_is_refused(writer, reader, tmp_path):
    snap = publish(writer, torch.ones(4, 4), "float32")
    name = writer.names()[0]
    target = SHM_DIR / f"{name}-target"
    os.rename(SHM_DIR / name, target)
    os.symlink(target, SHM_DIR / name)
    try:
        with pytest.raises(ProtocolError, match="cannot open segment"):
            snapshot_tensor(snap, reader)
        assert target.read_bytes()[8:16] != bytes(8)  # the READY state was not overwritten through the link
    finally:
        os.unlink(SHM_DIR / name)
        os.unlink(target)


def test_segment_names_are_bound_to_their_publisher(writer):
    from protocol.shm import publisher_id, segment_belongs_to
    publish(writer, torch.ones(4, 4), "float32")
    name = writer.names()[0]
    assert segment_belongs_to(name, publisher_id("host", os.getpid(), writer.secret))
    assert not segment_belongs_to(name, publisher_id("host", os.getpid(), "guess"))
    assert not segment_belongs_to(name, publisher_id("host", os.getpid() + 1, writer.secret))
    assert writer.secret not in name  # the name (visible to every local user) carries only a hash


def test_writer_close_leaves_nothing(writer):
    publish(writer, torch.ones(16, 16), "float32")
    publish(writer, torch.ones(16, 16), "float32")
    mine = set(writer.names())  # this writer's (another test's publisher in this process may hold others)
    assert len(mine) == 2 and mine <= set(segments_of(os.getpid()))
    writer.close()
    writer.close()
    assert not mine & set(segments_of(os.getpid()))


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
