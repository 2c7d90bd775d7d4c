"""Shared-memory slots: the same-host payload path (Linux /dev/shm, one POSIX segment per slot).

Slot layout: a 64-byte header of little-endian u64 words, then the payload (64-byte aligned):
    magic | state | seq | nbytes
`seq` is a seqlock word: the writer makes it odd before touching the payload and even (and larger)
when the payload is complete; the header sent over the socket carries that even value. The reader
copies the payload out, checks `seq` again (unchanged: the copy is intact), and sets `state` back to
FREE: that is the whole back channel. The writer only reuses a slot that is FREE, or one that nobody
released within a timeout (a reader that died); a reader racing such a reuse sees `seq` change.
"""
from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import numpy as np

from .messages import SHM_NAME_RE, SHM_PREFIX, ProtocolError, ShmRef

SHM_DIR: Final[Path] = Path("/dev/shm")
SLOT_MAGIC: Final[int] = int.from_bytes(b"EMONSLT1", "little")
HEADER_BYTES: Final[int] = 64
FREE: Final[int] = 0  # reader released it (or never used)
WRITING: Final[int] = 1  # the publisher is filling it
READY: Final[int] = 2  # complete, waiting for the reader

_WORDS = struct.Struct("<QQQQ")  # magic, state, seq, nbytes
_STATE_AT, _SEQ_AT = 8, 16
_READ_CHUNK = 4 * 1024 * 1024  # bytes per preadv call when copying a payload out


def shm_available(directory: Path = SHM_DIR) -> bool:
    """True where POSIX shared memory is reachable as files (Linux /dev/shm)."""
    return directory.is_dir() and os.access(directory, os.W_OK)


def _map(fd: int, size: int, populate: bool) -> mmap.mmap:
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


@dataclass
class _Slot:
    index: int
    name: str
    nbytes: int
    mm: mmap.mmap
    ready_since: float = 0.0  # monotonic time the slot became READY
    expired: bool = False  # its reader is known to be gone: reuse it without waiting

    def words(self) -> tuple[int, int, int, int]:
        return _WORDS.unpack_from(self.mm, 0)

    def payload(self) -> memoryview:
        return memoryview(self.mm)[HEADER_BYTES:HEADER_BYTES + self.nbytes]


class ShmWriter:
    """Publisher side: a small ring of reusable slots, created lazily, unlinked by close()."""

    def __init__(self, slots: int = 2, *, reclaim_after_s: float = 30.0, directory: Path = SHM_DIR,
                 secret: str | None = None) -> None:
        self.directory = directory
        self.reclaim_after_s = reclaim_after_s
        # The secret goes into this publisher's id (see publisher_id); the names carry only its hash.
        self.secret = secret or secrets.token_hex(16)
        self.prefix = f"{SHM_PREFIX}{os.getpid()}-{shm_token(self.secret)}"
        self._slots: list[_Slot | None] = [None] * slots
        self._generation = 0
        self._preparing: set[int] = set()  # slot indices the sender thread is creating right now
        self._lock = threading.Lock()  # acquire/commit may run on the training or the sender thread
        self.reclaimed = 0  # slots taken back from a reader that never released them
        self.timed_out = 0  # ... of those, taken back because reclaim_after_s passed while connected
        self.released = 0  # slots a reader released (proof that shared memory reaches the receiver)
        self._unlinked = False  # set by unlink_all() (a signal handler): recreate slots before reuse

    def _create(self, index: int, nbytes: int, generation: int | None = None) -> _Slot:
        if generation is None:
            self._generation += 1
            generation = self._generation
        name = f"{self.prefix}-{index}-{generation}"
        size = HEADER_BYTES + nbytes
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # fallocate reserves the pages now: a full /dev/shm fails here with ENOSPC instead of
            # killing the trainer with SIGBUS on the first write; MAP_POPULATE pre-faults the mapping.
            os.posix_fallocate(fd, 0, size)
            mm = _map(fd, size, populate=True)
        except BaseException:
            os.unlink(self.directory / name)
            raise
        finally:
            os.close(fd)
        _WORDS.pack_into(mm, 0, SLOT_MAGIC, FREE, 0, nbytes)
        return _Slot(index, name, nbytes, mm)

    def _drop(self, slot: _Slot) -> None:
        self._slots[slot.index] = None
        self._drop_unlisted(slot)

    def _drop_unlisted(self, slot: _Slot) -> None:
        try:
            slot.mm.close()
        except BufferError:  # a payload view is still alive somewhere; the unlink below still frees the name
            pass
        try:
            os.unlink(self.directory / slot.name)
        except FileNotFoundError:
            pass

    def acquire(self, nbytes: int) -> _Slot | None:
        """A slot marked WRITING with room for `nbytes`, or None when all are in use (caller drops)."""
        now = time.monotonic()
        with self._lock:
            if self._unlinked:  # a signal removed the segments but the process lives on: start afresh
                self._unlinked = False
                for slot in list(self._slots):
                    if slot is not None:
                        self._drop(slot)
            for i, slot in enumerate(self._slots):
                if i in self._preparing:
                    continue  # being created off the training thread: never create it twice here
                if slot is not None:
                    _, state, _, _ = slot.words()
                    timed_out = now - slot.ready_since > self.reclaim_after_s
                    if state == READY and (slot.expired or timed_out):
                        self.reclaimed += 1  # the reader is gone or stuck: take the slot back
                        self.timed_out += 0 if slot.expired else 1
                    elif state != FREE:
                        continue
                    if slot.nbytes != nbytes:
                        self._drop(slot)
                        slot = None
                if slot is None:
                    slot = self._slots[i] = self._create(i, nbytes)
                _, _, seq, _ = slot.words()
                # odd seq first, then state: a reader still copying the old payload sees the change
                struct.pack_into("<Q", slot.mm, _SEQ_AT, seq + 1 if seq % 2 == 0 else seq)
                struct.pack_into("<Q", slot.mm, _STATE_AT, WRITING)
                return slot
        return None

    def prepare(self, nbytes: int) -> int:
        """Create (and fault in) every missing slot for `nbytes` now, off the training thread; returns how many.

        Creation runs without the lock, so a publish on the training thread meanwhile takes another
        slot (or drops) instead of waiting for gigabytes to be populated.
        """
        made = 0
        for i in range(len(self._slots)):
            with self._lock:
                slot = self._slots[i]
                if slot is not None and (slot.nbytes == nbytes or slot.words()[1] != FREE):
                    continue
                if slot is not None:
                    self._drop(slot)  # a free slot of an old size
                self._generation += 1
                generation = self._generation
                self._preparing.add(i)
            try:
                fresh = self._create(i, nbytes, generation)
            finally:
                with self._lock:
                    self._preparing.discard(i)
            with self._lock:
                if self._slots[i] is None:
                    self._slots[i] = fresh
                    made += 1
                    continue
            self._drop_unlisted(fresh)  # the training thread created this slot meanwhile
        return made

    def commit(self, slot: _Slot) -> ShmRef:
        """Mark a filled slot READY and return the reference to send."""
        with self._lock:
            _, _, seq, _ = slot.words()
            seq += 1  # even again: the payload is complete
            struct.pack_into("<Q", slot.mm, _SEQ_AT, seq)
            struct.pack_into("<Q", slot.mm, _STATE_AT, READY)
            slot.ready_since = time.monotonic()
            slot.expired = False
            return ShmRef(segment=slot.name, offset=HEADER_BYTES, slot_seq=seq)

    def release(self, slot: _Slot) -> None:
        """Give a slot back unsent (the header could not be sent)."""
        with self._lock:
            struct.pack_into("<Q", slot.mm, _STATE_AT, FREE)

    def note_released(self) -> int:
        """Count slots the reader released since the last call (READY -> FREE) and return that count."""
        n = 0
        with self._lock:
            for slot in self._slots:
                if slot is not None and slot.ready_since and slot.words()[1] == FREE:
                    slot.ready_since = 0.0
                    n += 1
        self.released += n
        return n

    def expire(self) -> None:
        """The receiver went away: slots it did not release may be reused at once (a late read sees seq change)."""
        with self._lock:
            for slot in self._slots:
                if slot is not None:
                    slot.expired = True

    def busy(self) -> int:
        """Slots still WRITING or READY (not yet released by the reader)."""
        with self._lock:
            return sum(1 for s in self._slots if s is not None and s.words()[1] != FREE)

    def names(self) -> list[str]:
        """Names of the segments that exist now."""
        return [s.name for s in self._slots if s is not None]

    def unlink_all(self) -> None:
        """Remove every segment's name now, without the lock: safe inside a signal handler.

        A handler runs on the main thread between two bytecodes, possibly while that thread holds
        `_lock` in acquire(); taking it here would deadlock. Unlinking only removes the names (the
        mappings stay valid); a later acquire() replaces the slots with fresh segments.
        """
        self._unlinked = True
        for slot in list(self._slots):
            if slot is not None:
                try:
                    os.unlink(self.directory / slot.name)
                except OSError:
                    pass

    def close(self) -> None:
        """Unmap and unlink every slot (idempotent)."""
        with self._lock:
            for slot in list(self._slots):
                if slot is not None:
                    self._drop(slot)


class ShmReader:
    """Receiver side: reads a slot named in a snapshot header into memory of its own, checking it first.

    Every segment is hostile until checked, on every read (nothing is cached between reads): opened
    without following links, a regular file with one link, owned by this process's uid or one in
    `allowed_uids`, not writable by group or others (our publishers create 0600), and fstat'ed large
    enough for the payload. The payload is copied with preadv(2) into our own buffer, never through a
    mapping: a segment truncated by its owner mid-read yields a short read (an error), not SIGBUS.
    """

    def __init__(self, directory: Path = SHM_DIR, max_open: int = 16, allowed_uids: Iterable[int] = ()) -> None:
        self.directory = directory
        self.max_open = max_open  # kept for compatibility: no mapping or descriptor outlives a read
        self.allowed_uids = frozenset({os.geteuid(), *allowed_uids})

    def _open_checked(self, name: str) -> tuple[int, os.stat_result]:
        flags = os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK  # no FIFO hang
        try:
            fd = os.open(self.directory / name, flags)
        except FileNotFoundError:
            raise ProtocolError(f"shm: segment {name!r} does not exist (publisher gone or slot recreated)") from None
        except OSError as exc:
            raise ProtocolError(f"shm: cannot open segment {name!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise ProtocolError(f"shm: segment {name!r} is not a plain file with one link")
            if st.st_uid not in self.allowed_uids:
                raise ProtocolError(f"shm: segment {name!r} is owned by uid {st.st_uid}, not by this daemon's "
                                    f"uid or an allowed one ({sorted(self.allowed_uids)}; see --allow-uid)")
            if st.st_mode & 0o022:
                raise ProtocolError(f"shm: segment {name!r} is writable by group or others (mode "
                                    f"{stat.S_IMODE(st.st_mode):o}); our publishers create 0600 segments")
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def copy_out(self, ref: ShmRef, nbytes: int) -> np.ndarray:
        """Copy a slot's payload into fresh memory (uint8), verify it was not overwritten, release the slot."""
        fd, st = self._open_checked(ref.segment)
        try:
            if ref.offset < HEADER_BYTES or ref.offset + nbytes > st.st_size:
                raise ProtocolError(f"shm: segment {ref.segment!r} of {st.st_size} bytes cannot hold {nbytes} "
                                    f"bytes at offset {ref.offset}")
            header = os.pread(fd, _WORDS.size, 0)
            if len(header) != _WORDS.size:
                raise ProtocolError(f"shm: segment {ref.segment!r} was truncated (no slot header)")
            magic, state, seq, slot_nbytes = _WORDS.unpack(header)
            if magic != SLOT_MAGIC:
                raise ProtocolError(f"shm: segment {ref.segment!r} has no slot header (magic {magic:#x})")
            if seq != ref.slot_seq or state != READY:
                raise ProtocolError(f"shm: slot {ref.segment!r} was overwritten or released (seq {seq}, header says {ref.slot_seq})")
            if slot_nbytes != nbytes:
                raise ProtocolError(f"shm: slot {ref.segment!r} holds {slot_nbytes} bytes, header nbytes={nbytes}")
            out = np.empty(nbytes, dtype=np.uint8)
            view = memoryview(out)
            done = 0
            while done < nbytes:  # in 4 MiB pieces (measured a little faster than one call; bench_shm_read.py)
                n = os.preadv(fd, [view[done:done + _READ_CHUNK]], ref.offset + done)
                if n <= 0:
                    raise ProtocolError(f"shm: segment {ref.segment!r} was truncated while being read "
                                        f"({done} of {nbytes} bytes)")
                done += n
            del view
            if _WORDS.unpack(os.pread(fd, _WORDS.size, 0).ljust(_WORDS.size, b"\0"))[2] != ref.slot_seq:
                raise ProtocolError(f"shm: slot {ref.segment!r} was overwritten while being read (seq {ref.slot_seq} changed)")
            os.pwrite(fd, struct.pack("<Q", FREE), _STATE_AT)  # release: the writer may reuse the slot
            return out
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing is held between reads; kept so callers can close a reader unconditionally."""


def shm_token(secret: str) -> str:
    """The part of a segment name that binds it to a publisher: 96 bits of SHA-256 of the publisher's secret.

    The secret travels only inside the publisher id of its messages (to the daemon); segment names
    are visible to every local user in /dev/shm, so they carry the hash, never the secret.
    """
    return hashlib.sha256(secret.encode("ascii", "replace")).hexdigest()[:24]


def publisher_id(host: str, pid: int, secret: str) -> str:
    """The publisher id sent in every message: host/pid/secret."""
    return f"{host}/{pid}/{secret}"


def public_publisher_id(publisher: str) -> str:
    """`publisher` with its secret replaced by the public hash prefix its segment names show: for logs."""
    parts = publisher.rsplit("/", 2)
    if len(parts) != 3:
        return publisher
    return f"{parts[0]}/{parts[1]}/#{shm_token(parts[2])[:8]}"


def segment_belongs_to(segment: str, publisher: str) -> bool:
    """True when `segment` was created by the publisher whose id is `publisher` (same pid, token of its secret)."""
    match = SHM_NAME_RE.match(segment)
    parts = publisher.rsplit("/", 2)
    if match is None or len(parts) != 3 or not parts[2]:
        return False
    _, pid, secret = parts
    return match.group(1) == pid and hmac.compare_digest(match.group(2), shm_token(secret))


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (in this pid namespace)."""
    if pid <= 0:
        return True  # 0 and negative pids name process groups, never a publisher: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_segments(directory: Path = SHM_DIR) -> int:
    """Unlink our slot segments whose creating publisher process no longer exists; returns how many."""
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in os.scandir(directory):
        match = SHM_NAME_RE.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed += 1
            except (FileNotFoundError, PermissionError):
                pass
    return removed


def segments_of(pid: int, directory: Path = SHM_DIR) -> list[str]:
    """Names of our segments created by process `pid` (for tests and diagnostics)."""
    pattern = re.compile(rf"^{re.escape(SHM_PREFIX)}{pid}-")
    return sorted(e.name for e in os.scandir(directory) if pattern.match(e.name)) if directory.is_dir() else []


def remove_segments_of(pid: int, directory: Path = SHM_DIR) -> int:
    """Unlink the segments of publisher process `pid` if that process is gone; returns how many."""
    if pid_alive(pid):
        return 0  # a live publisher still owns (and may be writing) them
    removed = 0
    for name in segments_of(pid, directory):
        try:
            os.unlink(directory / name)
            removed += 1
        except (FileNotFoundError, PermissionError):
            pass
    return removed
