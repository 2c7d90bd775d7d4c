"""launch.sh end to end: daemon + trainer on the built-in data, Ctrl-C, and the tail mode."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _launch_env(subprocess_env: dict[str, str], tmp_path: Path, port: int) -> dict[str, str]:
    # EM_PYTHON: use this interpreter instead of (re)creating .venv, so the test exercises launch.sh itself.
    return dict(subprocess_env, EM_PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "runs"), PORT=str(port),
                RUN="launch-test", WANDB_MODE="offline")


def _our_segments() -> set[str]:
    # The hook's shared-memory slots ("emon-<pid>-..."); other software's segments are not ours to judge.
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("emon-")} if shm.is_dir() else set()


def test_launch_runs_trainer_and_daemon_to_a_results_file(tmp_path, subprocess_env):
    from tests.conftest import free_tcp_port

    before = _our_segments()
    env = _launch_env(subprocess_env, tmp_path, free_tcp_port())
    proc = subprocess.run(
        [str(ROOT / "launch.sh"), "--", "--max_iters=60", "--eval_interval=20", "--eval_iters=2",
         f"--out_dir={tmp_path / 'out'}"],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "launch-test" / "analysis.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 20, 40, 60]
    assert records[0]["drift"] is None
    assert all(r["drift"] is not None and r["prev_iter"] == prev["iter"] for prev, r in zip(records, records[1:]))
    # train.py's losses travel with each snapshot into the record
    assert all(set(r["metrics"]) == {"train/loss", "val/loss", "lr"} and 0 < r["metrics"]["val/loss"] < 10
               for r in records)
    # The daemon's summary blocks reach the terminal and its log file exists for `tail`.
    assert "--- ASYNC ANALYSIS RESULTS FOR ITERATION 60" in proc.stdout
    assert (tmp_path / "runs" / "launch-test" / "daemon.log").read_text().count("analysed in") == 4
    assert _our_segments() <= before

    tail = subprocess.run(["timeout", "3", str(ROOT / "launch.sh"), "tail"], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    assert "iter 60: analysed in" in tail.stdout


def test_ctrl_c_stops_trainer_and_daemon_without_leftovers(tmp_path, subprocess_env):
    from tests.conftest import free_tcp_port

    before = _our_segments()
    env = _launch_env(subprocess_env, tmp_path, free_tcp_port())
    # A run far too long to finish: Ctrl-C must end it.
    proc = subprocess.Popen(
        [str(ROOT / "launch.sh"), "--", "--max_iters=100000", "--eval_interval=20", "--eval_iters=2",
         f"--out_dir={tmp_path / 'out'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True)
    results = tmp_path / "runs" / "launch-test" / "analysis.jsonl"
    deadline = time.monotonic() + 180
    while not (results.exists() and results.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no analysis results within 180 s"
        time.sleep(0.2)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) >= 3  # launch.sh, daemon, trainer (and tee)
    # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out[-3000:]
    def alive() -> list[int]:
        found = []
        for pid in family:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    found.append(pid)
            except psutil.NoSuchProcess:
                pass
        return found

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive() == [], f"orphans left: {alive()}"
    assert _our_segments() <= before, f"shared memory left: {_our_segments() - before}"
    # The results written before Ctrl-C are intact JSON lines.
    assert all(json.loads(line)["run"] == "launch-test" for line in results.read_text().splitlines())


@pytest.mark.parametrize("mode_args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["trainer"], "trainer mode needs --connect"),
])
def test_launch_rejects_bad_usage_with_one_line(mode_args, message, tmp_path, subprocess_env):
    from tests.conftest import free_tcp_port

    env = _launch_env(subprocess_env, tmp_path, free_tcp_port())
    proc = subprocess.run([str(ROOT / "launch.sh"), *mode_args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert message in proc.stderr
