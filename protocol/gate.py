"""Who may connect to the daemon, and how many at once: our own ZAP handler plus a connection monitor.

libzmq asks the ZAP handler (`inproc://zeromq.zap.01` in the socket's context) about every incoming
connection once its greeting is in: for CURVE with the client's public key, for NULL when the socket
has a ZAP domain (bind_receiver sets one). This handler
- allows a CURVE client only if its public key is in the authorised set, which `reload()` replaces
  (the daemon calls it on SIGHUP), and logs every refusal with the peer's address and a key fingerprint;
- limits connections by *source* (protocol/peers.py: the uid owning a local peer's socket, else its
  address) as soon as libzmq accepts them, before any byte of a handshake: a source the daemon does not
  trust (not its own uid, not an --allow-uid) may hold at most `max_per_source` connections, and all such
  sources together at most `max_connections`; past that the new connection is shut down at once. So
  peers that never send a greeting (or send it and fall silent) cannot take the places of the daemon's
  own trainers, whose connections are never refused by these limits; a peer stuck before its handshake
  is closed by libzmq at --handshake-timeout (ZMQ_HANDSHAKE_IVL), a silent one at --peer-timeout;
- says at once, per source, why a handshake failed (e.g. a trainer without keys at a CurveZMQ daemon).
libzmq closes a refused connection itself. Refusals are logged at most once per kind and source per
interval, with the number suppressed since.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Final

import zmq
from zmq.utils.monitor import parse_monitor_message

from .peers import OWN_UID, UNKNOWN, Source, TcpTable, from_zap_address, resolve_fd, still_connected

ZAP_ENDPOINT: Final[str] = "inproc://zeromq.zap.01"
ZAP_DOMAIN: Final[str] = "embedding-monitor"
_EVENTS: Final[int] = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

log = logging.getLogger("embedding_monitor.daemon")

# Monitor events handled per turn of the gate's loop (ZAP requests and the sweep come between batches).
_EVENT_BATCH = 256
# Rate-limited log keys remembered at once (each distinct refused key is one).
_MAX_LOG_KEYS = 1024


def key_fingerprint(public_key: bytes) -> str:
    """A short, stable name for a CURVE public key (32 raw bytes) in logs: sha256:<16 hex>."""
    return "sha256:" + hashlib.sha256(public_key).hexdigest()[:16]


@dataclass
class GateCounters:
    """What the gate saw; the daemon logs them at exit and tests read them."""

    accepted: int = 0  # tcp/ipc connections accepted by libzmq
    established: int = 0  # handshakes (and ZAP checks) that succeeded
    disconnected: int = 0  # connections that ended, for whatever reason
    refused_key: int = 0  # CURVE clients whose key is not authorised
    refused_full: int = 0  # connections refused because max_connections were open
    refused_source: int = 0  # connections refused because their source held max_per_source already
    handshake_failed: int = 0  # handshakes that failed (timeout, protocol error, bad CURVE box)
    peak_open: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dict(self.__dict__)


@dataclass
class Gate:
    """The ZAP handler and connection monitor thread of one receiving socket (see the module docstring)."""

    max_connections: int = 256  # connections of untrusted sources open at once, all together
    max_per_source: int = 32  # connections one untrusted source may hold
    log_interval: float = 10.0
    trusted_uids: frozenset[int] = frozenset({OWN_UID})  # local users whose connections are never refused
    counters: GateCounters = field(default_factory=GateCounters)

    def __post_init__(self) -> None:
        self._keys: frozenset[bytes] | None = None  # None: NULL mechanism, no key check
        self._open: dict[int, Source] = {}  # fd -> source of each accepted connection still open
        self._per_source: dict[str, int] = {}
        # fd -> source of the last connection accepted on it, kept after it closed: the messages it queued
        # before closing (a trainer's `end`) are still read after the disconnect. Bounded by the fd limit.
        self._last: dict[int, Source] = {}
        self._untrusted_open = 0
        self._listening: object = None  # the bound (host, port) or ipc path: only its connections are judged
        self._failed: tuple[int, int] | None = None  # the last handshake failure, told with its disconnect
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._zap: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    # --- configuration -------------------------------------------------------------------------
    def set_keys(self, keys: frozenset[bytes]) -> None:
        """Replace the authorised CURVE public keys (raw 32 bytes); new handshakes see the new set at once."""
        with self._lock:
            self._keys = frozenset(keys)

    def bound(self, endpoint: str) -> None:
        """Tell the gate the address the socket bound (after bind): connections to it are judged."""
        if endpoint.startswith("ipc://"):
            self._listening = endpoint[len("ipc://"):]
        elif endpoint.startswith("tcp://"):
            host, port = endpoint[len("tcp://"):].rsplit(":", 1)
            self._listening = (host.strip("[]"), int(port))

    def trusted(self, src: Source) -> bool:
        """Whether `src` is the daemon's own user (or an --allow-uid): its connections are never refused."""
        return src.uid is not None and src.uid in self.trusted_uids

    def source_of(self, fd: int | None) -> Source:
        """The source of the open connection on `fd` (a message's ZMQ_SRCFD); resolved now if not seen yet."""
        if fd is None or fd < 0:
            return UNKNOWN
        with self._lock:
            src = self._open.get(fd)
            last = self._last.get(fd)
        if src is not None:
            return src
        src, sock = resolve_fd(fd, self._listening)  # accepted but not yet seen by the monitor thread
        if sock is not None:
            sock.close()
        return src or last or UNKNOWN

    def start(self, ctx: zmq.Context) -> None:
        """Bind the ZAP endpoint in `ctx` (before the server socket binds) and start the thread."""
        self._zap = ctx.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)

    def watch(self, sock: zmq.Socket) -> None:
        """Attach the monitor to the server socket and start serving (call before sock.bind)."""
        self._monitor = sock.get_monitor_socket(_EVENTS)
        self._thread = threading.Thread(target=self._run, name="zap-gate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its sockets (before the context is terminated)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        elif self._zap is not None:
            self._zap.close(0)
            self._zap = None

    # --- the thread ----------------------------------------------------------------------------
    def _rate_limited(self, key: str, msg: str, *args: object) -> None:
        # One line per kind of event and source per interval; the next one says how many were suppressed.
        now = time.monotonic()
        last = self._last_log.get(key)
        if last is not None and now - last < self.log_interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if key not in self._last_log and len(self._last_log) >= _MAX_LOG_KEYS:
            # The keys include refused clients' key fingerprints, which a peer chooses: forget the
            # oldest entry rather than grow without bound (its suppressed count is logged with it).
            oldest = min(self._last_log, key=self._last_log.__getitem__)
            del self._last_log[oldest]
            dropped = self._suppressed.pop(oldest, 0)
            if dropped:
                log.warning("%d similar messages suppressed in the last %g s (%s)", dropped,
                            self.log_interval, oldest)
        self._last_log[key] = now
        n = self._suppressed.pop(key, 0)
        log.warning(msg + (f" [{n} similar suppressed in the last {self.log_interval:g} s]" if n else ""), *args)

    def _run(self) -> None:
        assert self._zap is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        next_sweep = time.monotonic() + 1.0
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + 1.0
                # Monitor events first, at most a batch per turn so ZAP requests and the sweep are not
                # starved by a flood; one read of the TCP owner table serves the whole batch.
                table = TcpTable()
                for _ in range(_EVENT_BATCH if self._monitor in ready else 0):
                    try:
                        self._on_event(parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK)), table)
                    except zmq.Again:
                        break
                    except Exception:  # a malformed event must not stop the gate
                        log.exception("connection monitor: unreadable event")
                        break
                if self._zap in ready:
                    try:
                        request = self._zap.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    try:
                        reply = self._answer(request)
                    except Exception:  # a bug here must not leave every handshake waiting for an answer
                        log.exception("ZAP handler failed; refusing this connection")
                        reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
                    self._zap.send_multipart(reply)
        finally:
            self._monitor.close(0)
            self._zap.close(0)
            self._zap = None

    def _on_event(self, event: dict, table: TcpTable | None = None) -> None:
        kind, fd = event["event"], event["value"]
        c = self.counters
        if kind == zmq.EVENT_ACCEPTED:
            self._on_accepted(fd, table)
            return
        with self._lock:
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                c.established += 1  # the event carries no fd: counted, not tracked per connection
                self._failed = None
                return
            if kind == zmq.EVENT_DISCONNECTED:
                c.disconnected += 1
                src = self._open.pop(fd, None)
                if src is not None:
                    self._count(src, -1)
                failed, self._failed = self._failed, None
            elif kind & (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                         | zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                c.handshake_failed += 1
                # libzmq's one I/O thread reports a failed handshake, then the same connection's
                # disconnect (which names its fd, hence its source): the line is written then.
                self._failed = (kind, fd)
                return
            else:
                return
        if failed is not None and src is not None:
            self._tell_failure(src, *failed)

    def _sweep(self) -> None:
        # libzmq's monitor queue holds 1000 events and drops the rest under a flood: a lost DISCONNECTED
        # would leave its connection counted forever. Once a second, forget descriptors that are no
        # longer a connection to us (a reused number is caught by the next ACCEPTED for it).
        with self._lock:
            entries = list(self._open.items())
        gone = [(fd, src) for fd, src in entries if not still_connected(fd, self._listening)]
        with self._lock:
            for fd, src in gone:
                if self._open.get(fd) is src:
                    del self._open[fd]
                    self._count(src, -1)

    def _count(self, src: Source, delta: int) -> None:
        # lock held
        n = self._per_source.get(src.key, 0) + delta
        if n > 0:
            self._per_source[src.key] = n
        else:
            self._per_source.pop(src.key, None)
        if not self.trusted(src):
            self._untrusted_open += delta

    def _on_accepted(self, fd: int, table: TcpTable | None = None) -> None:
        c = self.counters
        src, sock = resolve_fd(fd, self._listening, table)
        src = src or UNKNOWN
        try:
            with self._lock:
                c.accepted += 1
                held = self._per_source.get(src.key, 0)
                refuse = None
                if sock is not None and not self.trusted(src):
                    if held >= self.max_per_source:
                        c.refused_source += 1
                        refuse = ("source", f"{held} of its connections are open (--max-connections-per-source "
                                            f"{self.max_per_source}; --max-connections {self.max_connections} "
                                            "for all other users together)")
                    elif self._untrusted_open >= self.max_connections:
                        c.refused_full += 1
                        refuse = ("full", f"{self._untrusted_open} connections of other users are open "
                                          f"(--max-connections {self.max_connections})")
                if refuse is None:
                    stale = self._open.pop(fd, None)  # a disconnect we never heard of: the fd was reused
                    if stale is not None:
                        self._count(stale, -1)
                    self._open[fd] = self._last[fd] = src
                    self._count(src, +1)
                    c.peak_open = max(c.peak_open, len(self._open))
            if refuse is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # libzmq sees the end of the stream and closes it
                except OSError:
                    pass
                self._rate_limited(f"{refuse[0]}:{src.key}", "refused a connection from %s: %s", src.label, refuse[1])
        finally:
            if sock is not None:
                sock.close()  # our duplicate only

    def _tell_failure(self, src: Source, kind: int, value: int) -> None:
        if kind & zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return  # a ZAP refusal: _answer logged it with its reason
        with self._lock:
            curve = self._keys is not None
        if kind & zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if curve:
                why = ("it has no CurveZMQ keys and this daemon requires them: give the trainer "
                       "curve_client_secret= and curve_server_public= (launch.sh trainer --keys DIR)")
            else:
                why = ("it uses CurveZMQ keys but this daemon has none: start the daemon with --curve-secret "
                       "and --curve-authorized-dir, or drop the trainer's keys")
            self._rate_limited(f"mechanism:{src.key}", "refused the handshake of %s: %s", src.label, why)
        elif kind & zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self._rate_limited(f"protocol:{src.key}", "refused the handshake of %s: ZMTP protocol error 0x%x "
                               "(not an embedding-monitor trainer, or a damaged connection)", src.label, value)
        else:
            self._rate_limited(f"handshake:{src.key}", "closed a connection from %s before its handshake "
                               "completed (none within --handshake-timeout, or it hung up)", src.label)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        # ZAP 1.0 request: version, request id, domain, address, identity, mechanism, credentials...
        if len(request) < 6 or request[0] != b"1.0":
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        peer = address.decode("ascii", "replace") or "local"
        src = from_zap_address(peer)
        label = src.label if src is not None else peer
        with self._lock:
            keys = self._keys
        if mechanism == b"CURVE":
            client_key = credentials[0] if credentials else b""
            fingerprint = key_fingerprint(client_key)
            if keys is None or client_key not in keys:
                self.counters.refused_key += 1
                # Keyed by the peer, not by the key: a peer trying many random keys costs one line per interval.
                self._rate_limited(f"key:{peer}",
                                   "refused a CurveZMQ handshake from %s: client key %s is not authorised "
                                   "(add its NAME.key to --curve-authorized-dir and send SIGHUP)",
                                   label, fingerprint)
                return [version, request_id, b"400", b"client key not authorised", b"", b""]
            user = fingerprint.encode()
        elif keys is not None:  # a NULL/PLAIN peer on a CURVE socket never gets this far; be strict anyway
            self.counters.refused_key += 1
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        else:
            user = b""
        return [version, request_id, b"200", b"OK", user, b""]
