"""Where results go: one small interface, one module per destination.

A sink gets every result dict (`handle`), hears a run's hello info (`run_hello`), hears when a run has ended (`run_ended`) and is closed once
at shutdown (`close`). `SinkSet` fans out to all of them (all calls come from the worker thread); a sink that raises is logged once and
dropped, and the others go on. Adding a destination means adding one module here.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("embedding_monitor.daemon")


class Sink:
    """Base class of every result destination."""

    name = "sink"

    def handle(self, result: dict[str, Any]) -> None:
        """Take one analysis result (the JSONL record's dict)."""
        raise NotImplementedError

    def run_hello(self, run: str, hello: Any) -> None:
        """The trainer of `run` introduced itself (a `HelloInfo`); default: nothing to do."""

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """The trainer run `run` has ended and all its work is done (default: nothing to do)."""

    def close(self) -> None:
        """Flush and release everything; called once at shutdown."""


class SinkSet:
    """Fans results out to several sinks, isolating their failures from each other."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = list(sinks)

    def _call(self, what: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, what)(*args)
            except Exception as exc:  # a broken sink must never stop the analysis or the others
                log.error("sink %s failed in %s, disabled from now on: %s: %s",
                          sink.name, what, type(exc).__name__, exc)
                self.sinks.remove(sink)
                try:
                    sink.close()
                except Exception:
                    pass

    def handle(self, result: dict[str, Any]) -> None:
        """Give `result` to every sink still working."""
        self._call("handle", result)

    def run_hello(self, run: str, hello: Any) -> None:
        """Tell every sink what the trainer of `run` said about itself."""
        self._call("run_hello", run, hello)

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """Tell every sink that `run` ended."""
        self._call("run_ended", run, summary)

    def close(self) -> None:
        """Close every sink (errors logged, never raised)."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("sink %s failed to close: %s: %s", sink.name, type(exc).__name__, exc)
        self.sinks = []
