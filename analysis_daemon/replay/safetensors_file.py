"""A bounded, validating reader of the safetensors format: list the tensors, read one of them.

The format: an 8-byte little-endian header length H, H bytes of JSON header ({name: {"dtype", "shape",
"data_offsets": [begin, end]}, optional "__metadata__": {str: str}}), then the data; offsets count from
the end of the header. Every byte of the file is treated as hostile: the header length is capped and
must fit the file, each entry is checked (known dtype, non-negative shape, offsets inside the data,
shape x itemsize == byte span) before anything is allocated, and only the requested tensor's bytes are
read (through mmap), so a 100 GB model file costs one embedding's worth of memory.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch

MAX_HEADER_BYTES: Final = 100 * 1024 * 1024  # the safetensors library's own cap
# dtype name -> (bytes per element, torch dtype readable as an embedding or None)
DTYPES: Final[dict[str, tuple[int, torch.dtype | None]]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, None), "I32": (4, None), "I16": (2, None), "I8": (1, None),
    "U64": (8, None), "U32": (4, None), "U16": (2, None), "U8": (1, None), "BOOL": (1, None),
    "F8_E4M3": (1, None), "F8_E5M2": (1, None),
}


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file, or the tensor cannot be read as an embedding."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its (validated) header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of its bytes
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The validated tensor entries and the `__metadata__` of the safetensors file at `path`."""
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        f.seek(0)
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte "
                                   "limit (not a safetensors file?)")
        if 8 + header_len > size:
            raise SafetensorsError(f"{path}: header of {header_len} bytes but the file has {size} "
                                   "(truncated?)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        entries[name] = _entry(path, name, spec, data_start, data_len)
    return entries, metadata


def _entry(path: Path, name: str, spec: object, data_start: int, data_len: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise SafetensorsError(f"{where}: entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise SafetensorsError(f"{where}: data_offsets must be two integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise SafetensorsError(f"{where}: bytes {begin}..{end} lie outside the data section of {data_len} "
                               "bytes (truncated file?)")
    if math.prod(shape) * DTYPES[dtype][0] != end - begin:
        raise SafetensorsError(f"{where}: shape {shape} of {dtype} needs {math.prod(shape) * DTYPES[dtype][0]} "
                               f"bytes, the offsets give {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_tensor(path: str | Path, entry: TensorEntry) -> torch.Tensor:
    """The tensor `entry` (from `read_header(path)`) as a new CPU tensor; only its bytes are read."""
    torch_dtype = DTYPES[entry.dtype][1]
    if torch_dtype is None:
        raise SafetensorsError(f"{path}: tensor {entry.name!r} is {entry.dtype}, not a float tensor "
                               "(F32, F16, BF16 or F64)")
    out = torch.empty(entry.shape, dtype=torch_dtype)
    nbytes = entry.end - entry.begin
    if nbytes == 0:
        return out
    with open(path, "rb") as f:
        if f.seek(0, 2) < entry.end:  # the file shrank since its header was read
            raise SafetensorsError(f"{path}: file ends before tensor {entry.name!r} (truncated?)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            src = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=entry.begin)
            # little-endian on disk, as on every host torch runs on
            out.reshape(-1).view(torch.uint8).numpy()[:] = src
            del src  # the mmap cannot close while an array still points into it
    return out
