"""Assembling sharded snapshots: the parts of one iteration, one per rank, into the full matrix.

Each rank of an FSDP / ZeRO-3 / tensor-parallel trainer sends only what it holds (protocol: a part is
either a 2-D block at an `offset` or a flat element range `[start, start + numel)` of the C-order matrix;
a full-width block is an element range too). Per run at most one iteration is being assembled: its
full-size buffer is allocated at its first part (whose `global_shape` the protocol has bounded) and
filled part by part. A part that overlaps one already placed is rejected with both parts named, so
when the parts' elements add up to the matrix's, every element was covered exactly once; only then is
it analysed, exactly like an unsharded snapshot. Token counts: each part may carry its rank's counts over
the whole vocabulary (ranks that feed different batches: data-parallel sharding); the iteration's counts
are their sum, and None when no part carried any. An iteration is dropped, with a logged and counted
reason, when a part of a newer iteration arrives first, when it stays incomplete past `timeout_s` (a
rank died, a part was dropped at a full queue), or when the run ends (every rank's publisher sent
`end` or is gone: liveness.py).

Only the daemon's receive thread calls into this module.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol import DEFAULT_LIMITS, Snapshot

log = logging.getLogger("embedding_monitor.daemon")

DEFAULT_TIMEOUT_S = 120.0  # an iteration's parts normally arrive within a second of each other
# Parts of one iteration: one per rank. Element ranges are checked for overlap by bisection; 2-D blocks
# that are not full-width (column sharding) pairwise, so their number is bounded far lower.
MAX_PARTS = DEFAULT_LIMITS.max_world_size
MAX_BLOCKS = 1024


class PartRejected(ValueError):
    """A part that cannot belong to the iteration being assembled (overlap, shape or dtype mismatch)."""


def _block_hits_range(block: tuple[int, int, int, int], start: int, end: int, width: int) -> bool:
    """Whether the 2-D block (r0, c0, rows, cols) of a matrix `width` wide shares an element with [start, end)."""
    r0, c0, rows, cols = block
    first, last = max(r0, start // width), min(r0 + rows - 1, (end - 1) // width)
    if first > last:
        return False
    if last - first >= 2:  # a whole row of the range lies inside the block's rows
        return True
    return any(r * width + c0 < end and start < r * width + c0 + cols for r in {first, last})


@dataclass
class _Assembly:
    iter: int
    name: str
    dtype: str
    global_shape: tuple[int, int]
    buffer: torch.Tensor
    started: float
    sent_at: float
    # Element ranges placed so far, sorted by start: (start, end, what, publisher); full-width blocks are
    # ranges too (`what` names the part as it was sent, for the overlap message).
    ranges: list[tuple[int, int, str, str]] = field(default_factory=list)
    blocks: list[tuple[int, int, int, int, str]] = field(default_factory=list)  # r0, c0, rows, cols, publisher
    covered: int = 0  # elements filled so far
    metrics: dict | None = None  # the trainer metrics of the lowest-ranked part that carried any (rank 0's)
    metrics_rank: int | None = None
    token_counts: torch.Tensor | None = None  # (rows,) int64: the sum of the parts' counts so far

    @property
    def parts(self) -> int:
        return len(self.ranges) + len(self.blocks)

    def progress(self) -> str:
        total = self.global_shape[0] * self.global_shape[1]
        return f"{self.parts} part(s) covering {100.0 * self.covered / total:.1f}% of {list(self.global_shape)}"

    def overlap(self, start: int, end: int, block: tuple[int, int, int, int] | None) -> str | None:
        """What the new part (flat [start, end), or the 2-D `block`) overlaps among the parts placed; None if nothing."""
        width = self.global_shape[1]
        if block is None:
            i = bisect.bisect_left(self.ranges, (start,))
            for s, e, what, who in self.ranges[max(0, i - 1):i + 1]:
                if s < end and start < e:
                    return f"the {what} already received from {who or '?'}"
            hits = [b for b in self.blocks if _block_hits_range(b[:4], start, end, width)]
        else:
            for s, e, what, who in self.ranges:
                if _block_hits_range(block, s, e, width):
                    return f"the {what} already received from {who or '?'}"
            r0, c0, rows, cols = block
            hits = [b for b in self.blocks
                    if r0 < b[0] + b[2] and b[0] < r0 + rows and c0 < b[1] + b[3] and b[1] < c0 + cols]
        if hits:
            b_r0, b_c0, b_rows, b_cols, who = hits[0]
            return f"the part {[b_rows, b_cols]} at {[b_r0, b_c0]} already received from {who or '?'}"
        return None


@dataclass
class Complete:
    """A fully assembled iteration: the matrix and the header fields of the snapshot it stands for."""

    iter: int
    name: str
    tensor: torch.Tensor
    sent_at: float
    parts: int
    metrics: dict | None = None
    token_counts: torch.Tensor | None = None  # summed over the parts that carried counts


class Assembler:
    """The receive thread's per-run assembly state; see the module docstring."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._current: dict[str, _Assembly] = {}
        self.dropped = 0  # iterations discarded incomplete, daemon-wide

    # --- parts ---------------------------------------------------------------------------------
    def add(self, run: str, msg: Snapshot, part: torch.Tensor, counted_drop: list[str],
            rank: int = 0) -> Complete | None:
        """Place one part of `run` from the publisher of `rank`; the full iteration when this completed it.

        Reasons for dropped iterations go to `counted_drop`. The iteration's trainer metrics are rank 0's
        (the lowest rank that sent any), as every logger keeps them, whatever order the parts arrive in.
        """
        assert msg.global_shape is not None and (msg.offset is not None or msg.start is not None)
        counts = msg.token_counts
        if counts is not None and (type(counts) is not bytes or len(counts) != 4 * msg.global_shape[0]):
            # the protocol checked this already; a part is refused before it costs anything if not
            raise PartRejected(f"part of iter {msg.iter}: token counts of {len(counts)} bytes, the matrix's "
                               f"{msg.global_shape[0]} rows need {4 * msg.global_shape[0]}")
        now = time.monotonic()
        current = self._current.get(run)
        if current is not None and msg.iter > current.iter:
            counted_drop.append(self._drop(run, f"incomplete ({current.progress()}) when a part of iter "
                                                    f"{msg.iter} arrived"))
            current = None
        elif current is not None and msg.iter < current.iter:
            raise PartRejected(f"part of iter {msg.iter} arrived after iter {current.iter} began (late or "
                               "reordered): ignored")
        if current is None:
            current = self._start(run, msg, now)
        if msg.global_shape != current.global_shape or msg.dtype != current.dtype or msg.name != current.name:
            raise PartRejected(f"part of iter {msg.iter} is {msg.name} {list(msg.global_shape)} {msg.dtype}, the "
                               f"iteration's other parts are {current.name} {list(current.global_shape)} "
                               f"{current.dtype}")
        width = current.global_shape[1]
        if msg.start is not None:
            start, block, what = msg.start, None, f"elements [{msg.start}, {msg.start + msg.numel})"
        else:
            (r0, c0), (rows, cols) = msg.offset, msg.shape
            full_width = c0 == 0 and cols == width
            start, block = r0 * width, None if full_width else (r0, c0, rows, cols)
            what = f"part {[rows, cols]} at {[r0, c0]}"
        end = start + msg.numel
        if current.parts >= MAX_PARTS or (block is not None and len(current.blocks) >= MAX_BLOCKS):
            raise PartRejected(f"{what} of iter {msg.iter}: the iteration already has {current.parts} parts "
                               f"(at most {MAX_PARTS}, {MAX_BLOCKS} of them narrower than the matrix)")
        clash = current.overlap(start, end, block)
        if clash is not None:
            raise PartRejected(f"{what} of iter {msg.iter} overlaps {clash}")
        if block is None:
            current.buffer.view(-1)[start:end].copy_(part.reshape(-1))
            bisect.insort(current.ranges, (start, end, what, msg.publisher))
        else:
            r0, c0, rows, cols = block
            current.buffer[r0:r0 + rows, c0:c0 + cols].copy_(part)
            current.blocks.append((*block, msg.publisher))
        current.covered += msg.numel
        current.sent_at = max(current.sent_at, msg.sent_at)
        if msg.metrics and (current.metrics_rank is None or rank < current.metrics_rank):
            current.metrics, current.metrics_rank = dict(msg.metrics), rank
        if counts is not None:  # uint32 per row, at most MAX_PARTS of them: the int64 sum cannot overflow
            mine = torch.from_numpy(np.frombuffer(counts, dtype="<u4").astype(np.int64))
            current.token_counts = mine if current.token_counts is None else current.token_counts.add_(mine)
        # No part overlaps another, so once the parts' elements add up to the matrix's, each element is
        # covered exactly once: no gap is left.
        if current.covered < current.global_shape[0] * current.global_shape[1]:
            return None
        del self._current[run]
        return Complete(iter=current.iter, name=current.name, tensor=current.buffer, sent_at=current.sent_at,
                        parts=current.parts, metrics=current.metrics, token_counts=current.token_counts)

    def _start(self, run: str, msg: Snapshot, now: float) -> _Assembly:
        from protocol import torch_dtype

        # Allocated once per iteration; the protocol has bounded global_shape x dtype by max_payload_bytes.
        buffer = torch.empty(msg.global_shape, dtype=torch_dtype(msg.dtype))
        assembly = _Assembly(iter=msg.iter, name=msg.name, dtype=msg.dtype, global_shape=msg.global_shape,
                             buffer=buffer, started=now, sent_at=msg.sent_at)
        self._current[run] = assembly
        return assembly

    def _drop(self, run: str, why: str) -> str:
        assembly = self._current.pop(run)
        self.dropped += 1
        return f"iter {assembly.iter} dropped: {why}"

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop assemblies incomplete for longer than the timeout; (run, reason) for each."""
        out = []
        for run, assembly in list(self._current.items()):
            if now - assembly.started > self.timeout_s:
                out.append((run, self._drop(run, f"incomplete after {self.timeout_s:.0f} s ({assembly.progress()}); "
                                                  "a rank died or dropped its part")))
        return out

    def abandon(self, run: str, why: str) -> str | None:
        """Drop `run`'s assembly in progress (the run ended); the reason, or None if there was none."""
        if run not in self._current:
            return None
        return self._drop(run, f"{why} ({self._current[run].progress()})")

    def has(self, run: str) -> bool:
        """Whether `run` has an iteration being assembled."""
        return run in self._current

    def runs(self) -> list[str]:
        """Runs with an assembly in progress."""
        return list(self._current)

    def held(self) -> dict[str, tuple[int, int, float]]:
        """Per run being assembled: (its iteration, bytes of its buffer, when it started): for the pending-bytes budget."""
        return {run: (a.iter, a.buffer.numel() * a.buffer.element_size(), a.started) for run, a in self._current.items()}

    def in_progress(self) -> int:
        """Assemblies holding a buffer now (at most one per run)."""
        return len(self._current)
