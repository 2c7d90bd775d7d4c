"""Socket setup: oversized frames dropped by libzmq before allocation, insecure endpoints refused."""
from __future__ import annotations

import socket
import struct
import time

import psutil
import pytest
import zmq

from protocol import Limits, bind_receiver, check_endpoint, connect_publisher, decode, encode_snapshot, is_local_endpoint

LIMITS = Limits(max_header_bytes=64 * 1024, max_payload_bytes=1 << 20)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def small_snapshot() -> list:
    return encode_snapshot(run="r", iter=1, seq=0, name="w", dtype="float32", shape=(2, 2), payload=bytes(16))


def test_oversized_frame_is_dropped_and_the_receiver_goes_on(ctx, tcp_endpoint):
    pull = bind_receiver(ctx, tcp_endpoint, LIMITS)
    push = connect_publisher(ctx, tcp_endpoint)
    deadline = time.monotonic() + 5
    while True:  # IMMEDIATE=1: wait until the connection exists, then send the oversized message once
        try:
            push.send_multipart(encode_snapshot(run="r", iter=0, seq=0, name="w", dtype="float32",
                                                shape=(1024, 1024), payload=bytes(4 << 20)), zmq.NOBLOCK)
            break
        except zmq.Again:
            assert time.monotonic() < deadline, "publisher never connected"
            time.sleep(0.01)
    assert not pull.poll(500), "a frame above MAXMSGSIZE was delivered"
    deadline = time.monotonic() + 10
    while not pull.poll(50):  # libzmq dropped that connection; the publisher reconnects by itself
        assert time.monotonic() < deadline, "receiver stopped accepting after an oversized frame"
        try:
            push.send_multipart(small_snapshot(), zmq.NOBLOCK)
        except zmq.Again:
            pass
    assert decode(pull.recv_multipart()).iter == 1


def _zmtp_push_greeting() -> bytes:
    """A ZMTP 3.0 NULL-mechanism greeting and READY command of a PUSH peer, written out by hand."""
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 4) + b"PUSH"
    return greeting + bytes([0x04, len(body)]) + body


def test_huge_announced_frame_is_refused_before_allocation(ctx, tcp_endpoint):
    """A peer announcing a 64 GiB frame is disconnected at once; the receiver allocates nothing."""
    pull = bind_receiver(ctx, tcp_endpoint, LIMITS)
    me = psutil.Process()
    rss_before = me.memory_info().rss
    host, port = tcp_endpoint[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(_zmtp_push_greeting())
        greeting = b""
        while len(greeting) < 64:  # the receiver's own greeting: the handshake is under way
            chunk = raw.recv(64 - len(greeting))
            assert chunk, "the receiver hung up during the greeting"
            greeting += chunk
        raw.sendall(b"\x00\x05hello")  # one small frame first: proves the handshake was right
        assert pull.poll(5000) and pull.recv() == b"hello"
        raw.sendall(b"\x02" + struct.pack(">Q", 64 << 30) + bytes(4096))  # announce 64 GiB
        hung_up = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not raw.recv(4096):
                    hung_up = True
                    break
            except ConnectionResetError:
                hung_up = True
                break
    assert hung_up, "the receiver kept a connection that announced a frame above MAXMSGSIZE"
    assert not pull.poll(200)
    assert me.memory_info().rss - rss_before < 64 << 20


@pytest.mark.parametrize("endpoint,local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.9.9.9:1", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True), ("ipc:///tmp/x.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.5:5555", False),
    ("tcp://eth0:5555", False), ("tcp://gpu-node-3:5555", False),
])
def test_local_endpoints(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_insecure_endpoint_is_refused_with_a_fix_hint(ctx):
    with pytest.raises(ValueError) as info:
        bind_receiver(ctx, "tcp://0.0.0.0:0")
    message = str(info.value)
    assert "refusing unencrypted endpoint tcp://0.0.0.0:0" in message and "python -m protocol.keygen" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="refusing unencrypted"):
        connect_publisher(ctx, "tcp://10.1.2.3:5555")
    with pytest.raises(ValueError, match="unsupported endpoint"):
        check_endpoint("udp://127.0.0.1:5", secured=False, allow_insecure=True)
    sock = bind_receiver(ctx, "tcp://0.0.0.0:0", allow_insecure=True)  # explicit opt-out works
    assert sock.getsockopt(zmq.MAXMSGSIZE) == Limits().max_frame_bytes()
    sock.close(0)


def test_ipc_endpoint_round_trip(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/daemon.sock"
    pull = bind_receiver(ctx, endpoint, LIMITS)
    push = connect_publisher(ctx, endpoint)
    deadline = time.monotonic() + 5
    while not pull.poll(20):
        assert time.monotonic() < deadline
        try:
            push.send_multipart(small_snapshot(), zmq.NOBLOCK)
        except zmq.Again:
            pass
    assert decode(pull.recv_multipart(), LIMITS).shape == (2, 2)
