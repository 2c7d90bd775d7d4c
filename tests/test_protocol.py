"""Wire format: round trips of every dtype over real sockets, and every malformed header rejected precisely."""
from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (DEFAULT_LIMITS, PROTOCOL_VERSION, End, Heartbeat, Hello, Limits, ProtocolError, ShmRef,
                      Snapshot, bind_receiver, connect_publisher, decode, encode_end, encode_heartbeat,
                      encode_hello, encode_snapshot,
                      snapshot_tensor, wire_dtype)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 3), (257, 64), (50, 768)]


def raw_bytes(t: torch.Tensor) -> bytes:
    """The C-order bytes of a tensor (bfloat16 through its 2-byte words)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def snapshot_frames(**overrides):
    fields = dict(run="r", iter=5, seq=1, name="wte", dtype="float32", shape=(4, 3), payload=bytes(48))
    fields.update(overrides)
    return encode_snapshot(**fields)


def with_header(frames, **changes):
    """Frames whose header map is changed (None value deletes the key)."""
    header = msgpack.unpackb(frames[0])
    for key, value in changes.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    return [msgpack.packb(header), *frames[1:]]


def recv(sock: zmq.Socket, timeout_ms: int = 5000):
    assert sock.poll(timeout_ms), f"nothing received within {timeout_ms} ms"
    return sock.recv_multipart(copy=False)


@pytest.fixture
def pipe(tcp_endpoint):
    ctx = zmq.Context()
    pull = bind_receiver(ctx, tcp_endpoint)
    push = connect_publisher(ctx, tcp_endpoint)
    yield push, pull
    push.close(0)
    pull.close(0)
    ctx.term()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_snapshot_round_trip_over_tcp(pipe, dtype, shape):
    push, pull = pipe
    sent = torch.randn(shape).to(dtype)
    push.send_multipart(encode_snapshot(run="run-1", iter=100, seq=9, name="wte", dtype=wire_dtype(dtype), shape=shape,
                                        payload=memoryview(sent.view(torch.uint8).numpy()), publisher="p"), copy=False)
    snap = decode(recv(pull))
    assert isinstance(snap, Snapshot)
    assert (snap.run, snap.iter, snap.seq, snap.name, snap.shape, snap.publisher) == ("run-1", 100, 9, "wte", shape, "p")
    got = snapshot_tensor(snap)
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got, sent)


def test_bfloat16_is_rebuilt_without_a_copy():
    sent = torch.randn(16, 8).to(torch.bfloat16)
    frames = encode_snapshot(run="r", iter=0, seq=0, name="wte", dtype="bfloat16", shape=(16, 8),
                             payload=bytearray(raw_bytes(sent)))
    snap = decode(frames)
    got = snapshot_tensor(snap)
    assert torch.equal(got, sent)
    # same memory as the frame: the tensor views the received bytes
    assert got.data_ptr() == np.frombuffer(frames[1], dtype=np.uint8).ctypes.data


def test_tensor_stays_valid_after_frames_go_out_of_scope(pipe):
    push, pull = pipe
    sent = torch.arange(12, dtype=torch.float32).view(4, 3)
    push.send_multipart(encode_snapshot(run="r", iter=0, seq=0, name="w", dtype="float32", shape=(4, 3),
                                        payload=raw_bytes(sent)))
    got = snapshot_tensor(decode(recv(pull)))  # the zmq.Frame objects are only referenced by the tensor now
    assert torch.equal(got.clone(), sent)


def test_hello_and_end_round_trip(pipe):
    push, pull = pipe
    vocab = [f"tok{i}" for i in range(50_000)] + ["ünïcødé", ""]
    push.send_multipart(encode_hello(run="r", seq=0, pid=42, host="h", vocab=vocab, wandb={"project": "p", "id": "x1"},
                                     meta={"lr": 0.1}, publisher="pub"))
    push.send_multipart(encode_end(run="r", seq=1, final_iter=None, published=3, dropped=2, publisher="pub"))
    hello, end = decode(recv(pull)), decode(recv(pull))
    assert hello == Hello(run="r", seq=0, pid=42, host="h", vocab=vocab, wandb={"project": "p", "id": "x1"},
                          meta={"lr": 0.1}, publisher="pub")
    assert end == End(run="r", seq=1, final_iter=None, published=3, dropped=2, publisher="pub")


def test_metrics_round_trip_and_stay_optional():
    metrics = {"train/loss": 2.31, "val/loss": 2.4, "step": 7, "lr-0.max_norm": -1e-300, "x" * 64: 2**53}
    got = decode(snapshot_frames(metrics=metrics))
    assert got.metrics == metrics and type(got.metrics["step"]) is int
    assert decode(snapshot_frames()).metrics is None  # an older publisher sends no key at all
    assert "metrics" not in msgpack.unpackb(snapshot_frames(metrics={})[0])
    with pytest.raises(ProtocolError, match="must be a finite number"):
        snapshot_frames(metrics={"loss": float("nan")})  # the sender checks too: nothing invalid goes out


def test_heartbeat_round_trip_and_validation(pipe):
    push, pull = pipe
    push.send_multipart(encode_heartbeat(run="r", seq=7, publisher="host/1/ab"))
    assert decode(recv(pull)) == Heartbeat(run="r", seq=7, publisher="host/1/ab")
    good = msgpack.unpackb(encode_heartbeat(run="r", seq=7)[0])
    for bad, match in (({**good, "run": "../x"}, "run="), ({**good, "seq": -1}, "seq=-1"),
                       ({k: v for k, v in good.items() if k != "publisher"}, "missing key 'publisher'")):
        with pytest.raises(ProtocolError, match=match):
            decode([msgpack.packb(bad)])
    with pytest.raises(ProtocolError, match="heartbeat has 2 frames"):
        decode([msgpack.packb(good), b"x"])


def test_token_counts_are_uint32_until_a_count_needs_uint64_and_never_capped():
    from protocol import pack_token_counts, unpack_token_counts
    from protocol.messages import TOKEN_COUNT_MAX
    small, big = np.array([0, 7, 2**32 - 1, 3]), np.array([0, 7, 2**32, 6_000_000_000])
    assert len(pack_token_counts(small)) == 16 and len(pack_token_counts(big)) == 32  # 4 rows: 4 or 8 bytes each
    for counts in (small, big, np.array([0, 0, 0, TOKEN_COUNT_MAX])):
        got = decode(snapshot_frames(token_counts=pack_token_counts(counts))).token_counts
        assert unpack_token_counts(got, 4).tolist() == counts.tolist()
    for bad in (np.array([0, 0, 0, TOKEN_COUNT_MAX + 1]), np.array([0, -1, 0, 0])):
        with pytest.raises(ValueError, match="token counts must lie in"):
            pack_token_counts(bad)  # the sender refuses; the receiver refuses what another sender packs
    hostile = np.array([0, 0, 0, 2**63 + 5], dtype="<u8").tobytes()  # would wrap negative as int64
    with pytest.raises(ProtocolError, match="a token count exceeds"):
        decode(with_header(snapshot_frames(), token_counts=hostile))
    for nbytes in (12, 20, 0):  # neither 4 nor 8 bytes a row
        with pytest.raises(ProtocolError, match="token_counts must be 16 \\(uint32\\) or 32 \\(uint64\\) bytes"):
            decode(with_header(snapshot_frames(), token_counts=bytes(nbytes)))


def test_shm_snapshot_has_only_a_header():
    ref = ShmRef(segment="emon-123-0123abcd0123abcd0123abcd-0-1", offset=64, slot_seq=4)
    frames = encode_snapshot(run="r", iter=1, seq=2, name="wte", dtype="float16", shape=(10, 4), shm=ref)
    assert len(frames) == 1
    snap = decode(frames)
    assert snap.shm == ref and snap.payload is None and snap.nbytes == 80


# ------------------------------------------------------------------ malformed input

SMALL = Limits(max_header_bytes=4096, max_rows=100, max_cols=50, max_payload_bytes=4000, max_string_bytes=64)

MALFORMED = {
    "wrong version": (with_header(snapshot_frames(), v=PROTOCOL_VERSION + 1), "v=2 is not the supported protocol version"),
    "version missing": (with_header(snapshot_frames(), v=None), "missing key 'v'"),
    "unknown kind": (with_header(snapshot_frames(), kind="shutdown"), "kind='shutdown' is not one of"),
    "missing key": (with_header(snapshot_frames(), iter=None), "missing key 'iter'"),
    "wrong type": (with_header(snapshot_frames(), iter="5"), "iter must be an integer, got str '5'"),
    "bool is not an int": (with_header(snapshot_frames(), seq=True), "seq must be an integer, got bool"),
    "negative seq": (with_header(snapshot_frames(), seq=-1), "seq=-1 is outside"),
    "bad dtype": (with_header(snapshot_frames(), dtype="float64"), "dtype='float64' is not one of"),
    "1-D shape": (with_header(snapshot_frames(), shape=[12]), "shape must be [rows, cols] (2-D, integers), got [12]"),
    "3-D shape": (with_header(snapshot_frames(), shape=[2, 2, 3]), "got [2, 2, 3]"),
    "zero rows": (with_header(snapshot_frames(), shape=[0, 3], nbytes=0), "rows=0 is outside"),
    "nbytes mismatch": (with_header(snapshot_frames(), nbytes=40), "nbytes=40 does not match shape [4, 3] x float32 = 48"),
    "payload length mismatch": ([snapshot_frames()[0], bytes(44)], "frame has 44 bytes, header nbytes=48"),
    "missing payload frame": (snapshot_frames()[:1], "inline snapshot has 1 frames, expected 2"),
    "extra frames": ([*snapshot_frames(), b"x"], "inline snapshot has 3 frames, expected 2"),
    "extra frame on end": ([*encode_end(run="r", seq=0, final_iter=1, published=0, dropped=0), b""], "end has 2 frames"),
    "run with slash": (with_header(snapshot_frames(), run="../etc"), "may not be '.', '..' or contain '/'"),
    "empty run": (with_header(snapshot_frames(), run=""), "run must be a non-empty string"),
    "vocab not strings": (with_header(encode_hello(run="r", seq=0, pid=1, host="h", vocab=["a"]), vocab=["a", 3]),
                          "vocab[1] must be a string, got int"),
    "meta not a map": (with_header(encode_hello(run="r", seq=0, pid=1, host="h"), meta=[1]), "meta must be a map"),
    "shm name with a path": (with_header(snapshot_frames(payload=None, shm=ShmRef("emon-1-0123abcd0123abcd0123abcd-0-1", 64, 2))[:1],
                                         shm={"segment": "../../etc/passwd", "offset": 64, "slot_seq": 2}),
                             "is not a segment name this protocol creates"),
    "shm odd seq": (with_header(snapshot_frames(payload=None, shm=ShmRef("emon-1-0123abcd0123abcd0123abcd-0-1", 64, 2)),
                                shm={"segment": "emon-1-0123abcd0123abcd0123abcd-0-1", "offset": 64, "slot_seq": 3}), "slot_seq=3 is odd"),
    "msgpack garbage": ([b"\xc1\xc1\xc1", bytes(48)], "not a valid msgpack map"),
    "truncated msgpack": ([snapshot_frames()[0][:-3], bytes(48)], "not a valid msgpack map"),
    "header not a map": ([msgpack.packb([1, 2, 3])], "must be a msgpack map, got list"),
    # bytes are unpacked (a snapshot's token_counts are bytes) and refused where a string is expected
    "msgpack bytes value": (with_header(snapshot_frames(), name=b"wte"), "name must be a string, got bytes"),
    "msgpack ext type": ([msgpack.packb({"v": 1, "x": msgpack.ExtType(5, b"abc")})], "not a valid msgpack map"),
    "non-string map key": ([msgpack.packb({1: 2})], "not a valid msgpack map"),
    "no frames": ([], "expected a non-empty list of frames"),
    "metrics not a map": (with_header(snapshot_frames(), metrics=[1.0]), "metrics must be a map"),
    "metric nan": (with_header(snapshot_frames(), metrics={"loss": float("nan")}), "loss must be a finite number"),
    "metric inf": (with_header(snapshot_frames(), metrics={"loss": float("inf")}), "loss must be a finite number"),
    "metric bool": (with_header(snapshot_frames(), metrics={"ok": True}), "ok must be a finite number, got bool"),
    "metric string": (with_header(snapshot_frames(), metrics={"loss": "2.3"}), "loss must be a finite number"),
    "metric nested": (with_header(snapshot_frames(), metrics={"loss": {"a": 1}}), "loss must be a finite number"),
    "metric huge int": (with_header(snapshot_frames(), metrics={"n": 2**60}), "n=1152921504606846976 is outside"),
    "metric name chars": (with_header(snapshot_frames(), metrics={"train loss\n": 1.0}), "must be 1-64 characters"),
    "metric name slash first": (with_header(snapshot_frames(), metrics={"/etc": 1.0}), "must be 1-64 characters"),
    "metric name too long": (with_header(snapshot_frames(), metrics={"a" * 65: 1.0}), "must be 1-64 characters"),
    "too many metrics": (with_header(snapshot_frames(), metrics={f"m{i}": i for i in range(65)}),
                         "65 entries exceed max_metrics=64"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_raises_precise_error(case):
    frames, expected = MALFORMED[case]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert expected in str(info.value)


LIMITED = {
    "too many rows": (dict(shape=(101, 1), payload=bytes(404)), "rows=101 is outside [1, max_rows=100]"),
    "too many cols": (dict(shape=(1, 51), payload=bytes(204)), "cols=51 is outside [1, max_cols=50]"),
    "too many bytes": (dict(shape=(100, 11), payload=bytes(4400)), "nbytes=4400 exceeds max_payload_bytes=4000"),
    "string too long": (dict(name="w" * 65), "not a valid msgpack map within limits"),
    "header too large": (dict(run="r", publisher="p" * 60, name="n" * 60), None),
}


@pytest.mark.parametrize("case", sorted(LIMITED))
def test_limits_are_enforced(case):
    overrides, expected = LIMITED[case]
    frames = snapshot_frames(**overrides)
    limits = SMALL if case != "header too large" else Limits(max_header_bytes=100)
    expected = expected or f"{len(frames[0])} bytes exceeds max_header_bytes=100"
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    assert expected in str(info.value)
    decode(snapshot_frames())  # the same message shape within default limits is fine


def test_vocab_limits_in_tokens_and_bytes():
    limits = Limits(max_vocab_tokens=1000, max_vocab_bytes=4000)
    ok = decode(encode_hello(run="r", seq=0, pid=1, host="h", vocab=["tok"] * 1000), limits)
    assert len(ok.vocab) == 1000
    with pytest.raises(ProtocolError, match="not a valid msgpack map within limits"):  # refused while unpacking
        decode(encode_hello(run="r", seq=0, pid=1, host="h", vocab=["t"] * 1001), limits)
    with pytest.raises(ProtocolError, match="max_vocab_bytes=4000"):
        decode(encode_hello(run="r", seq=0, pid=1, host="h", vocab=["x" * 5] * 900), limits)
    with pytest.raises(ProtocolError, match="max_vocab_bytes=4000"):  # counted in UTF-8 bytes, not characters
        decode(encode_hello(run="r", seq=0, pid=1, host="h", vocab=["\u00e9\u00e9"] * 999 + ["x" * 10]), limits)


def test_vocab_longer_than_max_rows_is_rejected():
    frames = encode_hello(run="r", seq=0, pid=1, host="h", vocab=["t"] * 101)
    with pytest.raises(ProtocolError, match="not a valid msgpack map within limits"):
        decode(frames, SMALL)


class _Trap:
    """Unpickling this would create a file: proof that nothing is ever unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickle_is_never_unpickled(tmp_path, pipe):
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Trap(marker))
    pickle.loads(evil)  # sanity: the trap works when someone does unpickle it
    assert marker.exists()
    marker.unlink()
    push, pull = pipe
    push.send_multipart([evil])
    with pytest.raises(ProtocolError):
        decode(recv(pull))
    # as a payload it is only bytes: a valid header around it still yields raw numbers
    padded = evil + bytes(-len(evil) % 4)
    push.send_multipart(snapshot_frames(shape=(1, len(padded) // 4), payload=padded))
    snapshot_tensor(decode(recv(pull)))
    assert not marker.exists()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_raises_only_protocol_error_on_random_bytes(data):
    with pytest.raises(ProtocolError):
        decode([data])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "kind", "run", "seq", "iter", "name", "dtype", "shape", "nbytes",
                                        "sent_at", "shm", "publisher", "pid", "host", "vocab", "meta", "wandb"]),
                       st.one_of(st.none(), st.integers(-2, 2**64 - 1), st.text(max_size=5), st.floats(),
                                 st.lists(st.integers(-1, 10), max_size=3), st.sampled_from(["snapshot", "hello", "end"]))),
       st.lists(st.binary(max_size=64), max_size=2))
def test_decode_raises_only_protocol_error_on_random_headers(header, extra):
    try:
        result = decode([msgpack.packb(header), *extra])
    except ProtocolError as exc:
        result = exc
    assert isinstance(result, (Hello, Snapshot, End, ProtocolError))


def test_default_limits_fit_a_large_vocabulary():
    vocab = ["token_%06d" % i for i in range(200_000)]
    frames = encode_hello(run="r", seq=0, pid=1, host="h", vocab=vocab)
    assert len(frames[0]) < DEFAULT_LIMITS.max_header_bytes
    assert decode(frames).vocab == vocab
