# DDP: torchrun --nproc_per_node=2 ddp.py (start `analysis-daemon` first). Every rank holds a publisher;
# the weight is replicated, so only rank 0 sends it.
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer_hook import EmbeddingPublisher

dist.init_process_group("gloo")  # "nccl" on GPUs
vocab_size, width = 512, 32
model = DDP(torch.nn.Sequential(torch.nn.Embedding(vocab_size, width), torch.nn.Linear(width, vocab_size)))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
wte = model.module[0]

publisher = EmbeddingPublisher(run="ddp-run")  # on every rank, same run name
publisher.prepare(wte)
for iter_num in range(21):
    tokens = torch.randint(vocab_size, (8, 9))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if iter_num % 10 == 0:
        publisher.publish(wte, iter_num)  # every rank calls it; rank 0 sends
publisher.close()
dist.destroy_process_group()
