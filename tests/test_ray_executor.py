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
from analysis_daemon.records import RunInsight  # noqa: E402
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
        for name in ("norm", "xy", "knn_ids", "knn_cos", "drift", "weights"):
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


def test_two_tensors_of_one_run_keep_their_own_object_refs(cluster) -> None:
    # A run publishing its embedding and its output head, interleaved: each tensor's drift is against its own
    # previous snapshot and its drift since init against its own first one, each snapshot put into the object
    # store once (a per-run cache would evict the other tensor's reference and put it again every time).
    from dataclasses import replace
    wte, head = jobs(v=150, d=16, iters=3), jobs(v=150, d=16, iters=3)
    head = [replace(j, current=replace(j.current, name="lm_head", tensor=j.current.tensor.flip(0).contiguous()))
            for j in head]
    for series in (wte, head):  # previous / first as the daemon links them, per tensor
        for i, job in enumerate(series):
            series[i] = replace(job, previous=series[i - 1].current if i else None, first=series[0].current)
    settings = settings_for("cpu")
    ex = RayExecutor(threads=1)
    states = {"wte": RunInsight(), "lm_head": RunInsight()}
    local_states = {"wte": RunInsight(), "lm_head": RunInsight()}
    local_ex = InProcessExecutor()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a, b in zip(wte, head):
            for job in (a, b):
                name = job.current.name
                remote, states[name] = ex.analyse(job, settings, None, states[name], lambda: False)
                local, local_states[name] = local_ex.analyse(job, settings, None, local_states[name], lambda: False)
                assert remote["tensor"] == name
                assert_same_records([local], [remote])
    finally:
        torch.set_num_threads(threads)
    # 6 snapshots put once each, plus each tensor's first snapshot once more when it is neither current nor
    # previous (the third job's since-init drift): 8
    assert ex.puts == 8
    assert ex.lost_tasks == 0 and ex.fallback is None


def _crash_first_time(marker: str):
    def task(*args):
        if not Path(marker).exists():
            Path(marker).write_text("crashed once")
            os._exit(1)  # the worker process dies: a system failure, not an exception
        return _analyse_task(*args)
    return task


def _always_fails():
    def task(*args):  # a closure: Ray ships it by value, the workers need not import this test module
        raise RuntimeError("out of device memory (test)")
    return task


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
    ex = RayExecutor(threads=1, task=_always_fails())
    job = jobs(v=50, d=8, iters=1)[0]
    with pytest.raises(TaskLost, match="failed twice: .*out of device memory \\(test\\)"):
        ex.analyse(job, settings_for("cpu"), None, RunInsight(), lambda: False)
    assert ex.lost_tasks == 1


def test_daemon_with_ray_executor_writes_the_in_process_records(cluster, tmp_path: Path, subprocess_env) -> None:
    # Real daemons, real publishers: two runs publishing at once, analysed in process and as Ray tasks
    # (the daemon joins this module's instance through RAY_ADDRESS); the records are the same.
    from tests.conftest import free_tcp_port
    from tests.test_daemon import DaemonProc, matrices
    from trainer_hook import EmbeddingPublisher

    env = dict(subprocess_env, OMP_WAIT_POLICY="PASSIVE")
    runs = ("run-a", "run-b")
    out: dict[str, dict[str, list[dict]]] = {}
    for executor in ("inprocess", "ray"):
        endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
        (tmp_path / executor).mkdir()
        d = DaemonProc(tmp_path / executor, dict(env, RAY_ADDRESS=cluster) if executor == "ray" else env, endpoint,
                       "--exit-on-end", "--no-wandb", "--no-console", "--executor", executor,
                       "--max-concurrent", "2", "--galaxy-rows", "100", tag=executor)
        try:
            pubs = [EmbeddingPublisher(endpoint, run=run) for run in runs]
            series = [matrices(3, shape=(200, 16), seed=i) for i in range(len(runs))]
            for it in range(3):
                for pub, mats in zip(pubs, series):
                    assert pub.publish(mats[it], 100 * it)
                for run in runs:
                    d.wait_results(run, it + 1)
            for pub in pubs:
                pub.close()
            assert d.wait_exit() == 0, d.log()
        finally:
            d.kill()
        out[executor] = {run: d.results(run) for run in runs}
        if executor == "ray":
            assert "executor: Ray at" in d.log() and "up to 2 analyses at once" in d.log()
    skip = {"counters", "daemon_counters", "memory_held_bytes", "seq"}  # seq: the publisher's message count
    for run in runs:
        local, remote = out["inprocess"][run], out["ray"][run]
        assert [r["iter"] for r in remote] == [0, 100, 200]  # the run's order kept
        for a_rec, b_rec in zip(local, remote):  # name the differing keys first: a record is large
            a_rec, b_rec = strip(a_rec), strip(b_rec)
            assert [k for k in a_rec if k not in skip and a_rec[k] != b_rec.get(k)] == []
        assert [{k: v for k, v in strip(r).items() if k not in skip} for r in local] == \
            [{k: v for k, v in strip(r).items() if k not in skip} for r in remote]
    assert ray.is_initialized()  # the daemon disconnected from the module's instance, did not stop it


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
