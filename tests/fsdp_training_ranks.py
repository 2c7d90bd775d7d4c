"""Run under torchrun by tests/test_fsdp_training.py: real FSDP training that publishes mid-step, as a user would.

    torchrun --nproc_per_node=2 tests/fsdp_training_ranks.py ENDPOINT OUT_DIR RESULTS_DIR SCENARIO...

Scenarios: fsdp2 (`fully_shard` on each block and on the root; the embedding lives in the root unit)
publishes `model.tok_embeddings` between forward and backward (run fsdp2-mid) and after
optimizer.step() (run fsdp2-post); fsdp1 (FullyShardedDataParallel per block and root) publishes on
rank 0 inside `FSDP.summon_full_params(model, writeback=False)`, the README's advice, between forward
and backward (fsdp1-mid) and after the step (fsdp1-post). FSDP frees unsharded parameter storage with
`resize_(0)` right after; a publish that touched it killed both ranks. Rank 0 saves each published
matrix to OUT_DIR/<run>-<iter>.pt for the test's reference analysis and prints the losses.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.rank_setup import ENDPOINT, OUT, RANK, wait_analysed, wait_sent  # noqa: E402
from tests.tiny_lm import TinyLM  # noqa: E402
from trainer_hook import EmbeddingPublisher  # noqa: E402
from trainer_hook.sharding import is_dtensor  # noqa: E402

VOCAB, DIM, SEQ, BATCH, STEPS = 97, 32, 16, 4, 4


def batch(step: int) -> torch.Tensor:
    """Token sequences that count upwards (mod VOCAB): learnable in a few steps, different on each rank."""
    g = torch.Generator().manual_seed(1000 * RANK + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    return (start + torch.arange(SEQ + 1)) % VOCAB


def save_full(run: str, it: int, weight: torch.Tensor) -> None:
    """Rank 0 keeps the matrix it (or every rank) published, for the test's reference analysis."""
    full = weight.full_tensor() if is_dtensor(weight) else weight  # full_tensor: a collective, every rank calls it
    if RANK == 0:
        torch.save(full.detach().clone(), OUT / f"{run}-{it}.pt")


SENT: dict[str, int] = {}  # run -> snapshots (or parts) this rank handed off


def published(pub: EmbeddingPublisher, run: str, n: int, sent: bool) -> None:
    """After the n-th publish of `run`: what this rank sent went out, and the daemon analysed it, before training goes on."""
    SENT[run] = SENT.get(run, 0) + bool(sent)
    if sent:
        wait_sent(pub, SENT[run])
    if RANK == 0:
        wait_analysed(run, n)
    dist.barrier()


def train(model: nn.Module, publish_mid, publish_post, name: str) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    losses = []
    for step in range(STEPS):
        ids = batch(step)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        publish_mid(step, loss.item())  # between forward and backward
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        publish_post(step)  # after the optimizer step
        losses.append(loss.item())
    print(f"rank {RANK} {name} trained {STEPS} steps, losses {' '.join(f'{x:.4f}' for x in losses)}", flush=True)


def scenario_fsdp2() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyLM(VOCAB, DIM)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root unit: the embedding, final norm and head
    mid, post = EmbeddingPublisher(ENDPOINT, run="fsdp2-mid"), EmbeddingPublisher(ENDPOINT, run="fsdp2-post")

    def publish_mid(step: int, loss: float) -> None:
        weight = model.tok_embeddings.weight
        save_full("fsdp2-mid", step, weight)
        sent = mid.publish(model.tok_embeddings, step, metrics={"train/loss": loss})
        kind = "a DTensor shard" if is_dtensor(weight) else "the unsharded tensor"
        if step == 0:
            print(f"rank {RANK} fsdp2 mid-step publish sent {kind}", flush=True)
        published(mid, "fsdp2-mid", step + 1, sent)

    def publish_post(step: int) -> None:
        save_full("fsdp2-post", step, model.tok_embeddings.weight)
        published(post, "fsdp2-post", step + 1, post.publish(model.tok_embeddings, step))

    train(model, publish_mid, publish_post, "fsdp2")
    mid.close()
    post.close()


def scenario_fsdp1() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = TinyLM(VOCAB, DIM)
    for i, layer in enumerate(model.layers):
        model.layers[i] = FSDP(layer, device_id=torch.device("cpu"))
    model = FSDP(model, device_id=torch.device("cpu"))  # the embedding is in the root's FlatParameter
    mid, post = EmbeddingPublisher(ENDPOINT, run="fsdp1-mid"), EmbeddingPublisher(ENDPOINT, run="fsdp1-post")

    def publish_full(pub: EmbeddingPublisher, run: str, step: int, metrics: dict | None) -> None:
        sent = False
        with FSDP.summon_full_params(model, writeback=False):  # a collective: every rank enters
            if RANK == 0:
                weight = model.module.tok_embeddings.weight
                torch.save(weight.detach().clone(), OUT / f"{run}-{step}.pt")
                sent = pub.publish(model.module.tok_embeddings, step, metrics=metrics)
        # leaving it, FSDP freed the full parameters' storage with resize_(0): the publish above must allow that
        published(pub, run, step + 1, sent)

    train(model, lambda step, loss: publish_full(mid, "fsdp1-mid", step, {"train/loss": loss}),
          lambda step: publish_full(post, "fsdp1-post", step, None), "fsdp1")
    mid.close()
    post.close()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for name in sys.argv[4:]:
        {"fsdp2": scenario_fsdp2, "fsdp1": scenario_fsdp1}[name]()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
