"""The assembler with element-range parts: every element covered exactly once, overlaps and gaps refused.

Parts here are made by the protocol's own encoder and decoder, so the header checks run too; the
assembled matrix is compared with the matrix the parts were cut from.
"""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis_daemon.service import assembly
from analysis_daemon.service.assembly import Assembler, PartRejected
from protocol import decode, encode_snapshot

FULL = torch.arange(10 * 4, dtype=torch.float32).view(10, 4)


def rng(it: int, start: int, end: int, full: torch.Tensor = FULL, publisher: str = "p"):
    """The decoded range part [start, end) of `full` and its tensor."""
    data = full.reshape(-1)[start:end].clone()
    msg = decode(encode_snapshot(run="r", iter=it, seq=0, name="wte", dtype="float32", shape=(end - start,),
                                 payload=data.numpy().tobytes(), global_shape=tuple(full.shape), start=start,
                                 publisher=publisher))
    return msg, data


def blk(it: int, r0: int, c0: int, rows: int, cols: int, full: torch.Tensor = FULL, publisher: str = "b"):
    """The decoded 2-D block part of `full` at [r0, c0] and its tensor."""
    data = full[r0:r0 + rows, c0:c0 + cols].clone()
    msg = decode(encode_snapshot(run="r", iter=it, seq=0, name="wte", dtype="float32", shape=(rows, cols),
                                 payload=data.numpy().tobytes(), global_shape=tuple(full.shape), offset=(r0, c0),
                                 publisher=publisher))
    return msg, data


def test_ranges_split_mid_row_assemble_to_the_matrix():
    asm, drops = Assembler(timeout_s=60), []
    assert asm.add("r", *rng(1, 13, 40), drops) is None  # rank 1 holds from the middle of row 3 on
    done = asm.add("r", *rng(1, 0, 13), drops)
    assert done is not None and done.parts == 2 and torch.equal(done.tensor, FULL) and drops == []


def test_ranges_and_blocks_mix_rows_and_column_blocks():
    asm, drops = Assembler(timeout_s=60), []
    asm.add("r", *rng(2, 0, 8), drops)  # rows 0-1 as a range
    asm.add("r", *blk(2, 2, 0, 3, 4), drops)  # rows 2-4 as a full-width block (becomes a range)
    asm.add("r", *blk(2, 5, 0, 5, 1), drops)  # column 0 of rows 5-9
    done = asm.add("r", *blk(2, 5, 1, 5, 3), drops)  # columns 1-3 of rows 5-9
    assert done is not None and done.parts == 4 and torch.equal(done.tensor, FULL)


OVERLAPS = {
    "range inside a range": ([(0, 20)], (19, 21), "elements [19, 21) of iter 1 overlaps the elements [0, 20) already received from p"),
    "range before a range": ([(20, 30)], (10, 21), "overlaps the elements [20, 30)"),
    "range over a block": ([("b", 5, 1, 5, 3)], (22, 23), "overlaps the part [5, 3] at [5, 1] already received from b"),
    "range spanning a block's rows": ([("b", 2, 2, 4, 1)], (4, 39), "overlaps the part [4, 1] at [2, 2]"),
    "block over a range": ([(21, 22)], ("b", 5, 1, 1, 1), "part [1, 1] at [5, 1] of iter 1 overlaps the elements [21, 22)"),
    "full-width block over a block": ([("b", 3, 3, 1, 1)], ("b", 2, 0, 3, 4), "overlaps the part [1, 1] at [3, 3]"),
}


def _add(asm, spec, drops):
    if spec[0] == "b":
        return asm.add("r", *blk(1, *spec[1:]), drops)
    return asm.add("r", *rng(1, *spec), drops)


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_overlapping_parts_are_rejected_with_both_named(case):
    placed, new, expected = OVERLAPS[case]
    asm, drops = Assembler(timeout_s=60), []
    for spec in placed:
        _add(asm, spec, drops)
    with pytest.raises(PartRejected) as info:
        _add(asm, new, drops)
    assert expected in str(info.value)
    assert asm.in_progress() == 1 and drops == []  # the iteration waits for the right parts


def test_touching_ranges_and_blocks_do_not_overlap():
    asm, drops = Assembler(timeout_s=60), []
    _add(asm, ("b", 5, 1, 5, 3), drops)
    for start, end in [(20, 21), (24, 25), (28, 29), (32, 33), (36, 37)]:  # column 0 of rows 5-9, one by one
        _add(asm, (start, end), drops)
    done = _add(asm, (0, 20), drops)
    assert done is not None and torch.equal(done.tensor, FULL)


def test_a_gap_keeps_the_iteration_incomplete_until_the_timeout():
    asm, drops = Assembler(timeout_s=0.05), []
    asm.add("r", *rng(1, 0, 13), drops)
    asm.add("r", *rng(1, 14, 40), drops)  # element 13 never arrives
    assert asm.in_progress() == 1
    time.sleep(0.1)
    (run, why), = asm.expire(time.monotonic())
    assert why.startswith("iter 1 dropped: incomplete after 0 s (2 part(s) covering 97.5% of [10, 4])")


def test_the_number_of_parts_is_bounded(monkeypatch):
    monkeypatch.setattr(assembly, "MAX_PARTS", 3)
    monkeypatch.setattr(assembly, "MAX_BLOCKS", 1)
    asm, drops = Assembler(timeout_s=60), []
    _add(asm, ("b", 0, 0, 1, 1), drops)
    with pytest.raises(PartRejected, match=r"part \[1, 1\] at \[0, 1\] of iter 1: the iteration already has 1 parts"):
        _add(asm, ("b", 0, 1, 1, 1), drops)
    _add(asm, (4, 5), drops)
    _add(asm, (5, 6), drops)
    with pytest.raises(PartRejected, match=r"elements \[6, 7\) of iter 1: the iteration already has 3 parts \(at most 3"):
        _add(asm, (6, 7), drops)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data())
def test_any_partition_into_ranges_assembles_exactly_and_any_overlap_is_refused(data):
    rows, cols = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 7))
    full = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 10 + cols))
    total = rows * cols
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), max_size=6)) if total > 1 else set())
    bounds = [0, *cuts, total]
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:])]
    order = data.draw(st.permutations(pieces))
    asm, drops = Assembler(timeout_s=60), []
    for i, (a, b) in enumerate(order):
        done = asm.add("r", *rng(1, a, b, full), drops)
        if i < len(order) - 1:
            assert done is None
            s = data.draw(st.integers(0, total - 1))  # any range touching an element already placed is refused
            placed = [p for p in order[:i + 1] if p[0] <= s < p[1]]
            if placed:
                with pytest.raises(PartRejected):
                    asm.add("r", *rng(1, s, min(total, s + data.draw(st.integers(1, 3))), full), drops)
    assert done is not None and torch.equal(done.tensor, full) and drops == []


# --- a real daemon: hostile range parts are refused and counted, the right ones still assemble -------

from tests.test_daemon import env, push, snapshot, start_daemon  # noqa: E402,F401 - fixtures and helpers


def test_daemon_refuses_hostile_ranges_counts_them_and_assembles_the_rest(start_daemon, push):
    from protocol import encode_end, encode_hello
    from tests.test_sharded import close

    d = start_daemon("--exit-on-end", "--no-wandb")
    full = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    flat = full.reshape(-1)

    def send_range(run: str, start: int, end: int, header: dict | None = None) -> None:
        frames = encode_snapshot(run=run, iter=3, seq=start, name="wte", dtype="float32", shape=(end - start,),
                                 payload=flat[start:end].numpy().tobytes(), global_shape=(64, 8), start=start)
        push.send_multipart(frames if not header else [_with(frames[0], **header), frames[1]])  # hand-edited

    for run in ("parts", "whole"):
        push.send_multipart(encode_hello(run=run, seq=0, pid=1, host="h"))
    snapshot(push, "whole", 3, full)  # the same matrix sent whole: what the assembled one must equal
    send_range("parts", 0, 203)  # rank 0: up to the middle of row 25
    send_range("parts", 100, 300)  # overlaps rank 0's elements: refused at assembly
    send_range("parts", 203, 512, {"start": 400})  # claims elements past the end: refused at decode
    send_range("parts", 203, 512, {"global_shape": [2**22, 2**16]})  # a huge claim: refused before allocation
    send_range("parts", 203, 512)  # rank 1: the rest
    parts, whole = d.wait_results("parts", 1), d.wait_results("whole", 1)
    for run in ("parts", "whole"):
        push.send_multipart(encode_end(run=run, seq=9, final_iter=3, published=1, dropped=0))
    assert d.wait_exit() == 0
    close(whole[0]["geometry"], parts[0]["geometry"])
    assert parts[0]["shape"] == [64, 8] and parts[0]["counters"]["incomplete"] == 0
    log = d.log()
    assert "elements [100, 300) of iter 3 overlaps the elements [0, 203) already received" in log
    assert "element range [400, 709) does not lie within global_shape [64, 8] (512 elements)" in log
    assert "global_shape [4194304, 65536] x float32 = 1099511627776 bytes exceeds max_payload_bytes" in log
    assert "rejected=3" in log


def _with(header_frame: bytes, **changes) -> bytes:
    import msgpack

    header = msgpack.unpackb(header_frame)
    header.update(changes)
    return msgpack.packb(header)
