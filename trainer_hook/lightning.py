"""Lightning callback: watch a LightningModule's token embedding in one line.

    from trainer_hook.lightning import EmbeddingMonitorCallback
    trainer = Trainer(..., callbacks=[EmbeddingMonitorCallback("tcp://127.0.0.1:5555", every_n_steps=500)])

Publishes the input embedding when training starts (after any checkpoint is restored), every
`every_n_steps` optimizer steps, after every validation (not the sanity check) and at the end, each step
once at `trainer.global_step`, then sends `end`. The embedding is `pl_module.get_input_embeddings()`,
else that of a direct submodule that has one (e.g. a wrapped transformers model), else `embedding=`
(a module, a tensor or an attribute path such as "model.embed_tokens"). The only module of the project
that imports Lightning (`lightning`, or the older `pytorch_lightning` package when that is what is installed).
"""
from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of older releases
    import pytorch_lightning as pl

from .callbacks import (StepPublisher, active_wandb_info, first_given, generated_run_name, scalar_metrics,
                        untied_output_embedding, vocab_of, wandb_info_of)
from .publisher import embedding_weight

__all__ = ["EmbeddingMonitorCallback"]


def find_embedding(pl_module: Any, embedding: Any = None) -> Any:
    """The embedding module (or tensor) to publish; ValueError that says what to pass when there is none."""
    if isinstance(embedding, str):
        obj = pl_module
        for part in embedding.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"embedding={embedding!r}: {type(obj).__name__} has no attribute {part!r}")
            obj = getattr(obj, part)
        return obj
    if embedding is not None:
        return embedding
    for owner in (pl_module, *(child for _, child in pl_module.named_children())):
        getter = getattr(owner, "get_input_embeddings", None)
        if getter is not None:
            found = getter()
            if found is not None:
                return found
    raise ValueError(f"{type(pl_module).__name__} has no get_input_embeddings(); pass the embedding to "
                     "EmbeddingMonitorCallback(embedding='attribute.path'), e.g. embedding='model.embed_tokens'")


def _logger_run(trainer: Any) -> tuple[str | None, dict[str, Any] | None]:
    """A run name and wandb info from the trainer's loggers (rank 0's view)."""
    wandb_info = None
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            wandb_info = wandb_info_of(logger.experiment)  # creates the wandb run if the logger has not yet
    wandb_info = wandb_info or active_wandb_info()
    if wandb_info is not None:
        return wandb_info.get("run_name"), wandb_info
    logger = trainer.logger
    if logger is not None and logger.name:
        version = logger.version
        return f"{logger.name}-{version if isinstance(version, str) else f'version_{version}'}", None
    return None, None


class EmbeddingMonitorCallback(pl.Callback):
    """A Lightning Callback that publishes the token embedding to an analysis daemon."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", run: str | None = None,
                 every_n_steps: int | None = None, *, embedding: Any = None, tokenizer: Any = None,
                 output_embeddings: bool = True, count_tokens: bool = True, **publisher_options: Any) -> None:
        self.run = run
        self.count_tokens = count_tokens  # count each batch's "input_ids" (drift by token frequency)
        self.output_embeddings = output_embeddings  # also publish an untied get_output_embeddings() as "lm_head"
        self.embedding = embedding
        self.tokenizer = tokenizer
        self.monitor = StepPublisher(endpoint, every_n_steps, publisher_options)
        self._module: Any = None
        self._sent: dict[str, Any] = {}  # the metric values last sent with a snapshot

    @property
    def publisher(self):
        """The current training's EmbeddingPublisher (None outside training)."""
        return self.monitor.publisher

    # ------------------------------------------------------------ the one place snapshots leave from

    def _publish(self, trainer: Any, read_device: bool = False) -> bool:
        module = self._module
        # trainer.callback_metrics: what the module logged with self.log (train_loss, val_loss, ...). Values
        # on the GPU are read only where Lightning has synchronised already (after validation, at the end).
        return self.monitor.publish(lambda: find_embedding(module, self.embedding), int(trainer.global_step),
                                    lambda: self._new_metrics(trainer, read_device),
                                    self._output if self.output_embeddings else None)

    def _output(self) -> Any:
        module = self._module
        return untied_output_embedding([module, *(child for _, child in module.named_children())],
                                       find_embedding(module, self.embedding))

    def _new_metrics(self, trainer: Any, read_device: bool) -> dict[str, Any]:
        # callback_metrics keeps each value until it is logged again: send a value only when it changed
        # since the previous snapshot, so an old val_loss is not repeated at every later step.
        current = scalar_metrics(dict(trainer.callback_metrics), read_device=read_device)
        new = {k: v for k, v in current.items() if self._sent.get(k) != v}
        self._sent.update(new)
        return new

    # ------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Open the publisher: find the embedding, agree on the run name across ranks, vocabulary, W&B run."""
        self._module, self._sent = pl_module, {}
        rows = int(embedding_weight(find_embedding(pl_module, self.embedding)).shape[0])  # fail before training
        name, wandb_info = (None, None)
        if trainer.is_global_zero:
            name, wandb_info = _logger_run(trainer)
        run = self.run or name or generated_run_name("lightning")
        run, wandb_info = trainer.strategy.broadcast((run, wandb_info), src=0)  # every rank's hello agrees
        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = first_given(self.tokenizer, getattr(pl_module, "tokenizer", None),
                                getattr(datamodule, "tokenizer", None))
        self.monitor.start(run, vocab_of(tokenizer, rows), wandb_info,
                           meta={"framework": "lightning", "framework_version": pl.__version__,
                                 "model": type(pl_module).__name__})

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """The starting weights, at the step training starts from (0, or the restored step on resume)."""
        self._publish(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every `every_n_steps` optimizer steps (with gradient accumulation: once, right after the step)."""
        if self.count_tokens:
            self.monitor.count(batch)
        if self.monitor.active and self.monitor.due(trainer.global_step):
            self._publish(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """After each validation during fit (not the sanity check, not a standalone validate())."""
        if self.monitor.active and not trainer.sanity_checking:
            self._publish(trainer, read_device=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The final weights (unless that step is already out), then `end`."""
        if self.monitor.active:
            self._publish(trainer, read_device=True)
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training failed or was interrupted: still send `end`, so the daemon closes the run."""
        self._close()

    def _close(self) -> None:
        self.monitor.close()
        self._module = None
