"""Turning a decoded snapshot into a torch tensor, and torch dtypes into wire names.

torch is imported lazily so tools that only move frames (protocol.listen) start fast.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .messages import DTYPE_ITEMSIZE, ProtocolError, Snapshot
from .shm import ShmReader

if TYPE_CHECKING:
    import torch


def wire_dtype(dtype: "torch.dtype") -> str:
    """The wire name of a torch dtype allowed on the wire ('float32', 'float16', 'bfloat16')."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"dtype {dtype} cannot be sent; use one of {sorted(DTYPE_ITEMSIZE)}")
    return name


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype for a wire dtype name."""
    import torch

    if name not in DTYPE_ITEMSIZE:
        raise ProtocolError(f"header: dtype={name!r} is not one of {sorted(DTYPE_ITEMSIZE)}")
    return getattr(torch, name)


def snapshot_tensor(snap: Snapshot, shm_reader: ShmReader | None = None) -> "torch.Tensor":
    """The snapshot's (V, d) tensor; inline payloads are viewed zero-copy, shared memory is copied out and released."""
    import numpy as np
    import torch

    dtype = torch_dtype(snap.dtype)
    if snap.shm is not None:
        reader = shm_reader if shm_reader is not None else ShmReader()
        try:
            raw = torch.from_numpy(reader.copy_out(snap.shm, snap.nbytes))
        finally:
            if shm_reader is None:
                reader.close()
    elif snap.payload is not None:
        if snap.payload.nbytes != snap.nbytes:
            raise ProtocolError(f"payload: frame has {snap.payload.nbytes} bytes, header nbytes={snap.nbytes}")
        array = np.frombuffer(snap.payload, dtype=np.uint8)
        if array.ctypes.data % DTYPE_ITEMSIZE[snap.dtype]:
            array = array.copy()  # libzmq may hand back a frame at an odd address; views need alignment
        with warnings.catch_warnings():
            # Frames are read-only buffers; the tensor is a read-only view by contract (callers must not write).
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(array)
    else:
        raise ProtocolError("snapshot: has neither a payload frame nor a shared-memory reference")
    # uint8 -> dtype is a reinterpretation of the same bytes (bfloat16 included): no copy.
    return raw.view(dtype).view(snap.shape)
