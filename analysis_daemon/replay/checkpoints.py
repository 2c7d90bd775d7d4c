"""Saved checkpoints as embedding snapshots: find them, order them by iteration, read only the embedding.

Formats (one checkpoint = a file or a model directory):
- Hugging Face model directories: model.safetensors, sharded safetensors (model.safetensors.index.json),
  pytorch_model.bin (and its sharded index); the iteration from trainer_state.json's global_step.
- single .safetensors files (safetensors_file.py: the reference library's safe_open, only the embedding
  is read);
- torch files (.pt .pth .bin .ckpt): nanoGPT's ckpt.pt ({"model": state dict, "iter_num": ...}),
  Lightning ({"state_dict", "global_step"}), plain state dicts; loaded with weights_only=True (tensors
  and plain containers only: a pickle that names any other object is refused, nothing runs) and
  mmap=True (the tensors stay on disk, only the embedding's pages are read);
- .npy arrays (allow_pickle=False).
A directory that is not a model directory is expanded into the checkpoints it holds (files of those
kinds, model subdirectories such as checkpoint-500/), and everything is ordered by iteration: from the
checkpoint's metadata, else the last integer of its name, else the order given.

Every file is hostile until checked: the embedding's shape is held to the live daemon's limits (rows,
columns, bytes: `protocol.Limits`, raised with the same options) before any of its bytes are read, so
a sparse file of 4 KB that claims 10 GB costs nothing; JSON files are capped in size and their nesting
is bounded by the parser (one line per bad file, never a traceback).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Iterable

import numpy as np
import torch

from protocol import DEFAULT_LIMITS, Limits, ProtocolError, check_metrics
from protocol.metric_names import hf_log_metrics

from .safetensors_file import FLOAT_DTYPES,  SafetensorsError, TensorEntry, read_header, read_tensor

SAFETENSORS_INDEX: Final = "model.safetensors.index.json"
TORCH_INDEX: Final = "pytorch_model.bin.index.json"
MODEL_FILES: Final = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", TORCH_INDEX)
SUFFIXES: Final = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npy")
# Files a training run keeps beside its weights: never an embedding.
NOT_WEIGHTS: Final = re.compile(r"^(optimizer|scheduler|scaler|rng_state|training_args|trainer_state)")
# The embedding's usual names, most specific first; a key matches its name or ends with "." + it, after
# torch.compile's "_orig_mod." and DDP's leading "module." are removed.
EMBEDDING_NAMES: Final = (
    "transformer.wte.weight", "model.embed_tokens.weight", "gpt_neox.embed_in.weight",
    "embeddings.word_embeddings.weight", "transformer.word_embeddings.weight", "tok_embeddings.weight",
    "wte.weight", "embed_tokens.weight", "word_embeddings.weight", "embed_in.weight", "tok_emb.weight",
    "token_embedding.weight", "shared.weight",
)
STATE_DICT_KEYS: Final = ("model", "state_dict", "model_state_dict", "module")
ITER_KEYS: Final = ("iter_num", "global_step", "step", "iteration")
MAX_JSON_BYTES: Final = 64 * 1024 * 1024  # tokenizer.json / index / trainer_state: real ones are < 40 MB


log = logging.getLogger("embedding_monitor.daemon")


class CheckpointError(Exception):
    """A checkpoint cannot be used (unreadable, refused, no embedding); the message is one line."""


@dataclass
class Checkpoint:
    """One checkpoint to replay: where it is and which iteration it stands for."""

    path: Path  # a file, or a model directory
    iter: int | None = None
    iter_source: str = "order"  # "metadata", "name" or "order"
    error: str | None = None  # set when even its metadata could not be read


@dataclass
class Embedding:
    """What replay needs from one checkpoint."""

    tensor: torch.Tensor
    name: str
    iter: int | None  # from the checkpoint's metadata
    vocab: list[str | None] | None = field(default=None, repr=False)
    metrics: dict[str, float] | None = None  # the trainer's logged scalars at this step, when it kept them


# --- finding and ordering ------------------------------------------------------------------------
def is_model_dir(path: Path) -> bool:
    """True when `path` is a directory holding one model's weights (Hugging Face layout)."""
    return path.is_dir() and any((path / name).is_file() for name in MODEL_FILES)


def _is_weights_file(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES and not NOT_WEIGHTS.match(path.name)


def name_number(path: Path) -> int | None:
    """The last integer in the file or directory name (ckpt_000200.pt -> 200, checkpoint-500 -> 500)."""
    stem = path.name if path.is_dir() else path.stem
    numbers = re.findall(r"\d+", stem)
    return int(numbers[-1]) if numbers else None


def expand(paths: Iterable[str | Path]) -> list[Checkpoint]:
    """The checkpoints named by `paths`, directories of checkpoints expanded (by name order within each)."""
    found: list[Checkpoint] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist")
        subdirs = [c for c in path.iterdir() if is_model_dir(c)] if path.is_dir() else []
        if path.is_file() or (is_model_dir(path) and not subdirs):
            found.append(Checkpoint(path))
            continue
        if is_model_dir(path):  # a Trainer's output_dir: checkpoint-N/ plus the final model saved again
            log.warning("%s holds checkpoint directories and weights of its own: replaying the checkpoint "
                        "directories; pass %s/<weights file> as well to include the top-level weights", path, path)
            children = subdirs
        else:
            children = [c for c in path.iterdir() if _is_weights_file(c) or is_model_dir(c)]
        if not children:
            raise CheckpointError(f"{path} holds no checkpoints (model directories such as checkpoint-500/, "
                                  f"or {', '.join(SUFFIXES)} files)")
        children.sort(key=lambda c: (name_number(c) is None, name_number(c) or 0, c.name))
        found.extend(Checkpoint(c) for c in children)
    return found


def order(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Fill in each iteration (metadata, else name) and sort by it; without one for every checkpoint,
    keep the order given and number them 0, 1, 2... (the order as iteration)."""
    for ckpt in checkpoints:
        try:
            ckpt.iter = metadata_iter(ckpt.path)
            if ckpt.iter is not None:
                ckpt.iter_source = "metadata"
        except CheckpointError as exc:
            ckpt.error = str(exc)
        if ckpt.iter is None:
            ckpt.iter = name_number(ckpt.path)
            ckpt.iter_source = "name" if ckpt.iter is not None else "order"
    if all(c.iter_source != "order" for c in checkpoints):
        return sorted(checkpoints, key=lambda c: c.iter)  # stable: equal iterations keep the given order
    for position, ckpt in enumerate(checkpoints):
        ckpt.iter, ckpt.iter_source = position, "order"
    return checkpoints


# --- metadata ----------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    """The JSON value in `path`, refusing files above MAX_JSON_BYTES (one-line CheckpointError)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES} bytes, not read")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # the C parser bounds nesting by the interpreter's recursion limit
        raise CheckpointError(f"{path}: JSON nested too deeply to be a real file (over "
                              f"~{sys.getrecursionlimit()} levels), not read") from None


def _as_iter(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        return int(value) if int(value) >= 0 else None
    return None


def _iter_from(mapping: dict[str, Any]) -> int | None:
    for key in ITER_KEYS:
        it = _as_iter(mapping.get(key))
        if it is not None:
            return it
    return None


def metadata_iter(path: Path) -> int | None:
    """The iteration a checkpoint's own metadata states (None when it says none)."""
    if path.is_dir():
        state = path / "trainer_state.json"
        if state.is_file():
            data = read_json(state)
            return _as_iter(data.get("global_step")) if isinstance(data, dict) else None
        return None
    if path.suffix == ".safetensors":
        return _iter_from(_safetensors_header(path)[1])
    if path.suffix == ".npy":
        return None
    obj = _torch_load(path)
    return _iter_from(obj) if isinstance(obj, dict) else None


# --- reading the embedding ---------------------------------------------------------------------
def _safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        return read_header(path)
    except SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None


def _torch_load(path: Path, limits: Limits = DEFAULT_LIMITS) -> Any:
    # mmap needs the zip format torch.save has written since 1.6; older files are read whole, so the whole
    # file is held to the bound on what replay may read.
    try:
        use_mmap = zipfile.is_zipfile(path)
        if not use_mmap and path.stat().st_size > limits.max_payload_bytes:
            raise CheckpointError(f"{path}: a legacy (pre-zip) torch file of {path.stat().st_size} bytes, over "
                                  f"--max-bytes {limits.max_payload_bytes}; such files are read whole (re-save "
                                  "it with a current torch.save, or raise --max-bytes)")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = " ".join(str(exc).split())
        if "weights_only" in text.lower() or "unpickl" in type(exc).__name__.lower():
            raise CheckpointError(f"{path}: refused by the weights-only loader (only tensors and plain "
                                  "containers are loaded, never objects whose unpickling could run code): "
                                  f"{text[:160]}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                              f"{text[:160]}; truncated or corrupt?)") from None


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _normalised(name: str) -> str:
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def choose_tensor(shapes: dict[str, tuple[int, ...]], wanted: str | None, where: Path) -> str:
    """The embedding's key among `shapes` (name -> shape): `wanted`, else the usual names; else one
    error that lists the 2-D candidates."""
    two_d = {k: s for k, s in shapes.items() if len(s) == 2}
    listing = ", ".join(f"{k} [{s[0]} x {s[1]}]" for k, s in list(two_d.items())[:12])
    if len(two_d) > 12:
        listing += f", ... ({len(two_d) - 12} more)"
    hint = f"2-D tensors: {listing}" if two_d else "it holds no 2-D tensor"
    if wanted is not None:
        if wanted in two_d:
            return wanted
        matches = [k for k in two_d if _normalised(k) == _normalised(wanted)]
        if len(matches) == 1:
            return matches[0]
        why = "is not 2-D" if wanted in shapes else "not found"
        raise CheckpointError(f"{where}: tensor {wanted!r} {why}; {hint}")
    for name in EMBEDDING_NAMES:
        matches = [k for k in two_d if _normalised(k) == name or _normalised(k).endswith("." + name)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise CheckpointError(f"{where}: several embedding candidates ({', '.join(matches)}); "
                                  "pick one with --tensor NAME")
    raise CheckpointError(f"{where}: no tensor with a usual embedding name; pass --tensor NAME ({hint})")


def admit(shape: tuple[int, ...], itemsize: int, name: str, where: Path, limits: Limits) -> None:
    """Refuse (CheckpointError) an embedding whose stated shape is beyond `limits`, before reading it."""
    rows, cols = shape
    nbytes = rows * cols * itemsize
    for value, bound, option in ((rows, limits.max_rows, "--max-rows"), (cols, limits.max_cols, "--max-cols"),
                                 (nbytes, limits.max_payload_bytes, "--max-bytes")):
        if value > bound:
            what = "bytes" if option == "--max-bytes" else option.removeprefix("--max-")
            raise CheckpointError(f"{where}: tensor {name!r} [{rows} x {cols}] has {value} {what}, over {option} "
                                  f"{bound} (not read; raise {option}"
                                  f"{' or --max-analysis-memory' if option == '--max-bytes' else ''} to allow it)")


def _check_float(tensor: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    if not tensor.dtype.is_floating_point:
        raise CheckpointError(f"{where}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, "
                              "not a float tensor")
    return tensor


def _index_shards(index_path: Path) -> dict[str, Path]:
    data = read_json(index_path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no weight_map object")
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        # A shard is a file beside the index, never a path elsewhere ("../../etc/passwd").
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: weight_map entry {name!r} names {shard!r}, not a file "
                                  "beside the index")
        shards[str(name)] = index_path.parent / shard
    return shards


def _read_safetensors(files: list[Path], wanted: str | None, where: Path,
                      limits: Limits) -> tuple[str, torch.Tensor, int | None]:
    entries: dict[str, tuple[Path, TensorEntry]] = {}
    it = None
    for f in files:
        header, meta = _safetensors_header(f)
        it = it if it is not None else _iter_from(meta)
        entries.update({name: (f, e) for name, e in header.items()})
    name = choose_tensor({k: e.shape for k, (_, e) in entries.items()}, wanted, where)
    f, entry = entries[name]
    dtype = FLOAT_DTYPES.get(entry.dtype)
    if dtype is not None:  # other dtypes are refused by read_tensor, by name
        admit(entry.shape, dtype.itemsize, name, where, limits)
    try:
        return name, read_tensor(f, entry), it
    except SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None


def _read_torch(path: Path, wanted: str | None, limits: Limits) -> tuple[str, torch.Tensor, int | None, dict]:
    obj = _torch_load(path, limits)
    tensors = _state_dict(obj, path)
    name = choose_tensor({k: tuple(v.shape) for k, v in tensors.items()}, wanted, path)
    tensor = _check_float(tensors[name], name, path)
    admit(tuple(tensor.shape), tensor.element_size(), name, path, limits)
    # clone: a private copy in memory; the rest of the checkpoint stays unread on disk (mmap)
    tensor = tensor.detach().clone()
    meta = obj if isinstance(obj, dict) else {}
    return name, tensor, _iter_from(meta), meta


def _read_npy(path: Path, limits: Limits) -> torch.Tensor:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise CheckpointError(f"{path}: refused or unreadable .npy ({' '.join(str(exc).split())[:160]})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise CheckpointError(f"{path}: holds a {arr.dtype} array of shape {list(arr.shape)}, not a 2-D float "
                              "embedding")
    admit(tuple(arr.shape), arr.dtype.itemsize, path.stem, path, limits)
    # a native-byte-order copy (torch takes no big-endian arrays), read once, no mmap left behind
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _sharded(index: Path, wanted: str | None, where: Path, limits: Limits) -> tuple[str, torch.Tensor, int | None]:
    """Read the embedding of a sharded model: the index names every tensor, so only its shard is opened."""
    shards = _index_shards(index)
    torch_shards = index.name == TORCH_INDEX
    try:  # by name first; shapes are checked once the shard is open
        key = choose_tensor({k: (0, 0) for k in shards}, wanted, where)
        files = [shards[key]]
    except CheckpointError:  # open every shard: finds it by shape-aware rules, or lists real shapes
        key, files = wanted, sorted(set(shards.values()))
    if not torch_shards:
        return _read_safetensors(files, key, where, limits)
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        loaded.update(_state_dict(_torch_load(f, limits), f))
    shapes = {k: tuple(v.shape) for k, v in loaded.items()}
    name = choose_tensor(shapes, key, where)
    tensor = _check_float(loaded[name], name, where)
    admit(tuple(tensor.shape), tensor.element_size(), name, where, limits)
    return name, tensor.detach().clone(), None


def read_embedding(path: Path, wanted: str | None = None, limits: Limits = DEFAULT_LIMITS) -> Embedding:
    """The embedding tensor of the checkpoint at `path` (file or model directory), its name and metadata.

    The embedding's shape is held to `limits` (rows, columns, bytes) before its bytes are read.
    """
    vocab: Any = None
    metrics = None
    try:
        if path.is_dir():
            if (path / SAFETENSORS_INDEX).is_file():
                name, tensor, it = _sharded(path / SAFETENSORS_INDEX, wanted, path, limits)
            elif (path / "model.safetensors").is_file():
                name, tensor, it = _read_safetensors([path / "model.safetensors"], wanted, path, limits)
            elif (path / TORCH_INDEX).is_file():
                name, tensor, it = _sharded(path / TORCH_INDEX, wanted, path, limits)
            else:
                name, tensor, it, meta = _read_torch(path / "pytorch_model.bin", wanted, limits)
                vocab = meta.get("itos")
            it = metadata_iter(path) if it is None else it
            metrics = trainer_metrics(path, it)
        elif path.suffix == ".safetensors":
            name, tensor, it = _read_safetensors([path], wanted, path, limits)
        elif path.suffix == ".npy":
            name, tensor, it = path.stem, _read_npy(path, limits), None
        else:
            name, tensor, it, meta = _read_torch(path, wanted, limits)
            vocab, metrics = meta.get("itos"), _checkpoint_metrics(meta.get("metrics"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    ok_vocab = vocab if isinstance(vocab, list) and all(isinstance(s, str) for s in vocab) else None
    return Embedding(tensor=_check_float(tensor, name, path), name=name, iter=it, vocab=ok_vocab, metrics=metrics)


def _checkpoint_metrics(value: Any) -> dict[str, float | int] | None:
    """The `metrics` a train.py checkpoint keeps (the ones it published), if they are valid trainer metrics."""
    try:
        return check_metrics(value)
    except ProtocolError:
        return None


def trainer_metrics(model_dir: Path, step: int | None) -> dict[str, float] | None:
    """What trainer_state.json's log_history holds for `step`, named as the live callback names it."""
    state = model_dir / "trainer_state.json"
    if step is None or not state.is_file():
        return None
    data = read_json(state)
    history = data.get("log_history") if isinstance(data, dict) else None
    found: dict[str, float] = {}
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or _as_iter(entry.get("step")) != step:
            continue
        found.update(hf_log_metrics(entry))
    return found or None
