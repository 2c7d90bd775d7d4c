"""The analysis thread: takes jobs from the daemon, has its executor run the pipeline, feeds the sinks.

torch releases the GIL inside its matmuls and reductions, so the receive loop on the main thread keeps
draining the socket (and releasing shared-memory slots) while this thread computes.
With an executor of several slots (--executor ray), up to that many jobs (of different runs: the
daemon hands out one job per run at a time) are analysed at once, each waited for on a lane thread of
this worker; reporting to the sinks and the state dir stays one result at a time (`_report_lock`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..pipeline import AnalysisAbandoned, AnalysisSettings
from ..records import Job, RunInsight
from .executor import Executor, InProcessExecutor, TaskLost

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

    def __init__(self, daemon: JobSource, settings: AnalysisSettings, executor: Executor | None = None) -> None:
        super().__init__(name="analysis-worker", daemon=True)
        self.daemon_ref = daemon
        self.settings = settings
        self.executor: Executor = executor if executor is not None else InProcessExecutor()
        self._slots = threading.BoundedSemaphore(max(1, self.executor.slots))
        self._report_lock = threading.RLock()  # sinks and state dir: one result at a time
        self.lost_tasks = 0  # analyses whose task failed twice (executor.TaskLost), logged with the reason
        self.current: Job | None = None  # read by the main thread at shutdown (for its log line)
        self.fraction_done = 0.0
        self._hello_sent: dict[str, Any] = {}
        self._insight: dict[tuple[str, str], RunInsight] = {}  # per (run, tensor); only this thread touches it

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
        """Take tasks until the daemon says stop (then wait for the analyses in flight and close the executor)."""
        lanes = ThreadPoolExecutor(self.executor.slots, thread_name_prefix="analysis-lane") \
            if self.executor.slots > 1 else None
        try:
            self._take_tasks(lanes)
        finally:
            if lanes is not None:
                lanes.shutdown(wait=True)
            if self.lost_tasks:
                log.error("executor %s: %d analysis task(s) lost (each logged with its reason)",
                          self.executor.name, self.lost_tasks)
            try:
                self.executor.close()
            except Exception as exc:
                log.warning("executor %s: close failed: %s", self.executor.name, exc)

    def _take_tasks(self, lanes: ThreadPoolExecutor | None) -> None:
        d = self.daemon_ref
        while True:
            task = d.next_task()
            if task is None:
                return
            if isinstance(task, Job) and lanes is not None:
                self._slots.acquire()  # a free slot first: the backlog keeps what the executor cannot take
                lanes.submit(self._lane, task)
                continue
            try:
                if isinstance(task, Job):
                    self._run_job(task)
                else:
                    run, summary = task
                    with self._report_lock:
                        d.sinks.run_ended(run, summary)
                    # The sinks forgot the run's hello with it: a run reopened later says it to them again.
                    self._hello_sent.pop(run, None)
                    d.mark_closed(run)
                    self._forget_released_runs()
            except Exception as exc:  # a bug here must cost one task, never the daemon's only worker
                log.exception("worker: %s failed: %s: %s", "job" if isinstance(task, Job) else "closing a run",
                              type(exc).__name__, exc)

    def held_runs(self) -> int:
        """Runs this thread keeps insight state or a sent hello for (bounded by the runs the daemon keeps)."""
        return len({run for run, _ in self._insight} | set(self._hello_sent))

    def _lane(self, job: Job) -> None:
        try:
            self._run_job(job)
        except Exception as exc:  # as in _take_tasks: one job lost, never the worker
            log.exception("worker: job failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._slots.release()

    def _forget_released_runs(self) -> None:
        # The daemon releases ended runs from memory; drop this thread's per-run state with them.
        live = set(self.daemon_ref.runs)
        for run in [r for r in list(self._hello_sent) if r not in live]:  # list(): lanes may add runs meanwhile
            self._hello_sent.pop(run, None)
        for key in [k for k in list(self._insight) if k[0] not in live]:  # per (run, tensor)
            self._insight.pop(key, None)
        forget = getattr(self.executor, "forget", None)
        if forget is not None:  # the Ray executor's object references of released runs
            forget(live)

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
        with self._report_lock:
            self._before_analysis(job)
        prev_iter = job.previous.iter if job.previous is not None else None
        if job.repeat_of is not None:
            log.warning("run %s iter %d: repeats an iteration (iter %d was analysed already): a trainer resumed "
                        "from a checkpoint? Both records are kept; this one is marked \"repeat\": true",
                        job.run, job.current.iter, job.repeat_of)
        log.info("run %s iter %d: analysing %s %s (drift vs iter %s)", job.run, job.current.iter,
                 "x".join(map(str, job.current.shape)), job.current.dtype, prev_iter)
        try:
            key = (job.run, job.current.name)  # drift compares a tensor with its own previous snapshot
            result, state = self.executor.analyse(job, self.settings, self._progress_callback(job),
                                                  self._insight.get(key) or RunInsight(), d.abandon.is_set)
            self._insight[key] = state
        except AnalysisAbandoned as exc:
            log.warning("run %s iter %d: analysis abandoned on shutdown (%s)", job.run,
                        job.current.iter, exc)
            return
        except TaskLost as exc:  # counted and said, never silent; the run goes on with its next snapshot
            self.lost_tasks += 1
            log.error("run %s iter %d: analysis lost: %s (lost analyses so far: %d)", job.run, job.current.iter,
                      exc, self.lost_tasks)
            return
        except Exception as exc:  # analyse() catches math errors itself; this is a daemon bug
            log.exception("run %s iter %d: analysis crashed: %s", job.run, job.current.iter, exc)
            return
        with self._report_lock:
            self._report(job, result)

    def _before_analysis(self, job: Job) -> None:
        d = self.daemon_ref
        if job.hello is not None and self._hello_sent.get(job.run) is not job.hello:
            self._hello_sent[job.run] = job.hello
            d.sinks.run_hello(job.run, job.hello)
            if d.store is not None:  # here, not on the receive thread: it fsyncs the whole vocabulary
                try:
                    d.store.save_hello(job.run, job.hello)
                except OSError as exc:
                    log.error("state dir: could not save hello of run %s: %s", job.run, exc)
        if d.store is not None and not job.current.recovered and job.default_tensor:  # the main tensor's only
            # On disk before the analysis, promoted to baseline only once its result is delivered:
            # a crash in between leaves the old baseline (which has a record) and this snapshot,
            # analysed again at the next start-up.
            try:
                d.store.begin_analysis(job.run, job.current)
            except OSError as exc:
                log.error("state dir: could not save run %s iter %d: %s", job.run, job.current.iter, exc)

    def _report(self, job: Job, result: dict[str, Any]) -> None:
        d = self.daemon_ref
        if job.repeat_of is not None:
            result["repeat"], result["resumed_after_iter"] = True, job.repeat_of
        if job.current.recovered:
            result["recovered"] = True  # analysed again after a restart (it was interrupted)
        d.add_counters(job, result)
        result.setdefault("daemon_counters", {})["analyses_lost"] = self.lost_tasks  # tasks failed twice so far
        log.info("run %s iter %d: analysed in %.2f s", job.run, job.current.iter, result["seconds"])
        # The job is finished (by _run_job) only after this: --exit-on-end must not exit between the
        # analysis and the sinks.
        d.sinks.handle(result)
        if d.store is not None and job.default_tensor:
            try:
                d.store.commit_analysis(job.run, job.current)
            except OSError as exc:
                log.error("state dir: could not record run %s iter %d as analysed: %s", job.run,
                          job.current.iter, exc)
