"""FSDP1, DeepSpeed ZeRO and Megatron-core tensor parallel end to end: 2 torchrun CPU ranks (gloo) train and publish.

Every rank publishes the object a user holds; a real daemon assembles the parts. Its records must
equal the analysis of the full matrix, gathered in tests/stack_ranks.py with the stack's own
collectives and analysed here by the function the daemon's worker runs. Torchrun is slow to start
(two interpreters importing torch and the stack), so one launch runs every layout in turn, each under
its own run name, and the tests below check theirs; the HF Trainer under ZeRO-3 is a launch of its own.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import child_env, free_tcp_port
from tests.test_daemon import DaemonProc
from tests.test_sharded import close, daemons, reference  # noqa: F401 - daemons is a fixture

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parent.parent
RANKS_SCRIPT = ROOT / "tests" / "stack_ranks.py"
ITERS = [0, 1]
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
FSDP1 = ["fsdp1-root", "fsdp1-own", "fsdp1-none", "fsdp1-bare", "fsdp1-callback", "fsdp1-noshard", "fsdp1-hybrid"]
MEGATRON = ["mg-tp", "mg-dp"]
ZERO = ["z3", "z3-bf16", "z3-init", "z2"]  # last: DeepSpeed's engine and zero.Init go after the others


def torchrun(daemon, out: Path, env: dict, *scenarios: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(RANKS_SCRIPT), daemon.endpoint, str(out), str(daemon.results_dir), *scenarios]
    extra = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=360)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory):
    """(daemon, out dir, finished torchrun) of the one launch that runs every installed stack's layouts."""
    tmp = tmp_path_factory.mktemp("stacks")
    env = child_env(tmp)
    daemon = DaemonProc(tmp, dict(env, OMP_WAIT_POLICY="PASSIVE"), f"tcp://127.0.0.1:{free_tcp_port()}")
    out = tmp / "full"
    out.mkdir()
    try:
        scenarios = FSDP1 + MEGATRON * HAVE_MEGATRON + ZERO * HAVE_DEEPSPEED
        yield daemon, out, torchrun(daemon, out, env, *scenarios)
    finally:
        daemon.kill()


def launched(stacks):
    """The shared launch, failing the test that reads it if the launch failed."""
    daemon, out, proc = stacks
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return daemon, out, proc


def check_runs(daemon, out: Path, runs: list[str], proc: subprocess.CompletedProcess) -> None:
    """Each run's records equal the reference analysis of the gathered full matrix, nothing rejected."""
    threads = torch.get_num_threads()
    try:
        for run in runs:
            got = daemon.wait_results(run, len(ITERS))
            assert [r["iter"] for r in got] == ITERS, run
            for mine, theirs in zip(reference(out, run, ITERS), got):
                assert theirs["shape"] == list(torch.load(out / f"{run}-{mine['iter']}.pt").shape)
                for key in ("drift", "geometry", "insight", "non_finite"):
                    close(mine.get(key), theirs.get(key), f"{run}:{mine['iter']}:{key}")
            assert got[-1]["counters"]["incomplete"] == 0 and got[-1]["counters"]["rejected"] == 0, got[-1]
            assert [r["metrics"] for r in got] == [{"train/loss": 1.0 / (it + 1)} for it in ITERS]  # rank 0's
    finally:
        torch.set_num_threads(threads)


needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed (pip install -e '.[test]')")
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip install -e '.[test]')")


@needs_megatron
def test_megatron_vocab_parallel_embedding_and_head_every_tp_rank_sends_its_rows(stacks):
    daemon, out, proc = launched(stacks)
    check_runs(daemon, out, ["mg-tp", "mg-head", "mg-dp"], proc)
    for rank in (0, 1):  # TP: both ranks send their half; DP x TP=1: only dp rank 0
        assert f"rank {rank} mg-tp: sent 2 parts" in proc.stdout and f"rank {rank} mg-head: sent 2 parts" in proc.stdout
    assert "rank 0 mg-dp: sent 2 parts" in proc.stdout and "rank 1 mg-dp: sent 0 parts" in proc.stdout


def test_fsdp1_root_unit_own_unit_a_rank_holding_nothing_and_replicas(stacks):
    daemon, out, proc = launched(stacks)
    check_runs(daemon, out, ["fsdp1-root", "fsdp1-own", "fsdp1-none", "fsdp1-callback", "fsdp1-noshard",
                             "fsdp1-hybrid"], proc)
    for run in ("fsdp1-noshard", "fsdp1-hybrid"):  # every rank holds all of it: the first replica sends
        assert f"rank 0 {run}: sent 2 parts" in proc.stdout and f"rank 1 {run}: sent 0 parts" in proc.stdout
    # the callbacks' StepPublisher, handed the bare embedding and the FSDP model, sends each rank's slice
    assert "rank 0 fsdp1-callback: sent 2 parts" in proc.stdout and "rank 1 fsdp1-callback: sent 2 parts" in proc.stdout
    assert "rank 1 fsdp1-callback: rows 1001" in proc.stdout
    for rank in (0, 1):
        assert f"rank {rank} fsdp1-root: sent 2 parts" in proc.stdout
        assert (f"rank {rank} bare: UnpublishableWeight: the embedding weight is a 1-D view of this rank's FSDP1 "
                "(FullyShardedDataParallel) shard, which does not say where it lies: pass the FSDP model and the "
                "embedding's path instead: publish(fsdp_model, it, embedding=\"transformer.wte\")") in proc.stdout
    assert "rank 0 fsdp1-none: sent 2 parts" in proc.stdout and "rank 1 fsdp1-none: sent 0 parts" in proc.stdout


@needs_deepspeed
def test_deepspeed_zero3_partitions_bf16_zero_init_and_zero2(stacks):
    daemon, out, proc = launched(stacks)
    # bf16 partitions travel as bf16; the reference is the same bf16 values, so the numbers match as for fp32
    check_runs(daemon, out, ["z3", "z3-bf16", "z3-init", "z2"], proc)
    for rank in (0, 1):
        assert f"rank {rank} z3: sent 2 parts" in proc.stdout and f"rank {rank} z3-bf16: sent 2 parts" in proc.stdout
        assert f"rank {rank} z3-init: sent 2 parts" in proc.stdout
    assert "rank 0 z2: sent 2 parts" in proc.stdout and "rank 1 z2: sent 0 parts" in proc.stdout
    # ZeRO-3 leaves an empty placeholder where the weight was; ZeRO-2 the full weight
    assert "rank 1 z3-bf16: weight (0,) partition torch.bfloat16" in proc.stdout
    assert "rank 1 z3-init: weight (0,) partition torch.float32" in proc.stdout
    assert "rank 1 z2: weight (1001, 15) partition None" in proc.stdout


@needs_deepspeed
def test_hf_trainer_deepspeed_zero3_callback_every_rank_publishes(daemons, subprocess_env, tmp_path):
    daemon = daemons()
    out = tmp_path / "full"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "hf_zero3_trainer.py"), daemon.endpoint, str(out), str(daemon.results_dir)]
    proc = subprocess.run(cmd, env={**subprocess_env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=360, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):  # both ranks sent their partition at steps 0, 2 and 4; nothing failed
        assert f"RANK {rank} published=3 dropped=0 failures=0" in proc.stdout, proc.stdout
    steps = [0, 2, 4]
    got = daemon.wait_results("hf-z3", len(steps))
    assert [r["iter"] for r in got] == steps and got[-1]["counters"]["rejected"] == 0
    threads = torch.get_num_threads()
    try:
        for mine, theirs in zip(reference(out, "hf-z3", steps), got):
            for key in ("drift", "geometry"):
                close(mine.get(key), theirs.get(key), f"hf-z3:{mine['iter']}:{key}")
    finally:
        torch.set_num_threads(threads)

