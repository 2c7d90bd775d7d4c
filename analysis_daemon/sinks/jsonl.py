"""Results file sink: one JSON line per result in `<results-dir>/<run>/analysis.jsonl`.

A record reaches the file whole or not at all. Each line is written with one `os.write` at the end of
an `O_APPEND` descriptor (looping on a partial write) and fsynced; if the write or the fsync fails
(disk full, read-only filesystem, I/O error) the file is truncated back to the size it had before,
so a reader never sees half a line and the next record is never glued onto one.

A record that could not be written is kept in memory and retried, in order, before the next record
and once more at close; so a full disk that is freed again (or a directory made writable again)
costs nothing. The memory kept is bounded (`MAX_PENDING_RECORDS` records and `MAX_PENDING_BYTES`
bytes); past that the oldest kept record is given up, and every record given up (or still unwritten
at close, or not representable as JSON) is counted as lost through `Sink.count_lost`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

from ..files import PRIVATE_FILE_MODE, dir_mode_for, make_dirs, open_for_append
from ..paths import run_dirname
from . import Sink

log = logging.getLogger("embedding_monitor.daemon")

# A result record is about 8 KB (histograms, token lists, insight); 4096 of them cover hours of a
# fast-publishing run on a full disk while holding at most a few tens of MB.
MAX_PENDING_RECORDS = 4096
MAX_PENDING_BYTES = 64 * 1024 * 1024


class _Unwritable(Exception):
    """A line could not be appended; the file was left as it was before the attempt."""

    def __init__(self, run: str, exc: OSError) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.run, self.exc = run, exc


class JsonlSink(Sink):
    """Appends each result as one line, whole or not at all, fsynced before the next result starts."""

    name = "jsonl"

    def __init__(self, results_dir: str | Path, max_pending_records: int = MAX_PENDING_RECORDS,
                 max_pending_bytes: int = MAX_PENDING_BYTES, mode: int = PRIVATE_FILE_MODE) -> None:
        self.results_dir = Path(results_dir)
        # Results name tokens and hold the run's metrics: private (0600, directories 0700) by default.
        self.mode = mode
        self.max_pending_records = max_pending_records
        self.max_pending_bytes = max_pending_bytes
        self._fds: dict[str, int] = {}
        self._pending: deque[tuple[str, int, bytes]] = deque()  # (run, iter, line), oldest first
        self._pending_bytes = 0
        self._failing: str | None = None  # the error of the current failure episode
        self._lost_in_episode = 0

    def path_for(self, run: str) -> Path:
        """The results file of `run`."""
        return self.results_dir / run_dirname(run) / "analysis.jsonl"

    # --- writing ---------------------------------------------------------------------------------
    def _fd(self, run: str) -> int:
        fd = self._fds.get(run)
        if fd is None:
            path = self.path_for(run)
            make_dirs(path.parent, dir_mode_for(self.mode))
            fd = open_for_append(path, self.mode)
            try:
                _repair_tail(fd, path)
            except OSError:
                os.close(fd)
                raise
            self._fds[run] = fd
        return fd

    def _append(self, run: str, line: bytes) -> None:
        """Append `line` whole, or leave the file as it was and raise _Unwritable."""
        try:
            fd = self._fd(run)
            st = os.fstat(fd)
            if st.st_nlink == 0:  # the file was deleted (or rotated away): a write would vanish with it
                self._close_fd(run)
                fd = self._fd(run)
                st = os.fstat(fd)
        except OSError as exc:
            raise _Unwritable(run, exc) from exc
        size = st.st_size
        try:
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                if n <= 0:  # never seen on Linux, but a zero write must not loop forever
                    raise OSError(errno.ENOSPC, "short write")
                view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            # Cut the partial line off; if even that fails, reopen (and repair the tail) next time.
            try:
                os.ftruncate(fd, size)
            except OSError:
                self._close_fd(run)
            raise _Unwritable(run, exc) from exc

    def _close_fd(self, run: str) -> None:
        fd = self._fds.pop(run, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _flush_pending(self) -> bool:
        """Write kept records, oldest first; False (and the rest kept) at the first that still fails."""
        while self._pending:
            run, it, line = self._pending[0]
            try:
                self._append(run, line)
            except _Unwritable as exc:
                self._start_episode(exc, it)
                return False
            self._pending.popleft()
            self._pending_bytes -= len(line)
        return True

    def _keep(self, run: str, it: int, line: bytes) -> None:
        self._pending.append((run, it, line))
        self._pending_bytes += len(line)
        while self._pending and (len(self._pending) > self.max_pending_records
                                 or self._pending_bytes > self.max_pending_bytes):
            old_run, old_iter, old = self._pending.popleft()
            self._pending_bytes -= len(old)
            self._lose(1)
            if self._lost_in_episode == 1:
                log.error("results file: %d unwritten result(s) held in memory (limit %d records, %d MiB); "
                          "giving up the oldest (run %s iter %s) and every further one until the disk "
                          "takes writes again", len(self._pending) + 1, self.max_pending_records,
                          self.max_pending_bytes >> 20, old_run, old_iter)

    def _lose(self, n: int) -> None:
        self._lost_in_episode += n
        self.count_lost(n)

    def _start_episode(self, exc: _Unwritable, it: Any) -> None:
        if self._failing is None:
            self._failing = str(exc)
            self._lost_in_episode = 0
            log.error("results file: cannot write run %s iter %s (%s); keeping unwritten results in "
                      "memory (up to %d) and retrying with each new result", exc.run, it, exc,
                      self.max_pending_records)

    def _end_episode(self, written: int) -> None:
        if self._failing is not None:
            log.warning("results file: writable again; %d held result(s) written, %d lost during the "
                        "episode (%s)", written, self._lost_in_episode, self._failing)
            self._failing = None

    def handle(self, result: dict[str, Any]) -> None:
        """Append `result` (after any results still held back) and make it durable."""
        try:
            line = (json.dumps(result, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
        except (ValueError, TypeError) as exc:  # a value JSON cannot hold: this record cannot be kept
            self.count_lost(1)
            log.error("results file: run %s iter %s cannot be written as JSON, lost: %s: %s",
                      result.get("run"), result.get("iter"), type(exc).__name__, exc)
            return
        run, it = str(result["run"]), result.get("iter")
        held = len(self._pending)
        if self._flush_pending():
            try:
                self._append(run, line)
                self._end_episode(held)
                return
            except _Unwritable as exc:
                self._start_episode(exc, it)
        self._keep(run, it, line)

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """Close the run's file (after retrying held results); a later result reopens it."""
        held = len(self._pending)
        if held and self._flush_pending():
            self._end_episode(held)
        if not any(r == run for r, _, _ in self._pending):
            self._close_fd(run)

    def held_runs(self) -> set[str]:
        """Runs with an open results file or records waiting for the disk (worker thread's view)."""
        return set(self._fds) | {run for run, _, _ in list(self._pending)}

    def close(self) -> None:
        """Retry the held results once more, count what is still unwritten as lost, close every file."""
        held = len(self._pending)
        if held and self._flush_pending():
            self._end_episode(held)
        if self._pending:
            runs = sorted({r for r, _, _ in self._pending})
            log.error("results file: %d result(s) could not be written and are lost (runs: %s): %s",
                      len(self._pending), ", ".join(runs), self._failing)
            self._lose(len(self._pending))
            self._pending.clear()
            self._pending_bytes = 0
        for run in list(self._fds):
            self._close_fd(run)

    @property
    def pending(self) -> int:
        """Results held in memory because they could not be written yet."""
        return len(self._pending)


def _repair_tail(fd: int, path: Path) -> None:
    """Cut a partial last line (left by a crash or an older writer) so the next record starts a line."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        end = start
    else:
        keep = 0
    os.ftruncate(fd, keep)
    log.warning("results file %s ended in a partial line: %d byte(s) cut off", path, size - keep)
