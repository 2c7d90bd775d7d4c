# Lightning with the callback (pip install -e ".[lightning]"; start `analysis-daemon` first).
import lightning as L
import torch

from trainer_hook.lightning import EmbeddingMonitorCallback


class TinyLM(L.LightningModule):
    def __init__(self, vocab_size: int = 256, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.head = torch.nn.Linear(width, vocab_size)

    def get_input_embeddings(self) -> torch.nn.Embedding:  # what the callback publishes
        return self.embed

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.head(self.embed(tokens[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(256, (64, 16))), batch_size=8)
trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[EmbeddingMonitorCallback(run="lightning-run", every_n_steps=3)])
trainer.fit(TinyLM(), data)  # publishes at step 0, 3 and 6 (the end), then sends `end`
