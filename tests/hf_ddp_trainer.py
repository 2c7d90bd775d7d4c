"""Run by test_hf_callback.py under torchrun (2 CPU processes, gloo): a Trainer with the callback on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/hf_ddp_trainer.py ENDPOINT OUT RESULTS_DIR

Rank 0 waits after each of its publishes (sent where the next step begins) until the daemon has written that result (the other rank waits
in the next all-reduce), so newest-wins skipping cannot hide a step. Prints one
`RANK r run=NAME published=P dropped=D` line per rank.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tests.test_hf_callback import Tokens, gpt2  # noqa: E402
from trainer_hook.hf import EmbeddingMonitorCallback  # noqa: E402

endpoint, out, results_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(1)
cb = EmbeddingMonitorCallback(endpoint, every_n_steps=2)  # no run name: generated, agreed across ranks
seen = {}


class Pace(TrainerCallback):
    def _wait(self, n: int) -> None:
        path = results_dir / cb.publisher.run / "analysis.jsonl"
        deadline = time.monotonic() + 60
        while cb.publisher.enabled and time.monotonic() < deadline:
            if path.exists() and path.read_text().count("\n") >= n:
                return
            time.sleep(0.02)

    def on_step_begin(self, args, state, control, **kw):  # the callback sent the previous step's snapshot here
        seen["publisher"] = cb.publisher
        if state.global_step % 2 == 0:
            self._wait(state.global_step // 2 + 1)


args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, report_to=[], save_strategy="no",
                         use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0, learning_rate=5e-2)
Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[cb, Pace()]).train()
p = seen["publisher"]
# one write of a short line: atomic on a pipe, so the ranks' lines cannot cut into each other
sys.stdout.write(f"RANK {torch.distributed.get_rank()} run={p.run} published={p.published} dropped={p.dropped}\n")
sys.stdout.flush()
