"""Per-run state of the analysis daemon: what it holds for each trainer run (the records it holds: records.py).

The receive loop and the worker thread share these objects under one lock (`Daemon.lock`); nothing
here locks by itself, so every mutation happens in one place with the lock held.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..records import Counters, HelloInfo, SnapshotData


@dataclass
class RunState:
    """Everything the daemon keeps for one trainer run.

    `previous` is the snapshot the worker took last, i.e. what the next drift compares against; a
    snapshot skipped from the backlog never becomes it, so `prev_iter` always names an analysed one.
    """

    run: str
    hello: HelloInfo | None = None
    previous: SnapshotData | None = None
    queue: deque[SnapshotData] = field(default_factory=deque)  # received, waiting for the worker, oldest first
    queued_bytes: int = 0  # bytes held by `queue` (the backlog budget counts these)
    busy: bool = False  # the worker is analysing a snapshot of this run right now
    skipped_iters: list[int] = field(default_factory=list)  # skipped with nothing queued after them yet
    served: int = 0  # when the worker last took a job of this run (a daemon-wide counter; round-robin)
    last_active: float = field(default_factory=time.monotonic)  # last message of the run (eviction order)
    max_iter: int | None = None  # highest iteration taken for analysis (a lower one is a repeat: resume)
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