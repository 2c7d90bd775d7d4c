"""Run by test_stacks.py under torchrun (2 CPU processes, gloo): the HF Trainer under DeepSpeed ZeRO-3, the callback on every rank.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node=2 tests/hf_zero3_trainer.py ENDPOINT OUT RESULTS_DIR

At each published step every rank gathers the embedding with DeepSpeed's own GatheredParameters (a
collective, for the test's reference only) and rank 0 saves it to OUT/hf-z3-<step>.pt; once the callback
has sent that step (at the next on_step_begin), rank 0 waits until the daemon has written its result. Prints `RANK r published=P dropped=D` per rank.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tests.rank_setup import ENDPOINT, OUT, deepspeed_without_shm_kernel, wait_analysed  # noqa: E402
from tests.test_hf_callback import Tokens, gpt2  # noqa: E402
from trainer_hook.hf import EmbeddingMonitorCallback  # noqa: E402

deepspeed_without_shm_kernel()  # before the Trainer sets DeepSpeed's backend up
torch.set_num_threads(1)
cb = EmbeddingMonitorCallback(ENDPOINT, run="hf-z3", every_n_steps=2)
seen = {}
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}}


class Reference(TrainerCallback):
    """After ours: keep each published step's full matrix; before the next step, wait for its result."""

    saved = 0

    def _save(self, model, step: int) -> None:
        weight = model.get_input_embeddings().weight
        with deepspeed.zero.GatheredParameters([weight]):
            full = weight.detach().clone()
        seen["publisher"] = cb.publisher
        if torch.distributed.get_rank() == 0:
            torch.save(full, OUT / f"hf-z3-{step}.pt")
        self.saved += 1

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._save(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % 2 == 0:
            self._save(model, state.global_step)

    def on_step_begin(self, args, state, control, **kw):
        # the callback sent the marked step at this on_step_begin: rank 0 waits for the daemon's result,
        # so newest-wins skipping cannot hide a step (rank 1 waits in the next collective)
        if torch.distributed.get_rank() == 0:
            wait_analysed("hf-z3", self.saved)


args = TrainingArguments(output_dir=str(OUT), max_steps=4, per_device_train_batch_size=4, report_to=[],
                         save_strategy="no", disable_tqdm=True, logging_steps=100, seed=0, learning_rate=5e-2,
                         optim="sgd", deepspeed=ZERO3)
Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[cb, Reference()]).train()
p = seen["publisher"]
sys.stdout.write(f"RANK {torch.distributed.get_rank()} published={p.published} dropped={p.dropped} "
                 f"failures={cb.monitor.failures}\n")
sys.stdout.flush()
