"""Publishing never touches the user's tensors: storage, flags, version counter and autograd state stay as they were.

FSDP (1 and 2) frees a parameter's storage with `untyped_storage().resize_(0)` right after a step; a
numpy view of the weight (what publish used to copy through) marks that storage not resizable for
good, and training died. Each case publishes to a real receiving process (`python -m protocol.listen`),
checks the bytes that arrived, that the tensor is exactly as before, and then frees its storage as FSDP does.
"""
from __future__ import annotations

import hashlib
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.test_hook import TRANSPORTS, listeners, wait_connected  # noqa: F401  (listeners is a fixture)
from trainer_hook import EmbeddingPublisher
from trainer_hook.sharding import is_dtensor

pytestmark = pytest.mark.timeout(120)


def state(t: torch.Tensor) -> dict:
    """Everything publish must leave alone (the storage's address and size, flags, version, autograd)."""
    flags = {"version": t._version, "requires_grad": t.requires_grad, "is_leaf": t.is_leaf, "grad_fn": t.grad_fn,
             "grad": t.grad if t.is_leaf else None, "dtype": t.dtype, "stride": t.stride()}
    if is_dtensor(t):  # a wrapper without storage of its own: its local shard holds the memory
        return flags
    storage = t.untyped_storage()
    return {**flags, "data_ptr": storage.data_ptr(), "nbytes": storage.nbytes(), "resizable": storage.resizable(),
            "storage_offset": t.storage_offset()}


def digest_of(t: torch.Tensor) -> str:
    """The receiver's digest of `t`'s bytes, computed on a copy (a numpy view of `t` would be the bug itself)."""
    copy = t.detach().contiguous().clone()
    return hashlib.blake2b(copy.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def cases() -> list[tuple[str, torch.Tensor, torch.dtype | None, torch.dtype]]:
    """(name, tensor to publish, send_dtype, wire dtype): every copy path of publish."""
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(1101, 64))
    return [
        ("float32 leaf parameter (memcpy)", nn.Parameter(torch.randn(1001, 64)), None, torch.float32),
        ("bfloat16 parameter (memcpy)", nn.Parameter(torch.randn(1001, 64, dtype=torch.bfloat16)), None,
         torch.bfloat16),
        ("float16 parameter (memcpy)", nn.Parameter(torch.randn(1001, 64, dtype=torch.float16)), None,
         torch.float16),
        ("float32 sent as float16 (conversion)", nn.Parameter(torch.randn(1001, 64)), torch.float16, torch.float16),
        ("bfloat16 sent as float32 (conversion)", nn.Parameter(torch.randn(1001, 64, dtype=torch.bfloat16)),
         torch.float32, torch.float32),
        ("row slice with a storage offset (memcpy)", big[50:1051], None, torch.float32),
        ("transposed, not contiguous (strided copy)", nn.Parameter(torch.randn(64, 1001)).t(), None, torch.float32),
        ("non-leaf with a grad_fn", nn.Parameter(torch.randn(1001, 64)) * 2.0, None, torch.float32),
    ]


def wait_released(pub: EmbeddingPublisher, timeout: float = 10.0) -> None:
    """Until the sender thread has taken back every staging buffer of a snapshot already received.

    The listener has the message before the sender thread sees libzmq's tracker done (it looks every 5 ms,
    later on a loaded host); a publish in between finds every buffer in flight and is dropped, by design.
    """
    deadline = time.monotonic() + timeout
    while pub._sender._pending or not pub._sender.jobs.empty():
        assert time.monotonic() < deadline, "the sender thread kept its buffers"
        time.sleep(0.002)


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_publish_leaves_every_tensor_as_it_was_and_fsdp_can_free_it(tcp_endpoint, listeners, shared_memory):
    listener = listeners(tcp_endpoint)
    with EmbeddingPublisher(tcp_endpoint, run="untouched", shared_memory=shared_memory) as pub:
        wait_connected(pub)
        assert listener.next()["kind"] == "hello"
        for i, (name, w, send_dtype, wire) in enumerate(cases()):
            before, expected = state(w), digest_of(w.to(wire))
            pub.send_dtype = send_dtype
            assert pub.publish(w, i), name
            got = listener.next_snapshot()
            wait_released(pub)  # the next case's publish needs a free buffer, not one libzmq still holds
            assert got["digest"] == expected and got["dtype"] == str(wire).removeprefix("torch."), name
            assert got["via"] == ("shm" if shared_memory else "inline"), name
            assert state(w) == before, name
            w.untyped_storage().resize_(0)  # what FSDP does to an unsharded parameter after use
            assert w.untyped_storage().nbytes() == 0, name


def test_publish_with_no_daemon_leaves_the_tensor_alone_too(tcp_endpoint):
    w = nn.Parameter(torch.randn(1001, 64))
    before = state(w)
    with EmbeddingPublisher(tcp_endpoint, run="nobody", connect_grace_s=0.0) as pub:
        pub.publish(w, 0)
        pub.prepare(w, timeout=5)
    assert state(w) == before
    w.untyped_storage().resize_(0)


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process, torn down after the test."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared_memory", TRANSPORTS)
def test_a_dtensor_shard_is_left_as_it_was(tcp_endpoint, listeners, shared_memory, one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    listener = listeners(tcp_endpoint)
    torch.manual_seed(3)
    w = nn.Parameter(distribute_tensor(torch.randn(1001, 64), init_device_mesh("cpu", (1,)), [Shard(0)]))
    local = w.to_local()
    before, before_local, expected = state(w), state(local), digest_of(local)
    with EmbeddingPublisher(tcp_endpoint, run="dtensor", shared_memory=shared_memory) as pub:
        wait_connected(pub)
        assert listener.next()["kind"] == "hello"
        assert pub.publish(w, 0)
        got = listener.next_snapshot()
    assert got["digest"] == expected and got["shape"] == [1001, 64]
    assert state(w) == before and state(local) == before_local
    local.untyped_storage().resize_(0)
