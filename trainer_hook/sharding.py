"""What one rank sends of an embedding weight: the whole matrix (plain tensor, rank 0), or its own shard.

A DTensor (FSDP2's `fully_shard`, tensor parallel, `distribute_tensor`) is sent as parts: each rank
sends only the block it holds, with the global shape and the block's offset, found by DTensor's own
`compute_local_shape_and_global_offset`. FSDP1, DeepSpeed ZeRO-3 and Megatron tensor-parallel weights
are located by stacks.py. No collective, no gather: the daemon assembles the parts.
Everything publish cannot send is refused here, at the first publish, with one line saying what to do.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from . import stacks


class UnpublishableWeight(ValueError):
    """The weight cannot be sent as it is; the message says what to pass instead."""


@dataclass(frozen=True)
class Part:
    """What this rank sends: `local`, and where it lies in the full matrix (global_shape None: it is the full matrix).

    A block is 2-D at `offset` [row, col]; an element range is 1-D, the flat elements from `start` on.
    """

    local: torch.Tensor
    global_shape: tuple[int, int] | None = None
    offset: tuple[int, int] | None = None
    start: int | None = None
    # Whether this rank's token counts go with the part: False where another rank that sends a part fed the
    # same batch (Megatron: every tensor-parallel rank of a group sees the group's batch; TP rank 0 counts).
    counts: bool = True


def dist_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else torchrun's env, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _dtensor_class() -> type | None:
    # Never import it here: that takes seconds on the training thread at the first publish. A weight
    # can only be a DTensor if the trainer has imported the module already.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: Any) -> bool:
    """True for a torch.distributed.tensor.DTensor (a parameter of a fully_shard/TP model)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _is_fsdp1(obj: Any) -> bool:
    if getattr(obj, "_is_flat_param", False):  # FSDP1's FlatParameter marks itself so
        return True
    return any(c.__name__ == "FullyShardedDataParallel" for c in type(obj).__mro__)


_FSDP1_HINT = ("FSDP1 (FullyShardedDataParallel) flattens parameters, so a FlatParameter does not say where the "
               "embedding lies: " + stacks.FSDP1_PATH_HINT)


def locate(obj: Any, sends_plain: bool, embedding: str | None = None) -> Part | None:
    """What this rank sends of the embedding `obj` (a weight, an embedding module, or an FSDP1 model with `embedding=` its path)."""
    try:
        if stacks.is_fsdp1_module(obj) and (embedding is not None or _wraps_weight(obj)):
            piece = stacks.fsdp1_piece(obj, embedding, sends_plain)
            return None if piece is None else Part(piece[0], piece[1], start=piece[2])
        if embedding is not None:
            if not isinstance(obj, torch.nn.Module):
                raise UnpublishableWeight(f"embedding={embedding!r} names a submodule, but {type(obj).__name__} "
                                          "is not a module: pass the model")
            obj = obj.get_submodule(stacks.clean_name(embedding))
        return local_part(find_weight(obj), sends_plain, module=obj)
    except (stacks.StackError, AttributeError) as exc:
        raise UnpublishableWeight(str(exc)) from None


def _wraps_weight(unit: Any) -> bool:
    # An FSDP1 unit around the embedding itself: its own FlatParameter holds a parameter named "weight".
    handle = getattr(unit, "_handle", None)
    return handle is not None and "weight" in handle.flat_param._fqns


def vocab_rows(weight: torch.Tensor) -> int:
    """Rows of the full (V, d) matrix of a weight from find_weight (a ZeRO-3 weight's own shape is a placeholder)."""
    if stacks.is_zero3(weight):
        return int(weight.ds_shape[0])
    return int(weight.shape[0])  # a DTensor's shape is the global one


def find_weight(obj: Any) -> torch.Tensor:
    """The (V, d) weight of a tensor, an nn.Embedding / module with .weight, or a module with main_weight.weight.

    A stack's sharded parameter (ZeRO-3, Megatron tensor parallel) is returned as it is, for local_part.
    """
    if _is_fsdp1(obj):
        raise UnpublishableWeight(_FSDP1_HINT)
    if isinstance(obj, torch.Tensor):
        weight = obj
    elif isinstance(getattr(getattr(obj, "main_weight", None), "weight", None), torch.Tensor):
        weight = obj.main_weight.weight
    elif isinstance(getattr(obj, "weight", None), torch.Tensor):
        weight = obj.weight
    else:
        raise TypeError(f"cannot find an embedding weight in {type(obj).__name__}: pass a tensor, an nn.Embedding "
                        "or a module with .weight or .main_weight.weight")
    if _is_fsdp1(weight):
        raise UnpublishableWeight(_FSDP1_HINT)
    if stacks.is_zero3(weight):  # its own data is an empty placeholder outside forward
        return weight
    hint = None if is_dtensor(weight) else stacks.fsdp1_view_hint(weight, None if obj is weight else obj)
    if hint is not None:
        raise UnpublishableWeight(hint)
    if weight.is_meta or (is_dtensor(weight) and weight.to_local().is_meta):
        raise UnpublishableWeight("the embedding weight is on the meta device (not materialised yet): publish "
                                  "after model.to_empty(device=...) and weight initialisation or loading")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UnpublishableWeight(f"embedding weight must be a 2-D floating tensor (V, d), got shape "
                                  f"{tuple(weight.shape)} {weight.dtype}: pass the embedding's weight itself"
                                  + ("; if it is an FSDP1 parameter (a flat view), " + stacks.FSDP1_PATH_HINT
                                     if weight.dim() == 1 and stacks.fsdp1_loaded() else ""))
    return weight if stacks.is_megatron_tp(weight) else weight.detach()


def local_part(weight: torch.Tensor, sends_plain: bool, module: Any = None) -> Part | None:
    """What this rank sends of `weight` (from find_weight); None when another rank sends it (or it is empty).

    A plain tensor is the whole matrix on every rank (single process, DDP, ZeRO-1/2): it is sent where
    `sends_plain` (the publisher's `enabled`, rank 0 by default). `module` (optional) is the module
    that holds `weight`, for the stacks that record the shard's position there.
    """
    if stacks.is_zero3(weight):
        piece = stacks.zero3_piece(weight)
        return None if piece is None else Part(piece[0], piece[1], start=piece[2])
    if stacks.is_megatron_tp(weight):
        where = stacks.megatron_piece(weight, module)
        return None if where is None else Part(weight.detach(), where[0], where[1],
                                               counts=stacks.megatron_counts_here())
    if not is_dtensor(weight):
        return Part(weight) if sends_plain else None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the tensor's mesh: it holds nothing
        return None
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            if coordinate[mesh_dim] != 0:
                return None  # a replica: the one at coordinate 0 of this mesh dimension sends it
        elif not isinstance(placement, Shard):  # Partial: the values are not final until reduced
            raise UnpublishableWeight(f"embedding DTensor has placement {placement} (pending reduction); publish "
                                      "a weight whose placements are Shard or Replicate")
    global_shape = (int(weight.shape[0]), int(weight.shape[1]))
    shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    local = weight.to_local()
    if tuple(local.shape) != tuple(shape):
        raise UnpublishableWeight(f"embedding DTensor's local shard is {tuple(local.shape)}, its placements "
                                  f"{placements} say {tuple(shape)}: cannot tell where it lies in the matrix")
    _check_block(weight, mesh, placements, coordinate)
    if local.numel() == 0:  # uneven sharding: e.g. 3 rows over 4 ranks leaves one rank nothing
        return None
    return Part(local, global_shape, (int(offset[0]), int(offset[1])))


def _check_block(weight: torch.Tensor, mesh: Any, placements: tuple, coordinate: list[int]) -> None:
    # compute_local_shape_and_global_offset gives where a shard *begins*; a strided placement
    # (_StridedShard) can make a rank's rows non-adjacent. FSDP2 x TP on the same dim composes into a
    # contiguous block; anything else would be assembled wrongly, so it is refused.
    strided = [p for p in placements if type(p).__name__ == "_StridedShard"]
    if not strided:
        return
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets

    index: dict[int, Any] = {}
    size = list(weight.shape)
    for mesh_dim, placement in enumerate(placements):
        if not hasattr(placement, "dim") or type(placement).__name__ not in ("Shard", "_StridedShard"):
            continue
        dim = placement.dim
        size[dim], offsets = _get_shard_size_and_offsets(size[dim], mesh.size(mesh_dim), coordinate[mesh_dim],
                                                         placement, index.get(dim), weight.shape[dim], False)
        index[dim] = offsets
    for dim, offsets in index.items():
        ids = offsets.tolist() if hasattr(offsets, "tolist") else list(offsets)
        if size[dim] and ids != list(range(ids[0], ids[0] + len(ids))):
            raise UnpublishableWeight(f"embedding DTensor placements {placements} give this rank non-adjacent "
                                      f"indices along dim {dim}; redistribute to Shard/Replicate placements first")
