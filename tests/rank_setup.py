"""What the tests' torchrun rank scripts share: their command line and the waits that keep iterations apart.

    torchrun --nproc_per_node=N tests/<name>_ranks.py ENDPOINT OUT_DIR RESULTS_DIR SCENARIO...

Imported by tests/sharded_ranks.py, tests/stack_ranks.py, tests/fsdp_training_ranks.py, tests/count_ranks.py and
tests/hf_zero3_trainer.py (run as scripts, never by pytest).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ENDPOINT, OUT, RESULTS = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
RANK = int(os.environ["RANK"])


def wait_sent(pub, n: int, what: str = "") -> None:
    """Until the `n` snapshots (or parts) this rank published were handed to ZeroMQ, so each iteration is out before the next.

    `pub`: anything with `published` and `dropped` counts (an EmbeddingPublisher, a callback's wrapper).
    """
    deadline = time.monotonic() + 60
    while pub.published < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pub.published == n, f"rank {RANK}: {what}{pub.published} of {n} parts sent ({pub.dropped} dropped)"


def wait_analysed(run: str, n: int) -> None:
    """Rank 0: until the daemon has written `n` results of `run` (its newest-wins rule then skips nothing)."""
    path = RESULTS / run / "analysis.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise SystemExit(f"rank 0: the daemon wrote no result {n} of run {run} in 120 s")


def deepspeed_without_shm_kernel() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce kernel (call before it sets up its backend).

    DeepSpeed builds it (C++ against torch's headers: 60-90 s on 2 cores, again whenever another
    checkout's venv built it last in the shared torch_extensions cache) when its torch backend starts,
    but uses it only for inference_all_reduce, which no test calls: ZeRO's collectives go through
    torch.distributed (gloo) with or without it. Everything else in DeepSpeed runs as it would.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
