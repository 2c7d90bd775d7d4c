"""Where the analysis math runs (--device cpu|cuda|auto) and how big its blocks may be there.

Every metric takes a `device`: its input is moved there once, its temporaries are made there, and what it
returns is back on the CPU (for JSON and the sinks). On the CPU nothing changes: the chunk size is the
one asked for. On a GPU the blocks of the pairwise pass are made as large as a share of the free memory
allows (a GPU wants big matmuls), bounded so one block never takes more than that share.
"""
from __future__ import annotations

import logging
from typing import Final

import torch

DEVICE_CHOICES: Final = ("cpu", "cuda", "auto")
# Bytes per entry of one block of the pairwise pass: float32 x, uint8 bins, bool comparison, and the
# neighbour search's mask and thresholds (geometry.py), rounded up.
_BLOCK_BYTES_PER_ENTRY: Final = 8
# Share of the device's free memory that the blocks may take (the packed rows, moments and neighbour
# lists need the rest; another process may be using the GPU too).
_FREE_SHARE: Final = 0.25
# Rows per block on a GPU at most: beyond this the matmul is as efficient as it gets.
_MAX_GPU_CHUNK: Final = 8192


class DeviceUnavailable(ValueError):
    """The device asked for does not exist on this host (--device cuda without a CUDA GPU)."""


def resolve_device(spec: str, log: logging.Logger | None = None) -> torch.device:
    """torch.device of --device `spec` (cpu, cuda, cuda:N or auto); DeviceUnavailable when it is absent.

    `auto` picks cuda when a CUDA device is usable, else cpu, and says which in one log line.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        chosen = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if log is not None:
            log.info("--device auto: analysing on %s%s", chosen,
                     f" ({torch.cuda.get_device_name(chosen)})" if chosen.type == "cuda" else
                     " (no CUDA device)")
        return chosen
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceUnavailable(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceUnavailable(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {spec}: no CUDA device on this host (torch {torch.__version__}, "
                                f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"--device {spec}: this host has {torch.cuda.device_count()} CUDA device(s)")
    return device


def chunk_rows(device: torch.device | str, rows: int, requested: int) -> int:
    """Rows per block of the pairwise pass over `rows` rows on `device`.

    CPU: `requested` unchanged (the CPU path is tuned for it). CUDA: as many rows as fit in a quarter of
    the free memory at 8 bytes per block entry, at least `requested` if that fits, at most 8192 and
    never fewer than 1.
    """
    device = torch.device(device)
    if device.type != "cuda" or rows < 1:
        return requested
    free, _total = torch.cuda.mem_get_info(device)
    fits = int(free * _FREE_SHARE) // (_BLOCK_BYTES_PER_ENTRY * rows)
    return max(1, min(fits, max(requested, _MAX_GPU_CHUNK)))
