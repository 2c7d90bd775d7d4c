"""The analysis thread: takes one job at a time from the daemon, runs the pipeline, feeds the sinks.

torch releases the GIL inside its matmuls and reductions, so the receive loop on the main thread keeps
draining the socket (and releasing shared-memory slots) while this thread computes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..pipeline import AnalysisAbandoned, AnalysisSettings, analyse
from ..records import Job, RunInsight

if TYPE_CHECKING:
    from ..sinks import SinkSet
    from .state_store import StateStore

log = logging.getLogger("embedding_monitor.daemon")


class JobSource(Protocol):
    """What the worker needs of the daemon (daemon.Daemon is one): jobs, the sinks, the state dir, callbacks.

    A narrow interface, so that the worker does not import the daemon (which starts it): the methods
    take the daemon's lock themselves.
    """

    @property
    def abandon(self) -> threading.Event:
        """Set at shutdown: the running analysis gives up at its next progress call."""

    @property
    def sinks(self) -> SinkSet:
        """Where results, hellos and run ends go."""

    @property
    def store(self) -> StateStore | None:
        """The --state-dir store, or None."""

    @property
    def runs(self) -> Mapping[str, Any]:
        """The runs the daemon still holds in memory (the worker forgets its state of the others)."""

    def next_task(self) -> Job | tuple[str, dict[str, Any]] | None:
        """The next job, a (run, summary) to close, or None to exit. Blocks."""

    def add_counters(self, job: Job, result: dict[str, Any]) -> None:
        """Count `result` as analysed and write the counters into it (called before the sinks)."""

    def job_finished(self, job: Job) -> None:
        """The worker is done with `job` (result delivered to the sinks, or abandoned)."""

    def mark_closed(self, run: str) -> None:
        """The sinks have been told that `run` ended."""


class AnalysisWorker(threading.Thread):
    """The one thread that runs analyses and calls the sinks, in order, one result at a time."""

    def __init__(self, daemon: JobSource, settings: AnalysisSettings) -> None:
        super().__init__(name="analysis-worker", daemon=True)
        self.daemon_ref = daemon
        self.settings = settings
        self.current: Job | None = None  # read by the main thread at shutdown (for its log line)
        self.fraction_done = 0.0
        self._hello_sent: dict[str, Any] = {}
        self._insight: dict[str, RunInsight] = {}  # per run; only this thread touches it

    def _progress_callback(self, job: Job) -> Callable[[float], None]:
        started = time.monotonic()
        last = [started]
        abandon = self.daemon_ref.abandon

        def progress(fraction: float) -> None:
            self.fraction_done = fraction
            if abandon.is_set():
                raise AnalysisAbandoned(f"abandoned at {fraction:.0%}")
            now = time.monotonic()
            if now - last[0] >= self.settings.progress_interval:
                last[0] = now
                log.info("run %s iter %d: geometry %.0f%% done after %.1f s",
                         job.run, job.current.iter, 100 * fraction, now - started)
        return progress

    def run(self) -> None:
        """Take tasks until the daemon says stop."""
        d = self.daemon_ref
        while True:
            task = d.next_task()
            if task is None:
                return
            try:
                if isinstance(task, Job):
                    self._run_job(task)
                else:
                    run, summary = task
                    d.sinks.run_ended(run, summary)
                    d.mark_closed(run)
                    self._forget_released_runs()
            except Exception as exc:  # a bug here must cost one task, never the daemon's only worker
                log.exception("worker: %s failed: %s: %s", "job" if isinstance(task, Job) else "closing a run",
                              type(exc).__name__, exc)

    def _forget_released_runs(self) -> None:
        # The daemon releases ended runs from memory; drop this thread's per-run state with them.
        live = set(self.daemon_ref.runs)
        for per_run in (self._insight, self._hello_sent):
            for run in [r for r in per_run if r not in live]:
                del per_run[run]

    def _run_job(self, job: Job) -> None:
        d = self.daemon_ref
        self.current, self.fraction_done = job, 0.0
        try:
            self._analyse_and_report(job)
        finally:
            # Whatever happened, the run is free again: a stuck `busy` flag would stop its analyses
            # and keep --exit-on-end from ever exiting.
            self.current = None
            d.job_finished(job)

    def _analyse_and_report(self, job: Job) -> None:
        d = self.daemon_ref
        if job.hello is not None and self._hello_sent.get(job.run) is not job.hello:
            self._hello_sent[job.run] = job.hello
            d.sinks.run_hello(job.run, job.hello)
            if d.store is not None:  # here, not on the receive thread: it fsyncs the whole vocabulary
                try:
                    d.store.save_hello(job.run, job.hello)
                except OSError as exc:
                    log.error("state dir: could not save hello of run %s: %s", job.run, exc)
        if d.store is not None and not job.current.recovered:
            # On disk before the analysis, promoted to baseline only once its result is delivered:
            # a crash in between leaves the old baseline (which has a record) and this snapshot,
            # analysed again at the next start-up.
            try:
                d.store.begin_analysis(job.run, job.current)
            except OSError as exc:
                log.error("state dir: could not save run %s iter %d: %s", job.run, job.current.iter, exc)
        prev_iter = job.previous.iter if job.previous is not None else None
        if job.repeat_of is not None:
            log.warning("run %s iter %d: repeats an iteration (iter %d was analysed already): a trainer resumed "
                        "from a checkpoint? Both records are kept; this one is marked \"repeat\": true",
                        job.run, job.current.iter, job.repeat_of)
        log.info("run %s iter %d: analysing %s %s (drift vs iter %s)", job.run, job.current.iter,
                 "x".join(map(str, job.current.shape)), job.current.dtype, prev_iter)
        try:
            result = analyse(job, self.settings, self._progress_callback(job),
                             self._insight.setdefault(job.run, RunInsight()))
        except AnalysisAbandoned as exc:
            log.warning("run %s iter %d: analysis abandoned on shutdown (%s)", job.run,
                        job.current.iter, exc)
            return
        except Exception as exc:  # analyse() catches math errors itself; this is a daemon bug
            log.exception("run %s iter %d: analysis crashed: %s", job.run, job.current.iter, exc)
            return
        if job.repeat_of is not None:
            result["repeat"], result["resumed_after_iter"] = True, job.repeat_of
        if job.current.recovered:
            result["recovered"] = True  # analysed again after a restart (it was interrupted)
        d.add_counters(job, result)
        log.info("run %s iter %d: analysed in %.2f s", job.run, job.current.iter, result["seconds"])
        # The job is finished (by _run_job) only after this: --exit-on-end must not exit between the
        # analysis and the sinks.
        d.sinks.handle(result)
        if d.store is not None:
            try:
                d.store.commit_analysis(job.run, job.current)
            except OSError as exc:
                log.error("state dir: could not record run %s iter %d as analysed: %s", job.run,
                          job.current.iter, exc)
