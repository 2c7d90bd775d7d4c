"""Remove the publisher's shared-memory segments when the trainer is stopped by a signal.

SIGTERM and SIGHUP kill a Python process without running atexit, so close() never unlinks the
segments; they would stay in /dev/shm until a daemon's start-up sweep. The handler installed here
unlinks the names of every live writer's segments and then hands the signal on: to the handler that
was installed before (the trainer's own, Lightning's, torchelastic's), or to the default action
(SIGINT: KeyboardInterrupt; SIGTERM/SIGHUP: the process dies of the signal, exit status included).
A signal the process ignores stays ignored, and one whose handler was set outside Python is left alone.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import weakref
from typing import Any, Protocol

log = logging.getLogger("embedding_monitor.hook")

SIGNALS: tuple[int, ...] = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


class _Unlinkable(Protocol):
    def unlink_all(self) -> None: ...


_writers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_previous: dict[int, Any] = {}  # signal -> the handler ours replaced


def _handler(signum: int, frame: Any) -> None:
    for writer in list(_writers):
        writer.unlink_all()  # lock-free: the interrupted main thread may hold the writer's lock
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif signum == signal.SIGINT:
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without us
    else:
        # The default action: die of this signal, so the exit status says so (e.g. 143 for SIGTERM).
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def unlink_on_signal(writer: _Unlinkable) -> None:
    """Unlink `writer`'s segments on SIGTERM/SIGINT/SIGHUP, then chain to the previous handling."""
    _writers.add(writer)
    if threading.current_thread() is not threading.main_thread():
        log.debug("embedding publisher created off the main thread: no signal handlers (atexit still cleans up)")
        return
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current is _handler or current is None or current == signal.SIG_IGN:
            continue  # already ours, set outside Python (cannot chain), or ignored on purpose
        _previous[signum] = current
        signal.signal(signum, _handler)


def forget(writer: _Unlinkable) -> None:
    """`writer` was closed: nothing of it to unlink any more."""
    _writers.discard(writer)
