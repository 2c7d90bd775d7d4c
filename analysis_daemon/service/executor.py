"""Where one analysis runs: the seam between the daemon's worker and `pipeline.analyse`.

The worker (worker.py) takes a Job from the backlog and hands it to an Executor; the receive loop, the
per-run state, the backlog, liveness and the sinks stay in the daemon whatever the executor. A run's
insight state (RunInsight) goes in with its job and the executor returns the state to keep, so it
may travel to another process (ray_executor.py) and back. The daemon never hands out a second job of
a run before the first is finished (RunState.busy), so a run's results keep their iteration order
however many analyses run at once.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from ..pipeline import AnalysisSettings, analyse
from ..records import Job, RunInsight


class TaskLost(Exception):
    """An analysis could not be run (its task failed twice); the message says why."""


class Executor(Protocol):
    """Runs analyses: `slots` of them at once at most."""

    name: str
    slots: int

    def analyse(self, job: Job, settings: AnalysisSettings, progress: Callable[[float], None] | None,
                state: RunInsight, should_stop: Callable[[], bool]) -> tuple[dict[str, Any], RunInsight]:
        """The record of `job` and the run's insight state after it; TaskLost when it could not run."""
        ...

    def close(self) -> None:
        """Release what the executor holds (a Ray connection)."""
        ...


class InProcessExecutor:
    """The analysis on the worker's own thread, in this process (the default)."""

    name = "inprocess"

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots

    def analyse(self, job: Job, settings: AnalysisSettings, progress: Callable[[float], None] | None,
                state: RunInsight, should_stop: Callable[[], bool]) -> tuple[dict[str, Any], RunInsight]:
        """`pipeline.analyse` here; the state is updated in place and returned."""
        return analyse(job, settings, progress, state), state

    def close(self) -> None:
        """Nothing to release."""
