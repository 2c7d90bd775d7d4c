"""The bounded backlog of snapshots waiting for analysis, and the fair order in which runs are served.

Every snapshot received is queued and analysed in order, late but at its own iteration, while all
queued snapshots together stay within `--max-pending-bytes`. Past that budget the oldest waiting
snapshot of the run holding the most queued bytes is skipped (so one run's flood costs that run,
not its neighbours), counted, logged, and its iteration is listed in `skipped_iters` of the next
result of that run; that result's drift is measured against the last snapshot analysed before it,
which has a record of its own. The snapshot just received is never the one skipped: the newest
snapshot of a run is always analysed (a budget smaller than one snapshot degrades to newest-wins).
A skipped snapshot's token counts are not lost: they are added to the run's next snapshot of the same
tensor, so a result's `tokens_seen` covers every token fed since the previous *analysed* snapshot (the
interval its drift spans) and the explorer's running total misses none.

The worker is fair by *source* first (protocol/peers.py: a user id, a CurveZMQ key or a peer address),
then by run: the source served least recently goes first, and within it the run served least recently.
So a burst of one run cannot starve another, and neither can a flood of fresh run names from one source:
each of them counts against that source, and another source's run waits for at most one of its jobs.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch

from ..records import SnapshotData
from .state import RunState

_MAX_DEFAULT = 8 * 1024**3
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def default_max_pending_bytes() -> int:
    """A quarter of this host's RAM, at most 8 GiB (256 MiB where RAM cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 256 * 1024**2
    return min(total // 4, _MAX_DEFAULT)


def parse_bytes(text: str) -> int:
    """'512M', '8G', '1.5g', '1000000' -> bytes (binary units); ValueError with the accepted forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size: use bytes or a number with K, M, G or T (e.g. 512M, 4G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def human(nbytes: int) -> str:
    """Bytes as a short readable size (e.g. '1.5 GiB')."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _add_counts(into: SnapshotData, counts: torch.Tensor | None) -> None:
    """Add a skipped snapshot's token counts to `into`'s (another vocabulary size: the newer counts stand)."""
    if counts is None:
        return
    if into.token_counts is None:
        into.token_counts = counts
    elif into.token_counts.shape == counts.shape:
        into.token_counts = into.token_counts + counts


def enqueue(state: RunState, snap: SnapshotData) -> None:
    """Queue `snap` for analysis; iterations skipped since the run's last queued snapshot go with it, and
    the token counts of skipped snapshots of its tensor too."""
    snap.skipped_before = state.skipped_iters + snap.skipped_before
    state.skipped_iters = []
    _add_counts(snap, state.skipped_counts.pop(snap.name, None))
    state.queue.append(snap)
    state.queued_bytes += snap.nbytes


def trim(runs: Iterable[RunState], budget: int, keep: SnapshotData,
         assembling: int = 0) -> list[tuple[RunState, SnapshotData]]:
    """Skip queued snapshots (never `keep`) until the backlog plus the `assembling` bytes of sharded
    iterations fits `budget`; returns what was skipped."""
    runs = list(runs)
    total = sum(s.queued_bytes for s in runs) + assembling
    skipped: list[tuple[RunState, SnapshotData]] = []
    while total > budget:
        candidates = [s for s in runs if any(q is not keep for q in s.queue)]
        if not candidates:
            break
        state = max(candidates, key=lambda s: s.queued_bytes)
        victim = next(q for q in state.queue if q is not keep)  # its oldest waiting snapshot
        state.queue.remove(victim)
        state.queued_bytes -= victim.nbytes
        total -= victim.nbytes
        iters = victim.skipped_before + [victim.iter]
        later = next(iter(state.queue), None)
        if later is not None:
            later.skipped_before = iters + later.skipped_before  # shown in the next result of the run
        else:
            state.skipped_iters = iters + state.skipped_iters
        if victim.token_counts is not None:  # the counts go on with the tensor's next snapshot
            same = next((q for q in state.queue if q.name == victim.name), None)
            if same is not None:
                _add_counts(same, victim.token_counts)
            else:
                held = state.skipped_counts.get(victim.name)
                if held is not None and held.shape == victim.token_counts.shape:
                    state.skipped_counts[victim.name] = held + victim.token_counts
                else:
                    state.skipped_counts[victim.name] = victim.token_counts
        skipped.append((state, victim))
    return skipped


def next_run(runs: Iterable[RunState], source_served: dict[str, int] | None = None) -> RunState | None:
    """The run whose oldest queued snapshot the worker should take now (fair by source, then by run), or None.

    `source_served` maps a source to when the worker last took a job of any of its runs.
    """
    waiting = [s for s in runs if s.queue and not s.busy]
    if not waiting:
        return None
    served = source_served or {}
    return min(waiting, key=lambda s: (served.get(s.owner_source or "", 0), s.served, s.queue[0].received_mono))
