"""Per-run state of the analysis daemon: what it holds for each trainer run, and its counters.

The receive loop and the worker thread share these objects under one lock (`Daemon.lock`); nothing
here locks by itself, so every mutation happens in one place with the lock held.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Counters:
    """Message counters, per run and daemon-wide; written into every result and logged at exit."""

    received: int = 0  # snapshots accepted (decoded, validated, copied out)
    analysed: int = 0  # snapshots whose analysis finished and reached the sinks
    skipped: int = 0  # snapshots replaced by a newer one before the worker got to them
    rejected: int = 0  # messages refused (undecodable, invalid, unusable payload)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (JSON/W&B friendly)."""
        return {"received": self.received, "analysed": self.analysed,
                "skipped": self.skipped, "rejected": self.rejected}


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

    @property
    def shape(self) -> list[int]:
        """The tensor's shape as a list."""
        return list(self.tensor.shape)

    @property
    def dtype(self) -> str:
        """The tensor's dtype name without the `torch.` prefix."""
        return str(self.tensor.dtype).removeprefix("torch.")


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


@dataclass
class RunState:
    """Everything the daemon keeps for one trainer run.

    `previous` is the snapshot most recently received before the pending one, i.e. what the next
    drift compares against; it advances when the worker takes a job or when a pending snapshot is
    replaced (the replaced one was received, so it becomes the baseline of the newer one).
    """

    run: str
    hello: HelloInfo | None = None
    previous: SnapshotData | None = None
    pending: SnapshotData | None = None  # newest snapshot not yet taken by the worker (never a queue)
    busy: bool = False  # the worker is analysing a snapshot of this run right now
    skipped_iters: list[int] = field(default_factory=list)  # since the last job was taken
    counters: Counters = field(default_factory=Counters)
    ended: bool = False  # `end` received; closed once no work is left
    closed: bool = False  # run's sinks told it ended
    end_info: dict[str, Any] | None = None

    def idle(self) -> bool:
        """True when nothing of this run is waiting or being analysed."""
        return self.pending is None and not self.busy


@dataclass
class RunInsight:
    """What the worker keeps per run between results for the insight metrics and alerts (worker thread only)."""

    knn_iter: int | None = None  # iteration whose neighbour lists `knn_ids` are
    knn_ids: torch.Tensor | None = None  # (V, k) int32 neighbour ids of the last analysed snapshot
    alerts: Any = None  # alerts.RunAlerts, created on first use
    probes_logged: bool = False  # unknown probe tokens are logged once per run
    galaxy_prev: dict[str, Any] | None = None  # {"iter", "points"} of the last map: the next one aligns to it
