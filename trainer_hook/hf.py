"""Hugging Face Trainer callback: watch the input embedding of any `transformers` model in one line.

    from trainer_hook.hf import EmbeddingMonitorCallback
    trainer = Trainer(..., callbacks=[EmbeddingMonitorCallback("tcp://127.0.0.1:5555", every_n_steps=500)])

Publishes `model.get_input_embeddings()` at the start of training, every `every_n_steps` optimizer
steps, after every evaluation and at the end (each step once, at `state.global_step`), then sends
`end`. The only module of the project that imports `transformers`.
"""
from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from .publisher import embedding_weight
from .callbacks import (StepPublisher, active_wandb_info, first_given, generated_run_name, scalar_metrics,
                        untied_output_embedding, vocab_of)

__all__ = ["EmbeddingMonitorCallback"]


def input_embeddings(model: Any) -> torch.nn.Module:
    """`model.get_input_embeddings()`, looking through DDP-style `.module` wrappers."""
    seen = model
    while not hasattr(seen, "get_input_embeddings") and hasattr(seen, "module"):
        seen = seen.module
    getter = getattr(seen, "get_input_embeddings", None)
    embedding = None
    if getter is not None:
        try:
            embedding = getter()
        except NotImplementedError:
            embedding = None
    if embedding is None:
        raise ValueError(f"{type(model).__name__} has no input embedding (get_input_embeddings() gave nothing); "
                         "EmbeddingMonitorCallback needs a model with token embeddings")
    return embedding


def _shared_across_ranks(value: Any) -> Any:
    """Rank 0's `value` on every rank (one broadcast at the start of training; the value itself if not distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    box = [value]
    device = None
    if dist.get_backend() == "nccl":  # nccl moves the pickled object through the current GPU
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


class EmbeddingMonitorCallback(TrainerCallback):
    """A transformers TrainerCallback that publishes the input embedding to an analysis daemon."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", run: str | None = None,
                 every_n_steps: int | None = None, *, tokenizer: Any = None, output_embeddings: bool = True,
                 **publisher_options: Any) -> None:
        self.run = run
        self.output_embeddings = output_embeddings  # also publish an untied get_output_embeddings() as "lm_head"
        self.tokenizer = tokenizer
        self.monitor = StepPublisher(endpoint, every_n_steps, publisher_options)
        self._model: Any = None
        self._history_seen = 0  # entries of state.log_history already sent with a snapshot

    @property
    def publisher(self):
        """The current training's EmbeddingPublisher (None outside training)."""
        return self.monitor.publisher

    # ------------------------------------------------------------ the one place snapshots leave from

    def _publish(self, state: Any) -> bool:
        model = self._model
        return self.monitor.publish(lambda: input_embeddings(model), int(state.global_step),
                                    lambda: self._new_metrics(state), self._output if self.output_embeddings else None)

    def _output(self) -> Any:
        model = self._model
        while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
            model = model.module
        return untied_output_embedding([model], input_embeddings(self._model))

    def _new_metrics(self, state: Any) -> dict[str, Any]:
        """The losses logged since the last publish, named as the Trainer's W&B integration names them:
        the newest training log (train/loss, train/learning_rate, train/grad_norm) and the newest
        evaluation (eval/loss and the other eval_* metrics, not its timings). Each log entry is sent at
        most once, so an old eval loss is never repeated at a later step. The Trainer logs after
        on_step_end, so the training loss is at most `logging_steps` old."""
        history = list(getattr(state, "log_history", None) or [])
        new, self._history_seen = history[self._history_seen:], len(history)
        train = next((e for e in reversed(new) if "loss" in e), None)
        evaluation = next((e for e in reversed(new) if any(k.startswith("eval_") for k in e)), None)
        metrics: dict[str, Any] = {}
        if train is not None:
            metrics.update({f"train/{k}": train[k] for k in ("loss", "learning_rate", "grad_norm") if k in train})
        if evaluation is not None:
            metrics.update({f"eval/{k[5:]}": v for k, v in evaluation.items() if k.startswith("eval_")
                            and not k.endswith(("_runtime", "_per_second"))})
        return scalar_metrics(metrics, read_device=False)

    # ------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       tokenizer: Any = None, **kwargs: Any) -> None:
        """Open the publisher (run name, vocabulary, W&B run to join) and publish the starting weights."""
        if model is None:
            raise ValueError("EmbeddingMonitorCallback: the Trainer passed no model to on_train_begin")
        self._model = model
        embedding = input_embeddings(model)  # fail before the first step, not at the first publish
        wandb_info = active_wandb_info() if "wandb" in (args.report_to or []) else None
        run = self.run or args.run_name or None
        run, wandb_info = _shared_across_ranks((run or generated_run_name("hf"), wandb_info))
        rows = int(embedding_weight(embedding).shape[0])  # a DTensor's shape is the global one
        vocab = vocab_of(first_given(self.tokenizer, processing_class, tokenizer), rows)
        self._history_seen = len(getattr(state, "log_history", None) or [])  # a resumed run's old logs stay
        self.monitor.start(run, vocab, wandb_info, meta={"framework": "transformers",
                                                         "framework_version": transformers.__version__,
                                                         "model": type(model).__name__})
        self._publish(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish every `every_n_steps` optimizer steps."""
        if self.monitor.active and self.monitor.due(state.global_step):
            self._publish(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish after each evaluation during training (a standalone evaluate() publishes nothing)."""
        if self.monitor.active:
            self._publish(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish the final weights (unless that step is already out) and send `end`."""
        if self.monitor.active:
            self._publish(state)
        self.monitor.close()
        self._model = None
