"""Token counts for drift by frequency: how often each token id was fed since the previous snapshot.

    handle = publisher.watch_tokens(model.transformer.wte)   # counts every training forward's ids
    ...
    handle.remove()                                          # or publisher.close()

The counts live on the ids' own device as one (rows + 1,) int64 tensor; the last bin takes ids outside
[0, rows) instead of checking them (a check would wait for the GPU). Adding a batch is one scatter-add
queued on the device, never a host sync. `watch_tokens` counts where the ids meet the model: a forward
pre-hook on the input embedding, so a framework callback that never sees the batch still counts it,
whatever the batch's key is called, every micro-batch of gradient accumulation included. Only
training-mode forwards count (not evaluation); in eager mode a forward that autograd runs again during
backward (activation checkpointing's recomputation) is not counted twice. Under torch.compile the hook is
traced into the graph as that one scatter-add on a tensor that is never replaced, so it adds no graph
break and no recompilation.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

log = logging.getLogger("embedding_monitor.hook")


def add_ids(counts: torch.Tensor, ids: torch.Tensor) -> None:
    """Add the ids' occurrences to `counts` (rows + 1 bins, the last for ids out of range): one scatter-add, no sync."""
    flat = ids.detach().reshape(-1).to(torch.int64)
    rows = counts.shape[0] - 1
    inside = (flat >= 0) & (flat < rows)
    counts.scatter_add_(0, torch.where(inside, flat, rows), torch.ones_like(flat))


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)  # private: a torch without it counts twice


def in_backward() -> bool:
    """Whether autograd's engine is running now (a forward run inside backward is a checkpoint's recomputation)."""
    return _graph_task_id is not None and _graph_task_id() != -1


class TokenCounts:
    """The counts since the last snapshot; the training thread adds and takes, nothing else touches them."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # (rows + 1,) int64 on the ids' device
        self.failures = 0  # batches the hook could not count (logged once)

    @property
    def rows(self) -> int | None:
        """Rows counted (the matrix's), None before the first allocation."""
        return None if self.counts is None else self.counts.numel() - 1

    def ensure(self, rows: int, device: torch.device) -> torch.Tensor:
        """The counts for `rows` rows on `device`; kept (moved once) when only the device differs.

        A new row count starts over: ids counted against another matrix would name other tokens.
        """
        counts = self.counts
        if counts is None or counts.numel() != rows + 1:
            counts = self.counts = torch.zeros(rows + 1, dtype=torch.int64, device=device)
        elif counts.device != device:
            counts = self.counts = counts.to(device)
        return counts

    def add(self, ids: torch.Tensor, rows: int) -> None:
        """Count `ids` against a matrix of `rows` rows."""
        add_ids(self.ensure(rows, ids.device), ids)

    def take(self, rows: int, pin: bool, like: torch.device | None = None) -> torch.Tensor | None:
        """The counts as a (rows,) CPU int64 tensor, then reset; None when nothing was ever counted.

        From a GPU the copy is non-blocking into pinned memory when `pin` and the counts sit on `like`
        (the device whose copy event the caller records next: the copy lands before it fires);
        otherwise it is a plain copy. Ids beyond `rows` (counted against a larger matrix) are left out.
        """
        counts = self.counts
        if counts is None or rows < 1:
            return None
        async_copy = pin and counts.is_cuda and counts.device == like
        n = min(rows, counts.numel() - 1)
        host = torch.zeros(rows, dtype=torch.int64, pin_memory=async_copy)
        host[:n].copy_(counts[:n], non_blocking=async_copy)
        counts.zero_()  # in place, queued after the copy: the hook's tensor is never replaced (no recompile)
        return host

    def reset(self) -> None:
        """Forget the counts (a rank whose part carries none: another rank of its group sends the same batch's)."""
        if self.counts is not None:
            self.counts.zero_()

    def hook(self, rows: int) -> "CountHook":
        """A forward pre-hook counting the ids an embedding sees in training against `rows` rows."""
        return CountHook(self, rows)


class CountHook:
    """Forward pre-hook (with kwargs) of an input embedding: counts the ids of every training-mode forward."""

    def __init__(self, counts: TokenCounts, rows: int) -> None:
        self.counts, self.rows = counts, rows

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return None  # evaluation, generation in eval mode
        ids = args[0] if args else kwargs.get("input")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            return None
        if not torch.compiler.is_compiling() and in_backward():
            return None  # activation checkpointing recomputes the forward in backward: counted already
        try:
            counts = self.counts.counts
            if counts is None or counts.device != ids.device or counts.shape[0] != self.rows + 1:
                counts = self.counts.ensure(self.rows, ids.device)  # eager only in practice: set at watch
            add_ids(counts, ids)
        except Exception:  # noqa: BLE001 - counting must never end a training run
            self.counts.failures += 1
            if self.counts.failures == 1:
                log.exception("embedding publisher: counting a batch's tokens failed; training goes on, later "
                              "failures are only counted")
        return None


def watch(module: torch.nn.Module, counts: TokenCounts, rows: int, device: torch.device | None) -> RemovableHandle:
    """Register the counting pre-hook on `module`; the counts are allocated now, on `device` (one tensor for good)."""
    if device is not None:
        counts.ensure(rows, device)
    return module.register_forward_pre_hook(counts.hook(rows), with_kwargs=True)


def module_device(module: Any) -> torch.device | None:
    """The device of a module's first parameter (a DTensor's local one), None without parameters."""
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        return None if local.is_meta else local.device
    return None
