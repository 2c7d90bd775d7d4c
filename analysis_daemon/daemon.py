"""The analysis daemon: a receive loop on the main thread, one analysis worker thread, explicit state.

The receive loop polls the PULL socket with a timeout, decodes and validates every message through
`protocol`, copies shared-memory payloads out at once (so the publisher's slots are free again even
while an analysis runs) and keeps, per run, only the newest snapshot not yet analysed: an older one
still waiting is replaced and recorded as skipped, so a fast publisher causes skips, never a backlog.
The worker (worker.py) takes one job at a time and feeds the sinks.

Run it with: python -m analysis_daemon --listen tcp://127.0.0.1:5555 --results-dir runs
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from protocol import (DEFAULT_LIMITS, End, Hello, Limits, ProtocolError, ShmReader, Snapshot,
                      bind_receiver, decode, remove_stale_segments, snapshot_tensor)

from .sinks import SinkSet
from .state import Counters, HelloInfo, Job, RunState, SnapshotData
from .state_store import StateStore
from .worker import AnalysisSettings, AnalysisWorker, warm_up

log = logging.getLogger("embedding_monitor.daemon")

_POLL_MS = 100  # receive-loop poll timeout: how quickly a signal or exit condition is noticed
_DRAIN_MAX = 64  # messages handled per wake-up before flags are checked again
# A run's state holds a full snapshot (150 MB at GPT-2 size). Ended runs keep it a while, so a trainer
# resumed under the same run name continues its drift; beyond this many the oldest are forgotten
# (with --state-dir their baseline stays on disk and comes back if the run reappears).
_KEEP_ENDED_RUNS = 4
# Runs open at once; a peer inventing run names must not grow the daemon without bound.
_MAX_OPEN_RUNS = 64


@dataclass
class DaemonConfig:
    """Everything the daemon needs from the command line."""

    listen: str = "tcp://127.0.0.1:5555"
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    limits: Limits = DEFAULT_LIMITS
    exit_on_end: bool = False
    state_dir: Path | None = None
    shutdown_grace: float = 10.0
    curve: Any = None  # protocol.security.CurveServer or None
    allow_insecure: bool = False


class TooManyRuns(Exception):
    """A message for a new run while _MAX_OPEN_RUNS runs are open."""


class Daemon:
    """Receives snapshots, keeps per-run state, hands jobs to the worker, shuts down cleanly."""

    def __init__(self, config: DaemonConfig, sinks: SinkSet) -> None:
        self.config = config
        self.sinks = sinks
        self.store = StateStore(config.state_dir) if config.state_dir else None
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.runs: dict[str, RunState] = {}
        self.totals = Counters()  # daemon-wide; `rejected` includes messages no run could be named for
        self.stop_requested = False  # set by SIGTERM/SIGINT: stop receiving, then shut down
        self.stopping = False  # the worker takes no new job once this is set
        self.abandon = threading.Event()  # the running analysis gives up at its next progress call
        self.seen_runs: set[str] = set()  # runs that said hello/snapshot to this process
        self._ended_order: list[str] = []  # closed runs still in memory, oldest first
        self._evicted: set[str] = set()  # runs forgotten from memory (their state may be on disk)
        self._signals = 0
        self.worker = AnalysisWorker(self, config.analysis)
        if self.store is not None:
            self._restore()

    # --- state shared with the worker (all under self.lock) --------------------------------------
    def _state(self, run: str) -> RunState:
        state = self.runs.get(run)
        if state is None:
            open_runs = sum(1 for s in self.runs.values() if not s.closed)
            if open_runs >= _MAX_OPEN_RUNS:
                raise TooManyRuns(f"{open_runs} runs are open already (limit {_MAX_OPEN_RUNS}); "
                                  f"run {run!r} refused until one ends")
            state = self.runs[run] = self._restored(run) or RunState(run=run)
        if run in self._ended_order:
            self._ended_order.remove(run)
        return state

    def _restored(self, run: str) -> RunState | None:
        # A run forgotten from memory comes back with its on-disk baseline, when there is one.
        if self.store is None or run not in self._evicted:
            return None
        self._evicted.discard(run)
        loaded = self.store.load(run)  # this run only: the others' baselines stay on disk
        if loaded is None:
            return None
        state = RunState(run=run)
        state.previous, state.hello = loaded
        return state

    def _restore(self) -> None:
        assert self.store is not None
        for run, (snap, hello) in self.store.load_all().items():
            state = self._state(run)
            state.previous, state.hello = snap, hello
            state.closed = True  # nothing to close until this run shows up again
            log.info("state dir: restored run %s (baseline iter %s)", run,
                     snap.iter if snap is not None else None)

    def next_task(self) -> Job | tuple[str, dict[str, Any]] | None:
        """For the worker: the next job, a (run, summary) to close, or None to exit. Blocks."""
        with self.cond:
            while True:
                if self.stopping:
                    return None
                for state in self.runs.values():
                    if state.ended and not state.closed and state.idle():
                        state.closed = True
                        return state.run, self._run_summary(state)
                waiting = [s for s in self.runs.values() if s.pending is not None and not s.busy]
                if waiting:
                    # Oldest pending first, so two busy runs take turns instead of one starving.
                    state = min(waiting, key=lambda s: s.pending.received_mono)  # type: ignore[union-attr]
                    job = Job(run=state.run, current=state.pending, previous=state.previous,  # type: ignore[arg-type]
                              skipped_iters=state.skipped_iters, hello=state.hello)
                    state.previous, state.pending, state.skipped_iters = state.pending, None, []
                    state.busy = True
                    return job
                self.cond.wait(0.5)

    def add_counters(self, job: Job, result: dict[str, Any]) -> None:
        """Count `result` as analysed and write the counters into it (called before the sinks)."""
        with self.lock:
            state = self.runs[job.run]
            state.counters.analysed += 1
            self.totals.analysed += 1
            result["counters"] = state.counters.as_dict()
            # `lost` / `lost_by_sink`: results earlier sinks could not deliver (this one not yet known).
            result["daemon_counters"] = {**self.totals.as_dict(), **self.sinks.counters()}

    def job_finished(self, job: Job) -> None:
        """The worker is done with `job` (result delivered to the sinks, or abandoned)."""
        with self.cond:
            self.runs[job.run].busy = False
            self.cond.notify_all()

    def mark_closed(self, run: str) -> None:
        """The sinks have been told that `run` ended (for --exit-on-end); old ended runs are forgotten."""
        log.info("run %s: closed", run)
        with self.cond:
            state = self.runs.get(run)
            if state is not None and state.closed and run not in self._ended_order:
                self._ended_order.append(run)
            while len(self._ended_order) > _KEEP_ENDED_RUNS:
                old = self._ended_order.pop(0)
                old_state = self.runs.get(old)
                if old_state is not None and old_state.closed and old_state.idle():
                    del self.runs[old]
                    self._evicted.add(old)
                    log.info("run %s: state released from memory (%d newer ended runs kept)", old,
                             _KEEP_ENDED_RUNS)
            self.cond.notify_all()

    def _run_summary(self, state: RunState) -> dict[str, Any]:
        summary: dict[str, Any] = dict(state.counters.as_dict())
        if state.end_info:
            summary.update({f"trainer_{k}": v for k, v in state.end_info.items()})
        return summary

    # --- receive loop ----------------------------------------------------------------------------
    def _reject(self, reason: str, run: str | None = None) -> None:
        with self.lock:
            self.totals.rejected += 1
            if run is not None and run in self.runs:
                self.runs[run].counters.rejected += 1
            total = self.totals.rejected
        log.warning("rejected message #%d%s: %s", total, f" (run {run})" if run else "", reason)

    def _on_hello(self, msg: Hello) -> None:
        hello = HelloInfo(pid=msg.pid, host=msg.host, vocab=msg.vocab, wandb=msg.wandb, meta=msg.meta)
        with self.cond:
            state = self._state(msg.run)
            state.hello = hello
            state.ended = state.closed = False
            self.seen_runs.add(msg.run)
            self.cond.notify_all()
        log.info("run %s: hello from pid %s on %s (vocab: %s tokens, wandb: %s)", msg.run, msg.pid,
                 msg.host, len(msg.vocab) if msg.vocab is not None else "no",
                 "yes" if msg.wandb else "no")

    def _on_snapshot(self, msg: Snapshot, shm: ShmReader) -> None:
        try:
            # Copies a shared-memory payload out and frees the slot now, whatever the worker is doing.
            tensor = snapshot_tensor(msg, shm)
        except ProtocolError as exc:
            self._reject(str(exc), msg.run)
            return
        snap = SnapshotData(iter=msg.iter, seq=msg.seq, name=msg.name, tensor=tensor, sent_at=msg.sent_at,
                            metrics=msg.metrics)
        with self.cond:
            state = self._state(msg.run)
            self.seen_runs.add(msg.run)
            if state.ended:
                log.warning("run %s: snapshot iter %d after its end message; run reopened", msg.run, msg.iter)
                state.ended = state.closed = False
            state.counters.received += 1
            self.totals.received += 1
            replaced = state.pending
            if replaced is not None:
                # The worker is behind: keep only the newest. The replaced one was received, so it is
                # the baseline the newer snapshot's drift is measured against.
                state.skipped_iters.append(replaced.iter)
                state.previous = replaced
                state.counters.skipped += 1
                self.totals.skipped += 1
            state.pending = snap
            self.cond.notify_all()
        if replaced is not None:
            log.info("run %s: skipped iter %d (iter %d arrived before the worker was free)",
                     msg.run, replaced.iter, msg.iter)
        else:
            log.debug("run %s: received iter %d", msg.run, msg.iter)

    def _on_end(self, msg: End) -> None:
        with self.cond:
            state = self._state(msg.run)
            state.ended = True
            state.end_info = {"final_iter": msg.final_iter, "published": msg.published,
                              "dropped": msg.dropped}
            self.seen_runs.add(msg.run)
            self.cond.notify_all()
        log.info("run %s: end (final iter %s, trainer published %d, dropped %d)", msg.run,
                 msg.final_iter, msg.published, msg.dropped)

    def _handle(self, frames: list[Any], shm: ShmReader) -> None:
        try:
            msg = decode(frames, self.config.limits)
        except ProtocolError as exc:
            self._reject(str(exc))
            return
        try:
            if isinstance(msg, Snapshot):
                self._on_snapshot(msg, shm)
            elif isinstance(msg, Hello):
                self._on_hello(msg)
            else:
                self._on_end(msg)
        except TooManyRuns as exc:
            self._reject(str(exc))
        except Exception as exc:  # never exit because of input, whatever it triggers
            self._reject(f"could not handle {type(msg).__name__.lower()}: {type(exc).__name__}: {exc}",
                         msg.run)

    def _all_ended(self) -> bool:
        with self.lock:
            if not self.seen_runs:
                return False
            return all(r not in self.runs or (self.runs[r].closed and self.runs[r].idle())
                       for r in self.seen_runs)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self.stop_requested = True
        if self._signals > 1:  # a second Ctrl-C means "now"
            self.abandon.set()

    def serve(self, ready_stream: Any = None) -> int:
        """Bind, print the ready line, receive until end/signal, shut down; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        removed = remove_stale_segments()
        if removed:
            log.info("removed %d stale shared-memory segment(s) of dead publishers", removed)
        ctx = zmq.Context()
        sock = None
        shm = ShmReader()
        try:
            sock = bind_receiver(ctx, self.config.listen, self.config.limits, self.config.curve,
                                 self.config.allow_insecure)
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.config.listen
            warm_up(self.config.analysis)
            self.worker.start()
            out = ready_stream or sys.stdout
            out.write(f"analysis-daemon ready on {endpoint}\n")
            out.flush()
            log.info("ready on %s (%s%s)", endpoint, self.config.analysis,
                     "" if self.store is None else f", state dir {self.store.root}")
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            while not self.stop_requested:
                if poller.poll(_POLL_MS):
                    for _ in range(_DRAIN_MAX):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames, shm)
                        del frames
                        if self.stop_requested:
                            break
                if self.config.exit_on_end and self._all_ended():
                    log.info("every run has ended and its work is done: exiting (--exit-on-end)")
                    break
            if self.stop_requested:
                log.info("signal received: no longer receiving; shutting down")
        finally:
            if sock is not None:
                sock.close(0)  # stop receiving before the (possibly long) wait for the worker
            self._shutdown()
            shm.close()
            if self.config.curve is not None:
                self.config.curve.stop()
            ctx.term()
        return 0

    def _shutdown(self) -> None:
        grace = self.config.shutdown_grace
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            dropped = [(s.run, s.pending) for s in self.runs.values() if s.pending is not None]
        for run, snap in dropped:
            log.warning("run %s: iter %d received but not analysed (shutting down)", run, snap.iter)
        if self.worker.is_alive():
            job = self.worker.current
            self.worker.join(grace)
            if self.worker.is_alive():
                job = self.worker.current
                log.warning("shutdown: run %s iter %s still analysing after %.1f s grace (%.0f%% done): "
                            "abandoning it", job.run if job else "?", job.current.iter if job else "?",
                            grace, 100 * self.worker.fraction_done)
                self.abandon.set()
                self.worker.join(max(grace, 5.0))
                if self.worker.is_alive():
                    log.error("shutdown: the analysis did not stop; exiting without it")
            elif job is not None:
                log.info("shutdown: finished the running analysis (run %s iter %d) before exiting",
                         job.run, job.current.iter)
        if self.store is not None:
            # The newest snapshot received is the baseline the next drift should use after a restart.
            for run, snap in dropped:
                try:
                    self.store.save_snapshot(run, snap)
                except OSError as exc:
                    log.error("state dir: could not save run %s iter %d: %s", run, snap.iter, exc)
        self.sinks.close()
        with self.lock:
            totals = self.totals.as_dict()
        lost = self.sinks.counters()  # after close: results still unwritten then are lost
        by_sink = " (" + ", ".join(f"{k}={v}" for k, v in sorted(lost["lost_by_sink"].items())) + ")"
        log.info("analysis-daemon stopped: received=%d analysed=%d skipped=%d rejected=%d lost=%d%s",
                 totals["received"], totals["analysed"], totals["skipped"], totals["rejected"],
                 lost["lost"], by_sink if lost["lost"] else "")
