"""Who publishes for which run, when each publisher was last heard from, and which ones are gone.

Liveness is kept per publisher (the id every message carries), not per run: a run may have several
publishers (the ranks of a sharded run each send their own part), and it ends once every one of them
sent `end` or is gone. A publisher is gone when it has been silent for longer than the run timeout
(its sender thread heartbeats every few seconds, so silence means a dead, stopped or cut-off trainer),
or at once when it runs on this host and its process no longer exists (the hello names host and pid).

A second publisher for a run name that already has a live publisher of the same rank (two trainers
started with one name, a restarted trainer while the old one still runs) is kept apart: its messages
go to the run `<name>.pub-<tag>`, tag = 8 hex digits of its publisher id, so its drift is never measured
against the other trainer's snapshots. A publisher whose predecessor ended or is gone takes the
name over (a trainer resumed from a checkpoint continues its run).

Everything here runs on the daemon's receive thread under the daemon's lock; nothing locks itself.
"""
from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass
from typing import Any

from protocol import pid_alive
from protocol.shm import public_publisher_id

DEFAULT_RUN_TIMEOUT_S = 60.0  # twelve heartbeats (5 s) missed: a loaded host does not look dead
_PID_GRACE_S = 1.0  # a dead pid's last messages may still be in the socket queue this long


def publisher_tag(publisher: str) -> str:
    """Short stable tag of a publisher id, used to suffix the run name of a second publisher."""
    return hashlib.sha256(publisher.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _rank(hello: Any) -> int:
    # The hello's rank (each rank of a sharded run has its own publisher); 0 without a hello.
    rank = getattr(hello, "rank", 0)
    return rank if type(rank) is int else 0


@dataclass
class Publisher:
    """One trainer process sending for one run."""

    key: tuple[str, str]  # (run name as sent, publisher id); the id is "" for senders that give none
    run: str  # the run its messages go to: the name as sent, or name~tag when kept apart
    rank: int = 0
    pid: int | None = None
    host: str | None = None
    last_seen: float = 0.0  # monotonic
    gone: str | None = None  # why it no longer counts as alive (None: alive)
    source: str | None = None  # the source (protocol/peers.py) it first spoke from; later messages must match

    def describe(self) -> str:
        """`pid N on HOST` or the id, for log lines."""
        if self.pid is not None:
            return f"pid {self.pid} on {self.host or '?'}"
        # Never the raw id: it carries the secret that binds the publisher's shared-memory segments.
        return f"publisher {public_publisher_id(self.key[1])!r}" if self.key[1] else "an anonymous publisher"


class Publishers:
    """The daemon's table of publishers; see the module docstring."""

    def __init__(self, timeout_s: float = DEFAULT_RUN_TIMEOUT_S, hostname: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.hostname = hostname or socket.gethostname()
        self._by_key: dict[tuple[str, str], Publisher] = {}

    def route(self, run: str, publisher: str, *, hello: Any = None,
              now: float | None = None) -> tuple[Publisher, str | None]:
        """The publisher of a message (registered on first sight) and a warning when it is kept apart."""
        now = time.monotonic() if now is None else now
        key = (run, publisher)
        pub = self._by_key.get(key)
        warning = None
        if pub is None:
            rank = _rank(hello)
            rival = next((p for p in self._by_key.values() if p.key[0] == run and p.key[1] != publisher
                          and p.run == run and p.rank == rank and p.gone is None), None)
            target = run
            if rival is not None:
                target = f"{run}.pub-{publisher_tag(publisher)}"
                warning = (f"run {run}: a second publisher ({public_publisher_id(publisher)!r}) while {rival.describe()} still "
                           f"publishes it: kept apart as run {target}, never mixed into {run}'s drift")
            pub = self._by_key[key] = Publisher(key=key, run=target, rank=rank)
        if hello is not None:
            pub.pid, pub.host = hello.pid, hello.host
        pub.last_seen = now
        pub.gone = None  # heard from again: alive (a stalled trainer that resumed)
        return pub, warning

    def known(self, run: str, publisher: str) -> Publisher | None:
        """The registered publisher of (run as sent, id), if any."""
        return self._by_key.get((run, publisher))

    def of_all(self) -> list[Publisher]:
        """Every publisher in the table."""
        return list(self._by_key.values())

    def of_run(self, run: str) -> list[Publisher]:
        """Publishers whose messages go to `run`."""
        return [p for p in self._by_key.values() if p.run == run]

    def live(self, run: str) -> int:
        """How many publishers of `run` are alive."""
        return sum(1 for p in self._by_key.values() if p.run == run and p.gone is None)

    def all_gone(self, run: str) -> bool:
        """True when no publisher of `run` is alive (an unknown run has none)."""
        return all(p.gone is not None for p in self.of_run(run))

    def same_host(self, pub: Publisher) -> bool:
        """Whether `pub` runs on this host (its pid and /dev/shm segments are ours to check)."""
        return pub.pid is not None and pub.host == self.hostname

    def expired(self, now: float | None = None) -> list[Publisher]:
        """Publishers that just went from alive to gone (silent too long, or their process died)."""
        now = time.monotonic() if now is None else now
        out = []
        for pub in self._by_key.values():
            if pub.gone is not None:
                continue
            silent = now - pub.last_seen
            if silent > self.timeout_s:
                pub.gone = f"silent for {silent:.0f} s (--run-timeout {self.timeout_s:g})"
            elif (silent > min(_PID_GRACE_S, self.timeout_s) and self.same_host(pub)
                  and not pid_alive(pub.pid)):  # type: ignore[arg-type]
                pub.gone = f"publisher process {pub.pid} is gone (no end message)"
            else:
                continue
            out.append(pub)
        return out

    def end_run(self, run: str, reason: str) -> None:
        """Mark every publisher of `run` gone (the run was ended for `reason`)."""
        for pub in self.of_run(run):
            if pub.gone is None:
                pub.gone = reason

    def drop(self, pub: Publisher) -> None:
        """Forget one publisher (its run was refused)."""
        if self._by_key.get(pub.key) is pub:
            del self._by_key[pub.key]

    def forget_run(self, run: str) -> None:
        """Drop the entries of a run released from memory (so the table stays bounded)."""
        for key in [k for k, p in self._by_key.items() if p.run == run and p.gone is not None]:
            del self._by_key[key]
