"""Where this rank's piece of the embedding lies under FSDP1, DeepSpeed ZeRO-3 and Megatron tensor parallel.

Each stack keeps its own record of what a rank holds; we read it and send that piece as a part
(protocol: a block at an offset, or a flat element range of the C-order (V, d) matrix):
- FSDP1: the embedding's slice of the rank's `FlatParameter` shard (`_shard_param_infos`), an element range;
- ZeRO-3: the parameter's `ds_tensor` partition (rank r of `ds_process_group` holds the flat elements
  [r * ps, (r + 1) * ps), the last one padded), an element range;
- Megatron-core: a tensor-parallel weight (`tensor_model_parallel`, `partition_dim`) holds the rows
  (or columns) of its TP rank, a block.
No collective, no gather, and the user's tensors are only read (views taken with detach/slicing). Stack
modules are never imported here: a weight can only belong to a stack the trainer has imported already.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

_FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
FSDP1_PATH_HINT = ("pass the FSDP model and the embedding's path instead: "
                   "publish(fsdp_model, it, embedding=\"transformer.wte\") (its name in model.named_modules())")


class StackError(ValueError):
    """This rank's piece cannot be located; the message says what to pass instead."""


def clean_name(name: str) -> str:
    """A module or parameter name without the wrappers' own path segments (FSDP, activation checkpointing, compile)."""
    for prefix in _FSDP_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_fsdp1_module(obj: Any) -> bool:
    """True for a torch FullyShardedDataParallel (FSDP1) wrapper."""
    return any(c.__name__ == "FullyShardedDataParallel" for c in type(obj).__mro__)


def fsdp1_loaded() -> bool:
    """Whether FSDP1 has been imported (else no weight can be one of its views)."""
    return "torch.distributed.fsdp.fully_sharded_data_parallel" in sys.modules


def _group_rank(group: Any) -> int:
    return torch.distributed.get_rank(group=group)


# ------------------------------------------------------------------------------------- FSDP1

def fsdp1_piece(model: Any, path: str | None, sends_plain: bool) -> tuple[torch.Tensor, tuple[int, int], int] | None:
    """(1-D slice of this rank's shard, global shape, first flat element) of `path`.weight in an FSDP1 model.

    `path` None: `model` is the FSDP unit wrapping the embedding itself. None when this rank holds
    none of it, or when it is a replica another rank sends (NO_SHARD: rank 0; HYBRID_SHARD: the first
    replica group).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    target = "weight" if path is None else clean_name(path).strip(".") + ".weight"
    names = {id(m): clean_name(n) for n, m in model.named_modules()}
    found = []
    for unit in FSDP.fsdp_modules(model):
        handle = getattr(unit, "_handle", None)
        if handle is None:
            continue
        prefix = names.get(id(unit), "")
        flat = handle.flat_param
        for i, fqn in enumerate(flat._fqns):
            if (f"{prefix}.{fqn}" if prefix else fqn) == target:
                found.append((unit, handle, flat, i))
    if not found:
        raise StackError(f"no parameter {target!r} in the FSDP1 model's FlatParameters: pass embedding= with "
                         "the embedding module's name in model.named_modules() (e.g. \"transformer.wte\")")
    unit, handle, flat, i = found[0]
    shape = tuple(int(n) for n in flat._shapes[i])
    if len(shape) != 2 or not flat.is_floating_point():
        raise StackError(f"{target} has shape {shape} {flat.dtype} in the FSDP1 model, not a 2-D floating (V, d)")
    if not handle.uses_sharded_strategy:  # NO_SHARD: every rank holds all of it
        if not sends_plain:
            return None
    else:
        inter = getattr(unit, "_inter_node_pg", None)  # HYBRID_SHARD: the first replica group sends
        if inter is not None and _group_rank(inter) != 0:
            return None
    info = flat._shard_param_infos[i]
    if not info.in_shard or not info.numel_in_shard:
        return None
    shard = getattr(flat, "_local_shard", flat).detach()  # the sharded flat parameter, also inside forward
    local = shard[info.offset_in_shard:info.offset_in_shard + info.numel_in_shard]
    if info.intra_param_end_idx - info.intra_param_start_idx + 1 != local.numel():
        raise StackError(f"FSDP1 shard info of {target} is inconsistent ({info}); cannot tell where it lies")
    return local, (shape[0], shape[1]), int(info.intra_param_start_idx)


def fsdp1_path(root: Any, module: Any) -> str | None:
    """`module`'s path inside the FSDP1 model `root` when its weight is an FSDP1 view (what publish(root, embedding=) needs), else None."""
    if root is None or not is_fsdp1_module(root) or not isinstance(module, torch.nn.Module):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or fsdp1_view_hint(weight, module) is None:
        return None
    for name, sub in root.named_modules():
        if sub is module:
            return clean_name(name)
    return None


def fsdp1_view_hint(weight: torch.Tensor, module: Any = None) -> str | None:
    """The one-line error for a bare FSDP1-managed weight, else None.

    Outside forward FSDP1 leaves an embedding module either a 1-D view of the rank's shard
    (use_orig_params=True) or a (V, d) tensor whose storage is freed (False). A bare 1-D tensor without
    its module is not claimed here: it gets the plain 2-D error, which names this case too.
    """
    if not fsdp1_loaded() or weight.is_meta:
        return None
    freed = weight.numel() > 0 and weight.untyped_storage().nbytes() == 0
    flat_view = weight.dim() == 1 and hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim")
    if flat_view:
        what = "a 1-D view of this rank's FSDP1 (FullyShardedDataParallel) shard"
    elif freed:
        what = "an FSDP1 (FullyShardedDataParallel) parameter whose storage is freed outside forward"
    else:
        return None
    return f"the embedding weight is {what}, which does not say where it lies: {FSDP1_PATH_HINT}"


# ------------------------------------------------------------------------------------- ZeRO-3

def is_zero3(weight: Any) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter."""
    return isinstance(getattr(weight, "ds_tensor", None), torch.Tensor) and hasattr(weight, "ds_shape")


def zero3_piece(weight: Any) -> tuple[torch.Tensor, tuple[int, int], int] | None:
    """(1-D partition without its tail padding, global shape, first flat element) of a ZeRO-3 parameter."""
    shape = tuple(int(n) for n in weight.ds_shape)
    if len(shape) != 2 or not weight.ds_tensor.is_floating_point():
        raise StackError(f"the ZeRO-3 parameter has shape {shape} {weight.ds_tensor.dtype}, not a 2-D floating "
                         "(V, d): pass the embedding's weight")
    partition = weight.ds_tensor.detach().reshape(-1)
    size = int(getattr(weight.ds_tensor, "ds_numel", partition.numel()))
    group = getattr(weight, "ds_process_group", None)
    start = _group_rank(group) * size
    numel = max(0, min(size, shape[0] * shape[1] - start))
    if numel == 0:
        return None
    return partition[:numel], (shape[0], shape[1]), start


# ------------------------------------------------------------------------------------- Megatron

def is_megatron_tp(weight: Any) -> bool:
    """True for a Megatron-core tensor-parallel weight (VocabParallelEmbedding, Column/RowParallelLinear)."""
    return bool(getattr(weight, "tensor_model_parallel", False)) and hasattr(weight, "partition_dim")


def megatron_piece(weight: torch.Tensor, module: Any = None) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(global shape, offset) of this TP rank's block of a Megatron weight; None on a data-parallel replica."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        raise StackError("a Megatron tensor-parallel weight, but megatron.core.parallel_state is not initialised: "
                         "publish after parallel_state.initialize_model_parallel(...)")
    try:  # replicas of the TP layout (data and context parallel): the first one sends
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    except TypeError:
        dp_rank = ps.get_data_parallel_rank()
    if dp_rank != 0:
        return None
    dim, stride = int(weight.partition_dim), int(getattr(weight, "partition_stride", 1))
    if weight.dim() != 2 or dim not in (0, 1) or stride != 1:
        raise StackError(f"Megatron weight of shape {tuple(weight.shape)} partitioned along dim {dim} with stride "
                         f"{stride}: only 2-D weights split in one contiguous block per rank can be sent")
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    local = [int(weight.shape[0]), int(weight.shape[1])]
    start = getattr(module, "vocab_start_index", None) if dim == 0 else None
    full = list(local)
    full[dim] = local[dim] * tp_size  # Megatron splits evenly (it asserts the size divides)
    offset = [0, 0]
    offset[dim] = int(start) if start is not None else tp_rank * local[dim]
    total = getattr(module, "num_embeddings", None) if dim == 0 else None
    if total is not None and int(total) != full[0]:
        raise StackError(f"VocabParallelEmbedding has {total} rows but {tp_size} ranks x {local[0]}: cannot tell "
                         "where this rank's rows lie")
    return (full[0], full[1]), (offset[0], offset[1])


def megatron_counts_here() -> bool:
    """Whether this rank's token counts go with its part: the ranks of a tensor-parallel group all feed the
    group's one batch, so only TP rank 0 sends them (else the daemon's sum would count it TP-size times)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    return ps is None or ps.get_tensor_model_parallel_rank() == 0
