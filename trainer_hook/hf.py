"""Hugging Face Trainer callback: watch the input embedding of any `transformers` model in one line.

    from trainer_hook.hf import EmbeddingMonitorCallback
    trainer = Trainer(..., callbacks=[EmbeddingMonitorCallback(every_n_steps=500)])  # the daemon's default endpoint

Publishes `model.get_input_embeddings()` at the start of training, at every evaluation, every
`every_n_steps` optimizer steps when given, and at the last step (each step once, at `state.global_step`),
then sends `end`. Each snapshot carries what the Trainer logged at its own step, named as the Trainer's
W&B integration names it (`train/loss`, `train/learning_rate`, `eval/loss`, ...; docs/training-metrics.md),
and the token ids the input embedding saw in training since the previous snapshot (a forward pre-hook,
`publisher.watch_tokens`; `count_tokens=False` turns it off).
The only module of the project that imports `transformers`.
"""
from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from protocol.metric_names import hf_log_metrics

from .callbacks import (StepPublisher, active_wandb_info, embedding_rows, first_given, generated_run_name, log,
                        untied_output_embedding, vocab_of)
from .publisher import embedding_weight

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


def _unwrapped(model: Any) -> Any:
    """The model inside DDP-style `.module` wrappers (what has get_output_embeddings)."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


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

    def __init__(self, endpoint: str | None = None, run: str | None = None,
                 every_n_steps: int | None = None, *, tokenizer: Any = None, output_embeddings: bool = True,
                 count_tokens: bool = True, **publisher_options: Any) -> None:
        self.run = run
        self.output_embeddings = output_embeddings  # also publish an untied get_output_embeddings() as "lm_head"
        # count the ids the input embedding sees in training (a forward pre-hook: a TrainerCallback never
        # sees the batch), for drift by token frequency
        self.count_tokens = count_tokens
        self.tokenizer = tokenizer
        self.monitor = StepPublisher(endpoint, every_n_steps, publisher_options)
        self._model: Any = None

    @property
    def publisher(self):
        """The current training's EmbeddingPublisher (None outside training)."""
        return self.monitor.publisher

    # ------------------------------------------------------------ Trainer events
    # The Trainer's order for one optimizer step S: on_step_end, then its log (on_log), its evaluation
    # (on_log, on_evaluate) and its checkpoint (on_save); the weights change again only at the next
    # optimizer step, after on_step_begin. So step S is marked at on_step_end / on_evaluate, the metrics
    # logged at S are noted, and the snapshot leaves at the next on_step_begin (or the end of training).

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       tokenizer: Any = None, **kwargs: Any) -> None:
        """Open the publisher (run name, vocabulary, W&B run to join); the starting weights are marked."""
        if model is None:
            raise ValueError("EmbeddingMonitorCallback: the Trainer passed no model to on_train_begin")
        self._model = model
        embedding = input_embeddings(model)  # fail before the first step, not at the first publish
        wandb_info = active_wandb_info() if "wandb" in (args.report_to or []) else None
        run = self.run or args.run_name or None
        run, wandb_info = _shared_across_ranks((run or generated_run_name("hf"), wandb_info))
        rows = embedding_rows(embedding, model)  # the global rows (DTensor, ZeRO-3, FSDP1)
        vocab = vocab_of(first_given(self.tokenizer, processing_class, tokenizer), rows)
        self.monitor.start(run, vocab, wandb_info, meta={"framework": "transformers",
                                                         "framework_version": transformers.__version__,
                                                         "model": type(model).__name__},
                           embedding=lambda: input_embeddings(model), model=lambda: model,  # FSDP1: the root
                           output=(lambda: untied_output_embedding([_unwrapped(model)], input_embeddings(model)))
                           if self.output_embeddings else None)
        if self.count_tokens:
            self.monitor.watch_tokens(embedding)  # removed when the publisher closes (on_train_end)
        if self.monitor.every_n_steps is None and args.eval_strategy == "no":
            log.info("embedding monitor: no evaluation and no every_n_steps: publishing the first and the last "
                     "step only")
        self.monitor.defer(int(state.global_step))  # an evaluation at the start (eval_on_start) goes with it

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The previous step's logs and evaluation are all in: send its snapshot."""
        self.monitor.flush()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """At the latest before the weights change (on_step_begin normally sent it already)."""
        self.monitor.flush()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """An epoch-end evaluation of the previous epoch is in: send its step."""
        self.monitor.flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Mark every `every_n_steps`-th step, and the last one."""
        step = int(state.global_step)
        if self.monitor.active and (self.monitor.due(step) or step >= state.max_steps):
            self.monitor.defer(step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        """Note what the Trainer logged at this step (loss, learning rate, grad norm, eval metrics)."""
        if self.monitor.active and logs:
            self.monitor.note_metrics(int(state.global_step), hf_log_metrics(logs))

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every evaluation during training marks its step (a standalone evaluate() publishes nothing)."""
        if self.monitor.active:
            self.monitor.defer(int(state.global_step))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """With load_best_model_at_end the last step leaves at its checkpoint, before the best model replaces it."""
        if self.monitor.active and args.load_best_model_at_end and state.global_step >= state.max_steps:
            self.monitor.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Send the last marked step and `end`."""
        if self.monitor.active and args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self.monitor.drop_pending("the Trainer loaded the best checkpoint over its weights (load_best_model_at_end)")
        self.monitor.close()
        self._model = None
