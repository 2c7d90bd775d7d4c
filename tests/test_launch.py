"""launch.sh end to end: daemon + trainer on the built-in data, Ctrl-C, and the tail mode."""
from __future__ import annotations

import json
import os
import re
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import follow

ROOT = Path(__file__).resolve().parent.parent


def _launch_env(subprocess_env: dict[str, str], tmp_path: Path, port: int) -> dict[str, str]:
    # EM_PYTHON: use this interpreter instead of (re)creating .venv, so the test exercises launch.sh itself.
    return dict(subprocess_env, EM_PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "runs"), PORT=str(port),
                RUN="launch-test", WANDB_MODE="offline")


def _terminal_signals() -> None:
    """In the child before exec: SIGINT/SIGHUP at their defaults, as under a terminal.

    A shell started with a signal ignored can never trap it ("signals ignored upon entry cannot be
    trapped"), and a test runner started in the background of a non-interactive shell inherits SIGINT
    ignored: launch.sh's Ctrl-C trap would then silently not exist and the test would see exit 0.
    """
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _our_segments() -> set[str]:
    # The hook's shared-memory slots ("emon-<pid>-..."); other software's segments are not ours to judge.
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("emon-")} if shm.is_dir() else set()


def _leaked(before: set[str]) -> set[str]:
    """Segments made since `before` whose owner has exited (other tests may run beside this one)."""
    left = set()
    for name in _our_segments() - before:
        try:
            alive = psutil.pid_exists(int(name.split("-")[1]))
        except (IndexError, ValueError):
            alive = False
        if not alive:
            left.add(name)
    return left


def test_launch_runs_trainer_and_daemon_to_a_results_file(tmp_path, subprocess_env):
    from tests.conftest import free_tcp_port

    before = _our_segments()
    env = _launch_env(subprocess_env, tmp_path, free_tcp_port())
    # Daemon options pass through --daemon-args (split on spaces).
    proc = subprocess.run(
        [str(ROOT / "launch.sh"), "--daemon-args", "--probe 3,5 --probe-k 4", "--", "--max_iters=60",
         "--eval_interval=20", "--eval_iters=2", f"--out_dir={tmp_path / 'out'}"],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "launch-test" / "analysis.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 20, 40, 60]
    assert records[0]["drift"] is None
    assert all(r["drift"] is not None and r["prev_iter"] == prev["iter"] for prev, r in zip(records, records[1:]))
    # train.py's losses travel with each snapshot into the record
    assert all(set(r["metrics"]) == {"train/loss", "eval/loss", "train/learning_rate"} and 0 < r["metrics"]["eval/loss"] < 10
               for r in records)
    assert [(p["token_id"], len(p["neighbours"])) for p in records[-1]["insight"]["probes"]] == [(3, 4), (5, 4)]
    # The daemon's summary blocks reach the terminal once each, and its log file (for `tail`) has them too.
    assert [proc.stdout.count(f"--- ASYNC ANALYSIS RESULTS FOR ITERATION {i} ") for i in (0, 20, 40, 60)] == [1] * 4
    log = (tmp_path / "runs" / "launch-test" / "daemon.log").read_text()
    assert len(re.findall(r"iter \d+: analysed in", log)) == 4
    assert "analysis-daemon stopped: received=4 analysed=4 skipped=0 rejected=0 lost=0" in log
    assert "trainer finished" in proc.stderr
    assert "warning" not in proc.stderr
    assert_last_line_names_results_and_report(proc.stderr, tmp_path / "runs" / "launch-test" / "analysis.jsonl")
    assert _leaked(before) == set()

    block = "--- ASYNC ANALYSIS RESULTS FOR ITERATION 60 (run launch-test) ---"
    tail = follow([str(ROOT / "launch.sh"), "tail"], ["iter 60: analysed in", block, "[Geometry] Mean Similarity"],
                  env=env, cwd=ROOT)
    assert "iter 60: analysed in" in tail.stdout
    # The metrics, not only the INFO lines.
    assert block in tail.stdout
    assert "[Geometry] Mean Similarity" in tail.stdout


def assert_last_line_names_results_and_report(out: str, results: Path) -> None:
    """launch.sh's last line: the results file and the command that builds its report."""
    last = out.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"[launch] results: {results} (report: "), last
    assert f" report {results} -o {results.parent / 'report.html'})" in last, last


@pytest.mark.parametrize("sig, status, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGHUP, 129, "SIGHUP")],
                         ids=["ctrl-c", "terminal-closed"])
def test_ctrl_c_stops_trainer_and_daemon_without_leftovers(sig, status, name, tmp_path, subprocess_env):
    from tests.conftest import free_tcp_port

    before = _our_segments()
    env = _launch_env(subprocess_env, tmp_path, free_tcp_port())
    # A run far too long to finish: Ctrl-C must end it.
    proc = subprocess.Popen(
        [str(ROOT / "launch.sh"), "--", "--max_iters=100000", "--eval_interval=20", "--eval_iters=2",
         f"--out_dir={tmp_path / 'out'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True, preexec_fn=_terminal_signals)
    results = tmp_path / "runs" / "launch-test" / "analysis.jsonl"
    deadline = time.monotonic() + 180
    while not (results.exists() and results.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no analysis results within 180 s"
        time.sleep(0.2)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) >= 3  # launch.sh, daemon, trainer (and tee)
    # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group; when it closes, the
    # shell sends SIGHUP to the whole job.
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == status, out[-3000:]
    assert f"interrupted by {name}: trainer (status 0) and daemon stopped; exit status {status}" in out
    assert "trainer finished" not in out
    log = (tmp_path / "runs" / "launch-test" / "daemon.log").read_text()
    assert "analysis-daemon stopped: received=" in log and " lost=0 " in log
    # The daemon stopped cleanly and lost nothing: no warning, whatever signal reached it first.
    assert "warning: the daemon" not in out and "results may be incomplete" not in out, out[-3000:]
    assert_last_line_names_results_and_report(out, results)
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
    assert _leaked(before) == set(), f"shared memory left: {_leaked(before)}"
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


def test_help_prints_usage_only(tmp_path, subprocess_env):
    env = _launch_env(subprocess_env, tmp_path, 5555)
    for flag in ("--help", "-h"):
        proc = subprocess.run([str(ROOT / "launch.sh"), flag], env=env, capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert proc.returncode == 0 and proc.stderr == ""
        assert proc.stdout.startswith("embedding-monitor launcher")
        assert "./launch.sh tail [RUN|HOST]" in proc.stdout and "--daemon-args" in proc.stdout
        assert "set -euo" not in proc.stdout and "cd " not in proc.stdout


@pytest.mark.parametrize("mode", [[], ["daemon", "--listen"]], ids=["local", "daemon-mode"])
def test_a_failed_daemon_start_leaves_nothing_behind(mode, tmp_path, subprocess_env):
    from tests.conftest import free_tcp_port

    port = free_tcp_port()
    env = _launch_env(subprocess_env, tmp_path, port)
    if not mode:  # the local mode listens on a private ipc socket by default: make it use the busy port
        env["ENDPOINT"] = f"tcp://127.0.0.1:{port}"
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".current").write_text("earlier-run\n")
    with socket.socket() as busy:  # the daemon cannot bind: its start fails
        busy.bind(("127.0.0.1", port))
        busy.listen()
        args = [*mode, f"tcp://127.0.0.1:{port}"] if mode else ["--", "--max_iters=1"]
        proc = subprocess.run([str(ROOT / "launch.sh"), *args], env=env, capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot listen on" in proc.stderr and "the analysis daemon exited before it was ready" in proc.stderr
    assert sorted(p.name for p in runs.iterdir()) == [".current"]  # no empty run directory
    assert (runs / ".current").read_text() == "earlier-run\n"


def test_a_killed_daemon_does_not_turn_a_finished_training_into_a_failure(tmp_path, subprocess_env):
    from tests.conftest import free_tcp_port

    port = free_tcp_port()
    env = _launch_env(subprocess_env, tmp_path, port)
    proc = subprocess.Popen(
        [str(ROOT / "launch.sh"), "--", "--max_iters=80", "--eval_interval=20", "--eval_iters=2",
         f"--out_dir={tmp_path / 'out'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
    results = tmp_path / "runs" / "launch-test" / "analysis.jsonl"
    deadline = time.monotonic() + 180
    while not (results.exists() and results.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "no first result"
        time.sleep(0.2)
    daemon = [c for c in psutil.Process(proc.pid).children(recursive=True)
              if "analysis_daemon" in " ".join(c.cmdline())]
    assert len(daemon) == 1
    daemon[0].kill()  # OOM killer, an operator's kill -9 (who may start another daemon by hand)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]  # the training succeeded: that is what the status says
    assert "exited with status 137 (killed?); results may be incomplete" in out
    assert "step 80: train loss" in out  # the trainer ran to its last evaluation
