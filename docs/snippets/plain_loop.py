# A complete training loop with the hook: python plain_loop.py (start `analysis-daemon` first).
import torch

from trainer_hook import EmbeddingPublisher

vocab_size, width = 512, 32
model = torch.nn.Sequential(torch.nn.Embedding(vocab_size, width), torch.nn.Linear(width, vocab_size))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
wte = model[0]  # the token embedding; in nanoGPT: raw_model.transformer.wte

publisher = EmbeddingPublisher(run="my-run")  # never blocks, even with no daemon up
publisher.prepare(wte)                                                 # before the loop: buffers made ahead
for iter_num in range(31):
    tokens = torch.randint(vocab_size, (16, 9))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if iter_num % 10 == 0:  # your eval block: the snapshot and the loss travel together, training goes on at once
        publisher.publish(wte, iter_num, metrics={"train/loss": loss.item()})
publisher.close()  # at the end: sends `end`
