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
