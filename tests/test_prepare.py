"""prepare() and large snapshots: buffers made ahead on the sender thread, never on the training thread."""
from __future__ import annotations

import os

import pytest
import torch

from protocol import shm_available
from protocol.shm import segments_of
from tests.test_hook import digest, listeners, wait_connected  # noqa: F401  (listeners is a fixture)
from trainer_hook import EmbeddingPublisher

BIG = (5000, 1000)  # 20 MB float32: above the size that may take fresh memory on the training thread


@pytest.mark.skipif(not shm_available(), reason="needs /dev/shm")
def test_prepare_creates_the_shm_slots_before_the_first_publish(tcp_endpoint, listeners):  # noqa: F811
    weight = torch.randn(*BIG)
    listener = listeners(tcp_endpoint)
    pub = EmbeddingPublisher(tcp_endpoint, run="prep", shared_memory=True, max_in_flight=2)
    try:
        wait_connected(pub)
        assert segments_of(os.getpid()) == []
        assert pub.prepare(weight, timeout=60)
        assert len(segments_of(os.getpid())) == 2  # both slots exist (and are faulted in) before the loop
        for i in range(3):
            assert pub.publish(weight, i)
            snap = listener.next_snapshot()
            assert snap["via"] == "shm" and snap["digest"] == digest(weight)
        assert len(segments_of(os.getpid())) == 2  # reused, none created by a publish
    finally:
        pub.close(timeout=2.0)
    assert segments_of(os.getpid()) == []


def test_without_prepare_the_first_large_publish_goes_and_the_rest_wait_for_prepared_buffers(tcp_endpoint,
                                                                                              listeners):  # noqa: F811
    weight = torch.randn(*BIG)
    listener = listeners(tcp_endpoint)
    pub = EmbeddingPublisher(tcp_endpoint, run="noprep", shared_memory=False, max_in_flight=2)
    try:
        wait_connected(pub)
        assert pub.publish(weight, 0)  # takes fresh memory once, queues the preparation of the rest
        assert listener.next_snapshot()["digest"] == digest(weight)
        assert pub._prepared is not None and pub._prepared.done.wait(60)
        for i in range(1, 4):
            assert pub.publish(weight, i)
            assert listener.next_snapshot()["iter"] == i
        assert pub._pool._count <= 2 and pub.dropped == 0  # bounded: the prepared buffers were reused
    finally:
        pub.close(timeout=2.0)


def test_prepare_refuses_what_publish_refuses(tcp_endpoint):
    with EmbeddingPublisher(tcp_endpoint, run="bad-prep") as pub:
        with pytest.raises(ValueError, match="meta device"):
            pub.prepare(torch.empty(10, 4, device="meta"))
        with pytest.raises(ValueError, match="2-D floating tensor"):
            pub.prepare(torch.zeros(3, 4, 5))
