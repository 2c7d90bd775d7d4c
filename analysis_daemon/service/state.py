"""Per-run state of the analysis daemon: what it holds for each trainer run (the records it holds: records.py).

The receive loop and the worker thread share these objects under one lock (`Daemon.lock`); nothing
here locks by itself, so every mutation happens in one place with the lock held.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..records import Counters, HelloInfo, SnapshotData


def token_counts_of(msg: Any) -> torch.Tensor | None:
    """A snapshot's token counts (validated to 4 bytes a row by the protocol) as an int64 tensor, or None."""
    if msg.token_counts is None:
        return None
    return torch.from_numpy(np.frombuffer(msg.token_counts, dtype="<u4").astype(np.int64))


MAX_TENSORS_PER_RUN = 8  # named tensors one run may send (each holds up to two V x d baselines)


@dataclass
class RunState:
    """Everything the daemon keeps for one trainer run.

    `previous` is the snapshot the worker took last, i.e. what the next drift compares against; a
    snapshot skipped from the backlog never becomes it, so `prev_iter` always names an analysed one.
    """

    run: str
    hello: HelloInfo | None = None
    previous: SnapshotData | None = None
    first: SnapshotData | None = None  # the first snapshot taken for analysis: drift_since_init's baseline
    queue: deque[SnapshotData] = field(default_factory=deque)  # received, waiting for the worker, oldest first
    queued_bytes: int = 0  # bytes held by `queue` (the backlog budget counts these)
    busy: bool = False  # the worker is analysing a snapshot of this run right now
    skipped_iters: list[int] = field(default_factory=list)  # skipped with nothing queued after them yet
    # token counts of skipped snapshots, by tensor, until that tensor's next snapshot is queued (backlog.py)
    skipped_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    served: int = 0  # when the worker last took a job of this run (a daemon-wide counter; round-robin)
    last_active: float = field(default_factory=time.monotonic)  # last message of the run (eviction order)
    max_iter: int | None = None  # highest iteration taken for analysis (a lower one is a repeat: resume)
    main_tensor: str | None = None  # the first tensor name the run sent: `previous`/`first`/`max_iter` are its
    others: dict[str, "TensorBaseline"] = field(default_factory=dict)  # every other tensor's, by name (bounded)
    counters: Counters = field(default_factory=Counters)
    # Who the run belongs to (issue 21): the source (protocol/peers.py) and run token of the publisher that
    # opened it. Other ranks must show the same token; other sources are refused while it is in memory.
    owner_source: str | None = None
    owner_label: str = ""
    owner_token: str | None = None
    ended: bool = False  # `end` received; closed once no work is left
    closed: bool = False  # run's sinks told it ended
    end_info: dict[str, Any] | None = None

    def idle(self) -> bool:
        """True when nothing of this run is waiting or being analysed."""
        return not self.queue and not self.busy

    def knows_tensor(self, name: str) -> bool:
        """True when `name` is the run's main tensor or one of its others (or the run has none yet)."""
        return self.main_tensor is None or name == self.main_tensor or name in self.others

    def take(self, snap: SnapshotData, since_init: bool) -> tuple[SnapshotData | None, SnapshotData | None,
                                                                  int | None, bool]:
        """(previous, first, repeat_of, is main tensor) for analysing `snap`; `snap` becomes its tensor's baseline."""
        if self.main_tensor is None:  # a baseline read back from --state-dir names the main tensor
            self.main_tensor = self.previous.name if self.previous is not None else snap.name
        if snap.name == self.main_tensor:
            base = TensorBaseline(self.previous, self.first, self.max_iter)
        else:
            base = self.others.setdefault(snap.name, TensorBaseline())
        previous, max_iter = base.previous, base.max_iter
        repeat = max_iter if max_iter is not None and snap.iter <= max_iter else None
        if base.first is None and since_init:
            base.first = snap  # held for the run's life: one more V x d, counted in memory_held_bytes
        base.previous, base.max_iter = snap, snap.iter if repeat is None else max_iter
        if snap.name == self.main_tensor:
            self.previous, self.first, self.max_iter = base.previous, base.first, base.max_iter
        return previous, base.first, repeat, snap.name == self.main_tensor

    def baseline_bytes(self) -> int:
        """Bytes of every tensor's previous and first snapshots (each counted once)."""
        held = {id(s): s.nbytes for b in (TensorBaseline(self.previous, self.first), *self.others.values())
                for s in (b.previous, b.first) if s is not None}
        return sum(held.values())


@dataclass
class TensorBaseline:
    """What the daemon keeps per tensor of a run besides the main one: its previous and first snapshots."""

    previous: SnapshotData | None = None
    first: SnapshotData | None = None
    max_iter: int | None = None
