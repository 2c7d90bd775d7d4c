"""Run under torchrun by tests/test_sharded.py: every rank publishes DTensor embeddings, as a user would.

    torchrun --nproc_per_node=4 tests/sharded_ranks.py ENDPOINT OUT_DIR RESULTS_DIR SCENARIO...

Scenarios (each its own run name): fsdp (fully_shard, 5003 uneven rows), shard0, shard1
(distribute_tensor on a 1-D mesh), mesh2x2 ((Shard(0), Shard(1)) on a 2 x 2 mesh), replicate
((Replicate(), Shard(0)) on 2 x 2), errors (FSDP1-style flat param, meta, 3-D: the one-line errors),
killed (2 ranks: rank 1 dies before sending iter 2's part), then killed-again (the job started anew
under the same run name sends iter 3).
Rank 0 saves each iteration's full_tensor() to OUT_DIR/<run>-<iter>.pt for the test to analyse itself,
and waits for the daemon's result (RESULTS_DIR/<run>/analysis.jsonl) before the next iteration, so
the daemon's newest-wins rule skips nothing and every iteration can be compared.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.rank_setup import ENDPOINT, OUT, RANK, wait_analysed, wait_sent  # noqa: E402
from trainer_hook import EmbeddingPublisher  # noqa: E402

WORLD = int(os.environ["WORLD_SIZE"])


def publish_iters(run: str, weight_fn, iters: list[int], step) -> None:
    """Publish `iters` of one run on every rank; between iterations `step` changes the weights."""
    pub = EmbeddingPublisher(ENDPOINT, run=run)
    w = weight_fn()
    pub.prepare(w)  # as the README shows: buffers ready before the first publish
    sent = 0
    for it in iters:
        full = w.full_tensor()  # a collective: every rank calls it; only the test's reference uses it
        if RANK == 0:
            torch.save(full.clone(), OUT / f"{run}-{it}.pt")
        if pub.publish(w, it, metrics={"train/loss": 1.0 / (it + 1)} if RANK == 0 else None):
            sent += 1
        wait_sent(pub, sent)
        if RANK == 0:
            wait_analysed(run, len(iters[:iters.index(it) + 1]))
        dist.barrier()
        step(w)
    pub.close()
    dist.barrier()


def perturb(w) -> None:
    with torch.no_grad():
        local = w.to_local()
        local.mul_(0.9).add_(0.05 * torch.randn_like(local))


def scenario_fsdp() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5003, 24)  # 5003 rows over 4 ranks: 1251, 1251, 1251, 1250
    fully_shard(emb, mesh=init_device_mesh("cpu", (WORLD,)))
    publish_iters("fsdp", lambda: emb.weight, [0, 10], perturb)


def scenario_dist(run: str, shape: tuple[int, int], mesh_shape: tuple[int, ...], placements) -> None:
    torch.manual_seed(1)  # the same full matrix on every rank: distribute_tensor takes each rank's block of it
    full = torch.randn(*shape)
    w = distribute_tensor(full, init_device_mesh("cpu", mesh_shape), placements)
    publish_iters(run, lambda: w, [0, 5], perturb)


def scenario_errors() -> None:
    pub = EmbeddingPublisher(ENDPOINT, run="errors")
    flat = torch.nn.Parameter(torch.zeros(12))
    flat._is_flat_param = True  # what FSDP1's FlatParameter carries
    for what, arg in [("flat", flat), ("meta", torch.empty(10, 4, device="meta")), ("3d", torch.zeros(2, 3, 4))]:
        try:
            pub.publish(arg, 0)
            print(f"rank {RANK} {what}: no error", flush=True)
        except ValueError as exc:
            print(f"rank {RANK} {what}: {type(exc).__name__}: {exc}", flush=True)
    pub.close()


def scenario_killed(attempt: int) -> None:
    torch.manual_seed(2)
    full = torch.randn(1001, 16)
    w = distribute_tensor(full, init_device_mesh("cpu", (WORLD,)), [Shard(0)])
    pub = EmbeddingPublisher(ENDPOINT, run="killed")
    pub.prepare(w)
    if attempt == 0:
        pub.publish(w, 1)
        wait_sent(pub, 1)
        if RANK == 0:
            wait_analysed("killed", 1)
        dist.barrier()
        if RANK == 0:
            pub.publish(w, 2)
            wait_sent(pub, 2)
        dist.barrier()
        if RANK == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # dies before sending its part of iter 2
        time.sleep(60)  # torchrun stops this rank once it sees rank 1 die
        return
    perturb(w)
    if RANK == 0:
        torch.save(w.full_tensor().clone(), OUT / "killed-3.pt")
    else:
        w.full_tensor()
    pub.publish(w, 3)
    wait_sent(pub, 1)
    pub.close()
    dist.barrier()


def main() -> None:
    dist.init_process_group("gloo")
    for name in sys.argv[4:]:
        if name == "fsdp":
            scenario_fsdp()
        elif name == "shard0":
            scenario_dist("shard0", (1003, 20), (WORLD,), [Shard(0)])
        elif name == "shard1":
            scenario_dist("shard1", (600, 22), (WORLD,), [Shard(1)])  # 22 columns over 4: 6, 6, 6, 4
        elif name == "mesh2x2":
            scenario_dist("mesh2x2", (701, 18), (2, 2), [Shard(0), Shard(1)])
        elif name == "replicate":
            scenario_dist("replicate", (501, 12), (2, 2), [Replicate(), Shard(0)])
        elif name == "errors":
            scenario_errors()
        elif name in ("killed", "killed-again"):
            scenario_killed(0 if name == "killed" else 1)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
