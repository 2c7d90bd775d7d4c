# Hugging Face Trainer with the callback (pip install -e ".[hf]"; start `analysis-daemon` first).
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from trainer_hook.hf import EmbeddingMonitorCallback

model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2))
train = [{"input_ids": ids, "labels": ids} for ids in torch.randint(256, (64, 16))]
args = TrainingArguments(output_dir="hf-out", max_steps=6, per_device_train_batch_size=8, report_to=[],
                         save_strategy="no", use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=train,
                  callbacks=[EmbeddingMonitorCallback(run="hf-run", every_n_steps=3)])
trainer.train()  # publishes at step 0, 3 and 6 (the end), then sends `end`
