"""Lightning callback: watch a LightningModule's token embedding in one line.

    from trainer_hook.lightning import EmbeddingMonitorCallback
    trainer = Trainer(..., callbacks=[EmbeddingMonitorCallback(every_n_steps=500)])  # the daemon's default endpoint

Publishes the input embedding when training starts (after any checkpoint is restored), at every
validation (not the sanity check), every `every_n_steps` optimizer steps when given, and at the end, each
step once at `trainer.global_step`, then sends `end`. Each snapshot carries the values of
`trainer.callback_metrics` (what the module logged with `self.log`, under its own names) that changed at
its step: a validation's metrics go with the step that was validated (docs/training-metrics.md). The embedding is `pl_module.get_input_embeddings()`,
else that of a direct submodule that has one (e.g. a wrapped transformers model), else `embedding=`
(a module, a tensor or an attribute path such as "model.embed_tokens"). The token ids that embedding sees
in training forwards are counted (a forward pre-hook, whatever the batch looks like; not validation) and
travel with each snapshot; `count_tokens=False` turns it off. The only module of the project
that imports Lightning (`lightning`, or the older `pytorch_lightning` package when that is what is installed).
"""
from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of older releases
    import pytorch_lightning as pl

from .callbacks import (StepPublisher, active_wandb_info, embedding_rows, first_given, generated_run_name,
                        scalar_metrics, untied_output_embedding, vocab_of, wandb_info_of)
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

    def __init__(self, endpoint: str | None = None, run: str | None = None,
                 every_n_steps: int | None = None, *, embedding: Any = None, tokenizer: Any = None,
                 output_embeddings: bool = True, count_tokens: bool = True, **publisher_options: Any) -> None:
        self.run = run
        self.output_embeddings = output_embeddings  # also publish an untied get_output_embeddings() as "lm_head"
        self.count_tokens = count_tokens  # count the ids the embedding sees in training (drift by token frequency)
        self.embedding = embedding
        self.tokenizer = tokenizer
        self.monitor = StepPublisher(endpoint, every_n_steps, publisher_options)
        self._module: Any = None
        self._seen: dict[str, Any] = {}  # trainer.callback_metrics as we last looked at them

    @property
    def publisher(self):
        """The current training's EmbeddingPublisher (None outside training)."""
        return self.monitor.publisher

    # ------------------------------------------------------------ what was measured at which step
    # Lightning's order for one optimizer step S (trainer.global_step == S after it): on_train_batch_end,
    # then, when due, the validation (on_validation_start ... on_validation_end); the weights change again
    # only in the next batch's optimizer step, after on_train_batch_start. So step S is marked at
    # on_train_batch_end / on_validation_end, and its snapshot leaves at the next on_train_batch_start (or
    # the end of training). trainer.callback_metrics keeps every value until it is logged again: a value
    # that changed since we last looked was measured since then, and goes with the step it changed at.

    def _look(self, trainer: Any) -> dict[str, Any]:
        # Reads values on the accelerator too: only at a step that is published or validated (one wait for
        # the device per published step, none on the other steps).
        current = scalar_metrics(dict(trainer.callback_metrics), read_device=True)
        changed = {k: v for k, v in current.items() if self._seen.get(k) != v}
        self._seen.update(current)
        return changed

    def _note(self, trainer: Any) -> None:
        self.monitor.note_metrics(int(trainer.global_step), self._look(trainer))

    # ------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Open the publisher: find the embedding, agree on the run name across ranks, vocabulary, W&B run."""
        self._module, self._seen = pl_module, {}
        rows = embedding_rows(find_embedding(pl_module, self.embedding), trainer.strategy.model)  # fail before training
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
                                 "model": type(pl_module).__name__},
                           embedding=lambda: find_embedding(pl_module, self.embedding),
                           model=lambda: trainer.strategy.model,  # FSDPStrategy: the FSDP1 root
                           output=(lambda: untied_output_embedding(
                               [pl_module, *(child for _, child in pl_module.named_children())],
                               find_embedding(pl_module, self.embedding))) if self.output_embeddings else None)
        if self.count_tokens:  # a forward pre-hook on the embedding: every training batch, whatever its key
            self.monitor.watch_tokens(find_embedding(pl_module, self.embedding))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """The starting weights, at the step training starts from (0, or the restored step on resume)."""
        if self.monitor.active:
            self._look(trainer)  # what the sanity check or a restored checkpoint left is not this step's
            self.monitor.defer(int(trainer.global_step))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """The previous step's metrics and validation are in, its weights still unchanged: send it."""
        self.monitor.flush()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Mark every `every_n_steps`-th optimizer step (with gradient accumulation: once, right after the step)."""
        step = int(trainer.global_step)
        if self.monitor.due(step) and self.monitor.wants(step):  # micro-batches after the step: already marked
            self.monitor.defer(step)
            self._note(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """What training logged up to here belongs to this step, not to its validation."""
        if self.monitor.active and not trainer.sanity_checking:
            self._note(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Each validation during fit marks its step (not the sanity check, not a standalone validate())."""
        if not self.monitor.active:
            return
        if trainer.sanity_checking:
            self._look(trainer)  # measured before training: belongs to no step
            return
        self._note(trainer)
        self.monitor.defer(int(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The final weights (unless that step is already out), then `end`."""
        if self.monitor.active:
            self._note(trainer)
            self.monitor.defer(int(trainer.global_step))
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training failed or was interrupted: still send `end`, so the daemon closes the run."""
        self._close()

    def _close(self) -> None:
        self.monitor.close()
        self._module = None
