"""Results file sink: one JSON line per result in `<results-dir>/<run>/analysis.jsonl`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from ..paths import run_dirname
from . import Sink


class JsonlSink(Sink):
    """Appends each result as one line, flushed and fsynced before the next result starts."""

    name = "jsonl"

    def __init__(self, results_dir: str | Path) -> None:
        self.results_dir = Path(results_dir)
        self._files: dict[str, IO[str]] = {}

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
        f = self._file(result["run"])
        f.write(json.dumps(result, allow_nan=False, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())

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
