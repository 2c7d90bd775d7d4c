"""What publish() costs each rank's training thread when every rank sends its own piece of the embedding.

    python benchmarks/bench_sharded_publish.py [--rows 50304] [--cols 768] [--reps 10] [--ranks 2]

Spawns `--ranks` CPU processes (gloo). For each layout every rank builds the embedding the way its
stack does and publishes it `--reps` times to its own `protocol.listen` receiver (shared memory, as on
one host), waiting for each snapshot to arrive before the next, so no publish is dropped or overlaps:
  whole       a plain tensor (single process, DDP, ZeRO-1/2): rank 0 sends the whole matrix;
  fsdp2       FSDP2 fully_shard (a DTensor): each rank sends its row block;
  fsdp1       FSDP1, embedding in the root unit, publish(model, it, embedding="wte"): an element range;
  megatron    Megatron-core VocabParallelEmbedding over all ranks (TP): each rank's rows (if installed).
DeepSpeed ZeRO-3 sends its partition the same way as FSDP1 (a 1-D slice copied once).
Prints, per layout and rank, the median blocking time of publish() and the MB it copied.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_hook import free_endpoint  # noqa: E402
from trainer_hook import EmbeddingPublisher  # noqa: E402


def timed_publishes(run: str, obj, reps: int, **kwargs) -> dict | None:
    """Publish `obj` reps+1 times to a fresh receiver; the median of the blocking times after the first."""
    endpoint = free_endpoint()
    listener = subprocess.Popen([sys.executable, "-m", "protocol.listen", endpoint], stdout=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True)
    try:
        assert listener.stdout.readline().startswith("listen ready")
        pub = EmbeddingPublisher(endpoint, run=run, shared_memory=True, enabled=True)
        if not pub.prepare(obj, **kwargs) or not pub.wait_connected(10):
            return None  # this rank holds nothing of it
        times, nbytes = [], 0
        for i in range(reps + 1):
            t = time.perf_counter()
            ok = pub.publish(obj, i, **kwargs)
            took = time.perf_counter() - t
            assert ok, f"{run}: snapshot dropped"
            while True:
                msg = json.loads(listener.stdout.readline())
                if msg["kind"] == "snapshot":
                    nbytes = msg.get("nbytes", 0)
                    break
            if i:
                times.append(took)
        pub.close()
        return {"publish_ms": statistics.median(times) * 1e3, "mb": nbytes / 1e6}
    finally:
        listener.kill()
        listener.wait()


def layouts(rows: int, cols: int, world: int):
    """(name, object to publish, publish kwargs) for each layout this machine can build."""
    torch.manual_seed(0)
    yield "whole", torch.nn.Embedding(rows, cols).weight.detach(), {}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    emb = torch.nn.Embedding(rows, cols)
    fully_shard(emb, mesh=init_device_mesh("cpu", (world,)))
    yield "fsdp2", emb.weight, {}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = torch.nn.Sequential()
    model.add_module("pre", torch.nn.Linear(3, 3))
    model.add_module("wte", torch.nn.Embedding(rows, cols))
    yield "fsdp1", FSDP(model, use_orig_params=True, device_id=torch.device("cpu")), {"embedding": "wte"}
    try:
        from megatron.core import parallel_state as ps
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import VocabParallelEmbedding
    except ImportError:
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    cfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    yield "megatron", VocabParallelEmbedding(rows - rows % world, cols, init_method=torch.nn.init.normal_,
                                             config=cfg), {}


def rank_main(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=args.port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, obj, kwargs in layouts(args.rows, args.cols, world):
        dist.barrier()
        if name == "whole" and rank != 0:
            results[name] = None  # a replicated weight: rank 0 sends it
            continue
        results[name] = timed_publishes(f"bench-{name}", obj, args.reps, **kwargs)
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50304, help="vocabulary rows V (default: GPT-2's 50304)")
    parser.add_argument("--cols", type=int, default=768, help="embedding width d")
    parser.add_argument("--reps", type=int, default=10, help="timed publishes per layout and rank")
    parser.add_argument("--ranks", type=int, default=2, help="CPU processes (gloo)")
    args = parser.parse_args()
    args.port = free_endpoint().rsplit(":", 1)[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(args.ranks, args, out), nprocs=args.ranks, join=True)
        per_rank = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(args.ranks)]
    full_mb = args.rows * args.cols * 4 / 1e6
    print(f"publish() per rank, {args.rows} x {args.cols} float32 ({full_mb:.0f} MB), {args.ranks} ranks, "
          f"shared memory, median of {args.reps}; torch {torch.__version__}")
    print(f"{'layout':10s} " + " ".join(f"{'rank ' + str(r) + ' ms (MB)':>18s}" for r in range(args.ranks)))
    for name in per_rank[0]:
        cells = []
        for r in range(args.ranks):
            res = per_rank[r].get(name)
            cells.append(f"{'-':>18s}" if res is None else f"{res['publish_ms']:10.1f} ({res['mb']:5.1f})")
        print(f"{name:10s} " + " ".join(cells))


if __name__ == "__main__":
    main()
