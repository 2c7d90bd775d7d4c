"""--executor ray: each analysis runs as a Ray task, on the cluster at RAY_ADDRESS or a local Ray instance.

    analysis-daemon --executor ray --max-concurrent 8                 (RAY_ADDRESS=ray://head:10001 or unset)

What crosses to the task: the job without its tensors, the snapshot tensors as object-store references
(each snapshot is `ray.put` once: the current one of a job is the previous one of the run's next job,
and its reference is kept for that), the run's vocabulary once per hello, the settings and the run's
insight state; back come the record and the new state. GPU tasks (num_gpus=1) with --device cuda.
A task that fails is submitted once more; a second failure is TaskLost with Ray's reason. When the
Ray connection is gone the executor says so in one line and runs every later analysis in this process.
Ray moves these objects with its own (pickle-based) serialisation between the daemon and its workers:
the cluster must be as trusted as the daemon's host (see docs/scale.md).
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from ..pipeline import TOKEN_ARRAYS, AnalysisAbandoned, AnalysisSettings, analyse
from ..records import Job, RunInsight
from ..safetext import first_line
from .executor import InProcessExecutor, TaskLost

log = logging.getLogger("embedding_monitor.daemon")

_WAIT_S = 0.5  # how often a waiting worker checks for shutdown


def _analyse_task(job: Job, current: torch.Tensor, previous: torch.Tensor | None, vocab: Any,
                  settings: AnalysisSettings, state: RunInsight, threads: int,
                  first_is: str | None = None, first: torch.Tensor | None = None) -> tuple[dict[str, Any], RunInsight]:
    """Body of the Ray task: rebuild the job around the tensors from the object store and analyse it.

    `first_is` says which snapshot the run's first one is ("current", "previous", "own": `first`, or None),
    so the job's identities survive the trip (the pipeline tells "this is the first snapshot" by identity).
    """
    torch.set_num_threads(max(1, threads))
    # received_mono arrives as the seconds waited so far (monotonic clocks differ between hosts)
    cur = replace(job.current, tensor=current, received_mono=time.monotonic() - job.current.received_mono)
    prev = replace(job.previous, tensor=previous) if job.previous is not None and previous is not None else None
    hello = replace(job.hello, vocab=vocab) if job.hello is not None else None
    first_snap = {"current": cur, "previous": prev}.get(first_is or "")
    if first_is == "own" and job.first is not None and first is not None:
        first_snap = replace(job.first, tensor=first)
    record = analyse(replace(job, current=cur, previous=prev, hello=hello, first=first_snap), settings, None, state)
    arrays = record.get(TOKEN_ARRAYS)
    if arrays is not None:  # the snapshot itself: the daemon has it already, it need not travel back
        arrays.weights = None
    return record, state


def ray_missing_message() -> str:
    """The one line a person sees when --executor ray is asked for without Ray installed."""
    return "--executor ray needs Ray: pip install 'embedding-monitor[ray]' (or pip install ray)"


class RayExecutor:
    """Analyses as Ray tasks; falls back to this process, with one line, when the cluster is lost."""

    name = "ray"

    def __init__(self, *, device: str = "cpu", threads: int = 1, max_concurrent: int | None = None,
                 local_cpus: int | None = None, task: Callable[..., Any] = _analyse_task) -> None:
        """Connect to RAY_ADDRESS, or start a local Ray instance with `local_cpus` CPUs (default: all usable).

        `threads`: torch threads (and Ray CPUs) per task. Raises ValueError (one line) when Ray is not
        installed or the cluster cannot run a task (no CPU, or no GPU for --device cuda).
        """
        try:
            import ray
        except ImportError:
            raise ValueError(ray_missing_message()) from None
        self.ray = ray
        self.threads = max(1, threads)
        self.gpu = torch.device(device).type == "cuda"
        self.lost_tasks = 0
        self.fallback: InProcessExecutor | None = None
        address = os.environ.get("RAY_ADDRESS") or None
        if not ray.is_initialized():
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                cpus = local_cpus or len(os.sched_getaffinity(0))
                ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        fit = gpus if self.gpu else cpus // self.threads
        if fit < 1:
            raise ValueError(f"the Ray cluster ({cpus} CPU(s), {gpus} GPU(s)) cannot run one analysis task "
                             f"({'1 GPU' if self.gpu else f'{self.threads} CPU(s)'}); use --threads or --device cpu")
        self.slots = min(fit, max_concurrent) if max_concurrent else fit
        self._remote = ray.remote(task).options(num_cpus=0 if self.gpu else self.threads,
                                                num_gpus=1 if self.gpu else 0, max_retries=0)
        # Keyed by (run, tensor name): drift compares a tensor with its own previous snapshot, so a run
        # publishing its embedding and its output head keeps one cached reference for each.
        self._refs: dict[tuple[str, str], tuple[torch.Tensor, Any]] = {}  # -> (last snapshot's tensor, object ref)
        self.puts = 0  # snapshot tensors put into the object store
        self._vocab_refs: dict[str, tuple[int, Any]] = {}  # run -> (id of its hello, ref of its vocabulary)
        self._first_refs: dict[tuple[str, str], tuple[torch.Tensor, Any]] = {}  # -> (first snapshot's tensor, ref)
        log.info("executor: Ray at %s, %d CPU(s) %d GPU(s); up to %d analyses at once (%s per task)",
                 address or "a local instance", cpus, gpus, self.slots, "1 GPU" if self.gpu else f"{self.threads} CPU(s)")

    # -- object store: each snapshot's bytes go in once ------------------------------------------------
    def _snapshot_refs(self, job: Job) -> tuple[Any, Any]:
        """(current, previous) object refs; the previous one is the tensor's last current one when it is that tensor."""
        key = (job.run, job.current.name)
        cached = self._refs.get(key)
        prev = None
        if job.previous is not None:
            if cached is not None and cached[0] is job.previous.tensor:
                prev = cached[1]
            else:  # a baseline read back from --state-dir, or a run whose reference was dropped
                prev = self.ray.put(job.previous.tensor)
                self.puts += 1
        cur = self.ray.put(job.current.tensor)
        self.puts += 1
        self._refs[key] = (job.current.tensor, cur)  # this tensor's next job compares against it
        return cur, prev

    def _vocab_ref(self, job: Job) -> Any:
        if job.hello is None or job.hello.vocab is None:
            return None
        cached = self._vocab_refs.get(job.run)
        if cached is not None and cached[0] == id(job.hello):
            return cached[1]
        ref = self.ray.put(job.hello.vocab)
        self._vocab_refs[job.run] = (id(job.hello), ref)
        return ref

    def forget(self, runs: set[str]) -> None:
        """Drop the object references of runs no longer in the daemon (their bytes leave the store)."""
        for table in (self._refs, self._vocab_refs, self._first_refs):
            # list(): lanes may add runs meanwhile; the snapshot tables are keyed by (run, tensor)
            for key in [k for k in list(table) if (k[0] if isinstance(k, tuple) else k) not in runs]:
                table.pop(key, None)

    def _alive(self) -> bool:
        if not self.ray.is_initialized():  # checked first: other calls would start a new local instance
            return False
        try:
            self.ray.cluster_resources()
            return True
        except Exception:
            return False

    def _fall_back(self, why: str) -> InProcessExecutor:
        if self.fallback is None:
            log.error("executor: the Ray cluster is gone (%s): analysing in this process from now on", why)
            self.fallback = InProcessExecutor()
        return self.fallback

    def analyse(self, job: Job, settings: AnalysisSettings, progress: Callable[[float], None] | None,
                state: RunInsight, should_stop: Callable[[], bool]) -> tuple[dict[str, Any], RunInsight]:
        """Run `job` as a Ray task (retried once); TaskLost after two failures, in-process once Ray is gone."""
        if self.fallback is not None:
            return self.fallback.analyse(job, settings, progress, state, should_stop)
        if not self._alive():
            return self._fall_back("not connected").analyse(job, settings, progress, state, should_stop)
        try:
            cur, prev = self._snapshot_refs(job)
            vocab = self._vocab_ref(job)
        except Exception as exc:
            if not self._alive():
                return self._fall_back(first_line(exc)).analyse(job, settings, progress, state, should_stop)
            raise TaskLost(f"could not put the snapshot into Ray's object store: {first_line(exc)}") from exc
        waited = time.monotonic() - job.current.received_mono
        first_is, first_ref = None, None
        if job.first is not None:  # the run's first snapshot (drift since init): by identity, or put once
            first_is = "current" if job.first is job.current else "previous" if job.first is job.previous else "own"
            if first_is == "own":
                key = (job.run, job.current.name)
                cached = self._first_refs.get(key)
                if cached is None or cached[0] is not job.first.tensor:
                    cached = (job.first.tensor, self.ray.put(job.first.tensor))
                    self._first_refs[key] = cached
                    self.puts += 1
                first_ref = cached[1]
        shell = replace(job, current=replace(job.current, tensor=torch.empty(0), received_mono=waited),
                        previous=replace(job.previous, tensor=torch.empty(0)) if job.previous else None,
                        first=replace(job.first, tensor=torch.empty(0)) if job.first is not None else None,
                        hello=replace(job.hello, vocab=None) if job.hello is not None else None)
        reasons = []
        for attempt in (1, 2):
            try:
                ref = self._remote.remote(shell, cur, prev, vocab, settings, state, self.threads, first_is, first_ref)
                record, new_state = self._wait(ref, should_stop)
                arrays = record.get(TOKEN_ARRAYS)
                if arrays is not None:
                    arrays.weights = job.current.tensor  # as in-process: the received snapshot, not copied
                return record, new_state
            except AnalysisAbandoned:
                raise
            except Exception as exc:
                if not self._alive():
                    return self._fall_back(first_line(exc)).analyse(job, settings, progress, state, should_stop)
                reasons.append(self._reason(exc))
                if attempt == 1:
                    log.warning("run %s iter %d: Ray task failed (%s): trying once more", job.run,
                                job.current.iter, reasons[-1])
        self.lost_tasks += 1
        raise TaskLost(f"Ray task failed twice: {reasons[-1]}")

    def _reason(self, exc: BaseException) -> str:
        """One line saying why a task failed: the task's own exception rather than Ray's wrapper around it."""
        cause = getattr(exc, "cause", None) if isinstance(exc, self.ray.exceptions.RayTaskError) else None
        if isinstance(cause, BaseException):
            return first_line(cause)
        return re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))

    def _wait(self, ref: Any, should_stop: Callable[[], bool]) -> tuple[dict[str, Any], RunInsight]:
        while True:
            done, _ = self.ray.wait([ref], timeout=_WAIT_S)
            if done:
                return self.ray.get(ref)
            if should_stop():
                self.ray.cancel(ref, force=True)
                raise AnalysisAbandoned("the Ray task was cancelled at shutdown")

    def close(self) -> None:
        """Drop the references; disconnect from Ray (a local instance stops with it)."""
        self._refs.clear()
        self._vocab_refs.clear()
        if self.ray.is_initialized():
            self.ray.shutdown()

