"""Run under torchrun by tests/test_token_counts.py: 2 gloo ranks count the tokens their embedding sees and publish.

    torchrun --nproc_per_node=2 tests/count_ranks.py ENDPOINT OUT_DIR RESULTS_DIR SCENARIO...

Scenarios (each its own run name):
  fsdp-counts  FSDP2 fully_shard over an embedding (101 x 8: rows 51 / 50) and a head; data parallel: each rank
               trains on batches of its own, counted by publisher.watch_tokens; each rank's part carries its
               counts, the daemon sums them;
  mg-counts    Megatron-core TP=2 VocabParallelEmbedding (102 x 8: rows 51 / 51): both ranks of the TP group
               feed the same batch, as Megatron does; only TP rank 0's part carries its counts.
Each rank saves the ids it fed before each publish to OUT_DIR/<run>-<rank>-<iter>.pt (the test's reference);
rank 0 waits for the daemon's record of an iteration before the next one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.rank_setup import ENDPOINT, OUT, RANK, wait_analysed, wait_sent  # noqa: E402
from trainer_hook import EmbeddingPublisher  # noqa: E402

ITERS = {0: 1, 1: 2}  # iteration -> optimizer steps trained before its publish
D = 8


def run_iters(run: str, embedding: torch.nn.Module, step, next_ids) -> None:
    """Watch the embedding; per iteration train, save the ids fed, publish this rank's part; then close."""
    pub = EmbeddingPublisher(ENDPOINT, run=run)
    pub.watch_tokens(embedding)  # what the callbacks do at train begin
    for n, (it, steps) in enumerate(ITERS.items()):
        fed = [next_ids() for _ in range(steps)]
        for ids in fed:
            step(ids)
        torch.save(torch.cat([ids.reshape(-1) for ids in fed]), OUT / f"{run}-{RANK}-{it}.pt")
        assert pub.publish(embedding, it), f"rank {RANK}: {run} iter {it} not handed off"
        wait_sent(pub, n + 1, f"{run} iter {it}: ")
        if RANK == 0:
            wait_analysed(run, n + 1)
        dist.barrier()
    pub.close()
    dist.barrier()


def fsdp_counts() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(101, D), torch.nn.Linear(D, 101))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(100 + RANK)  # data parallel: each rank its own batches

    def step(ids: torch.Tensor) -> None:
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 101), ids.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()

    # ids only up to 80: rows 81..100 (on rank 1's shard) are never fed by any rank
    run_iters("fsdp-counts", model[0], step, lambda: torch.randint(0, 81, (3, 5 + RANK), generator=gen))


def mg_counts() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(102, D, init_method=torch.nn.init.normal_, config=cfg)
    opt = torch.optim.SGD([emb.weight], lr=0.5)
    gen = torch.Generator().manual_seed(7)  # the same on both ranks: a TP group feeds one batch

    def step(ids: torch.Tensor) -> None:
        (emb(ids).float() ** 2).mean().backward()
        opt.step()
        opt.zero_grad()

    run_iters("mg-counts", emb, step, lambda: torch.randint(0, 90, (2, 6), generator=gen))
    ps.destroy_model_parallel()


def main() -> None:
    dist.init_process_group("gloo")
    for name in sys.argv[4:]:
        {"fsdp-counts": fsdp_counts, "mg-counts": mg_counts}[name]()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
