"""Full disk, read-only results directory, unreachable W&B: nothing lost silently, no broken file.

The filesystems are real: a small tmpfs mounted for the test (root only; elsewhere these tests skip
and say why), filled up with a filler file, remounted read-only. The daemon is a real subprocess.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tests.test_daemon import DaemonProc, env, matrices, push, snapshot, start_daemon, wait_for  # noqa: F401
from analysis_daemon.sinks import SinkSet
from analysis_daemon.sinks.jsonl import JsonlSink
from protocol import encode_end, encode_hello
from tests import wandb_history

pytestmark = pytest.mark.timeout(120)


def _mount_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs (a real full filesystem)"
    return None


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where`, unmounted afterwards whatever happens."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path) -> Path:
    """Write a filler file until the filesystem is full; returns it (delete it to free the space)."""
    filler = fs / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    return filler


def lines_of(path: Path) -> list[dict[str, Any]]:
    """Every line of a results file, each of which must parse (the file must end with a newline)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"partial last line: {raw[-200:]!r}"
    return [json.loads(line) for line in raw.decode().splitlines()]


def analysed(d: DaemonProc, run: str) -> list[int]:
    """Iterations the daemon has finished analysing (its log), whether or not they were written."""
    return [int(m) for m in re.findall(rf"run {run} iter (\d+): analysed in", d.log())]


def send_and_wait(d: DaemonProc, sock: Any, run: str, it: int, t: torch.Tensor) -> None:
    """One snapshot, then wait until its analysis is done (so none is skipped by a newer one)."""
    snapshot(sock, run, it, t)
    wait_for(f"iter {it} analysed", lambda: it in analysed(d, run), proc=d)


def stopped_line(d: DaemonProc) -> str:
    lines = [line for line in d.log().splitlines() if "analysis-daemon stopped:" in line]
    assert len(lines) == 1, d.log()[-3000:]
    return lines[0]


@pytest.mark.skipif(_mount_problem() is not None, reason=str(_mount_problem()))
def test_full_disk_keeps_every_line_whole_retries_and_counts_the_lost(
        start_daemon, push, tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "1m") as fs:
        results, state = fs / "runs", fs / "state"
        d = start_daemon("--results-dir", str(results), "--state-dir", str(state), "--no-wandb", "--exit-on-end")
        run, path = "full", fs / "runs" / "full" / "analysis.jsonl"
        ws = matrices(12, shape=(256, 16))  # 16 KiB snapshots: the state dir cannot save them on a full disk
        push.send_multipart(encode_hello(run=run, seq=0, pid=os.getpid(), host="h"))
        for it in range(3):
            send_and_wait(d, push, run, it, ws[it])
        assert [r["iter"] for r in lines_of(path)] == [0, 1, 2]

        # Full, with one page left: the next record's write is short (one page), then ENOSPC.
        filler = fill(fs)
        os.truncate(filler, max(0, filler.stat().st_size - 4096))
        for it in range(3, 7):
            send_and_wait(d, push, run, it, ws[it])
        assert [r["iter"] for r in lines_of(path)] == [0, 1, 2]  # nothing half-written
        assert list(state.rglob("*.tmp")) == [], "temporary state files left on a full disk"
        assert "results file: cannot write run full iter 3" in d.log()
        assert d.log().count("results file: cannot write") == 1  # one line per episode, not per record

        # Space returns: the held results are written, in order, before the next one.
        filler.unlink()
        send_and_wait(d, push, run, 7, ws[7])
        records = lines_of(path)
        assert [r["iter"] for r in records] == list(range(8))
        counters = records[-1]["daemon_counters"]
        # the results file retried and lost nothing; the token data of iterations 3-6 was not retried
        assert counters["lost_by_sink"].get("jsonl", 0) == 0 and counters["lost"] == counters["lost_by_sink"]["token-data"]
        assert all(r["drift"] is not None for r in records[1:])
        assert "results file: writable again; 4 held result(s) written" in d.log()

        # Full again until the end: what is still unwritten at exit is lost, and says so.
        filler = fill(fs)
        for it in range(8, 10):
            send_and_wait(d, push, run, it, ws[it])
        push.send_multipart(encode_end(run=run, seq=99, final_iter=9, published=10, dropped=0))
        assert d.wait_exit() == 0
        records = lines_of(path)
        assert [r["iter"] for r in records] == list(range(8))
        missing = len(analysed(d, run)) - len(records)
        assert missing == 2
        line = stopped_line(d)
        assert "analysed=10 skipped=0 rejected=0 lost=" in line
        total, by_sink = lost_by_sink(line)
        # the results file lost the two held at exit; the explorer's token data (not retried) lost what
        # was analysed while the disk was full, and left no half-written iteration behind
        assert by_sink["jsonl"] == missing and by_sink.get("token-data", 0) >= 1 and total == sum(by_sink.values())
        assert not [p for p in (fs / "runs").rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
        assert "results file: 2 result(s) could not be written and are lost (runs: full)" in d.log()
        assert list(state.rglob("*.tmp")) == []


def lost_by_sink(line: str) -> tuple[int, dict[str, int]]:
    """The total and per-sink counts of a stopped line's `lost=N (sink=n, ...)`."""
    m = re.search(r"lost=(\d+)(?: \(([^)]*)\))?", line)
    assert m, line
    pairs = [kv.split("=") for kv in (m.group(2) or "").split(", ") if "=" in kv]
    return int(m.group(1)), {k: int(v) for k, v in pairs}


@pytest.mark.skipif(_mount_problem() is not None, reason=str(_mount_problem()))
def test_a_short_write_is_cut_back_to_the_last_whole_line(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "256k") as fs:
        sinks = SinkSet([jsonl := JsonlSink(fs, max_pending_records=2)])
        sinks.handle({"run": "r", "iter": 0, "pad": "a" * 100})
        path = fs / "r" / "analysis.jsonl"
        size = path.stat().st_size
        filler = fill(fs)
        os.truncate(filler, filler.stat().st_size - 8192)  # two pages free, the record needs five
        for it in (1, 2, 3):
            sinks.handle({"run": "r", "iter": it, "pad": "b" * 20000})
        assert path.stat().st_size == size and [r["iter"] for r in lines_of(path)] == [0]
        assert jsonl.pending == 2 and sinks.counters() == {"lost": 1, "lost_by_sink": {"jsonl": 1}}
        filler.unlink()
        sinks.close()
        assert [r["iter"] for r in lines_of(path)] == [0, 2, 3]  # iter 1 was the oldest held: given up


@pytest.mark.skipif(_mount_problem() is not None, reason=str(_mount_problem()))
def test_read_only_results_dir_counts_every_result_as_lost(start_daemon, push, tmp_path: Path) -> None:
    with small_fs(tmp_path / "ro", "1m") as fs:
        (fs / "runs").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, capture_output=True)
        d = start_daemon("--results-dir", str(fs / "runs"), "--no-wandb", "--exit-on-end")
        ws = matrices(4, shape=(64, 16))
        for it in range(4):
            send_and_wait(d, push, "ro-run", it, ws[it])
        push.send_multipart(encode_end(run="ro-run", seq=99, final_iter=3, published=4, dropped=0))
        assert d.wait_exit() == 0
        assert not (fs / "runs" / "ro-run").exists()
        total, by_sink = lost_by_sink(stopped_line(d))
        assert by_sink == {"jsonl": 4, "token-data": 4} and total == 8
        assert d.log().count("results file: cannot write") == 1
        # The counter also travels with the results the other sinks got: the console block's source.
        assert "Read-only file system" in d.log()


def test_unreachable_wandb_is_bounded_and_keeps_the_results_for_wandb_sync(
        start_daemon, env: dict[str, str], tmp_path: Path, tcp_endpoint: str) -> None:
    with socket.socket() as s:  # a port nothing listens on: every connection is refused at once
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    online = dict(env, WANDB_MODE="online", WANDB_BASE_URL=f"http://127.0.0.1:{closed}", WANDB_API_KEY="x" * 40,
                  WANDB_DIR=str(tmp_path))
    d = start_daemon("--exit-on-end", "--wandb-init-timeout", "5", "--wandb-finish-timeout", "5",
                     child_env=online)
    from trainer_hook import EmbeddingPublisher

    pub = EmbeddingPublisher(tcp_endpoint, run="wb-down")
    wait_for("publisher to connect", lambda: pub.connected)
    for it, w in enumerate(matrices(3, shape=(64, 16))):
        pub.publish(w, it)
        wait_for(f"iter {it} analysed", lambda: it in analysed(d, "wb-down"), proc=d)
    pub.close()
    ended = time.monotonic()
    assert d.wait_exit(timeout=90) == 0
    took = time.monotonic() - ended
    log = d.log()
    assert "wandb: cannot start an online W&B run for 'wb-down'" in log
    sync = re.search(r"upload it later with `wandb sync (\S+)`", log)
    assert sync, log[-3000:]
    offline_dir = Path(sync.group(1))
    files = list(offline_dir.glob("*.wandb"))
    assert files, f"no offline run file to sync in {offline_dir}"
    steps = [row["analysis/iter"] for row in wandb_history.history(files[0]) if "analysis/iter" in row]
    assert steps == [0, 1, 2]  # every result is in the file `wandb sync` uploads
    assert "lost=0" in stopped_line(d)
    assert took < 80, f"the daemon took {took:.0f} s to exit after the trainer's end"
