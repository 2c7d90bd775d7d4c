"""Reusable host buffers for snapshots in flight, and the copy-completion events of the CUDA path.

A buffer goes out to ZeroMQ zero-copy, so it is reused only after its MessageTracker says libzmq
let go of it; the pool never grows past `size` buffers, so memory is bounded however slow the daemon.
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

import numpy as np
import torch


class CopyEvent(Protocol):
    """Marks the end of an asynchronous device-to-host copy (torch.cuda.Event fits)."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


EventFactory = Callable[[], CopyEvent]


def cuda_event() -> CopyEvent:
    """A CUDA event; record() enqueues it on the current stream, so it fires after the copy before it."""
    return torch.cuda.Event()


class StagingBuffer:
    """One reusable uint8 host buffer (pinned when it receives CUDA copies)."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes, self.pinned = nbytes, pin
        if pin:
            self.data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            # numpy advises huge pages for large arrays (MADV_HUGEPAGE): a fresh buffer's first write
            # then faults 2 MB at a time, about 2x a copy instead of about 8x (bench_hook.py --faults).
            self.data = torch.from_numpy(np.empty(nbytes, dtype=np.uint8))

    def view(self, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        """The buffer seen as a (V, d) tensor of `dtype` (no copy)."""
        return self.data.view(dtype).view(shape)

    def frame(self) -> memoryview:
        """The bytes to hand to ZeroMQ with copy=False (keeps the buffer alive while libzmq holds it)."""
        return memoryview(self.data.numpy())


class StagingPool:
    """At most `size` buffers; acquire() returns None instead of allocating more."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[StagingBuffer] = []
        self._count = 0
        self._lock = threading.Lock()  # acquired on the training thread, released on the sender thread

    def acquire(self, nbytes: int, pin: bool, allocate: bool = True) -> StagingBuffer | None:
        """A free buffer of exactly `nbytes` bytes, or None when all are in flight (or none is free and not `allocate`)."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.nbytes == nbytes and buf.pinned == pin:
                    return self._free.pop(i)
            if not allocate:
                return None
            if self._free:  # wrong size (shape or dtype changed): replace it rather than grow
                self._free.pop()
                self._count -= 1
            if self._count >= self.size:
                return None
            self._count += 1
        try:
            return StagingBuffer(nbytes, pin)
        except BaseException:
            with self._lock:
                self._count -= 1
            raise

    def prepare(self, nbytes: int, pin: bool) -> int:
        """Allocate and touch free buffers of `nbytes` up to the pool size (sender thread); returns how many."""
        made = 0
        while True:
            with self._lock:
                if self._count >= self.size:
                    stale = [b for b in self._free if b.nbytes != nbytes or b.pinned != pin]
                    if not stale:
                        return made
                    self._free.remove(stale[0])  # a buffer of an old size: replace it
                    self._count -= 1
                self._count += 1
            try:
                buf = StagingBuffer(nbytes, pin)
                buf.data.fill_(0)  # fault the pages in here, not in the training thread's first copy
            except BaseException:
                with self._lock:
                    self._count -= 1
                raise
            self.release(buf)
            made += 1

    def release(self, buf: StagingBuffer) -> None:
        """Return a buffer libzmq no longer references."""
        with self._lock:
            self._free.append(buf)

    def in_flight(self) -> int:
        """Buffers handed out and not yet released."""
        with self._lock:
            return self._count - len(self._free)

    def clear(self) -> None:
        """Drop the free buffers (those in flight are freed when libzmq lets go)."""
        with self._lock:
            self._count -= len(self._free)
            self._free.clear()
