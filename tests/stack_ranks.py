"""Run under torchrun by tests/test_stacks.py: each rank trains a tiny model on a sharding stack and publishes.

    torchrun --nproc_per_node=2 tests/stack_ranks.py ENDPOINT OUT_DIR RESULTS_DIR SCENARIO...

Scenarios (each its own run name):
  mg-tp       Megatron-core TP=2: VocabParallelEmbedding (1002 x 16, rows split 501/501) and, as run
              mg-head, a ColumnParallelLinear output head over the vocabulary;
  mg-dp       Megatron-core TP=1 x DP=2: every rank holds the whole table, only dp rank 0 sends;
  fsdp1-root  FSDP1, use_orig_params=True, embedding (1001 x 16) inside the root unit: the shard
              boundary falls mid-row; published as publish(model, it, embedding="transformer.wte");
  fsdp1-own   FSDP1, use_orig_params=False, embedding in its own unit: publish(model.transformer.wte, it);
  fsdp1-none  FSDP1 root unit where rank 0's shard holds all of the embedding and rank 1's none of it;
  fsdp1-noshard / fsdp1-hybrid
              FSDP1 NO_SHARD and HYBRID_SHARD (2 replicas of a 1-rank shard group): every rank holds all
              of it, rank 0 (the first replica) sends;
  fsdp1-bare  the bare embedding module of fsdp1-root: the one-line error, training goes on;
  fsdp1-callback  fsdp1-root published as the framework callbacks do (trainer_hook.callbacks.StepPublisher
              given the bare embedding and the FSDP model);
  z3 / z3-bf16 / z3-init / z2
              DeepSpeed ZeRO-3 (fp32, bf16, parameters created under zero.Init) and ZeRO-2, on a
              1001 x 15 embedding: partitions of 7508 elements, split mid-row, the last one padded.
Each iteration every rank trains one step and publishes; the reference full matrix is gathered here
with the stack's own collectives (for the test only) and saved by rank 0 to OUT_DIR/<run>-<iter>.pt;
rank 0 waits for the daemon's result before the next iteration so every iteration can be compared.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.rank_setup import ENDPOINT, OUT, RANK, deepspeed_without_shm_kernel, wait_analysed, wait_sent  # noqa: E402
from trainer_hook import EmbeddingPublisher  # noqa: E402

ITERS = [0, 1]
V, D = 1001, 16


def loop(runs: dict, step, publish_args, pubs: dict | None = None) -> None:
    """For each iteration: `step()` trains; then for each run, save the gathered reference and publish on every rank.

    `pubs` (optional): run -> an object with publish(obj, it, metrics=..., **kwargs), published, dropped, close().
    """
    pubs = pubs or {run: EmbeddingPublisher(ENDPOINT, run=run) for run in runs}
    sent = {run: 0 for run in runs}
    for n, it in enumerate(ITERS):
        step()
        for run, gather in runs.items():
            full = gather()  # collective on every rank: the test's reference only
            if RANK == 0:
                torch.save(full.detach().float().clone(), OUT / f"{run}-{it}.pt")
            obj, kwargs = publish_args(run)
            if pubs[run].publish(obj, it, metrics={"train/loss": 1.0 / (it + 1)} if RANK == 0 else None, **kwargs):
                sent[run] += 1
            wait_sent(pubs[run], sent[run], f"{run}: ")
            if RANK == 0:
                wait_analysed(run, n + 1)
            dist.barrier()
    for run, pub in pubs.items():
        print(f"rank {RANK} {run}: sent {sent[run]} parts", flush=True)  # the test checks who sent
        pub.close()
    dist.barrier()


# ------------------------------------------------------------------------------------- Megatron

def megatron(tp: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(V + 1, D, init_method=torch.nn.init.normal_, config=cfg)
    head = ColumnParallelLinear(D, V + 1, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                gather_output=False)
    if tp == 1:  # data parallel: the replicas start equal, as Megatron's DDP makes them
        for p in (emb.weight, head.weight):
            dist.broadcast(p.data, 0)
    opt = torch.optim.SGD([emb.weight, head.weight], lr=0.5)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        ids = torch.randint(0, V + 1, (4, 8), generator=gen)
        logits, _ = head(emb(ids))
        opt.zero_grad()
        (logits.float() ** 2).mean().backward()
        if tp == 1:
            for p in (emb.weight, head.weight):
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()

    def gathered(w: torch.Tensor):
        def gather() -> torch.Tensor:
            group = ps.get_tensor_model_parallel_group()
            pieces = [torch.empty_like(w) for _ in range(dist.get_world_size(group))]
            dist.all_gather(pieces, w.detach().contiguous(), group=group)
            return torch.cat(pieces, 0)
        return gather

    if tp == 2:
        loop({"mg-tp": gathered(emb.weight), "mg-head": gathered(head.weight)}, step,
             lambda run: (emb, {}) if run == "mg-tp" else (head.weight, {}))
    else:
        loop({"mg-dp": gathered(emb.weight)}, step, lambda run: (emb, {}))
    ps.destroy_model_parallel()


# ------------------------------------------------------------------------------------- FSDP1

class Inner(torch.nn.Module):
    def __init__(self, big_after: bool, dim: int = D) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(V, dim)
        # fsdp1-none: a large parameter after the embedding moves the shard boundary past its end
        self.head = torch.nn.Linear(dim, 2000 if big_after else 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.wte(ids))


class Model(torch.nn.Module):
    def __init__(self, big_after: bool = False) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(3, 3)  # a few parameters before the embedding: the split is mid-row
        self.transformer = Inner(big_after)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids) + self.pre.bias.sum()


def fsdp1(scenario: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    model = Model(big_after=scenario == "fsdp1-none")
    own = scenario == "fsdp1-own"
    kwargs = dict(auto_wrap_policy=ModuleWrapPolicy({torch.nn.Embedding})) if own else {}
    if scenario == "fsdp1-noshard":
        kwargs["sharding_strategy"] = ShardingStrategy.NO_SHARD
    elif scenario == "fsdp1-hybrid":
        from torch.distributed.device_mesh import init_device_mesh

        kwargs.update(sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=init_device_mesh("cpu", (2, 1)))
    fsdp = FSDP(model, use_orig_params=scenario != "fsdp1-own", device_id=torch.device("cpu"), **kwargs)
    opt = torch.optim.SGD(fsdp.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        out = fsdp(torch.randint(0, V, (4, 8), generator=gen))
        opt.zero_grad()
        (out ** 2).mean().backward()
        opt.step()

    def gather() -> torch.Tensor:
        with FSDP.summon_full_params(fsdp, writeback=False):
            return fsdp.module.transformer.wte.weight.detach().clone()

    if scenario == "fsdp1-bare":
        pub = EmbeddingPublisher(ENDPOINT, run="fsdp1-bare")
        step()
        try:
            pub.publish(fsdp.module.transformer.wte, 0)
            print(f"rank {RANK} bare: no error", flush=True)
        except ValueError as exc:
            print(f"rank {RANK} bare: {type(exc).__name__}: {exc}", flush=True)
        step()  # training goes on
        pub.close()
        return
    if scenario == "fsdp1-callback":
        from trainer_hook.callbacks import StepPublisher, embedding_rows

        steps = StepPublisher(ENDPOINT, None, {})
        pub = steps.start(scenario, None, None, meta={})
        print(f"rank {RANK} {scenario}: rows {embedding_rows(fsdp.module.transformer.wte, fsdp)}", flush=True)

        class ViaSteps:  # the callbacks' path: StepPublisher.publish(embedding, step, metrics, model=)
            published = property(lambda self: pub.published)
            dropped = property(lambda self: pub.dropped)

            def publish(self, obj, it, metrics=None):
                return steps.publish(lambda: fsdp.module.transformer.wte, it, lambda: metrics, model=lambda: fsdp)

            def close(self):
                steps.close()

        loop({scenario: gather}, step, lambda run: (None, {}), pubs={scenario: ViaSteps()})
    elif own:
        loop({scenario: gather}, step, lambda run: (fsdp.transformer.wte, {}))
    else:
        loop({scenario: gather}, step, lambda run: (fsdp, {"embedding": "transformer.wte"}))


# ------------------------------------------------------------------------------------- DeepSpeed

def zero(scenario: str) -> None:
    import deepspeed

    stage = 2 if scenario == "z2" else 3
    bf16 = scenario == "z3-bf16"
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": bf16}}
    torch.manual_seed(0)
    if scenario == "z3-init":
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = Inner(big_after=False, dim=15)
    else:  # 1001 x 15 = 15015 elements: partitions of 7508, rank 1's padded by one, split mid-row
        model = Inner(big_after=False, dim=15)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    weight = engine.module.wte.weight
    print(f"rank {RANK} {scenario}: weight {tuple(weight.shape)} partition "
          f"{getattr(getattr(weight, 'ds_tensor', None), 'dtype', None)}", flush=True)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        out = engine(torch.randint(0, V, (4, 8), generator=gen))
        engine.backward((out.float() ** 2).mean())
        engine.step()

    def gather() -> torch.Tensor:
        weight = engine.module.wte.weight
        if stage == 3:
            with deepspeed.zero.GatheredParameters([weight]):
                return weight.detach().clone()
        return weight.detach().clone()

    loop({scenario: gather}, step, lambda run: (engine.module.wte, {}))


def main() -> None:
    scenarios = sys.argv[4:]
    if any(s.startswith("z") for s in scenarios):
        import deepspeed

        deepspeed_without_shm_kernel()
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    for name in scenarios:
        if name == "mg-tp":
            megatron(2)
        elif name == "mg-dp":
            megatron(1)
        elif name.startswith("fsdp1"):
            fsdp1(name)
        elif name.startswith("z"):
            zero(name)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
