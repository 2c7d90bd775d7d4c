"""The daemon's shared records: snapshots, jobs, counters and per-run insight state.

The receive loop, the worker, replay, the pipeline and the sinks all speak in these types, so they live
below every one of them (nothing here imports from the rest of analysis_daemon).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

# The record key under which `pipeline.analyse` hands the per-token arrays (a TokenArrays) to the sinks.
# SinkSet takes it out of the record before any sink sees the record, so it never reaches JSON, and gives
# it to the sinks that store arrays (sinks/token_data.py).
TOKEN_ARRAYS = "_token_arrays"


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
    # (V,) int64 tokens the trainer fed in total, from the snapshot counts analysed since iteration
    # `tokens_total_since` (in memory only: a restarted daemon starts a new total; pipeline._add_token_counts)
    tokens_total: torch.Tensor | None = None
    tokens_total_since: int | None = None
