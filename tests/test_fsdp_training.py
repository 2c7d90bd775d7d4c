"""FSDP1 and FSDP2 training on two CPU ranks (gloo) that publishes mid-step to a real daemon, and finishes.

FSDP frees unsharded parameter storage with `resize_(0)` after use; a publish that left the storage
not resizable killed both ranks. tests/fsdp_training_ranks.py trains a tiny model for a few steps and
publishes between forward and backward and after optimizer.step(); the daemon's records must equal
the analysis of the matrices the ranks saved, done here by the daemon's own function.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_sharded import ROOT, close, daemons, reference  # noqa: F401  (daemons is a fixture)

pytestmark = pytest.mark.timeout(300)

RANKS_SCRIPT = ROOT / "tests" / "fsdp_training_ranks.py"
STEPS = 4  # tests/fsdp_training_ranks.py's STEPS


def test_fsdp1_and_fsdp2_training_publishing_mid_step_finishes_and_is_analysed(daemons, subprocess_env,
                                                                               tmp_path: Path):
    daemon = daemons()
    out = tmp_path / "full"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RANKS_SCRIPT),
           daemon.endpoint, str(out), str(daemon.results_dir), "fsdp2", "fsdp1"]
    proc = subprocess.run(cmd, env={**subprocess_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "not resizable" not in proc.stderr
    # The root unit keeps its parameters unsharded between forward and backward: rank 0 sends the whole matrix.
    assert "rank 0 fsdp2 mid-step publish sent the unsharded tensor" in proc.stdout, proc.stdout
    losses = {}
    for rank in (0, 1):
        for name in ("fsdp2", "fsdp1"):
            line = re.search(rf"rank {rank} {name} trained {STEPS} steps, losses ([\d. ]+)", proc.stdout)
            assert line, proc.stdout
            losses[rank, name] = [float(x) for x in line.group(1).split()]
            assert losses[rank, name][-1] < losses[rank, name][0]  # it trained: the counting sequences are learnt
    iters = list(range(STEPS))
    for run in ("fsdp2-mid", "fsdp2-post", "fsdp1-mid", "fsdp1-post"):
        got = daemon.wait_results(run, STEPS)
        assert [r["iter"] for r in got] == iters, run
        for mine, theirs in zip(reference(out, run, iters), got):
            assert theirs["shape"] == [97, 32]
            for key in ("drift", "geometry", "insight", "non_finite"):
                close(mine.get(key), theirs.get(key), f"{run}:{mine['iter']}:{key}")
        assert got[0]["drift"] is None and all(0 < r["drift"]["average_cosine_similarity"] < 1 for r in got[1:]), run
        assert got[-1]["counters"]["incomplete"] == 0 and got[-1]["counters"]["rejected"] == 0
        if run.endswith("-mid"):  # rank 0's loss, measured at that step's forward, travels with its snapshot
            measured = losses[0, run.split("-")[0]]
            assert [round(r["metrics"]["train/loss"], 4) for r in got] == pytest.approx(measured, abs=1e-4)
        else:
            assert all(not r.get("metrics") for r in got)
    # The post-step matrices differ from the mid-step ones of the same step: the optimizer moved them.
    assert not torch.equal(torch.load(out / "fsdp2-mid-1.pt"), torch.load(out / "fsdp2-post-1.pt"))
    for fsdp in ("fsdp2", "fsdp1"):  # nothing changes the weights between a step's end and the next forward
        assert torch.equal(torch.load(out / f"{fsdp}-post-0.pt"), torch.load(out / f"{fsdp}-mid-1.pt"))
