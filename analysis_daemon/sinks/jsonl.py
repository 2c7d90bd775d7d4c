"""Results file sink: one JSON line per result in `<results-dir>/<run>/analysis.jsonl`."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from ..paths import run_dirname
from . import Sink

log = logging.getLogger("embedding_monitor.daemon")
_REPORT_EVERY_S = 60.0  # a persisting write error (disk full) is logged at most this often


class JsonlSink(Sink):
    """Appends each result as one line, flushed and fsynced before the next result starts."""

    name = "jsonl"

    def __init__(self, results_dir: str | Path) -> None:
        self.results_dir = Path(results_dir)
        self._files: dict[str, IO[str]] = {}
        self._failures = 0
        self._last_report = -_REPORT_EVERY_S

    def path_for(self, run: str) -> Path:
        """The results file of `run`."""
        return self.results_dir / run_dirname(run) / "analysis.jsonl"

    def _file(self, run: str) -> IO[str]:
        f = self._files.get(run)
        if f is None:
            path = self.path_for(run)
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._files[run] = open(path, "a", encoding="utf-8")
        return f

    def handle(self, result: dict[str, Any]) -> None:
        """Append `result` and make it durable (a reader or a crash never sees half a line)."""
        # A write error (disk full for a moment, one unwritable run directory, a value JSON cannot
        # hold) costs this one record, never the results file of every later result: this sink is
        # the record of the run, so it does not let SinkSet switch it off.
        try:
            line = json.dumps(result, allow_nan=False, separators=(",", ":")) + "\n"
            f = self._file(result["run"])
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except (OSError, ValueError, TypeError) as exc:
            self._failures += 1
            broken = self._files.pop(result.get("run"), None)
            if broken is not None:  # reopened (append mode) by the next result
                try:
                    broken.close()
                except OSError:
                    pass
            now = time.monotonic()
            if now - self._last_report >= _REPORT_EVERY_S:
                self._last_report = now
                log.error("results file: could not write run %s iter %s (%d failure(s) so far): %s: %s",
                          result.get("run"), result.get("iter"), self._failures, type(exc).__name__, exc)

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """Close the run's file; a later result of the same run reopens it in append mode."""
        f = self._files.pop(run, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        """Close every open results file."""
        for f in self._files.values():
            f.close()
        self._files.clear()
