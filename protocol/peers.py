"""Who is on the other end of a connection: the *source* that limits, fairness and run ownership go by.

A source is the strongest identity the kernel or the handshake gives us for a peer:
- `key:sha256:<16 hex>`: a CurveZMQ client, by its (authorised) public key;
- `uid:N`: a peer on this host, by the user id owning its socket: SO_PEERCRED for ipc://, the owner
  column of /proc/net/tcp{,6} for a loopback tcp:// connection (Linux shows every socket's owner);
- `addr:IP`: a remote tcp:// peer without keys (or a loopback one whose owner could not be read).

The daemon learns the file descriptor of each accepted connection from libzmq's monitor (ACCEPTED) and of
each message (ZMQ_SRCFD), and resolves it here. A descriptor is only ever judged while it is a connection
to our own listening address (checked with getsockname), so a closed and reused number is never mistaken.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

OWN_UID: Final[int] = os.getuid()
_TCP_TABLES: Final[tuple[str, ...]] = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True)
class Source:
    """One peer identity: `key` groups connections and runs (limits, fairness), `label` is for log lines."""

    key: str
    label: str

    @property
    def uid(self) -> int | None:
        """The local user id, for a `uid:N` source."""
        return int(self.key[4:]) if self.key.startswith("uid:") else None


UNKNOWN = Source("addr:?", "an unknown peer")


def _hex_addr(ip: str, port: int) -> str:
    # /proc/net/tcp writes addresses as the kernel's in-memory words in host order (little-endian here).
    packed = ipaddress.ip_address(ip).packed
    words = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
    return f"{words.hex().upper()}:{port:04X}"


class TcpTable:
    """The owners of this host's TCP sockets, read once from /proc/net/tcp{,6} when first asked: one read
    serves a whole batch of accepted connections (under a flood the tables hold thousands of lines)."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, str], int] | None = None
        self._reads = 0

    def owner(self, peer: tuple[str, int], local: tuple[str, int]) -> int | None:
        """The uid owning the client socket of a loopback connection peer -> local."""
        key = (_hex_addr(peer[0], peer[1]), _hex_addr(local[0], local[1]))
        if self._owners is None or (key not in self._owners and self._reads < 4):
            self._read()  # first use, or a connection newer than the last read (a few re-reads per batch)
        return self._owners.get(key) if self._owners is not None else None

    def _read(self) -> None:
        self._reads += 1
        owners: dict[tuple[str, str], int] = {}
        for table in _TCP_TABLES:
            try:
                with open(table, encoding="ascii") as f:
                    next(f, None)
                    for line in f:
                        fields = line.split()
                        if len(fields) > 7 and fields[3] != "06":  # not TIME_WAIT: those have no owner
                            owners[(fields[1], fields[2])] = int(fields[7])
            except (OSError, ValueError):
                continue
        self._owners = owners


def _ipc_uid(sock: socket.socket) -> int | None:
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17), struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", cred)[1]


def resolve_fd(fd: int, listening: object, table: TcpTable | None = None) -> tuple[Source | None, socket.socket | None]:
    """The source of the connection on descriptor `fd`, when it is one of ours (its local address is
    `listening`: the (host, port) or ipc path we bound), with a duplicate socket to act on; else (None, None)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None, None
    try:
        local = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            if listening is None or local != listening:
                raise OSError("not our connection")
            uid = _ipc_uid(sock)
            src = Source(f"uid:{uid}", f"uid {uid} (ipc)") if uid is not None else UNKNOWN
            return src, sock
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or listening is None:
            raise OSError("not our connection")
        if not isinstance(listening, tuple) or local[1] != listening[1]:
            raise OSError("not our connection")
        peer = sock.getpeername()
        ip = peer[0]
        if ipaddress.ip_address(ip).is_loopback:
            uid = (table or TcpTable()).owner((ip, peer[1]), (local[0], local[1]))
            if uid is not None:
                return Source(f"uid:{uid}", f"{ip} (uid {uid})"), sock
        return Source(f"addr:{ip}", ip), sock
    except (OSError, ValueError):
        sock.close()
        return None, None


def from_zap_address(address: str) -> Source | None:
    """The source libzmq names in a ZAP request for an ipc peer ("localhost:UID:GID:PID"), else None."""
    parts = address.rsplit(":", 3)
    if len(parts) == 4 and parts[1].isdigit():
        return Source(f"uid:{parts[1]}", f"uid {parts[1]} (ipc)")
    return None


def still_connected(fd: int, listening: object) -> bool:
    """Whether descriptor `fd` is still a connected socket on our listening address (cheap: no uid lookup)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        local = sock.getsockname()
        sock.getpeername()
        return local == listening if sock.family == socket.AF_UNIX else (
            isinstance(listening, tuple) and local[1] == listening[1])
    except OSError:
        return False
    finally:
        sock.close()
