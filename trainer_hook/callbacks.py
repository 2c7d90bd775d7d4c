"""What the framework callbacks share, without importing any framework.

`trainer_hook.hf` and `trainer_hook.lightning` are thin adapters: they find the model, the step and
the tokenizer in their framework's terms and hand them to a `StepPublisher`, which owns the publisher,
decides which steps are published (start, every n steps, after evaluation, end; each step once) and
turns a tokenizer into the vocabulary the daemon names tokens with.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import sys
import time
from typing import Any, Callable

import torch

from .publisher import EmbeddingPublisher, embedding_weight
from .sharding import vocab_rows
from .stacks import fsdp1_path

log = logging.getLogger("embedding_monitor.hook")

_RUN_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]+")  # what protocol.check_run_name refuses
_MAX_RUN_CHARS = 200


def first_given(*candidates: Any) -> Any:
    """The first candidate that is not None (a tokenizer's truth value is its length: `or` would be wrong)."""
    return next((c for c in candidates if c is not None), None)


def check_every_n_steps(every_n_steps: int | None) -> int | None:
    """`every_n_steps` if it is None or a positive int, else a ValueError that says what to pass."""
    if every_n_steps is None:
        return None
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
    return every_n_steps


def safe_run_name(name: str) -> str:
    """`name` made usable as a daemon run name: path separators and control characters become '-'."""
    cleaned = _RUN_UNSAFE.sub("-", str(name)).strip("-")[:_MAX_RUN_CHARS]
    return cleaned if cleaned not in ("", ".", "..") else "run"


def generated_run_name(prefix: str) -> str:
    """A run name the same on every rank of one job (torchrun's variables), else host, pid and time."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        job = "|".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
        return f"{prefix}-{time.strftime('%Y%m%d')}-{hashlib.sha256(job.encode()).hexdigest()[:8]}"
    return f"{prefix}-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def active_wandb_info() -> dict[str, Any] | None:
    """Project, group, id and name of this process's active wandb run (None without one), for the hello."""
    wandb = sys.modules.get("wandb")  # never import wandb for this: no run can be active if it is not loaded
    run = getattr(wandb, "run", None) if wandb is not None else None
    return wandb_info_of(run)


def wandb_info_of(run: Any) -> dict[str, Any] | None:
    """The hello's wandb info for a wandb Run object (None for None or a disabled run)."""
    if run is None or getattr(run, "disabled", False) or not getattr(run, "id", None):
        return None
    info: dict[str, Any] = {"project": run.project, "run_id": run.id, "run_name": run.name,
                            "mode": "offline" if getattr(run, "offline", False) else "online"}
    if getattr(run, "group", None):  # else the daemon groups its run under the trainer's run id
        info["group"] = run.group
    if getattr(run, "entity", None):
        info["entity"] = run.entity
    return info


def vocab_of(tokenizer: Any, rows: int | None = None) -> list[str] | None:
    """Token strings by id (ids the tokenizer lacks are ''), from a tokenizer or a processor holding one."""
    if tokenizer is None:
        return None
    if not hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "tokenizer"):
        tokenizer = tokenizer.tokenizer  # a multimodal processor wraps the tokenizer
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    try:
        by_token = get_vocab()
    except Exception as exc:  # noqa: BLE001 - some processors raise NotImplementedError; a vocabulary is optional
        log.info("embedding monitor: no vocabulary from %s (%s); reports will show token ids", type(tokenizer).__name__, exc)
        return None
    size = max((i for i in by_token.values() if isinstance(i, int) and i >= 0), default=-1) + 1
    if rows is not None:
        size = min(size, rows)  # ids past the embedding's rows name nothing
    vocab = [""] * size
    for token, i in by_token.items():
        if isinstance(i, int) and 0 <= i < size:
            vocab[i] = str(token)
    return vocab


def _is_unmerged_lora(module: Any) -> bool:
    return (hasattr(module, "lora_embedding_A") and hasattr(module, "get_delta_weight")
            and not getattr(module, "merged", True) and not getattr(module, "disable_adapters", False))


def effective_weight(module: Any) -> torch.Tensor:
    """The (V, d) embedding the model computes with: for a PEFT LoRA-adapted embedding, base + active deltas."""
    weight = embedding_weight(module)
    if not _is_unmerged_lora(module):
        return weight
    adapters = [a for a in module.active_adapters if a in module.lora_embedding_A]
    if any(getattr(module, "use_dora", {}).get(a) for a in adapters):
        log.warning("embedding monitor: DoRA-adapted embedding; publishing its base weight only")
        return weight
    with torch.no_grad():
        for adapter in adapters:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


def embedding_rows(module: Any, model: Any = None) -> int:
    """Rows of the full embedding matrix (the vocabulary size) under any supported stack; `model` is the wrapped model."""
    if fsdp1_path(model, module) is not None and hasattr(module, "num_embeddings"):
        return int(module.num_embeddings)  # its weight is this rank's flat view
    return vocab_rows(embedding_weight(module))


def scalar_metrics(values: dict[str, Any], *, read_device: bool) -> dict[str, float | int]:
    """The one-number entries of a framework's metrics dict as Python numbers.

    Numbers and one-element CPU tensors always; a one-element tensor on an accelerator only when
    `read_device` (reading it waits for the device: only where the framework has synchronised anyway,
    e.g. after validation). Anything else (lists, strings, bigger tensors) is left out silently: these
    dicts are the framework's, not the user's, and hold more than scalars.
    """
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
                continue
            if value.device.type != "cpu" and not read_device:
                continue
            value = value.detach().item()
        elif hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "size", 0) == 1:
            value = value.item()  # numpy scalars
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = value
    return out


OUTPUT_TENSOR = "lm_head"  # the tensor name the callbacks give an untied output embedding (W&B: analysis/lm_head/...)


def untied_output_embedding(owners: Any, input_embedding: Any) -> Any | None:
    """The first `get_output_embeddings()` among `owners` when its weight is not the input embedding's; else None.

    Tied weights (one parameter, or one storage) are sent once, as the input embedding.
    """
    for owner in owners:
        getter = getattr(owner, "get_output_embeddings", None)
        if getter is None:
            continue
        try:
            out = getter()
        except NotImplementedError:
            out = None
        if out is None:
            continue
        try:
            w_out = effective_weight(out)
            # the input's published weight, its own parameter and a LoRA wrapper's base weight: a head sharing
            # any of them is tied (an adapter's merged weight is a new tensor, its base is the shared one)
            inputs = [effective_weight(input_embedding), getattr(input_embedding, "weight", None),
                      getattr(getattr(input_embedding, "base_layer", None), "weight", None)]
            tied = any(isinstance(w, torch.Tensor) and (w is w_out or (w.data_ptr() == w_out.data_ptr()
                                                                       and w.shape == w_out.shape))
                       for w in inputs)
        except Exception:  # noqa: BLE001 - cannot tell (an exotic wrapper): send the input embedding only
            tied = True
        return None if tied or w_out.dim() != 2 else out
    return None


class StepPublisher:
    """One EmbeddingPublisher per training: publishes the chosen steps, each step once, with that step's metrics.

    A framework measures a step's metrics (its training log, its evaluation) after the step's "step end"
    event, and the weights do not change until the next optimizer step. So a step to publish is only
    marked (`defer`) and sent by `flush`, which the adapters call where the next step begins (or the
    training ends): by then every metric measured at that step has been noted (`note_metrics`) and
    travels with the snapshot, and none measured at another step does.
    """

    def __init__(self, endpoint: str | None, every_n_steps: int | None, publisher_options: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.options = dict(publisher_options)
        self.publisher: EmbeddingPublisher | None = None
        self.failures = 0  # publishes that raised (logged once, then counted)
        self._last_step: int | None = None
        self._embedding: Callable[[], Any] | None = None
        self._model: Callable[[], Any] | None = None  # the wrapped model (FSDP1: publish through it)
        self.pending: int | None = None  # the step marked for publishing, not sent yet
        self._metrics_step: int | None = None
        self._metrics: dict[str, Any] = {}  # what was measured at _metrics_step

    @property
    def active(self) -> bool:
        """Whether a training is running (between start and close)."""
        return self.publisher is not None

    def start(self, run: str, vocab: list[str] | None, wandb_info: dict[str, Any] | None,
              meta: dict[str, Any], embedding: Callable[[], Any] | None = None,
              model: Callable[[], Any] | None = None,
              output: Callable[[], Any] | None = None) -> EmbeddingPublisher:
        """Create the publisher for a new training (closing a previous one); `embedding()` gives the weight.

        `model()` (optional) gives the wrapped model: under FSDP1 the embedding is published through it.
        `output()` gives the untied output embedding or None (published beside it as OUTPUT_TENSOR).
        """
        self.close()
        options = dict(self.options)
        options.setdefault("vocab", vocab)
        options.setdefault("wandb_info", wandb_info)
        options["meta"] = {**meta, **(options.get("meta") or {})}
        self.publisher = EmbeddingPublisher(self.endpoint, run=safe_run_name(run), **options)
        self._last_step = self.pending = self._metrics_step = None
        self._metrics = {}
        self._embedding = embedding
        self._model = model
        self._output = output
        log.info("embedding monitor: run %s publishing to %s (every_n_steps=%s)", self.publisher.run,
                 self.publisher.endpoint, self.every_n_steps)
        return self.publisher

    def due(self, step: int) -> bool:
        """Whether `step` is one of the every-n-steps steps."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def wants(self, step: int) -> bool:
        """Whether `step` is neither published nor pending (and a training is running)."""
        return self.publisher is not None and step != self._last_step and step != self.pending

    def note_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Record metrics the framework measured at `step` (merged with others of the same step)."""
        if step != self._metrics_step:
            self._metrics_step, self._metrics = step, {}
        self._metrics.update(metrics)

    def defer(self, step: int) -> None:
        """Mark `step` for publishing at the next `flush` (a different step still pending is sent first)."""
        if self.publisher is None or step == self._last_step or step == self.pending:
            return
        if self.pending is not None:
            self.flush()
        self.pending = step

    def flush(self) -> bool:
        """Send the pending step, with the metrics measured at it; True if handed off."""
        step, self.pending = self.pending, None
        if step is None or self._embedding is None:
            return False
        metrics = dict(self._metrics) if self._metrics_step == step else None
        return self.publish(self._embedding, step, lambda: metrics, output=getattr(self, "_output", None))

    def drop_pending(self, why: str) -> None:
        """Forget the pending step (its weights are gone), saying why once."""
        if self.pending is not None:
            log.info("embedding monitor: step %d not published: %s", self.pending, why)
        self.pending = None

    def publish(self, embedding: Callable[[], Any], step: int,
                metrics: Callable[[], dict[str, Any] | None] | None = None,
                model: Callable[[], Any] | None = None, output: Callable[[], Any] | None = None) -> bool:
        """Publish the embedding at `step` now unless this step was already published; True if handed off.

        `metrics()` (called only when publishing) gives the trainer's scalars to send with the snapshot.
        `model()` (optional) is the wrapped model: under FSDP1 the embedding is published through it.
        `output()`: the untied output embedding or None, sent as tensor OUTPUT_TENSOR at the same step.
        """
        if self.publisher is None or step == self._last_step:
            return False
        self._last_step = step  # also on a drop: the same weights are not worth a second try
        try:
            module = embedding()
            values = (metrics() or None) if metrics else None
            root = (model or self._model or (lambda: None))()
            path = fsdp1_path(root, module)  # FSDP1: its weight is a flat view; the model knows where it lies
            if path is not None:
                sent = self.publisher.publish(root, step, metrics=values, embedding=path)
            else:
                sent = self.publisher.publish(effective_weight(module), step, metrics=values)
            head = output() if output is not None else None
            if head is not None:
                self.publisher.publish(effective_weight(head), step, name=OUTPUT_TENSOR)
            return sent
        except Exception:  # noqa: BLE001 - monitoring must never end a training run
            self.failures += 1
            if self.failures == 1:
                log.exception("embedding monitor: publishing step %d failed; training goes on, later failures "
                              "are only counted (callback.monitor.failures)", step)
            return False

    def watch_tokens(self, module: Any) -> None:
        """Count the ids the input embedding `module` sees in training (publisher.watch_tokens); never raises.

        Removed when the publisher closes. A wrapper whose forward does not take the ids, or no module
        at all (an `embedding=` tensor), is said once and training goes on uncounted.
        """
        if self.publisher is None:
            return
        try:
            self.publisher.watch_tokens(module)
        except Exception as exc:  # noqa: BLE001 - monitoring must never end a training run
            self.failures += 1
            log.warning("embedding monitor: token counts are off for this run: %s", exc)

    def close(self) -> None:
        """Close the publisher (sends `end`); safe to call when none is open. A pending step is sent first."""
        if self.pending is not None:
            self.flush()
        publisher, self.publisher = self.publisher, None
        self._embedding = self._model = None
        if publisher is not None:
            publisher.close()
