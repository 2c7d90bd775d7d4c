"""What a (re)started daemon takes back from --state-dir: lazily, one run at a time.

A run's baseline (the last snapshot whose result was delivered) and hello info are read only when
that run shows up again, so a state directory of many old runs costs nothing at start-up. The one
exception is a run whose snapshot was being analysed when the daemon stopped (SIGKILL, or abandoned
at shutdown): it is read at start-up and that snapshot analysed again, so its iteration is late,
not lost (its record says `"recovered": true`).
"""
from __future__ import annotations

import logging

from .backlog import enqueue
from .state import RunState
from .state_store import StateStore

log = logging.getLogger("embedding_monitor.daemon")


def load_run(store: StateStore, run: str) -> RunState | None:
    """`run`'s state as saved in the store (baseline, hello, iterations not analysed), or None."""
    loaded = store.load(run)
    if loaded is None:
        return None
    state = RunState(run=run)
    state.previous, state.hello = loaded
    state.max_iter = state.previous.iter if state.previous is not None else None
    _, not_analysed = store.load_pending(run)
    state.skipped_iters = list(not_analysed)
    log.info("state dir: restored run %s (baseline iter %s%s)", run, state.max_iter,
             f"; iterations received but never analysed before the restart: {not_analysed}" if not_analysed else "")
    return state


def interrupted_runs(store: StateStore) -> list[RunState]:
    """Runs whose snapshot was being analysed when the daemon stopped, with that snapshot queued again."""
    out = []
    for run in store.interrupted_runs():
        state = load_run(store, run) or RunState(run=run)
        snap, _ = store.load_pending(run)
        if snap is None:
            continue
        snap.recovered = True
        log.warning("run %s: iter %d was being analysed when the daemon stopped (killed or shut down); "
                    "analysing it again from the state dir (drift vs iter %s)", run, snap.iter, state.max_iter)
        enqueue(state, snap)
        state.ended = True  # nothing else is expected from it; its trainer reopens it by publishing again
        state.end_info = {"end_reason": "recovered from the state dir after a restart"}
        out.append(state)
    return out
