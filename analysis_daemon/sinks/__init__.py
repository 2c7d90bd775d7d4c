"""Where results go: one small interface, one module per destination.

A sink gets every result dict (`handle`), hears a run's hello info (`run_hello`), hears when a run has ended (`run_ended`) and is closed once
at shutdown (`close`). Whatever a sink keeps per run it releases at `run_ended` (`held_runs` says what is left). `SinkSet` fans out to all of them (all calls come from the worker thread); a sink that raises is logged once and
dropped, and the others go on. Adding a destination means adding one module here.

Nothing is lost silently: a sink that could not deliver a result calls `count_lost`, and `SinkSet` keeps
the count per sink (`lost_by_sink`); a result given to a sink already disabled counts as lost for it too.
The daemon writes those counts into every record's `daemon_counters` and its final "stopped" line.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger("embedding_monitor.daemon")


class Sink:
    """Base class of every result destination."""

    name = "sink"
    on_lost: Callable[[str, int], None] | None = None  # set by SinkSet

    def handle(self, result: dict[str, Any]) -> None:
        """Take one analysis result (the JSONL record's dict)."""
        raise NotImplementedError

    def handle_arrays(self, result: dict[str, Any], arrays: Any) -> None:
        """Take the per-token arrays (a pipeline.TokenArrays) of `result`; default: not stored."""

    def run_hello(self, run: str, hello: Any) -> None:
        """The trainer of `run` introduced itself (a `HelloInfo`); default: nothing to do."""

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """The trainer run `run` has ended and all its work is done (default: nothing to do)."""

    def close(self) -> None:
        """Flush and release everything; called once at shutdown."""

    def held_runs(self) -> set[str]:
        """Runs this sink keeps state for now (any thread): a run's state goes when it ends, so a
        long-lived daemon does not grow with the runs it has served."""
        return set()

    def count_lost(self, n: int = 1) -> None:
        """Report `n` results this sink could not deliver (any thread)."""
        if self.on_lost is not None and n > 0:
            self.on_lost(self.name, n)


class SinkSet:
    """Fans results out to several sinks, isolating their failures from each other."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = list(sinks)
        self.disabled: list[str] = []
        self._lost: dict[str, int] = {}
        self._lost_lock = threading.Lock()  # the wandb sink reports from its own thread
        for sink in self.sinks:
            sink.on_lost = self._count_lost

    def _count_lost(self, sink_name: str, n: int) -> None:
        with self._lost_lock:
            self._lost[sink_name] = self._lost.get(sink_name, 0) + n

    def counters(self) -> dict[str, Any]:
        """`lost` and `lost_by_sink`, for the daemon's counters."""
        with self._lost_lock:
            return {"lost": sum(self._lost.values()), "lost_by_sink": dict(self._lost)}

    def _call(self, what: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, what)(*args)
            except Exception as exc:  # a broken sink must never stop the analysis or the others
                log.error("sink %s failed in %s, disabled from now on (its results are counted as lost): "
                          "%s: %s", sink.name, what, type(exc).__name__, exc)
                self.sinks.remove(sink)
                self.disabled.append(sink.name)
                if what == "handle":
                    self._count_lost(sink.name, 1)
                try:
                    sink.close()
                except Exception:
                    pass

    def handle(self, result: dict[str, Any]) -> None:
        """Give `result` to every sink still working (a disabled sink counts it as lost).

        The per-token arrays (pipeline.TOKEN_ARRAYS) are taken out first: the record every sink sees is
        plain JSON; the sinks that store arrays get them through `handle_arrays` afterwards.
        """
        from ..records import TOKEN_ARRAYS

        arrays = result.pop(TOKEN_ARRAYS, None)
        for name in self.disabled:
            self._count_lost(name, 1)
        self._call("handle", result)
        if arrays is not None:
            self._call("handle_arrays", result, arrays)

    def run_hello(self, run: str, hello: Any) -> None:
        """Tell every sink what the trainer of `run` said about itself."""
        self._call("run_hello", run, hello)

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """Tell every sink that `run` ended."""
        self._call("run_ended", run, summary)

    def held_runs(self) -> dict[str, int]:
        """Per sink, how many runs it keeps state for (for the daemon's per-run state line)."""
        return {sink.name: len(sink.held_runs()) for sink in list(self.sinks)}

    def close(self) -> None:
        """Close every sink (errors logged, never raised)."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("sink %s failed to close: %s: %s", sink.name, type(exc).__name__, exc)
        self.sinks = []
