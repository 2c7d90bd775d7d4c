"""CurveZMQ: the key-generation command, an unknown client refused, a known one delivers."""
from __future__ import annotations

import stat
import subprocess
import sys
import time

import pytest
import torch
import zmq

from protocol import CurveClient, CurveServer, bind_receiver, connect_publisher, decode, encode_end, snapshot_tensor
from trainer_hook import EmbeddingPublisher


@pytest.fixture
def keys(tmp_path, subprocess_env):
    """Server keys, a trusted client whose public key is authorised, and an unknown client."""
    for name in ("server", "trusted", "stranger"):
        done = subprocess.run([sys.executable, "-m", "protocol.keygen", str(tmp_path / "keys"), "--name", name],
                              env=subprocess_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"secret key: {tmp_path / 'keys' / name}.key_secret" in done.stdout
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "trusted.key").write_bytes((tmp_path / "keys" / "trusted.key").read_bytes())
    return tmp_path / "keys", authorized


def test_keygen_writes_a_private_secret(keys):
    keydir, _ = keys
    mode = stat.S_IMODE((keydir / "trusted.key_secret").stat().st_mode)
    assert mode == 0o600
    assert "secret-key" not in (keydir / "trusted.key").read_text()


@pytest.fixture
def server(keys, tcp_endpoint):
    keydir, authorized = keys
    ctx = zmq.Context()
    curve = CurveServer(keydir / "server.key_secret", authorized)
    # a non-loopback bind is accepted because CURVE is on
    endpoint = tcp_endpoint.replace("127.0.0.1", "0.0.0.0")
    sock = bind_receiver(ctx, endpoint, curve=curve)
    yield ctx, sock, tcp_endpoint
    sock.close(0)
    curve.stop()
    ctx.term()


def _try_send(sock: zmq.Socket, frames: list, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:  # IMMEDIATE: no authenticated connection (yet)
            time.sleep(0.02)
    return False


@pytest.mark.parametrize("client,delivers", [("trusted", True), ("stranger", False)])
def test_only_authorised_clients_deliver(keys, server, client, delivers):
    keydir, _ = keys
    _, pull, endpoint = server
    ctx = zmq.Context()
    push = connect_publisher(ctx, endpoint, CurveClient(keydir / f"{client}.key_secret", keydir / "server.key"))
    try:
        frames = encode_end(run="r", seq=0, final_iter=1, published=0, dropped=0)
        sent = _try_send(push, frames, 5.0 if delivers else 1.5)
        assert sent is delivers
        arrived = pull.poll(3000 if delivers else 500)
        assert bool(arrived) is delivers
        if delivers:
            assert decode(pull.recv_multipart()).final_iter == 1
    finally:
        push.close(0)
        ctx.term()


def test_publisher_with_unknown_key_drops_and_known_key_delivers(keys, server):
    keydir, _ = keys
    _, pull, endpoint = server
    common = dict(curve_server_public=keydir / "server.key", shared_memory=False)
    stranger = EmbeddingPublisher(endpoint, run="stranger", curve_client_secret=keydir / "stranger.key_secret", **common)
    trusted = EmbeddingPublisher(endpoint, run="trusted", curve_client_secret=keydir / "trusted.key_secret", **common)
    try:
        weight = torch.randn(32, 8)
        deadline = time.monotonic() + 5
        while not trusted.connected:
            assert time.monotonic() < deadline, "trusted publisher never completed the CURVE handshake"
            time.sleep(0.02)
        assert trusted.publish(weight, 1)
        # Refused during the handshake: whether the publish is dropped at once or after the start-up
        # grace, it is never sent and never counted as published.
        stranger.publish(weight, 1)
        deadline = time.monotonic() + 5
        while stranger.dropped == 0:
            assert time.monotonic() < deadline, "the refused publisher never counted its drop"
            time.sleep(0.02)
        assert (stranger.published, stranger.dropped) == (0, 1) and not stranger.connected
        kinds = []
        while pull.poll(2000):
            msg = decode(pull.recv_multipart(copy=False))
            assert msg.run == "trusted"
            kinds.append(type(msg).__name__)
            if kinds[-1] == "Snapshot":
                assert torch.equal(snapshot_tensor(msg), weight)
                break
        assert kinds == ["Hello", "Snapshot"]
    finally:
        stranger.close(timeout=0.5)
        trusted.close(timeout=1.0)


def test_missing_key_files_give_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="python -m protocol.keygen"):
        CurveClient(tmp_path / "nope.key_secret", tmp_path / "server.key")
    with pytest.raises(ValueError, match="needs both"):
        EmbeddingPublisher("tcp://10.0.0.1:5555", curve_client_secret=tmp_path / "x")
    with pytest.raises(ValueError, match="refusing unencrypted endpoint"):
        EmbeddingPublisher("tcp://10.0.0.1:5555")
