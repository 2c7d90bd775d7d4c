"""--executor ray: analyses as tasks of a real local Ray instance give the in-process records.

One Ray instance for the module (its start-up costs seconds on a small machine); the last test shuts it
down on purpose to check the fall-back, so it stays last.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

from analysis_daemon.pipeline import TOKEN_ARRAYS  # noqa: E402
from analysis_daemon.service.executor import InProcessExecutor, TaskLost  # noqa: E402
from analysis_daemon.service.ray_executor import RayExecutor, _analyse_task  # noqa: E402
from analysis_daemon.service.state import RunInsight  # noqa: E402
from tests.test_device import jobs, settings_for, strip  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs for this module (RAY_ADDRESS unset: the executor starts none)."""
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if ray.is_initialized():
        ray.shutdown()


def run_jobs(executor, job_list, settings) -> list[dict]:
    """Records of `job_list` through `executor`, torch on one thread as the tasks (threads=1) run: the same
    summation order, hence the same bits (the daemon gives its tasks its own --threads)."""
    state, out = RunInsight(), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in job_list:
            record, state = executor.analyse(job, settings, None, state, lambda: False)
            out.append(record)
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert strip(x) == strip(y)
        assert [al["kind"] for al in x["alerts"]] == [al["kind"] for al in y["alerts"]]
        for name in ("norm", "xy", "knn_ids", "knn_cos", "drift"):
            p, q = getattr(x[TOKEN_ARRAYS], name), getattr(y[TOKEN_ARRAYS], name)
            assert (p is None) == (q is None)
            if p is not None:
                torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)


def test_ray_tasks_give_the_in_process_records_and_put_each_snapshot_once(cluster) -> None:
    job_list = jobs(v=300, d=24, iters=3)
    settings = settings_for("cpu")
    local = run_jobs(InProcessExecutor(), job_list, settings)
    ex = RayExecutor(threads=1, max_concurrent=4)
    assert ex.slots == 2  # the cluster's 2 CPUs at 1 CPU per task, under the bound of 4
    remote = run_jobs(ex, job_list, settings)
    assert_same_records(local, remote)
    # the run state (neighbour lists, galaxy map, followed tokens) travelled with the tasks and came back
    assert remote[-1]["insight"]["neighbourhood_drift"] is not None
    assert remote[-1]["galaxy"]["aligned_to_iter"] == 100
    assert ex.puts == 3  # three snapshots, each put once: a job's previous is the last one's current
    assert ex.fallback is None and ex.lost_tasks == 0
    assert RayExecutor(threads=1, max_concurrent=1).slots == 1


def _crash_first_time(marker: str):
    def task(*args):
        if not Path(marker).exists():
            Path(marker).write_text("crashed once")
            os._exit(1)  # the worker process dies: a system failure, not an exception
        return _analyse_task(*args)
    return task


def _always_fails(*args):
    raise RuntimeError("out of device memory (test)")


def test_a_failed_task_is_retried_once(cluster, tmp_path: Path, caplog) -> None:
    job_list = jobs(v=120, d=16, iters=2)
    settings = settings_for("cpu")
    ex = RayExecutor(threads=1, task=_crash_first_time(str(tmp_path / "crashed")))
    records = run_jobs(ex, job_list, settings)
    assert (tmp_path / "crashed").exists()
    assert_same_records(run_jobs(InProcessExecutor(), job_list, settings), records)
    assert ex.lost_tasks == 0
    assert any("Ray task failed" in r.getMessage() and "trying once more" in r.getMessage() for r in caplog.records)


def test_a_task_failing_twice_is_lost_with_its_reason(cluster) -> None:
    ex = RayExecutor(threads=1, task=_always_fails)
    job = jobs(v=50, d=8, iters=1)[0]
    with pytest.raises(TaskLost, match="failed twice: .*out of device memory \\(test\\)"):
        ex.analyse(job, settings_for("cpu"), None, RunInsight(), lambda: False)
    assert ex.lost_tasks == 1


def test_a_lost_cluster_falls_back_to_this_process_with_one_line(cluster, caplog) -> None:
    # Last in this module: it ends the module's Ray instance.
    job_list = jobs(v=120, d=16, iters=3)
    settings = settings_for("cpu")
    ex = RayExecutor(threads=1)
    state = RunInsight()
    first, state = ex.analyse(job_list[0], settings, None, state, lambda: False)
    ray.shutdown()  # the cluster is gone
    rest = []
    for job in job_list[1:]:
        record, state = ex.analyse(job, settings, None, state, lambda: False)
        rest.append(record)
    assert ex.fallback is not None
    lines = [r.getMessage() for r in caplog.records if "Ray cluster is gone" in r.getMessage()]
    assert len(lines) == 1 and "analysing in this process from now on" in lines[0]
    assert_same_records(run_jobs(InProcessExecutor(), job_list, settings), [first, *rest])
    assert not ray.is_initialized()  # the fall-back did not start a new instance behind our back
