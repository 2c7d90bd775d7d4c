"""Who may connect to the daemon, and how many at once: our own ZAP handler plus a connection monitor.

libzmq asks the ZAP handler (`inproc://zeromq.zap.01` in the socket's context) about every incoming
connection once its greeting is in: for CURVE with the client's public key, for NULL when the socket
has a ZAP domain (bind_receiver sets one). This handler
- allows a CURVE client only if its public key is in the authorised set, which `reload()` replaces
  (the daemon calls it on SIGHUP), and logs every refusal with the peer's address and a key fingerprint;
- refuses any connection while more than `max_connections` are open, so idle peers cannot take every
  file descriptor (the count comes from the socket monitor: accepted minus disconnected).
libzmq closes a refused connection itself. Refusals are logged at most once per reason per interval.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Final

import zmq
from zmq.utils.monitor import parse_monitor_message

ZAP_ENDPOINT: Final[str] = "inproc://zeromq.zap.01"
ZAP_DOMAIN: Final[str] = "embedding-monitor"
_EVENTS: Final[int] = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

log = logging.getLogger("embedding_monitor.daemon")

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
    handshake_failed: int = 0  # handshakes that failed (timeout, protocol error, bad CURVE box)
    peak_open: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dict(self.__dict__)


@dataclass
class Gate:
    """The ZAP handler and connection monitor thread of one receiving socket (see the module docstring)."""

    max_connections: int = 256
    log_interval: float = 10.0
    counters: GateCounters = field(default_factory=GateCounters)

    def __post_init__(self) -> None:
        self._keys: frozenset[bytes] | None = None  # None: NULL mechanism, no key check
        self._open: set[int] = set()
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
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                # Monitor events first: a disconnect frees a place before the next ZAP request is judged.
                while self._monitor in ready:
                    try:
                        self._on_event(parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK)))
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

    def _on_event(self, event: dict) -> None:
        kind, fd = event["event"], event["value"]
        c = self.counters
        with self._lock:
            if kind == zmq.EVENT_ACCEPTED:
                c.accepted += 1
                self._open.add(fd)
                c.peak_open = max(c.peak_open, len(self._open))
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                c.established += 1  # the event carries no fd: counted, not tracked per connection
            elif kind == zmq.EVENT_DISCONNECTED:
                c.disconnected += 1
                self._open.discard(fd)
            elif kind & (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                         | zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                c.handshake_failed += 1
                log.debug("handshake failed: event %s value %s", kind, fd)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        # ZAP 1.0 request: version, request id, domain, address, identity, mechanism, credentials...
        if len(request) < 6 or request[0] != b"1.0":
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        peer = address.decode("ascii", "replace") or "local"
        with self._lock:
            keys = self._keys
            open_now = len(self._open)
        if mechanism == b"CURVE":
            client_key = credentials[0] if credentials else b""
            fingerprint = key_fingerprint(client_key)
            if keys is None or client_key not in keys:
                self.counters.refused_key += 1
                self._rate_limited(f"key:{fingerprint}",
                                   "refused a CurveZMQ handshake from %s: client key %s is not authorised "
                                   "(add its NAME.key to --curve-authorized-dir and send SIGHUP)",
                                   peer, fingerprint)
                return [version, request_id, b"400", b"client key not authorised", b"", b""]
            user = fingerprint.encode()
        elif keys is not None:  # a NULL/PLAIN peer on a CURVE socket never gets this far; be strict anyway
            self.counters.refused_key += 1
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        else:
            user = b""
        if open_now > self.max_connections:
            self.counters.refused_full += 1
            self._rate_limited("full", "refused a connection from %s: %d connections open (--max-connections %d)",
                               peer, open_now, self.max_connections)
            # 300 = temporary failure (ZAP RFC 27): the client's libzmq retries by itself, and the trainer
            # can tell "daemon full" from "key refused" (400) in its HANDSHAKE_FAILED_AUTH event.
            return [version, request_id, b"300", b"too many connections", b"", b""]
        return [version, request_id, b"200", b"OK", user, b""]
