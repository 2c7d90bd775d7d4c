"""The publisher's background thread: the only user of its ZeroMQ socket.

The training thread copies the weights and queues a job; this thread waits for CUDA copies to
finish (event.synchronize() here, never on the training thread), moves staged CUDA copies into
shared memory, sends hello/snapshot/end without ever blocking (NOBLOCK), watches the socket's
monitor to know whether a daemon is connected, and recycles buffers once libzmq has let go of them.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import ShmRef, ShmWriter, encode_end, encode_heartbeat, encode_snapshot, pack_token_counts
from protocol.endpoints import UnsafeEndpoint, check_listener

from .staging import CopyEvent, StagingBuffer, StagingPool

log = logging.getLogger("embedding_monitor.hook")

_UP_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED
_DOWN_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_MONITOR_STOPPED)


def _counts_plus(newer: Any, older: Any) -> Any:
    """`newer` + `older` token counts as a new tensor (never the job's pinned buffer: that one is freed with
    the job); counted against another row count, only the rows both name are added (the newer's rows stand)."""
    out = newer.clone()
    if older is not None:
        n = min(out.numel(), older.numel())
        out[:n] += older[:n]
    return out


@dataclass
class SnapshotJob:
    """One snapshot on its way out: either committed to a shm slot, or in a staging buffer."""

    iter: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    staged: StagingBuffer | None = None
    event: CopyEvent | None = None
    slot: object | None = None
    ref: ShmRef | None = None
    # Set for a publish made while the first connection was still being set up: the sender may wait
    # (on its own thread) until then for the handshake instead of dropping the run's first snapshot.
    connect_deadline: float | None = None
    metrics: dict[str, float | int] | None = None  # already checked by the publisher (clean_metrics)
    global_shape: tuple[int, int] | None = None  # set for one rank's part of a sharded (DTensor) matrix
    offset: tuple[int, int] | None = None
    start: int | None = None  # or the first flat element of an element-range part (1-D shape)
    # tokens counted since the previous snapshot (int64 CPU tensor, rows of the matrix); for a CUDA count its
    # copy is non-blocking and lands before `event` fires (so read it only after event.synchronize())
    token_counts: Any = None
    landed: bool = False  # set once `event` fired (or there is none): token_counts can be read


@dataclass
class PrepareJob:
    """Create and fault in the buffers for snapshots of `nbytes` here, so the training thread never pays for it."""

    nbytes: int
    pin: bool
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class EndJob:
    """close(): send `end`, wait for in-flight sends until the deadline, then shut the socket."""

    deadline: float
    done: threading.Event = field(default_factory=threading.Event)


class Sender(threading.Thread):
    """Owns the socket; see the module docstring."""

    def __init__(self, sock: zmq.Socket, ctx: zmq.Context, *, run: str, publisher_id: str,
                 hello_frames: Callable[[int], list[bytes]], pool: StagingPool, writer: ShmWriter | None,
                 on_sent: Callable[[int], None], on_drop: Callable[[str], None],
                 counters: Callable[[], tuple[int, int, int | None]], heartbeat_s: float = 5.0) -> None:
        super().__init__(name="embedding-publisher", daemon=True)  # daemon: atexit's close() still runs
        self.sock, self.ctx = sock, ctx
        self.monitor = sock.get_monitor_socket(_UP_EVENTS | _DOWN_EVENTS)
        self.run_name, self.publisher_id = run, publisher_id
        self.hello_frames, self.pool, self.writer = hello_frames, pool, writer
        self.on_sent, self.on_drop, self.counters = on_sent, on_drop, counters
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.connected = False  # read by the training thread to skip copies nobody can receive
        # Set by the first handshake event, success or failure (e.g. a CURVE key the daemon refuses):
        # from then on "not connected" means gone or refused, not "still connecting".
        self.settled = False
        self.shm_enabled = writer is not None
        self._shm_lock = threading.Lock()  # disable_shm may run on the training thread and on this one
        self._need_hello = True
        # Why nothing can be sent, for the drop message: a daemon that refused our CURVE key is not "absent".
        self.refused = False
        self.full = False  # ...or turned us away for now: too many connections
        self.mismatch = False  # ...or the handshake failed: one side uses CurveZMQ keys, the other does not
        self.curve_client = sock.get(zmq.MECHANISM) == zmq.CURVE
        # libzmq does not reconnect after a ZAP refusal; we do, slowly, so a key authorised later (the
        # daemon reloads its keys on SIGHUP) or a free connection place is picked up without a restart.
        self.endpoint: str | None = None  # set by the publisher
        # Set by the publisher when no CurveZMQ key proves the daemon: every handshake is followed by a look
        # at who owns the listener (protocol.endpoints.check_listener); another user's gets nothing.
        self.verify_listener = False
        self.untrusted: str | None = None  # why the listener reached last was refused (None: not refused)
        self.retry_after_refusal_s = 2.0
        self._retry_at: float | None = None
        self._seq = 0
        self._pending: list[tuple[zmq.MessageTracker, StagingBuffer]] = []
        self.heartbeat_s = heartbeat_s
        self._last_sent = time.monotonic()  # any message tells the daemon we are alive
        # Token counts of snapshots dropped after they were queued (daemon absent, queue full): added to the
        # next snapshot that carries counts. Only this thread reads or writes it.
        self.carried_counts: Any = None

    # ------------------------------------------------------------ helpers

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, self._seq + 1
        return seq

    def _poll_monitor(self) -> None:
        while True:
            try:
                message = recv_monitor_message(self.monitor, zmq.NOBLOCK)
                event, value = message["event"], message["value"]
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            if event & _UP_EVENTS:
                if self._refuse_untrusted_listener():
                    continue
                self.connected = self.settled = True
                self.refused = self.full = self.mismatch = False
                self._need_hello = True  # a (re)started daemon has not seen our hello
            elif event & _DOWN_EVENTS:
                self.settled = True
                # The value of HANDSHAKE_FAILED_AUTH is the daemon's ZAP status: 400 = our key was refused,
                # 300 = temporarily full (too many connections; libzmq retries by itself).
                if event & zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._retry_at = time.monotonic() + (0.5 if value == 300 else self.retry_after_refusal_s)
                if event & zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == 300:
                    if not self.full:
                        log.warning("embedding publisher: the daemon has too many connections (its "
                                    "--max-connections); retrying")
                    self.full = True
                elif event & zmq.EVENT_HANDSHAKE_FAILED_AUTH and not self.refused:
                    self.refused = True
                    log.warning("embedding publisher: the daemon refused our key (CurveZMQ authentication "
                                "failed); add our public key (NAME.key) to the daemon's --curve-authorized-dir "
                                "and send it SIGHUP")
                if (event & zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                        and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH and not self.refused):
                    self.refused = True  # said once; libzmq keeps retrying, a daemon fixed later is found
                    self.mismatch = True
                    log.warning("embedding publisher: the daemon at %s refused the handshake: %s", self.endpoint,
                                self.absent_reason())
                if self.connected and self.writer is not None:
                    # headers queued at a daemon that is gone are lost with it: its slots are free to reuse
                    self.writer.expire()
                self.connected = False

    def _refuse_untrusted_listener(self) -> bool:
        # Before the first byte (hello, secret, payload) goes out: is the listener ours? A port squatted by
        # another user while the daemon was down is dropped at once and tried again later.
        if not self.verify_listener or self.endpoint is None:
            return False
        try:
            check_listener(self.endpoint)
        except UnsafeEndpoint as exc:
            why = str(exc)
        else:
            if self.untrusted is not None:
                log.warning("embedding publisher: the listener on %s is ours again; sending", self.endpoint)
            self.untrusted = None
            return False
        try:
            self.sock.disconnect(self.endpoint)  # drops the pipe: nothing can be sent to it
        except zmq.ZMQError:
            pass
        if self.untrusted is None:  # one line per episode, not one per retry
            log.warning("embedding publisher: refused: %s", why)
        self.untrusted = why
        self.connected, self.settled = False, True
        self._retry_at = time.monotonic() + self.retry_after_refusal_s
        return True

    def _retry_connect(self) -> None:
        if self._retry_at is None or time.monotonic() < self._retry_at or self.endpoint is None:
            return
        self._retry_at = None
        try:
            self.sock.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass  # not connected any more: nothing to undo
        try:
            self.sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            log.warning("embedding publisher: reconnecting to %s failed: %s", self.endpoint, exc)

    def _reap(self) -> None:
        still = []
        for tracker, buf in self._pending:
            if tracker.done:
                self.pool.release(buf)
            else:
                still.append((tracker, buf))
        self._pending = still
        if self.writer is not None:
            self.writer.note_released()

    def shm_slot(self, nbytes: int) -> object | None:
        """A shared-memory slot for `nbytes`, or None: all held by the daemon (`shm_enabled` still True: drop),
        or /dev/shm failed (full, gone; `shm_enabled` now False: send this snapshot over the socket).

        The one fallback of both paths: the training thread (CPU tensors) and this thread (CUDA copies).
        """
        assert self.writer is not None
        try:
            return self.writer.acquire(nbytes)
        except OSError as exc:
            self.disable_shm(f"shared memory failed ({exc.strerror or exc}); sending payloads over the socket")
            return None

    def disable_shm(self, why: str) -> None:
        """Send payloads inline over the socket from now on; says so in one line, once."""
        with self._shm_lock:
            if not self.shm_enabled:
                return
            self.shm_enabled = False
        log.warning("embedding publisher: %s", why)

    def _send(self, frames: list, *, track: bool = False) -> zmq.MessageTracker | bool:
        for attempt in (0, 1):
            try:
                if track:
                    tracker = self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=True)
                    self._last_sent = time.monotonic()
                    return tracker
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                self._last_sent = time.monotonic()
                return True
            except zmq.Again:  # no daemon connected (IMMEDIATE) or its queue is full: drop, never wait
                if attempt == 0:
                    # libzmq only processes its pending "queue has room again" commands now and then
                    # on send; reading ZMQ_EVENTS processes them, so a queue that just drained is seen.
                    self.sock.getsockopt(zmq.EVENTS)
        return False

    def _send_hello(self) -> bool:
        if self._send(self.hello_frames(self._seq)) is not False:
            self._next_seq()
            self._need_hello = False
            return True
        return False

    # ------------------------------------------------------------ jobs

    def _carry(self, job: SnapshotJob) -> None:
        """Keep a dropped job's token counts for the next snapshot (those of a copy that never landed are lost)."""
        counts, job.token_counts = job.token_counts, None
        if counts is not None and job.landed:
            self.carried_counts = _counts_plus(counts, self.carried_counts)

    def _with_carried(self, job: SnapshotJob) -> None:
        # Counts of earlier dropped snapshots join this one's; if this one is dropped too, _carry keeps the sum.
        if job.token_counts is not None and self.carried_counts is not None:
            job.token_counts, self.carried_counts = _counts_plus(job.token_counts, self.carried_counts), None

    def _snapshot(self, job: SnapshotJob) -> None:
        if job.event is not None:
            job.event.synchronize()  # the device-to-host copy has landed in the staging buffer
        job.landed = True
        if job.staged is not None and self.shm_enabled and self.writer is not None:
            job.slot = self.shm_slot(job.staged.nbytes)
            if job.slot is None and self.shm_enabled:
                self.pool.release(job.staged)
                self._carry(job)
                self.on_drop("every shared-memory slot is still held by the daemon")
                return
            if job.slot is not None:
                np.copyto(np.frombuffer(job.slot.payload(), dtype=np.uint8), job.staged.data.numpy())
                job.ref = self.writer.commit(job.slot)
                self.pool.release(job.staged)
                job.staged = None
            # else /dev/shm failed: the staged copy goes inline below, like every later one
        if job.connect_deadline is not None:
            self._await_first_connection(job.connect_deadline)
        self._poll_monitor()
        if not self.connected:  # a pipe whose handshake we have not judged yet (listener owner) gets nothing
            return self._fail(job, self.absent_reason())
        if self._need_hello and not self._send_hello():
            return self._fail(job, self.absent_reason())
        self._with_carried(job)
        common = dict(run=self.run_name, iter=job.iter, seq=self._seq, name=job.name, dtype=job.dtype,
                      shape=job.shape, publisher=self.publisher_id, global_shape=job.global_shape,
                      offset=job.offset, metrics=job.metrics, start=job.start,
                      token_counts=None if job.token_counts is None else pack_token_counts(job.token_counts.numpy()))
        if job.ref is not None:
            ok = self._send(encode_snapshot(shm=job.ref, **common)) is not False
        else:
            tracker = self._send(encode_snapshot(payload=job.staged.frame(), **common), track=True)
            ok = tracker is not False
            if ok:
                self._pending.append((tracker, job.staged))
                job.staged = None  # now owned by libzmq until the tracker says done
        if not ok:
            return self._fail(job, self.absent_reason() if self.refused or self.full else
                              "no analysis daemon connected, or it is not keeping up")
        self._next_seq()
        self.on_sent(job.iter)

    def _await_first_connection(self, deadline: float) -> None:
        # Only for snapshots published during the start-up grace: the loopback handshake with a daemon
        # that is up takes milliseconds, and this thread (not the training thread) is the one waiting.
        while not self.connected and not self.settled and time.monotonic() < deadline:
            time.sleep(0.005)
            self._poll_monitor()

    def absent_reason(self) -> str:
        """Why a snapshot cannot go out now (for the drop warning)."""
        if self.untrusted is not None:
            return "the listener on the daemon's address belongs to another user (refused, retrying)"
        if self.refused and self.mismatch and self.curve_client:
            return ("it has no CurveZMQ keys and we use them (drop curve_client_secret=/curve_server_public=, or "
                    "start the daemon with --curve-secret and --curve-authorized-dir)")
        if self.refused and self.mismatch:
            return ("it requires CurveZMQ keys and we have none: pass curve_client_secret= and "
                    "curve_server_public= (launch.sh trainer --keys DIR), and authorise our NAME.key at the daemon")
        if self.refused:
            return "the daemon refused our key (add our NAME.key to its --curve-authorized-dir, then SIGHUP it)"
        if self.full:
            return "the daemon has too many connections (its --max-connections); retrying"
        return "no analysis daemon connected"

    def _fail(self, job: SnapshotJob, reason: str) -> None:
        if job.slot is not None:
            self.writer.release(job.slot)
        if job.staged is not None:
            self.pool.release(job.staged)
        self._carry(job)
        self.on_drop(reason)

    def _prepare(self, job: PrepareJob) -> None:
        started = time.monotonic()
        try:
            made = 0
            if self.writer is not None and self.shm_enabled and not job.pin:
                try:
                    made = self.writer.prepare(job.nbytes)
                except OSError as exc:  # /dev/shm full: the same fallback as a publish's (socket from now on)
                    self.disable_shm(f"shared memory failed ({exc.strerror or exc}); sending payloads over the socket")
            if not self.shm_enabled or self.writer is None or job.pin:
                made = self.pool.prepare(job.nbytes, pin=job.pin)
        except (OSError, RuntimeError) as exc:  # e.g. /dev/shm or pinned memory short: publish copes later
            log.warning("embedding publisher: could not prepare snapshot buffers ahead (%s)", exc)
            return
        if made:
            log.debug("embedding publisher: prepared %d buffer(s) of %d bytes in %.3f s", made, job.nbytes,
                      time.monotonic() - started)

    def _end(self, job: EndJob) -> None:
        published, dropped, final_iter = self.counters()  # read here: every earlier job is done
        frames = encode_end(run=self.run_name, seq=self._seq, final_iter=final_iter, published=published,
                            dropped=dropped, publisher=self.publisher_id)
        while time.monotonic() < job.deadline:
            self._poll_monitor()
            if not self.connected:
                break
            if self._send(frames) is not False:
                self._next_seq()
                break
            time.sleep(0.005)  # the queue is full of snapshots still going out
        # Bounded wait for snapshots in flight: tcp frames libzmq still holds, shm slots not yet released.
        while time.monotonic() < job.deadline:
            self._reap()
            shm_busy = self.writer.busy() if self.writer is not None else 0
            if not self._pending and (not shm_busy or not self.connected):
                break
            self._poll_monitor()
            time.sleep(0.005)
        linger_ms = max(0, int((job.deadline - time.monotonic()) * 1000))
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(linger_ms)
        self.ctx.term()  # bounded: the only socket is closed with a finite linger

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        """Serve jobs until an EndJob arrives."""
        while True:
            try:
                job = self.jobs.get(timeout=0.005 if self._pending else 0.05)
            except queue.Empty:
                job = None
            self._poll_monitor()
            self._retry_connect()
            self._reap()
            if self._need_hello and self.connected:
                self._send_hello()  # tell a newly connected daemon about the run right away
            elif self.connected and time.monotonic() - self._last_sent >= self.heartbeat_s:
                # Liveness: a trainer between evals says nothing for minutes; one that was SIGKILLed
                # says nothing ever again, and the daemon tells the two apart by this.
                if self._send(encode_heartbeat(run=self.run_name, seq=self._seq, publisher=self.publisher_id)):
                    self._next_seq()
                else:
                    self._last_sent = time.monotonic()  # queue full: the snapshots in it say enough
            if job is None:
                continue
            if isinstance(job, EndJob):
                try:
                    self._end(job)
                finally:
                    job.done.set()
                return
            if isinstance(job, PrepareJob):
                try:
                    self._prepare(job)
                finally:
                    job.done.set()
                continue
            try:
                self._snapshot(job)
            except Exception:  # never let one bad job kill the thread the trainer relies on
                log.exception("embedding publisher: sending a snapshot failed")
                self._fail(job, "internal error")
