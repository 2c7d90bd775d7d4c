"""Socket setup for both ends, so no other module sets ZeroMQ options.

Trainers PUSH-connect, the daemon PULL-binds: one daemon serves several runs, and a trainer
never waits for a daemon (IMMEDIATE=1: nothing is queued while no daemon is connected).
"""
from __future__ import annotations

import errno
import ipaddress
from typing import Final

import zmq

from dataclasses import dataclass

from .endpoints import ipc_in_use
from .gate import ZAP_DOMAIN, Gate
from .messages import DEFAULT_LIMITS, Limits
from .security import CurveClient, CurveServer

RECEIVER_HWM: Final[int] = 4  # messages queued in the daemon's socket; each may be a whole snapshot
RECEIVER_LINGER_MS: Final[int] = 0
PUBLISHER_HWM: Final[int] = 8  # memory is bounded by the hook's buffer pool, not by this
PUBLISHER_LINGER_MS: Final[int] = 1000


@dataclass(frozen=True)
class PeerLimits:
    """Per-connection limits of the receiving socket (seconds)."""

    heartbeat_interval: float = 10.0  # the daemon PINGs every connection this often...
    peer_timeout: float = 30.0  # ...and drops one that sent nothing (not even a PONG) for this long
    handshake_timeout: float = 10.0  # a connection that has not completed its handshake by then is closed


DEFAULT_PEER_LIMITS = PeerLimits()


def _tcp_host(endpoint: str) -> str | None:
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    if ";" in rest:  # "source;destination" form: the destination decides
        rest = rest.split(";", 1)[1]
    host = rest.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (or localhost)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = _tcp_host(endpoint)
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name, "*" or a host name: not provably local
        return False


def check_endpoint(endpoint: str, *, secured: bool, allow_insecure: bool) -> None:
    """Raise ValueError when `endpoint` would carry snapshots unauthenticated beyond this host."""
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"unsupported endpoint {endpoint!r}: use tcp://HOST:PORT or ipc:///path")
    if secured or allow_insecure or is_local_endpoint(endpoint):
        return
    raise ValueError(f"refusing unencrypted endpoint {endpoint}: make keys with `python -m protocol.keygen DIR` "
                     "and configure CurveZMQ, use a loopback/ipc endpoint, or opt out with allow_insecure")


def bind_receiver(ctx: zmq.Context, endpoint: str, limits: Limits = DEFAULT_LIMITS,
                  curve: CurveServer | None = None, allow_insecure: bool = False, *,
                  hwm: int = RECEIVER_HWM, peers: PeerLimits = DEFAULT_PEER_LIMITS,
                  gate: Gate | None = None) -> zmq.Socket:
    """A bound PULL socket: oversized frames dropped by libzmq before allocation, silent peers dropped
    by heartbeats, and every connection checked by `gate` (our ZAP handler: CURVE keys, connection limit).

    With `curve` and no `gate`, the CurveServer's own gate is used.
    """
    check_endpoint(endpoint, secured=curve is not None, allow_insecure=allow_insecure)
    sock = ctx.socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, RECEIVER_LINGER_MS)
        # libzmq checks every frame's announced size against this and disconnects the peer
        # before allocating anything larger (applies to tcp and ipc, per frame).
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes())
        # A libzmq peer answers PINGs by itself, so an idle trainer stays connected; a peer that went
        # silent (or a raw TCP client that completed the greeting and stopped) is dropped.
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(peers.heartbeat_interval * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(peers.peer_timeout * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(peers.peer_timeout * 1000)))
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(peers.handshake_timeout * 1000)))
        if gate is None and curve is not None:
            gate = curve.gate
        if gate is not None:
            gate.start(ctx)  # the ZAP endpoint must exist before the first connection arrives
            sock.zap_domain = ZAP_DOMAIN.encode()  # makes libzmq ask the gate about NULL connections too
            gate.watch(sock)
        if curve is not None:
            curve.apply(ctx, sock)
        if ipc_in_use(endpoint):
            raise zmq.ZMQError(errno.EADDRINUSE, f"{endpoint} is in use by a running daemon")
        sock.bind(endpoint)
        if gate is not None:
            gate.bound(sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def connect_publisher(ctx: zmq.Context, endpoint: str, curve: CurveClient | None = None,
                      allow_insecure: bool = False, *, hwm: int = PUBLISHER_HWM,
                      linger_ms: int = PUBLISHER_LINGER_MS, connect: bool = True) -> zmq.Socket:
    """A connected PUSH socket that never queues for an absent daemon and never lingers long.

    connect=False leaves the connect() to the caller, e.g. to attach a socket monitor first so
    the handshake event cannot be missed.
    """
    check_endpoint(endpoint, secured=curve is not None, allow_insecure=allow_insecure)
    sock = ctx.socket(zmq.PUSH)
    try:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no pipe until a peer has completed the handshake
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if curve is not None:
            curve.apply(sock)
        if connect:
            sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock
