"""A daemon does not grow with the runs it has served: per-run state goes when a run ends (issue 21, item 5).

The W&B sink kept every run's hello (its wandb map, its vocabulary) forever: RSS 246 -> 7149 MiB over
three rounds of 20 released runs. These tests check the per-run maps themselves, not RSS (the soak
benchmark benchmarks/bench_soak_runs.py prints that): every sink holds nothing for a run once it has
ended, and the daemon's own maps hold at most the open runs plus the few ended ones it keeps on purpose
(their baseline continues the drift of a resumed trainer).
"""
from __future__ import annotations

import io
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from analysis_daemon.service.daemon import _KEEP_ENDED_RUNS
from analysis_daemon.records import HelloInfo
from analysis_daemon.sinks.console import ConsoleSink
from analysis_daemon.sinks.jsonl import JsonlSink
from analysis_daemon.sinks.wandb_sink import WandbSink
from tests import wandb_history
from tests.test_daemon import WAIT_S, env, start_daemon, wait_for  # noqa: F401
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(180)


def minimal_result(run: str, it: int) -> dict:
    """A result record as the worker hands it to the sinks (drift and geometry left out)."""
    return {"run": run, "iter": it, "prev_iter": None, "seconds": 0.01, "drift": None, "geometry": None,
            "shape": [4, 2], "dtype": "float32",
            "counters": {"received": 1, "analysed": 1, "skipped": 0, "rejected": 0, "incomplete": 0},
            "daemon_counters": {"received": 1, "analysed": 1, "skipped": 0, "rejected": 0, "incomplete": 0,
                                "lost": 0, "lost_by_sink": {}}}


def test_every_sink_releases_a_run_when_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb
    wandb.teardown()  # wandb reads WANDB_DIR once per process: an earlier test's setup would keep its own dir
    sinks = [WandbSink(default_project="release-test"), JsonlSink(tmp_path / "runs"),
             ConsoleSink(stream=io.StringIO(), to_stdout=False)]
    runs = [f"r{i}" for i in range(3)]
    try:
        for run in runs:
            hello = HelloInfo(pid=1, host="h", vocab=[f"t{i}" for i in range(1000)],
                              wandb={"project": "release-test", "run_id": run}, meta={"k": "v" * 1000})
            for sink in sinks:
                sink.run_hello(run, hello)
                sink.handle(minimal_result(run, 10))
        wandb_sink = sinks[0]
        wait_for("the W&B sink to hold all three runs", lambda: wandb_sink.held_runs() == set(runs))
        for run in runs:
            for sink in sinks:
                sink.run_ended(run, {"analysed": 1})
        for sink in sinks:
            wait_for(f"sink {sink.name} to release every ended run", lambda: not sink.held_runs())
    finally:
        for sink in sinks:
            sink.close()
    # Nothing was lost on the way: each run's W&B history has its point (read once the runs are finished).
    files = {wandb_history.run_info(f)["config"]["trainer_run"]: f for f in wandb_history.find_run_files(tmp_path)}
    assert sorted(files) == runs
    for run in runs:
        assert [row["analysis/iter"] for row in wandb_history.history(files[run])] == [10]


def _held(log: str) -> dict[str, int]:
    line = next(line for line in log.splitlines() if "per-run state at exit:" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("per-run state at exit:")[1])}


def test_the_daemon_keeps_no_state_for_runs_past_the_last_few(start_daemon, env: dict[str, str],
                                                               tcp_endpoint: str) -> None:
    d = start_daemon("--no-console", "--no-extras")
    runs = [f"served-{i}" for i in range(_KEEP_ENDED_RUNS + 2)]
    g = torch.Generator().manual_seed(1)
    for run in runs:
        pub = EmbeddingPublisher(tcp_endpoint, run=run, vocab=[f"{run}-{i}" for i in range(200)],
                                 wandb_info={"project": "release-test", "run_id": run}, meta={"k": "v" * 1000})
        assert pub.wait_connected(WAIT_S)
        for it in (10, 20):
            wait_for(f"{run} handing off iter {it}", lambda: pub.publish(torch.randn(200, 16, generator=g), it))
            d.wait_results(run, it // 10)
        pub.close()
        wait_for(f"run {run} closed", lambda: f"run {run}: closed" in d.log(), proc=d)
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait_exit() == 0
    held = _held(d.log())
    # The daemon's maps: the ended runs it keeps on purpose, no more (a run past them is released).
    for key in ("runs", "seen", "publishers", "hello_publishers", "worker"):
        assert held[key] <= _KEEP_ENDED_RUNS, (key, held)
    assert held["assemblies"] == 0
    # The sinks: nothing once every run ended (the W&B sink used to keep every hello forever).
    assert held["sink_jsonl"] == 0 and held["sink_wandb"] == 0, held
    assert f"run {runs[0]}: state released from memory" in d.log()
    assert all(len(d.results(run)) == 2 for run in runs)
