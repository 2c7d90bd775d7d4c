# FSDP2: torchrun --nproc_per_node=2 fsdp2.py (start `analysis-daemon` first). Every rank publishes its own
# shard of the DTensor weight; the daemon assembles the full matrix. No collective, no gather.
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from trainer_hook import EmbeddingPublisher

dist.init_process_group("gloo")  # "nccl" and device "cuda" on GPUs
vocab_size, width = 512, 32
model = torch.nn.Sequential(torch.nn.Embedding(vocab_size, width), torch.nn.Linear(width, vocab_size))
fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
wte = model[0]

publisher = EmbeddingPublisher(run="fsdp2-run")  # on every rank, same run name
publisher.prepare(wte)                                                    # every rank, before the loop
for iter_num in range(21):
    tokens = torch.randint(vocab_size, (8, 9))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if iter_num % 10 == 0:
        publisher.publish(wte, iter_num)  # every rank, same iteration: each sends the rows it holds
publisher.close()  # every rank
dist.destroy_process_group()
