"""Sharded embeddings end to end: torchrun CPU ranks (gloo) publish DTensor shards, a real daemon assembles them.

The daemon's records must equal the analysis of full_tensor() done here, in-process, by the same
function the daemon's worker runs. Two torchrun launches cover every scenario (they are slow to start).
"""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from analysis_daemon.service.assembly import Assembler, PartRejected
from analysis_daemon.records import Job, RunInsight, SnapshotData
from analysis_daemon.pipeline import AnalysisSettings, analyse
from protocol import decode, encode_snapshot
from tests.test_daemon import DaemonProc, wait_for

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
RANKS_SCRIPT = ROOT / "tests" / "sharded_ranks.py"
SCENARIOS_4 = ["fsdp", "shard0", "shard1", "mesh2x2", "replicate", "errors"]
ITERS = {"fsdp": [0, 10], "shard0": [0, 5], "shard1": [0, 5], "mesh2x2": [0, 5], "replicate": [0, 5]}


def torchrun(nproc: int, daemon: DaemonProc, out: Path, env: dict, *scenarios: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(RANKS_SCRIPT), daemon.endpoint, str(out), str(daemon.results_dir),
           *scenarios]
    return subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)


def close(a, b, path: str = "") -> None:
    """Every number in `a` equals the one in `b` (floats to 1e-5 relative); other keys must match too."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def reference(out: Path, run: str, iters: list[int]) -> list[dict]:
    """Analyse the saved full_tensor() of each iteration exactly as the daemon's worker does."""
    from analysis_daemon.pipeline import jsonable

    torch.set_num_threads(1)  # the daemon runs with --threads 1: same reduction order
    prev, first, records, insight = None, None, [], RunInsight()
    for it in iters:
        cur = SnapshotData(iter=it, seq=0, name="wte", tensor=torch.load(out / f"{run}-{it}.pt"))
        first = first or cur  # the daemon keeps the run's first snapshot (drift since init)
        records.append(jsonable(analyse(Job(run=run, current=cur, previous=prev, skipped_iters=[], hello=None,
                                            first=first),
                                        AnalysisSettings(), insight_state=insight)))
        prev = cur
    return records


@pytest.fixture
def daemons(subprocess_env: dict, tmp_path: Path, tcp_endpoint: str):
    """Factory of real daemons on this test's endpoint; each is killed at teardown."""
    started: list[DaemonProc] = []
    env = dict(subprocess_env, OMP_WAIT_POLICY="PASSIVE")

    def start(*args: str) -> DaemonProc:
        started.append(DaemonProc(tmp_path, env, tcp_endpoint, *args))
        return started[-1]

    yield start
    for d in started:
        d.kill()


def test_four_ranks_fsdp2_tp_and_2x2_mesh_equal_the_full_matrix(daemons, subprocess_env, tmp_path: Path):
    daemon = daemons()  # no --exit-on-end: the runs follow each other, each ends on its own
    out = tmp_path / "full"
    out.mkdir()
    threads = torch.get_num_threads()
    try:
        proc = torchrun(4, daemon, out, subprocess_env, *SCENARIOS_4)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        for run, iters in ITERS.items():
            got = daemon.wait_results(run, len(iters))
            assert [r["iter"] for r in got] == iters
            for mine, theirs in zip(reference(out, run, iters), got):
                assert theirs["shape"] == list(torch.load(out / f"{run}-{mine['iter']}.pt").shape)
                for key in ("drift", "geometry", "insight", "non_finite"):
                    close(mine.get(key), theirs.get(key), f"{run}:{mine['iter']}:{key}")
            assert got[-1]["counters"]["incomplete"] == 0 and got[-1]["counters"]["rejected"] == 0
            assert [r["metrics"] for r in got] == [{"train/loss": 1.0 / (it + 1)} for it in iters]  # rank 0's
    finally:
        torch.set_num_threads(threads)
    # Every rank got one clear line, and no traceback from inside torch.
    for rank in range(4):
        assert (f"rank {rank} flat: UnpublishableWeight: FSDP1 (FullyShardedDataParallel) flattens parameters"
                in proc.stdout), proc.stdout
        assert 'publish(fsdp_model, it, embedding="transformer.wte")' in proc.stdout
        assert f"rank {rank} meta: UnpublishableWeight: the embedding weight is on the meta device" in proc.stdout
        assert f"rank {rank} 3d: UnpublishableWeight: embedding weight must be a 2-D floating tensor" in proc.stdout
    for run in ITERS:  # every rank of every run sent `end`
        wait_for(f"run {run} closed", lambda: f"run {run}: closed" in daemon.log(), proc=daemon)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    log = daemon.log()
    assert "run fsdp: hello from" in log and "rank 3 of 4" in log and "incomplete=0" in log



def test_a_killed_rank_drops_its_iteration_and_the_next_completes(daemons, subprocess_env, tmp_path: Path):
    daemon = daemons("--assembly-timeout", "30")
    out = tmp_path / "full"
    out.mkdir()
    proc = torchrun(2, daemon, out, subprocess_env, "killed")
    assert proc.returncode != 0 and "exitcode  : -9" in proc.stderr, proc.stderr[-5000:]  # rank 1's SIGKILL
    proc = torchrun(2, daemon, out, subprocess_env, "killed-again")  # the job started again, same run name
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = daemon.wait_results("killed", 2)
    assert [r["iter"] for r in got] == [1, 3]
    assert got[-1]["counters"]["incomplete"] == 1
    close(reference(out, "killed", [3])[0]["geometry"], got[-1]["geometry"])
    # The first job's publishers are gone (rank 1 killed, rank 0 stopped by torchrun); the iteration being
    # assembled is dropped (timeout, or iter 3's parts arrive first); the new job's `end`s end the run.
    wait_for("the run closed", lambda: "run killed: closed" in daemon.log(), proc=daemon)
    log = daemon.log()
    assert "publisher process" in log and "is gone (no end message)" in log, log
    assert "run killed: iter 2 dropped: incomplete" in log and "1 part(s) covering 50.0% of [1001, 16]" in log, log


# --- the assembler on its own: bounds, overlaps, late parts ------------------------------------

def part_frames(run: str, it: int, rows: tuple[int, int], global_rows: int = 10, cols: int = 4, publisher: str = "p",
                metrics: dict | None = None):
    n = rows[1] - rows[0]
    data = torch.arange(rows[0] * cols, rows[1] * cols, dtype=torch.float32).view(n, cols)
    return encode_snapshot(run=run, iter=it, seq=it, name="wte", dtype="float32", shape=(n, cols),
                           payload=data.numpy().tobytes(), global_shape=(global_rows, cols), offset=(rows[0], 0),
                           publisher=publisher, metrics=metrics), data


def part(run: str, it: int, rows: tuple[int, int], global_rows: int = 10, cols: int = 4, publisher: str = "p",
         metrics: dict | None = None):
    frames, data = part_frames(run, it, rows, global_rows, cols, publisher, metrics)
    return decode(frames), data


def test_assembler_keeps_one_iteration_per_run_and_says_why_it_dropped():
    asm, drops = Assembler(timeout_s=60), []
    for it in range(50):  # a rank that never sends: each newer iteration evicts the older one
        assert asm.add("r", *part("r", it, (0, 5)), drops) is None
        assert asm.in_progress() == 1
    assert len(drops) == 49 and asm.dropped == 49
    assert drops[0] == "iter 0 dropped: incomplete (1 part(s) covering 50.0% of [10, 4]) when a part of iter 1 arrived"
    done = asm.add("r", *part("r", 49, (5, 10)), drops)
    assert done is not None and done.iter == 49 and done.parts == 2 and asm.in_progress() == 0
    assert torch.equal(done.tensor, torch.arange(40, dtype=torch.float32).view(10, 4))


def test_assembler_rejects_overlaps_late_parts_and_mismatches():
    asm, drops = Assembler(timeout_s=60), []
    asm.add("r", *part("r", 3, (0, 6)), drops)
    with pytest.raises(PartRejected, match=r"part \[4, 4\] at \[5, 0\] of iter 3 overlaps the part \[6, 4\] at \[0, 0\]"):
        asm.add("r", *part("r", 3, (5, 9)), drops)
    with pytest.raises(PartRejected, match="part of iter 2 arrived after iter 3 began"):
        asm.add("r", *part("r", 2, (6, 10)), drops)
    with pytest.raises(PartRejected, match=r"is wte \[11, 4\] float32, the iteration's other parts are wte \[10, 4\]"):
        asm.add("r", *part("r", 3, (6, 10), global_rows=11), drops)
    assert drops == [] and asm.add("r", *part("r", 3, (6, 10)), drops) is not None


def test_assembler_times_out():
    asm, drops = Assembler(timeout_s=0.05), []
    asm.add("r", *part("r", 1, (0, 5)), drops)
    time.sleep(0.1)
    (run, why), = asm.expire(time.monotonic())
    assert run == "r" and why.startswith("iter 1 dropped: incomplete after 0 s (1 part(s) covering 50.0%")
    assert asm.in_progress() == 0 and asm.runs() == [] and asm.dropped == 1


def test_assembled_iteration_carries_rank_0s_metrics_whatever_arrives_last():
    asm, drops = Assembler(timeout_s=60), []
    for order in ((0, 1), (1, 0)):  # rank 1's part last, then rank 0's last
        it = order[0]
        for rank in order:
            msg, data = part("r", it, (5 * rank, 5 * rank + 5), publisher=f"p{rank}",
                             metrics={"train/loss": 2.0 + rank, "rank": rank})
            done = asm.add("r", msg, data, drops, rank=rank)
        assert done is not None and done.metrics == {"train/loss": 2.0, "rank": 0}
    msg, data = part("r", 5, (0, 5), publisher="p0")  # rank 0 sent none: no metrics, not another rank's
    asm.add("r", msg, data, drops, rank=0)
    msg, data = part("r", 5, (5, 10), publisher="p1", metrics={"train/loss": 3.0})
    assert asm.add("r", msg, data, drops, rank=1).metrics == {"train/loss": 3.0}  # the only ones sent


def test_daemon_records_rank_0s_metrics_when_rank_1s_part_arrives_last(daemons, tcp_endpoint: str):
    import zmq
    from protocol import encode_end, encode_hello
    d = daemons("--exit-on-end", "--no-extras", "--no-wandb")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(tcp_endpoint)
    try:
        for rank in (0, 1):
            push.send_multipart(encode_hello(run="ranks", seq=0, pid=100 + rank, host="h", publisher=f"pub{rank}",
                                             rank=rank, world_size=2))
        for it in (1, 2):
            for rank in (0, 1):  # rank 1's part, with its own (local) loss, completes each iteration
                frames, _ = part_frames("ranks", it, (5 * rank, 5 * rank + 5), publisher=f"pub{rank}",
                                        metrics={"train/loss": it + 0.5 * rank})
                push.send_multipart(frames)
        for rank in (0, 1):
            push.send_multipart(encode_end(run="ranks", seq=9, final_iter=2, published=2, dropped=0,
                                           publisher=f"pub{rank}"))
        assert d.wait_exit() == 0
    finally:
        push.close()
        ctx.term()
    assert [(r["iter"], r["metrics"]) for r in d.results("ranks")] == [(1, {"train/loss": 1}), (2, {"train/loss": 2})]
