"""Per-run state of the analysis daemon: what it holds for each trainer run, and its counters.

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


@dataclass
class Counters:
    """Message counters, per run and daemon-wide; written into every result and logged at exit."""

    received: int = 0  # snapshots accepted (decoded, validated, copied out)
    analysed: int = 0  # snapshots whose analysis finished and reached the sinks
    skipped: int = 0  # snapshots dropped from the backlog past --max-pending-bytes (never analysed)
    rejected: int = 0  # messages refused (undecodable, invalid, unusable payload)
    incomplete: int = 0  # sharded iterations dropped because not all their parts arrived in time

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (JSON/W&B friendly)."""
        return {"received": self.received, "analysed": self.analysed,
                "skipped": self.skipped, "rejected": self.rejected, "incomplete": self.incomplete}


@dataclass
class SnapshotData:
    """One received snapshot, already copied out of the wire buffer or shared-memory slot."""

    iter: int
    seq: int
    name: str
    tensor: torch.Tensor  # V x d, the dtype it was sent in (float32/float16/bfloat16)
    received_at: float = field(default_factory=time.time)  # wall clock, for the result record
    received_mono: float = field(default_factory=time.monotonic)  # for the waited_seconds figure
    sent_at: float | None = None  # publisher's wall clock, when it said
    metrics: dict[str, float | int] | None = None  # trainer scalars sent with the snapshot (validated)
    skipped_before: list[int] = field(default_factory=list)  # iterations of the run skipped just before it
    sample_rows: int | None = None  # set when its exact geometry is over --max-cost: sample this many rows
    recovered: bool = False  # read back from --state-dir: it was being analysed when the daemon stopped
    token_counts: torch.Tensor | None = None  # (V,) int64: tokens the trainer fed since its previous snapshot

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor (what it costs the backlog budget)."""
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def shape(self) -> list[int]:
        """The tensor's shape as a list."""
        return list(self.tensor.shape)

    @property
    def dtype(self) -> str:
        """The tensor's dtype name without the `torch.` prefix."""
        return str(self.tensor.dtype).removeprefix("torch.")


def token_counts_of(msg: Any) -> torch.Tensor | None:
    """A snapshot's token counts (validated to 4 bytes a row by the protocol) as an int64 tensor, or None."""
    if msg.token_counts is None:
        return None
    return torch.from_numpy(np.frombuffer(msg.token_counts, dtype="<u4").astype(np.int64))



@dataclass
class HelloInfo:
    """What the trainer said about itself in its `hello` message."""

    pid: int | None = None
    host: str | None = None
    vocab: list[str] | None = None
    wandb: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One unit of work for the worker: analyse `current`, drift against `previous` (if any)."""

    run: str
    current: SnapshotData
    previous: SnapshotData | None
    skipped_iters: list[int]  # iterations of this run skipped since the last job was taken
    hello: HelloInfo | None
    repeat_of: int | None = None  # the run's highest iteration analysed before, when current.iter is not past it
    first: SnapshotData | None = None  # the run's first snapshot taken (drift since initialisation); None: off
    default_tensor: bool = True  # current is the run's main tensor (its W&B keys keep their plain names)


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


@dataclass
class RunInsight:
    """What the worker keeps per run between results for the insight metrics and alerts (worker thread only)."""

    knn_iter: int | None = None  # iteration whose neighbour lists `knn_ids` are
    knn_ids: torch.Tensor | None = None  # (V, k) int32 neighbour ids of the last analysed snapshot
    alerts: Any = None  # alerts.RunAlerts, created on first use
    probes_logged: bool = False  # unknown probe tokens are logged once per run
    galaxy_prev: dict[str, Any] | None = None  # {"iter", "points"} of the last map: the next one aligns to it
    followed: list[int] = field(default_factory=list)  # token_stats' tokens so far (bounded): each keeps its line
    # centred Gram matrices (d x d float64) of the snapshots still in use, by (id, iter, seq): the current one
    # is the next drift's previous, the first one every since-init drift's (CKA needs both; computed once each)
    grams: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    token_xy: torch.Tensor | None = None  # (V, 2) explorer map coordinates of the last analysed snapshot
