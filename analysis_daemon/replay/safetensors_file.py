"""Safetensors checkpoints through the reference `safetensors` library, with our bounds around it.

`safe_open` parses the header in Rust (length capped at 100 MB, strict schema, so no nesting deeper
than the format allows, every entry's dtype, shape and offsets checked against the data section and
the file's size; fuzzed upstream) and maps the file, so listing the tensors reads only the header and
reading one tensor reads only its bytes. What stays ours: the caller's bounds (rows, columns, bytes)
are applied to the shape the header states before any of the tensor's bytes are read, since a sparse
file can be 4 KB on disk and claim gigabytes (checkpoints.Bounds).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from safetensors import SafetensorError, safe_open

# The safetensors dtypes we can read as an embedding (others are listed, then refused by name).
FLOAT_DTYPES: Final[dict[str, torch.dtype]] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file, or the tensor cannot be read as an embedding."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its (validated) header describes it."""

    name: str
    dtype: str  # the format's name: F32, BF16, I64, ...
    shape: tuple[int, ...]


def _one_line(path: Path, exc: Exception) -> SafetensorsError:
    text = " ".join(str(exc).split())[:200]
    return SafetensorsError(f"{path}: not a valid safetensors file ({text}; truncated or corrupt?)")


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The validated tensor entries and the `__metadata__` of the safetensors file at `path`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            entries = {}
            for name in f.keys():
                part = f.get_slice(name)
                entries[name] = TensorEntry(name, str(part.get_dtype()), tuple(int(s) for s in part.get_shape()))
    except SafetensorError as exc:
        raise _one_line(path, exc) from None
    return entries, dict(metadata)


def read_tensor(path: str | Path, entry: TensorEntry) -> torch.Tensor:
    """The tensor `entry` (from `read_header(path)`) as a new CPU tensor; only its bytes are read."""
    path = Path(path)
    if entry.dtype not in FLOAT_DTYPES:
        raise SafetensorsError(f"{path}: tensor {entry.name!r} is {entry.dtype}, not a float tensor "
                               "(F32, F16, BF16 or F64)")
    try:
        with safe_open(str(path), framework="pt") as f:
            # get_tensor returns a view of the file's map; the copy owns its memory, so nothing is left
            # mapped (a file truncated later cannot fault the analysis) and only this tensor's pages were read
            tensor = f.get_tensor(entry.name).clone()
    except SafetensorError as exc:  # the file changed since its header was read
        raise _one_line(path, exc) from None
    if tuple(tensor.shape) != entry.shape:
        raise SafetensorsError(f"{path}: tensor {entry.name!r} changed shape since its header was read")
    return tensor
