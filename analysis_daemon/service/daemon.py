"""The analysis daemon: a receive loop on the main thread, one analysis worker thread, explicit state.

The receive loop polls the PULL socket with a timeout, decodes and validates every message through
`protocol`, copies shared-memory payloads out at once (so the publisher's slots are free again even
while an analysis runs) and queues snapshots in a backlog bounded by bytes (backlog.py): analysed in
order, late but at their own iteration, skipped only past the budget. It also watches its publishers
(liveness.py): a run whose publishers all went silent or died is closed as if it had sent `end`.
The worker (worker.py) takes one job at a time, runs round-robin, and feeds the sinks.

Run it with: python -m analysis_daemon --results-dir runs   (listens on the private ipc socket, protocol/endpoints.py)
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from protocol import (DEFAULT_LIMITS, DEFAULT_PEER_LIMITS, End, Gate, Heartbeat, Hello, Limits, PeerLimits,
                      ProtocolError, ShmReader, Snapshot, bind_receiver, decode, remove_segments_of,
                      remove_stale_segments, snapshot_tensor)
from protocol.messages import DTYPE_ITEMSIZE
from protocol.peers import OWN_UID, Source
from protocol.runsecret import take_token
from protocol.endpoints import default_endpoint
from protocol.shm import segment_belongs_to

from . import backlog, recovery
from ..cost import CostLimits, plan as plan_cost
from .liveness import DEFAULT_RUN_TIMEOUT_S, Publishers
from .assembly import DEFAULT_TIMEOUT_S, Assembler, PartRejected
from ..safetext import RateLimiter, reason_key, safe
from ..sinks import SinkSet
from ..records import Counters, HelloInfo, Job, SnapshotData
from .state import MAX_TENSORS_PER_RUN, RunState, token_counts_of
from .state_store import StateStore
from .vocab import CompactVocab
from ..pipeline import AnalysisSettings, warm_up
from .worker import AnalysisWorker

log = logging.getLogger("embedding_monitor.daemon")

_POLL_MS = 100  # receive-loop poll timeout: how quickly a signal or exit condition is noticed
_DRAIN_MAX = 64  # messages handled per wake-up before flags are checked again
# A run's state holds a full snapshot (150 MB at GPT-2 size). Ended runs keep it a while, so a trainer
# resumed under the same run name continues its drift; beyond this many the oldest are forgotten
# (with --state-dir their baseline stays on disk and comes back if the run reappears).
_KEEP_ENDED_RUNS = 4
# Runs open at once. A run with live publishers is never closed to make room: past the limit a new run
# is refused (counted, one line per source and interval). A source other than the daemon's own user may
# hold at most half of the places, so one cannot take them all. Runs closed but not yet told to the
# sinks (the worker is busy) count towards a hard cap of twice that, so a peer inventing run names
# cannot grow the daemon without bound.
_MAX_OPEN_RUNS = 64
_MAX_RUNS_PER_SOURCE = _MAX_OPEN_RUNS // 2
# Publisher ids remembered per run (one per trainer process and restart; ranks of a sharded run). Gone
# ones are forgotten first; when all are alive, a newcomer is refused.
_MAX_PUBLISHERS_PER_RUN = 256
# Messages from a source the daemon cannot attribute (a unit test calling _handle with bytes): its own user.
_LOCAL = Source(f"uid:{OWN_UID}", f"uid {OWN_UID}")


@dataclass
class DaemonConfig:
    """Everything the daemon needs from the command line."""

    listen: str = field(default_factory=lambda: default_endpoint(create=False))  # cli.py creates its directory
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    limits: Limits = DEFAULT_LIMITS
    exit_on_end: bool = False
    state_dir: Path | None = None
    shutdown_grace: float = 10.0
    curve: Any = None  # protocol.security.CurveServer or None
    allow_insecure: bool = False
    run_timeout: float = DEFAULT_RUN_TIMEOUT_S  # a publisher silent this long is gone
    max_pending_bytes: int = field(default_factory=backlog.default_max_pending_bytes)
    assembly_timeout: float = DEFAULT_TIMEOUT_S  # a sharded iteration's parts must all arrive within this
    reject_log_interval: float = 10.0  # at most one "rejected" line per reason this often
    peers: PeerLimits = DEFAULT_PEER_LIMITS  # heartbeat and handshake timeouts
    max_connections: int = 256  # connections of other users open at once; more are refused by the gate
    max_per_source: int = 32  # connections one other user (uid) or remote address may hold
    cost: CostLimits = field(default_factory=CostLimits)  # one snapshot's analysis cost and memory
    allow_uids: tuple[int, ...] = ()  # besides our own uid, owners whose shared-memory segments we read
    executor: Any = None  # service.executor.Executor that runs the analyses (None: in this process, one at a time)


def _held_bytes(state: RunState) -> int:
    # The baseline, the run's backlog (bounded daemon-wide by --max-pending-bytes) and its vocabulary.
    # Per tensor: its previous snapshot and its first one (drift since initialisation), each counted once.
    total = state.queued_bytes + state.baseline_bytes()
    vocab = state.hello.vocab if state.hello is not None else None
    return total + (vocab.nbytes() if isinstance(vocab, CompactVocab) else 0)


class TooManyRuns(Exception):
    """A message for a new run while the open-run places (all, or its source's share) are taken."""


class NotYours(Exception):
    """A message for a run that belongs to other publishers (another source or another job's run token)."""


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
        self.seen_runs: set[str] = set()  # runs that said hello/snapshot to this process (released ones leave)
        self._seen_any = False  # --exit-on-end waits for a first run, even once every run was released
        self._ended_order: list[str] = []  # closed runs still in memory, oldest first
        self.publishers = Publishers(config.run_timeout)
        self._served = 0  # jobs handed out; each run remembers when it was served last (round-robin)
        self._signals = 0
        self._hello_publishers: dict[str, list[str]] = {}  # run -> publisher ids that said hello
        self._reload_requested = False  # SIGHUP: re-read the authorised client keys
        self.gate = config.curve.gate if config.curve is not None else Gate()
        self.gate.max_connections = config.max_connections
        self.gate.max_per_source = config.max_per_source
        self.gate.trusted_uids = frozenset({OWN_UID, *config.allow_uids})
        self._source_served: dict[str, int] = {}  # source -> when the worker last took one of its jobs
        self.gate.log_interval = config.reject_log_interval
        self.reject_log = RateLimiter(log, config.reject_log_interval)
        self.worker = AnalysisWorker(self, config.analysis, config.executor)
        self.assembler = Assembler(config.assembly_timeout)  # sharded runs: parts -> full matrices
        if self.store is not None:
            self._restore()

    # --- state shared with the worker (all under self.lock) --------------------------------------
    def _state(self, run: str, src: Source = _LOCAL, token: str | None = None) -> RunState:
        state = self.runs.get(run)
        if state is None:
            self._make_room(run, src)
            # A run not in memory comes back with its on-disk baseline, when there is one (this run's only).
            state = (recovery.load_run(self.store, run) if self.store is not None else None) or RunState(run=run)
            self.runs[run] = state
        if state.owner_source is None:  # the first publisher to speak binds the run (see _admit)
            state.owner_source, state.owner_label, state.owner_token = src.key, src.label, token
        if run in self._ended_order:
            self._ended_order.remove(run)
        state.last_active = time.monotonic()
        return state

    def _trusted(self, src: Source) -> bool:
        # The daemon's own user (and --allow-uid users): a source whose runs count towards --exit-on-end
        # without limit. Keys (authorised) and remote addresses (reachable only with keys or
        # --allow-insecure) are trusted for --exit-on-end too, but share the per-source run limit.
        return src.uid is not None and src.uid in self.gate.trusted_uids

    def _make_room(self, run: str, src: Source) -> None:
        unclosed = [s for s in self.runs.values() if not s.closed]
        if len(unclosed) >= 2 * _MAX_OPEN_RUNS:
            raise TooManyRuns(f"{len(unclosed)} runs are not closed yet (the worker is behind); "
                              f"new run {run!r} refused until some are")
        open_runs = [s for s in unclosed if not s.ended]
        mine = [s for s in open_runs if s.owner_source == src.key]
        full = len(open_runs) >= _MAX_OPEN_RUNS
        if not full and (self._trusted(src) or len(mine) < _MAX_RUNS_PER_SOURCE):
            return
        # A run whose publishers are all gone may be closed for the newcomer; one with live publishers never.
        pool = open_runs if full else mine
        idle = [s for s in pool if self.publishers.all_gone(s.run) and not self.assembler.has(s.run)]
        if not idle:
            raise TooManyRuns(f"new run {run!r} refused: " + (
                f"{len(open_runs)} runs are open (limit {_MAX_OPEN_RUNS}), all with live publishers" if full else
                f"its source already has {len(mine)} open runs (limit {_MAX_RUNS_PER_SOURCE} per source)"))
        victim = min(idle, key=lambda s: s.last_active)
        self._end_run(victim, f"closed to serve new run {run!r}: its publishers are gone and "
                              f"{len(open_runs)} runs are open")

    def _admit(self, run: str, publisher: str, src: Source, token: str | None, *, rank: int = 0,
               world_size: int = 1, part: bool = False, hello: bool = False) -> None:
        """Raise NotYours unless a message of `publisher` from `src` may go to `run` (lock held).

        A run belongs to the publisher that opened it (its source and run token). Another publisher
        joins it only with the same run token (a rank of the same job); one of the same source is
        let through when it is a plain rank-0 trainer (liveness.py keeps it apart while the first one
        lives) or when the run's publishers are all gone (a resumed trainer). Everyone else is refused.
        """
        pub = self.publishers.known(run, publisher)
        if pub is not None:
            if pub.source is not None and pub.source != src.key:
                raise NotYours(f"publisher {pub.describe()} of run {run!r} spoke from {pub.source}, now from "
                               f"{src.label}: refused")
            return
        state = self.runs.get(run)
        if state is None or state.owner_source is None:
            return
        if token is not None and state.owner_token is not None and hmac.compare_digest(token, state.owner_token):
            return
        live = self.publishers.live(run) > 0  # a dead job's unfinished assembly is dropped by the new one's parts
        if src.key == state.owner_source:
            if not live or (not part and rank == 0 and world_size == 1):
                return
            if token is None and state.owner_token is None and (hello or self.publishers.live(run) == 0):
                return  # publishers without run tokens (hand-made, older hooks) of the same user: as before
            what = f"rank {rank} of {world_size}" if hello else "a part"
            raise NotYours(f"{what} of run {run!r} from a publisher whose run token differs from the run's "
                           "first publisher's: ranks of one job must share a run secret (run_secret= or "
                           "EMBEDDING_MONITOR_RUN_SECRET); refused")
        raise NotYours(f"run {run!r} belongs to the publishers of {state.owner_label}; {src.label} may not "
                       "join it (a different run name, or the run's secret): refused")

    def _routed_state(self, pub: Any, src: Source, token: str | None) -> RunState:
        # The state of the run a publisher was routed to (lock held). When its run is refused (a kept-apart
        # name past the limits), the publisher is forgotten again: refused ids must not fill the table.
        try:
            return self._state(pub.run, src, token)
        except TooManyRuns:
            self.publishers.drop(pub)
            raise

    def _bind(self, pub: Any, src: Source, token: str | None) -> None:
        # lock held: remember where an admitted publisher speaks from; a resumed run takes the new token.
        if pub.source is None:
            pub.source = src.key
        state = self.runs.get(pub.run)
        if state is not None and token is not None and state.owner_source == src.key and (
                state.owner_token is None or self.publishers.live(pub.run) <= 1):
            state.owner_token = token

    def _end_run(self, state: RunState, reason: str) -> None:
        # Closed like an `end` (lock held): its queued snapshots are analysed first, then the sinks hear.
        state.ended = True
        state.end_info = dict(state.end_info or {}, end_reason=reason)
        self.publishers.end_run(state.run, reason)
        self.cond.notify_all()
        log.warning("run %s: closing: %s", state.run, reason)

    def _restore(self) -> None:
        assert self.store is not None
        for state in recovery.interrupted_runs(self.store):
            self.runs[state.run] = state
            self.seen_runs.add(state.run)  # --exit-on-end waits for its analysis
        log.info("state dir %s: runs are read back when they reappear", self.store.root)

    def _check_liveness(self) -> None:
        """Close runs whose publishers all went silent or died; remove dead publishers' segments."""
        dead_pids: list[tuple[str, int]] = []
        with self.cond:
            for pub in self.publishers.expired():
                if self.publishers.same_host(pub):
                    dead_pids.append((pub.run, pub.pid))  # type: ignore[arg-type]
                state = self.runs.get(pub.run)
                if state is None or state.ended or state.closed:
                    continue
                if self.publishers.all_gone(pub.run) and not self.assembler.has(pub.run):
                    self._end_run(state, f"{pub.describe()}: {pub.gone}")
                else:
                    log.warning("run %s: %s: %s; the run goes on with its other publishers", pub.run,
                                pub.describe(), pub.gone)
        for run, pid in dead_pids:
            removed = remove_segments_of(pid)  # only when that process is gone: a live one owns them
            if removed:
                log.info("run %s: removed %d shared-memory segment(s) of dead publisher pid %d", run, removed, pid)

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
                state = backlog.next_run(self.runs.values(), self._source_served)  # fair by source, then run
                if state is not None:
                    snap = state.queue.popleft()
                    state.queued_bytes -= snap.nbytes
                    previous, first, repeat, main = state.take(snap, self.config.analysis.since_init)
                    job = Job(run=state.run, current=snap, previous=previous, skipped_iters=snap.skipped_before,
                              hello=state.hello, repeat_of=repeat, first=first, default_tensor=main)
                    self._served += 1
                    state.served, state.busy = self._served, True
                    self._source_served[state.owner_source or ""] = self._served
                    if len(self._source_served) > 4 * _MAX_OPEN_RUNS:  # bounded: forget sources with no run
                        owners = {s.owner_source or "" for s in self.runs.values()}
                        self._source_served = {k: v for k, v in self._source_served.items() if k in owners}
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
            # What this run holds between results (baseline + backlog + vocabulary): bounded by --max-bytes,
            # --max-pending-bytes and the vocabulary limits, reported so growth is visible.
            result["memory_held_bytes"] = _held_bytes(state)

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
                    self.publishers.forget_run(old)
                    self._hello_publishers.pop(old, None)
                    # a released run that --exit-on-end waited for still counts as "a run that connected"
                    self._seen_any = self._seen_any or (old in self.seen_runs and self._waits_for(old_state))
                    self.seen_runs.discard(old)
                    log.info("run %s: state released from memory (%d newer ended runs kept)", old,
                             _KEEP_ENDED_RUNS)
            self.cond.notify_all()

    def held_runs(self) -> dict[str, int]:
        """How many runs each per-run map holds now: bounded by the open runs plus _KEEP_ENDED_RUNS ended ones."""
        with self.lock:
            held = {"runs": len(self.runs), "seen": len(self.seen_runs),
                    "publishers": len({p.run for p in self.publishers.of_all()}),
                    "hello_publishers": len(self._hello_publishers), "assemblies": len(self.assembler.runs())}
        held["worker"] = self.worker.held_runs()
        return held

    def _run_summary(self, state: RunState) -> dict[str, Any]:
        summary: dict[str, Any] = dict(state.counters.as_dict())
        if state.end_info:
            summary.update({f"trainer_{k}": v for k, v in state.end_info.items()})
        return summary

    # --- receive loop ----------------------------------------------------------------------------
    def _reject(self, reason: str, run: str | None = None, src: Source | None = None) -> None:
        with self.lock:
            self.totals.rejected += 1
            state = self.runs.get(run) if run is not None else None
            if state is not None and (src is None or state.owner_source == src.key):
                state.counters.rejected += 1  # another source's refused messages are not this run's
            total = self.totals.rejected
        # Rate-limited per kind of reason and source: a flood of bad messages costs a line per interval.
        self.reject_log.log(logging.WARNING, reason_key(reason) + (f"|{src.key}" if src else ""),
                            "rejected message #%d%s%s: %s", total, f" from {src.label}" if src else "",
                            f" (run {safe(run)})" if run else "", safe(reason, 300))

    def _on_hello(self, msg: Hello, src: Source = _LOCAL) -> None:
        meta = dict(msg.meta)
        token = take_token(meta)  # never kept or shown: it proves membership of the run
        with self.cond:
            self._admit(msg.run, msg.publisher, src, token, rank=msg.rank, world_size=msg.world_size, hello=True)
            publishers = self._hello_publishers.get(msg.run, [])
            if msg.publisher not in publishers and len(publishers) >= _MAX_PUBLISHERS_PER_RUN:
                publishers[:] = [p for p in publishers if (k := self.publishers.known(msg.run, p)) is not None
                                 and k.gone is None]  # forget the gone ones; never a live one
                if len(publishers) >= _MAX_PUBLISHERS_PER_RUN:
                    raise TooManyRuns(f"run {msg.run!r} has {len(publishers)} live publishers (limit "
                                      f"{_MAX_PUBLISHERS_PER_RUN}): another one refused")
            if self.publishers.known(msg.run, msg.publisher) is None and msg.run not in self.runs:
                self._state(msg.run, src, token)  # room made (or the newcomer refused) before it is registered
            pub, warning = self.publishers.route(msg.run, msg.publisher, hello=msg)
            run = pub.run
            state = self._routed_state(pub, src, token)
            self._bind(pub, src, token)
            vocab = CompactVocab(msg.vocab) if msg.vocab is not None else None  # ~8 B/token instead of ~60
            state.hello = HelloInfo(pid=msg.pid, host=msg.host, vocab=vocab, wandb=msg.wandb, meta=meta)
            state.ended = state.closed = False
            publishers = self._hello_publishers.setdefault(msg.run, [])
            if msg.publisher not in publishers:
                publishers.append(msg.publisher)
            self.seen_runs.add(run)
            self.cond.notify_all()
        if warning:
            log.warning("%s", warning)
        beat = msg.meta.get("heartbeat_s")
        if type(beat) in (int, float) and 0 < beat <= 3600 and self.config.run_timeout < 2 * beat:
            self.reject_log.log(logging.WARNING, f"heartbeat_s|{src.key}", "run %s: its publisher heartbeats every "
                                "%g s but --run-timeout is %g s, so a quiet trainer looks gone; use --run-timeout %g "
                                "or more", safe(run), beat, self.config.run_timeout, 3 * beat)
        # Every hello of our own user's trainers; one line per interval for another source's (a flood of
        # hellos is summarised with the count suppressed).
        say = (lambda *a: log.info(*a) or True) if self._trusted(src) else \
            (lambda *a: self.reject_log.log(logging.INFO, f"hello|{src.key}", *a))
        say("run %s: hello from pid %s on %s%s (vocab: %s tokens, wandb: %s)", safe(run), msg.pid,
            safe(msg.host), f", rank {msg.rank} of {msg.world_size}" if msg.world_size > 1 else "",
            len(msg.vocab) if msg.vocab is not None else "no", "yes" if msg.wandb else "no")

    def _check_shm_owner(self, msg: Snapshot) -> None:
        # A shared-memory snapshot must name a segment of its own publisher (name bound to the secret in
        # the publisher id), and that publisher must have said hello for this run: a run naming another
        # run's slot, or a segment planted by another user, is refused before anything is opened.
        assert msg.shm is not None
        if not segment_belongs_to(msg.shm.segment, msg.publisher):
            raise ProtocolError(f"shm: segment {msg.shm.segment!r} was not created by this snapshot's publisher "
                                "(another run's slot, or a forged one)")
        with self.lock:
            announced = msg.publisher in self._hello_publishers.get(msg.run, ())
        if not announced:
            raise ProtocolError("shm: the snapshot's publisher sent no hello for this run on its connection")

    def _on_snapshot(self, msg: Snapshot, shm: ShmReader, src: Source = _LOCAL) -> None:
        # Decided from the header alone, before the payload is even copied: a snapshot whose analysis
        # would hold the only worker (or memory) beyond the bounds is refused with its reason.
        settings = self.config.analysis
        rows, cols = getattr(msg, "global_shape", None) or msg.shape  # a shard is judged by the whole matrix
        too_costly, sample = plan_cost(rows, cols, self.config.cost, settings.chunk_size,
                                       settings.knn_k if settings.extras else 0, settings.sample_rows)
        if too_costly is not None:
            self._reject(too_costly, msg.run, src)
            return
        with self.cond:  # only the run's own publishers may add to it (checked before any copy)
            self._admit(msg.run, msg.publisher, src, None, part=msg.is_part)
            if self.publishers.known(msg.run, msg.publisher) is None and msg.run not in self.runs:
                self._state(msg.run, src)  # room made (or the newcomer refused) before it is registered
            pub, warning = self.publishers.route(msg.run, msg.publisher)
            run = pub.run
            self._routed_state(pub, src, None)
            self._bind(pub, src, None)
        if sample is not None:
            self.reject_log.log(logging.INFO, f"sampled:{msg.run}", "run %s iter %d: the exact geometry of %dx%d "
                                "is over --max-cost %.2g: analysing it sampled from %d rows", safe(msg.run),
                                msg.iter, rows, cols, self.config.cost.max_cost, sample)
        try:
            if msg.shm is not None:
                self._check_shm_owner(msg)
            # Copies a shared-memory payload out and frees the slot now, whatever the worker is doing.
            tensor = snapshot_tensor(msg, shm)
        except ProtocolError as exc:
            self._reject(str(exc), msg.run, src)
            return
        if warning:
            log.warning("%s", warning)
        if msg.is_part:  # one rank's shard: analysed once the iteration's parts are all in
            snap = self._assemble(run, msg, tensor, pub.rank, src)
            if snap is None:
                return
            snap.sample_rows = sample  # judged by the whole matrix's shape, like every part of it
        else:
            snap = SnapshotData(iter=msg.iter, seq=msg.seq, name=msg.name, tensor=tensor, sent_at=msg.sent_at,
                                metrics=msg.metrics, sample_rows=sample, token_counts=token_counts_of(msg))
        budget = self.config.max_pending_bytes
        with self.cond:
            state = self._state(run, src)
            if not state.knows_tensor(snap.name) and len(state.others) + 1 >= MAX_TENSORS_PER_RUN:
                refused = f"tensor {snap.name!r}: run already sends {MAX_TENSORS_PER_RUN} named tensors"
            else:
                refused = None
        if refused is not None:
            self._reject(refused, run)
            return
        with self.cond:
            state = self._state(run, src)
            self.seen_runs.add(run)
            if state.ended:
                log.warning("run %s: snapshot iter %d after its end (or close); run reopened", run, msg.iter)
                state.ended = state.closed = False
            state.counters.received += 1
            self.totals.received += 1
            backlog.enqueue(state, snap)
            assembling = sum(held for _, held, _ in self.assembler.held().values())
            skipped = backlog.trim(self.runs.values(), budget, keep=snap, assembling=assembling)
            for victim_state, _ in skipped:
                victim_state.counters.skipped += 1
                self.totals.skipped += 1
            queued = sum(s.queued_bytes for s in self.runs.values()) if skipped else 0  # for the log line below
            self.cond.notify_all()
        for victim_state, victim in skipped:
            log.warning("run %s: skipped iter %d: the backlog is over --max-pending-bytes %s (%s queued); "
                        "raise it, or add cores/threads if this persists", victim_state.run, victim.iter,
                        backlog.human(budget), backlog.human(queued))
        log.debug("run %s: received iter %d", run, msg.iter)

    def _room_for_assembly(self, run: str, msg: Snapshot, src: Source, drops: list[tuple[str, str]]) -> str | None:
        """Make room in --max-pending-bytes for a new assembly of `run` (its full buffer); why not, or None.

        Assembly buffers count in the budget with the queued snapshots. When they do not fit, the source's
        own older assemblies go first, then those of a source holding more than this one would; never
        those of a source holding less (so a flood of never-completing parts costs its own source).
        """
        held = self.assembler.held()
        current = held.get(run)
        if current is not None and msg.iter <= current[0]:
            return None  # a part of the iteration already being assembled
        rows, cols = msg.global_shape  # type: ignore[misc]
        need = rows * cols * DTYPE_ITEMSIZE[msg.dtype]
        with self.lock:
            owner = {r: (self.runs[r].owner_source if r in self.runs else None) for r in held}
            queued = sum(s.queued_bytes for s in self.runs.values())
        held.pop(run, None)  # replaced by the newer iteration
        budget = self.config.max_pending_bytes
        while queued + need + sum(b for _, b, _ in held.values()) > budget:
            by_source: dict[str | None, int] = {}
            for r, (_, b, _) in held.items():
                by_source[owner[r]] = by_source.get(owner[r], 0) + b
            mine = by_source.get(src.key, 0) + need
            victims = [r for r in held if owner[r] == src.key] or \
                [r for r in held if by_source[owner[r]] > mine]
            if not victims:
                return (f"part of iter {msg.iter}: assembling it needs {backlog.human(need)}, over "
                        f"--max-pending-bytes {backlog.human(budget)} with {backlog.human(queued)} queued and "
                        f"{backlog.human(sum(b for _, b, _ in held.values()))} being assembled; refused")
            victim = min(victims, key=lambda r: held[r][2])
            why = self.assembler.abandon(victim, f"dropped for run {run!r}'s new iteration: assemblies over "
                                                 f"--max-pending-bytes {backlog.human(budget)}")
            drops.append((victim, why or ""))
            del held[victim]
        return None

    def _assemble(self, run: str, msg: Snapshot, part: Any, rank: int, src: Source = _LOCAL) -> SnapshotData | None:
        drops: list[str] = []
        room: list[tuple[str, str]] = []
        refused = self._room_for_assembly(run, msg, src, room)
        for victim, why in room:
            self._incomplete(victim, why)
        if refused is not None:
            self._reject(refused, run, src)
            return None
        try:
            done = self.assembler.add(run, msg, part, drops, rank=rank)
        except PartRejected as exc:
            done = None
            self._reject(str(exc), run, src)
        for why in drops:
            self._incomplete(run, why)
        if done is None:
            return None
        log.debug("run %s: iter %d assembled from %d parts", run, done.iter, done.parts)
        return SnapshotData(iter=done.iter, seq=msg.seq, name=done.name, tensor=done.tensor, sent_at=done.sent_at,
                            metrics=done.metrics, token_counts=done.token_counts)

    def _incomplete(self, run: str, why: str) -> None:
        with self.lock:
            self.totals.incomplete += 1
            if run in self.runs:
                self.runs[run].counters.incomplete += 1
        log.warning("run %s: %s", run, why)

    def _check_assemblies(self) -> None:
        # Sharded runs: iterations whose parts are overdue, or whose run ended (all its ranks ended or gone).
        for run, why in self.assembler.expire(time.monotonic()):
            self._incomplete(run, why)
            with self.cond:
                state = self.runs.get(run)
                if state is not None and not state.ended and self.publishers.all_gone(run):
                    self._end_run(state, "all its publishers ended or are gone")
        for run in self.assembler.runs():
            with self.lock:
                ended = run in self.runs and self.runs[run].ended
            if ended:
                self._incomplete(run, self.assembler.abandon(run, "incomplete when the run ended") or "")

    def _on_end(self, msg: End, src: Source = _LOCAL) -> None:
        with self.cond:
            self._admit(msg.run, msg.publisher, src, None)
            if self.publishers.known(msg.run, msg.publisher) is None and msg.run not in self.runs:
                self._state(msg.run, src)
            pub, _ = self.publishers.route(msg.run, msg.publisher)
            state = self._routed_state(pub, src, None)
            self._bind(pub, src, None)
            pub.gone = "sent end"
            run = pub.run
            state.end_info = {"final_iter": msg.final_iter, "published": msg.published,
                              "dropped": msg.dropped}
            # A run ends when all its publishers have; a sharded one also waits (bounded by
            # --assembly-timeout) for the iteration being assembled: a rank's hello may come after another's end.
            state.ended = self.publishers.all_gone(run) and not self.assembler.has(run)
            self.seen_runs.add(run)
            self.cond.notify_all()
        log.info("run %s: end (final iter %s, trainer published %d, dropped %d)", run,
                 msg.final_iter, msg.published, msg.dropped)

    def _on_heartbeat(self, msg: Heartbeat, src: Source = _LOCAL) -> None:
        with self.cond:
            known = self.publishers.known(msg.run, msg.publisher)
            if known is None or (known.source is not None and known.source != src.key):
                # Only a run's own publishers keep it alive (an unknown one's hello comes first): nothing
                # to keep alive, nothing to create, nothing logged (heartbeats come every few seconds).
                return
            pub, _ = self.publishers.route(msg.run, msg.publisher)
            state = self.runs.get(pub.run)
            if state is not None:
                state.last_active = time.monotonic()

    def _source(self, frame: Any) -> Source:
        """Who sent the message whose first frame is `frame`: its CurveZMQ key, else its connection's source."""
        try:
            user = frame.get("User-Id")
            fd = frame.get(zmq.SRCFD)
        except (AttributeError, zmq.ZMQError):
            return _LOCAL  # not a received zmq.Frame (a test feeding bytes): the daemon's own user
        if user:
            return Source(f"key:{user}", f"key {user}")
        return self.gate.source_of(fd)

    def _handle(self, frames: list[Any], shm: ShmReader) -> None:
        src = self._source(frames[0]) if frames else _LOCAL
        try:
            msg = decode(frames, self.config.limits)
        except ProtocolError as exc:
            self._reject(str(exc), src=src)
            return
        try:
            if isinstance(msg, Snapshot):
                self._on_snapshot(msg, shm, src)
            elif isinstance(msg, Hello):
                self._on_hello(msg, src)
            elif isinstance(msg, Heartbeat):
                self._on_heartbeat(msg, src)
            else:
                self._on_end(msg, src)
        except (TooManyRuns, NotYours) as exc:
            self._reject(str(exc), msg.run, src)
        except Exception as exc:  # never exit because of input, whatever it triggers
            self._reject(f"could not handle {type(msg).__name__.lower()}: {type(exc).__name__}: {exc}",
                         msg.run, src)

    def _all_ended(self) -> bool:
        # --exit-on-end waits for the runs of the daemon's own user, its --allow-uid users, its keys and
        # remote peers; another local user's runs neither hold it open nor count as "a run that connected".
        with self.lock:
            runs = [r for r in self.seen_runs if r not in self.runs or self._waits_for(self.runs[r])]
            if not runs:  # none yet, or every one that connected has ended and been released
                return self._seen_any
            return all(r not in self.runs or (self.runs[r].closed and self.runs[r].idle()) for r in runs)

    def _waits_for(self, state: RunState) -> bool:
        owner = state.owner_source
        if owner is None or owner.startswith("key:"):
            return True  # restored from --state-dir, or an authorised CurveZMQ key
        if owner.startswith("uid:"):
            return int(owner[4:]) in self.gate.trusted_uids
        # A remote address (reachable only with keys or --allow-insecure) counts; a local peer whose
        # owner could not be read does not (it may be another user's).
        host = owner[len("addr:"):]
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self.stop_requested = True
        if self._signals > 1:  # a second Ctrl-C means "now"
            self.abandon.set()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reload_requested = True  # handled on the receive loop, not inside the signal handler

    def _reload_keys(self) -> None:
        self._reload_requested = False
        if self.config.curve is None:
            log.info("SIGHUP: no CurveZMQ keys configured, nothing to reload")
            return
        try:
            total, added, removed = self.config.curve.reload()
        except OSError as exc:
            log.error("SIGHUP: could not reload the authorised keys: %s", exc)
            return
        log.info("SIGHUP: reloaded the authorised client keys from %s: %d keys (+%d, -%d); new "
                 "connections are checked against them", self.config.curve.authorized_dir, total, added, removed)

    def serve(self, ready_stream: Any = None) -> int:
        """Bind, print the ready line, receive until end/signal, shut down; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_sighup)
        removed = remove_stale_segments()
        if removed:
            log.info("removed %d stale shared-memory segment(s) of dead publishers", removed)
        ctx = zmq.Context()
        sock = None
        shm = ShmReader(allowed_uids=self.config.allow_uids)
        try:
            sock = bind_receiver(ctx, self.config.listen, self.config.limits, self.config.curve,
                                 self.config.allow_insecure, peers=self.config.peers, gate=self.gate)
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
            check_every = min(1.0, self.config.run_timeout / 4)
            next_check = time.monotonic() + check_every
            while not self.stop_requested:
                if time.monotonic() >= next_check:
                    self._check_liveness()
                    self._check_assemblies()
                    next_check = time.monotonic() + check_every
                if self._reload_requested:
                    self._reload_keys()
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
            self.gate.stop()
            log.info("connections: %s", ", ".join(f"{k}={v}" for k, v in self.gate.counters.as_dict().items()))
            ctx.term()
        return 0

    def _shutdown(self) -> None:
        grace = self.config.shutdown_grace
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            dropped = [(s.run, [q.iter for q in s.queue]) for s in self.runs.values() if s.queue]
        for run, iters in dropped:
            log.warning("run %s: iter(s) %s received but not analysed (shutting down)%s", run,
                        ", ".join(map(str, iters)), "; the next result after a restart lists them in skipped_iters"
                        if self.store is not None else "")
        for run in self.assembler.runs():
            self._incomplete(run, self.assembler.abandon(run, "parts still missing at shutdown") or "")
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
            # The baseline stays the last analysed snapshot (its record exists); the ones never
            # analysed are noted so the run's next result names them.
            for run, iters in dropped:
                try:
                    self.store.note_not_analysed(run, iters)
                except OSError as exc:
                    log.error("state dir: could not note the unanalysed iterations of run %s: %s", run, exc)
        sinks = list(self.sinks.sinks)
        self.sinks.close()
        # Per-run state still held (the open runs and the last few ended ones; the sinks: none once closed):
        # flat however many runs were served.
        held = {**self.held_runs(), **{f"sink_{s.name}": len(s.held_runs()) for s in sinks}}
        log.info("per-run state at exit: %s", " ".join(f"{k}={v}" for k, v in held.items()))
        self.reject_log.flush()
        with self.lock:
            totals = self.totals.as_dict()
        lost = self.sinks.counters()  # after close: results still unwritten then are lost
        by_sink = " (" + ", ".join(f"{k}={v}" for k, v in sorted(lost["lost_by_sink"].items())) + ")"
        log.info("analysis-daemon stopped: received=%d analysed=%d skipped=%d rejected=%d lost=%d%s incomplete=%d",
                 totals["received"], totals["analysed"], totals["skipped"], totals["rejected"],
                 lost["lost"], by_sink if lost["lost"] else "", totals["incomplete"])
