"""`analysis-daemon report RUN_DIR RUN_DIR`: two real runs on shared axes, gaps, token histories, galaxy map."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 120
RATES = {"lr-3e-3": "3e-3", "lr-3e-4": "3e-4"}


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
                PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real short runs of train.py (planted-group corpus, two learning rates), each to its own real daemon."""
    tmp = tmp_path_factory.mktemp("compare")
    env = _env(tmp)
    procs = []
    try:
        for run in RATES:
            endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
            out = open(tmp / f"{run}.daemon.out", "w")
            err = open(tmp / f"{run}.daemon.err", "w")
            procs.append((run, endpoint, out, err, subprocess.Popen(
                [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", str(tmp / "runs"),
                 "--threads", "1", "--nice", "0", "--exit-on-end", "--no-wandb", "--probe", "10,11"],
                stdout=out, stderr=err, env=env, cwd=tmp)))
        deadline = time.monotonic() + WAIT_S
        for run, _, _, _, daemon in procs:
            while "ready" not in (tmp / f"{run}.daemon.out").read_text():
                assert daemon.poll() is None, (tmp / f"{run}.daemon.err").read_text()
                assert time.monotonic() < deadline, "daemon not ready in time"
                time.sleep(0.05)
        trainers = [subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--dataset=synthetic", "--max_iters=60", "--eval_interval=10",
             "--eval_iters=2", "--batch_size=8", f"--learning_rate={RATES[run]}", f"--out_dir={tmp / run}",
             f"--run_name={run}", "--wandb_log=False", f"--analysis_endpoint={endpoint}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
            for run, endpoint, _, _, _ in procs]
        for t in trainers:
            _, stderr = t.communicate(timeout=WAIT_S)
            assert t.returncode == 0, stderr[-3000:]
        for run, _, _, _, daemon in procs:
            assert daemon.wait(WAIT_S) == 0, (tmp / f"{run}.daemon.err").read_text()[-3000:]
    finally:
        for _, _, out, err, daemon in procs:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)
            out.close()
            err.close()
    return {run: tmp / "runs" / run for run in RATES}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "analysis.jsonl").read_text().splitlines()]


def test_dev(two_runs):
    for run, d in two_runs.items():
        print(run, [r["iter"] for r in _records(d)], sorted(_records(d)[-1]))
