"""Wire fields of sharded runs: rank/world_size in hello, global_shape/offset of a snapshot part, hostile values."""
from __future__ import annotations

import pytest

from protocol import Limits, ProtocolError, decode, encode_hello, encode_snapshot
from tests.test_protocol import snapshot_frames, with_header


def part_frames(**overrides):
    """A snapshot part: rows 6..9 of a 10 x 3 matrix (test_protocol's snapshot plus the part fields)."""
    return snapshot_frames(**{"global_shape": (10, 3), "offset": (6, 0), **overrides})


def test_hello_carries_rank_and_world_size():
    hello = decode(encode_hello(run="r", seq=0, pid=1, host="h", rank=3, world_size=4))
    assert (hello.rank, hello.world_size) == (3, 4)


def test_hello_without_rank_fields_is_rank_zero_of_one():
    hello = decode(with_header(encode_hello(run="r", seq=0, pid=1, host="h"), rank=None, world_size=None))
    assert (hello.rank, hello.world_size) == (0, 1)


def test_part_round_trip_and_whole_snapshot_has_no_part_fields():
    snap = decode(part_frames())
    assert snap.is_part and snap.global_shape == (10, 3) and snap.offset == (6, 0) and snap.shape == (4, 3)
    whole = decode(encode_snapshot(run="r", iter=5, seq=1, name="wte", dtype="float32", shape=(4, 3),
                                   payload=bytes(48)))
    assert not whole.is_part and whole.global_shape is None and whole.offset is None


def test_encoder_refuses_half_a_part_and_a_bad_rank():
    with pytest.raises(ValueError, match="both global_shape= and offset="):
        part_frames(offset=None)
    with pytest.raises(ValueError, match="rank 4 is not in"):
        encode_hello(run="r", seq=0, pid=1, host="h", rank=4, world_size=4)


HOSTILE = {
    "rank >= world": (dict(rank=4, world_size=4), "rank=4 is outside [0, 3]"),
    "world zero": (dict(rank=0, world_size=0), "world_size=0 is outside [1, 65536]"),
    "world huge": (dict(rank=0, world_size=10**9), "world_size=1000000000 is outside"),
    "rank without world": (dict(world_size=None), "missing key 'world_size'"),
    "rank negative": (dict(rank=-1, world_size=2), "rank=-1 is outside"),
    "rank a string": (dict(rank="0", world_size=2), "rank must be an integer, got str"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_hello_rank_fields_are_rejected(case):
    changes, expected = HOSTILE[case]
    with pytest.raises(ProtocolError) as info:
        decode(with_header(encode_hello(run="r", seq=0, pid=1, host="h", rank=1, world_size=2), **changes))
    assert expected in str(info.value)


HOSTILE_PARTS = {
    "offset past the end": (dict(offset=[7, 0]), "part [4, 3] at offset [7, 0] does not lie within global_shape [10, 3]"),
    "negative offset": (dict(offset=[-1, 0]), "at offset [-1, 0] does not lie within"),
    "column overflow": (dict(offset=[0, 1]), "at offset [0, 1] does not lie within global_shape [10, 3]"),
    "part wider than global": (dict(global_shape=[10, 2]), "does not lie within global_shape [10, 2]"),
    "global 1-D": (dict(global_shape=[10]), "global_shape must be [rows, cols] (2 integers), got [10]"),
    "offset floats": (dict(offset=[1.0, 0]), "offset must be [rows, cols] (2 integers)"),
    "offset without global": (dict(global_shape=None), "missing key 'global_shape'"),
    "global without offset": (dict(offset=None), "missing key 'offset'"),
    "global zero rows": (dict(global_shape=[0, 3]), "global_shape rows=0 is outside"),
    "global too many rows": (dict(global_shape=[5 * 2**20, 3]), "global_shape rows=5242880 is outside [1, max_rows="),
    "global too many cols": (dict(global_shape=[10, 2**17]), "global_shape cols=131072 is outside [1, max_cols="),
    "bool in offset": (dict(offset=[True, 0]), "offset must be [rows, cols] (2 integers)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PARTS))
def test_hostile_part_geometry_is_rejected(case):
    changes, expected = HOSTILE_PARTS[case]
    with pytest.raises(ProtocolError) as info:
        decode(with_header(part_frames(), **changes))
    assert expected in str(info.value)


def test_global_shape_bytes_are_limited_before_assembly_allocates():
    small = Limits(max_rows=1000, max_cols=1000, max_payload_bytes=4000)
    with pytest.raises(ProtocolError, match=r"global_shape \[1000, 3\] x float32 = 12000 bytes exceeds max_payload_bytes=4000"):
        decode(part_frames(global_shape=(1000, 3)), small)
    assert decode(part_frames(global_shape=(333, 3)), small).global_shape == (333, 3)


def test_part_payload_bytes_must_match_the_part_shape():
    with pytest.raises(ProtocolError, match="frame has 44 bytes, header nbytes=48"):
        decode([part_frames()[0], bytes(44)])


# --- element-range parts: the flat elements [start, start + numel) of the C-order matrix ------------

def range_frames(**overrides):
    """A range part: elements 14..25 (12 of them, from mid-row 4 to mid-row 8) of a 10 x 3 matrix."""
    return snapshot_frames(**{"shape": (12,), "payload": bytes(48), "global_shape": (10, 3), "start": 14,
                              **overrides})


def test_range_part_round_trip():
    snap = decode(range_frames())
    assert snap.is_part and snap.start == 14 and snap.offset is None and snap.shape == (12,)
    assert snap.numel == 12 and snap.nbytes == 48 and snap.global_shape == (10, 3)
    block = decode(part_frames())
    assert block.start is None and block.numel == 12


def test_encoder_refuses_a_range_with_an_offset_or_a_2d_shape():
    with pytest.raises(ValueError, match="both global_shape= and offset= \\(or start=\\)"):
        range_frames(offset=(0, 0))
    with pytest.raises(ValueError, match="must be \\[numel\\] for an element range"):
        range_frames(shape=(4, 3))
    with pytest.raises(ValueError, match="both global_shape= and offset="):
        range_frames(global_shape=None)


HOSTILE_RANGES = {
    "range past the end": (dict(start=19), "element range [19, 31) does not lie within global_shape [10, 3] (30 elements)"),
    "start past the end": (dict(start=30), "start=30 is outside [0, 29]"),
    "negative start": (dict(start=-1), "start=-1 is outside [0, 29]"),
    "start a float": (dict(start=1.0), "start must be an integer, got float"),
    "start a bool": (dict(start=True), "start must be an integer, got bool"),
    "empty range": (dict(shape=[0], nbytes=0), "shape numel=0 is outside [1,"),
    "huge claim": (dict(shape=[2**40], nbytes=2**42), "shape numel=1099511627776 is outside [1, 274877906944]"),
    "2-D shape": (dict(shape=[4, 3]), "shape of an element-range part must be [numel] (1 integer), got [4, 3]"),
    "numel a string": (dict(shape=["12"]), "must be [numel] (1 integer)"),
    "start and offset": (dict(offset=[0, 0]), "either offset (a block) or start (an element range), not both"),
    "start without global": (dict(global_shape=None), "missing key 'global_shape'"),
    "nbytes lies": (dict(nbytes=40), "nbytes=40 does not match shape [12] x float32 = 48"),
    "global too large": (dict(global_shape=[2**22, 2**16]), "bytes exceeds max_payload_bytes="),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RANGES))
def test_hostile_range_parts_are_rejected(case):
    changes, expected = HOSTILE_RANGES[case]
    with pytest.raises(ProtocolError) as info:
        decode(with_header(range_frames(), **changes))
    assert expected in str(info.value)


def test_range_payload_bytes_must_match():
    with pytest.raises(ProtocolError, match="frame has 44 bytes, header nbytes=48"):
        decode([range_frames()[0], bytes(44)])
