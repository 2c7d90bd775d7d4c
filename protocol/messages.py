"""Message kinds, header schema, limits, encode and decode: the wire format in one place.

A message is a list of ZeroMQ frames. Frame 0 is a msgpack map (the header). A `snapshot` sent
inline has a second frame with the raw C-order tensor bytes; a `snapshot` that travels through
shared memory has only the header, whose `shm` entry names the slot. `hello`, `end` and `heartbeat`
are one frame.
Nothing is ever unpickled: msgpack is unpacked with hard limits and no extension types.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Union

import msgpack
import numpy as np

PROTOCOL_VERSION: Final[int] = 1

KIND_HELLO: Final[str] = "hello"
KIND_SNAPSHOT: Final[str] = "snapshot"
KIND_END: Final[str] = "end"
# Sent by the publisher's sender thread every few seconds while connected: the daemon closes a run
# whose publishers all went silent (a SIGKILLed trainer never sends `end`).
KIND_HEARTBEAT: Final[str] = "heartbeat"
KINDS: Final[tuple[str, ...]] = (KIND_HELLO, KIND_SNAPSHOT, KIND_END, KIND_HEARTBEAT)

# Bytes per element of every dtype allowed on the wire; bfloat16 travels as raw 2-byte words.
DTYPE_ITEMSIZE: Final[dict[str, int]] = {"float32": 4, "float16": 2, "bfloat16": 2}

# Shared-memory segment names: "emon-<pid>-<token>-<slot>-<generation>". The reader opens
# /dev/shm/<name>, so the name must never carry a path separator or anything unexpected. The token
# is a hash of the publisher's secret (shm.shm_token): it binds the segment to the publisher id.
SHM_PREFIX: Final[str] = "emon-"
SHM_NAME_RE: Final[re.Pattern[str]] = re.compile(r"^emon-(\d{1,10})-([0-9a-f]{24})-(\d{1,4})-(\d{1,10})$")

_U64_MAX: Final[int] = 2**64 - 1
# Trainer metrics (loss, lr, ...) riding on a snapshot: names a W&B key, a JSON key and a console label
# can all take as they are (letters, digits and _ . / -), at most max_metric_key_chars long.
METRIC_KEY_RE: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
_METRIC_INT_MAX: Final[int] = 2**53  # beyond this an int is not exact as a JSON/float64 number
_RUN_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")


class ProtocolError(ValueError):
    """A message that does not follow the wire format; the text names the field and the value."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced before anything is allocated for a message."""

    max_header_bytes: int = 16 * 1024 * 1024  # hello carries the vocabulary: 200k tokens fit easily
    max_rows: int = 4 * 1024 * 1024  # V
    max_cols: int = 64 * 1024  # d
    max_payload_bytes: int = 8 * 1024**3  # one snapshot's tensor bytes
    max_string_bytes: int = 64 * 1024  # any single msgpack string (token, run name, meta value)
    max_map_len: int = 4096  # entries of any msgpack map (meta, wandb info)
    max_run_chars: int = 200  # run names become directory names on the daemon side
    max_world_size: int = 65536  # ranks of one sharded run (each rank may send one part per iteration)
    max_metrics: int = 64  # trainer metrics per snapshot: a few scalars, not a second logging channel
    max_metric_key_chars: int = 64
    # A hello's vocabulary is kept per run for the run's lifetime: bounded in count and in bytes.
    # Real vocabularies: GPT-2 50,257 tokens (~0.4 MB), Llama 3 128,256, Gemma 262,144 (~3 MB).
    max_vocab_tokens: int = 1024 * 1024
    max_vocab_bytes: int = 16 * 1024 * 1024  # total UTF-8 bytes of all token strings
    # The rest of a hello is kept per run too (and written to --state-dir): every field small and flat.
    max_host_chars: int = 255  # a host name (RFC 1035: 253 with dots)
    max_publisher_chars: int = 512  # "host/pid/secret"
    max_tensor_name_chars: int = 200  # a snapshot's tensor name: a key of per-run state, a W&B key part
    # `meta`: free-form trainer facts (framework, versions, heartbeat): a small JSON-like tree.
    max_meta_bytes: int = 64 * 1024  # UTF-8 bytes of all its keys and strings together
    max_meta_items: int = 1024  # keys + values, nested ones included
    max_meta_depth: int = 3  # the map itself is depth 1; a list or map inside it 2, and so on
    # `wandb`: the trainer's W&B run (project, entity, group, run id and name, mode): flat, short strings.
    max_wandb_entries: int = 16
    max_wandb_value_chars: int = 256

    def max_frame_bytes(self) -> int:
        """Largest single ZeroMQ frame a receiver should accept (its ZMQ_MAXMSGSIZE)."""
        return max(self.max_header_bytes, self.max_payload_bytes)


DEFAULT_LIMITS: Final[Limits] = Limits()


@dataclass(frozen=True)
class ShmRef:
    """Where a snapshot's payload lies in shared memory, and the slot sequence it was written with."""

    segment: str  # name under /dev/shm, matches SHM_NAME_RE
    offset: int  # byte offset of the payload inside the segment
    slot_seq: int  # the slot's seqlock word when the payload was complete (even)


@dataclass(frozen=True)
class Hello:
    """Run metadata, sent when a connection to the daemon is (re)established."""

    run: str
    seq: int
    pid: int
    host: str
    vocab: list[str] | None
    wandb: dict | None
    meta: dict
    publisher: str = ""
    rank: int = 0  # this publisher's rank in its job (torch.distributed), 0 when not distributed
    world_size: int = 1  # ranks in the job; a sharded snapshot has its parts spread over them


@dataclass(frozen=True)
class Snapshot:
    """One embedding matrix: header fields plus either the inline payload or a shared-memory reference."""

    run: str
    iter: int
    seq: int
    name: str
    dtype: str
    shape: tuple[int, ...]  # (V, d); a block part's (rows, cols); an element-range part's (numel,)
    nbytes: int
    sent_at: float
    payload: memoryview | None = field(default=None, repr=False, compare=False)
    shm: ShmRef | None = None
    publisher: str = ""
    # A part of a sharded matrix, in one of two forms (both None for a whole, unsharded snapshot):
    # - a block: `shape` [rows, cols] is the part's, `offset` its [row, col] in `global_shape`;
    # - an element range: `shape` is [numel] and the part is the flat elements [start, start + numel)
    #   of the C-order `global_shape` matrix (an FSDP1 / ZeRO-3 shard; may begin or end mid-row).
    # A part is never empty: a rank that holds nothing of the matrix sends nothing.
    global_shape: tuple[int, int] | None = None
    offset: tuple[int, int] | None = None
    metrics: dict[str, float | int] | None = None  # the trainer's scalars at this iteration (loss, ...)
    start: int | None = None  # first flat element of an element-range part

    @property
    def numel(self) -> int:
        """Elements in this snapshot (or part)."""
        return math.prod(self.shape)
    # Tokens the trainer fed since its previous snapshot: little-endian uint32 (or, when a count needs
    # it, uint64) per row of the (global) matrix, validated to 4 or 8 x rows bytes (pack_token_counts);
    # None when not counted. `unpack_token_counts` reads it.
    token_counts: bytes | None = None

    @property
    def is_part(self) -> bool:
        """True when this is one shard of a larger matrix, to be assembled with the other ranks' parts."""
        return self.global_shape is not None


@dataclass(frozen=True)
class End:
    """Training finished: the publisher's final counters."""

    run: str
    seq: int
    final_iter: int | None
    published: int
    dropped: int
    publisher: str = ""


@dataclass(frozen=True)
class Heartbeat:
    """The publisher is alive (it may have nothing to send for a long while)."""

    run: str
    seq: int
    publisher: str = ""


Message = Union[Hello, Snapshot, End, Heartbeat]


# ---------------------------------------------------------------- encoding

def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def check_metrics(metrics: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, float | int] | None:
    """Return `metrics` if it is a valid trainer-metrics map (None or {} give None), else raise ProtocolError.

    Valid: at most `limits.max_metrics` entries; keys of 1..max_metric_key_chars characters matching
    METRIC_KEY_RE; values finite floats or ints within +-2**53 (bools are not numbers here).
    """
    if metrics is None:
        return None
    if type(metrics) is not dict:
        raise ProtocolError(f"metrics must be a map of name -> number, got {type(metrics).__name__} {_short(metrics)}")
    if len(metrics) > limits.max_metrics:
        raise ProtocolError(f"metrics: {len(metrics)} entries exceed max_metrics={limits.max_metrics}")
    for key, value in metrics.items():
        if type(key) is not str or not 0 < len(key) <= limits.max_metric_key_chars or not METRIC_KEY_RE.match(key):
            raise ProtocolError(f"metrics: name {_short(key)} must be 1-{limits.max_metric_key_chars} characters of "
                                "letters, digits and _ . / - (not starting with . / -)")
        if type(value) is int:
            if abs(value) > _METRIC_INT_MAX:
                raise ProtocolError(f"metrics: {key}={value} is outside +-2**53")
        elif type(value) is not float or not math.isfinite(value):
            raise ProtocolError(f"metrics: {key} must be a finite number, got {type(value).__name__} {_short(value)}")
    return dict(metrics) or None


def encode_hello(*, run: str, seq: int, pid: int, host: str, vocab: Sequence[str] | None = None,
                 wandb: dict | None = None, meta: dict | None = None, publisher: str = "",
                 rank: int = 0, world_size: int = 1) -> list[bytes]:
    """Frames of a `hello` message."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    meta = check_meta(meta)  # ProtocolError (a ValueError) here, not a refusal at the daemon
    wandb = check_wandb_info(wandb)
    return [_pack({"v": PROTOCOL_VERSION, "kind": KIND_HELLO, "run": run, "seq": seq, "publisher": publisher,
                   "pid": pid, "host": host, "vocab": list(vocab) if vocab is not None else None,
                   "wandb": wandb, "meta": meta, "rank": rank, "world_size": world_size})]


# A token count is at most this: 2^46 (7e13, several times the tokens of the largest training runs), so
# the daemon's int64 sum over 65536 ranks' parts (max_world_size) and many skipped snapshots never overflows.
TOKEN_COUNT_MAX: Final = 2**46


def pack_token_counts(counts: Any) -> bytes:
    """Token counts (one non-negative integer per row, a numpy array or a CPU tensor) for a snapshot header.

    Little-endian uint32 per row while every count fits (the usual case: half the bytes), else uint64:
    a count is never capped. Counts above TOKEN_COUNT_MAX raise ValueError.
    """
    values = np.asarray(counts).astype(np.int64, copy=False).reshape(-1)
    top = int(values.max()) if values.size else 0
    if values.size and int(values.min()) < 0 or top > TOKEN_COUNT_MAX:
        raise ValueError(f"token counts must lie in [0, {TOKEN_COUNT_MAX}]")
    return values.astype("<u4" if top <= 0xFFFFFFFF else "<u8").tobytes()


def unpack_token_counts(data: bytes, rows: int) -> np.ndarray:
    """The (rows,) int64 counts of a header's token_counts; ProtocolError when length or range is wrong."""
    if len(data) == 4 * rows:
        return np.frombuffer(data, dtype="<u4").astype(np.int64)
    if len(data) != 8 * rows:
        raise ProtocolError(f"header: token_counts must be {4 * rows} (uint32) or {8 * rows} (uint64) bytes for "
                            f"{rows} rows, got {len(data)}")
    wide = np.frombuffer(data, dtype="<u8")
    if wide.size and int(wide.max()) > TOKEN_COUNT_MAX:
        raise ProtocolError(f"header: a token count exceeds {TOKEN_COUNT_MAX}")
    return wide.astype(np.int64)


def encode_snapshot(*, run: str, iter: int, seq: int, name: str, dtype: str, shape: Sequence[int],
                    payload: Any = None, shm: ShmRef | None = None, sent_at: float | None = None,
                    publisher: str = "", global_shape: Sequence[int] | None = None,
                    offset: Sequence[int] | None = None, metrics: dict[str, float | int] | None = None,
                    start: int | None = None, token_counts: bytes | None = None) -> list[Any]:
    """Frames of a `snapshot`: [header, payload] inline, or [header] when `shm` names the payload.

    For one rank's part of a sharded matrix pass `global_shape` and either `offset` ([row, col] of a
    2-D block of `shape`) or `start` (the first flat element of a 1-D range, `shape` = [numel]).
    `metrics` (optional) must pass `check_metrics`; it raises ProtocolError otherwise.
    `token_counts` (optional): `pack_token_counts` of one count per row of the (global) matrix.
    """
    if (payload is None) == (shm is None):
        raise ValueError("encode_snapshot needs exactly one of payload= or shm=")
    if dtype not in DTYPE_ITEMSIZE:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_ITEMSIZE)}")
    dims = [int(n) for n in shape]
    if len(dims) != (1 if start is not None else 2):
        raise ValueError(f"shape {list(shape)} must be [numel] for an element range (start=), else [rows, cols]")
    nbytes = math.prod(dims) * DTYPE_ITEMSIZE[dtype]
    if payload is not None and memoryview(payload).nbytes != nbytes:
        raise ValueError(f"payload has {memoryview(payload).nbytes} bytes, shape {shape} {dtype} needs {nbytes}")
    if (global_shape is None) != (offset is None and start is None) or (offset is not None and start is not None):
        raise ValueError("encode_snapshot needs both global_shape= and offset= (or start=) for a part, or neither")
    part: dict[str, Any] = {}
    if global_shape is not None:
        part["global_shape"] = [int(n) for n in global_shape]
        if start is not None:
            part["start"] = int(start)
        else:
            part["offset"] = [int(n) for n in offset]  # type: ignore[union-attr]
    header = {"v": PROTOCOL_VERSION, "kind": KIND_SNAPSHOT, "run": run, "seq": seq, "publisher": publisher,
              "iter": iter, "name": name, "dtype": dtype, "shape": dims, "nbytes": nbytes,
              "sent_at": float(time.time() if sent_at is None else sent_at),
              "shm": None if shm is None else {"segment": shm.segment, "offset": shm.offset,
                                                 "slot_seq": shm.slot_seq}, **part}
    metrics = check_metrics(metrics)
    if metrics is not None:  # absent when there are none: older daemons never see the key
        header["metrics"] = metrics
    if token_counts is not None:
        rows_counted = int(global_shape[0]) if global_shape is not None else dims[0]
        if len(token_counts) not in (4 * rows_counted, 8 * rows_counted):
            raise ValueError(f"token_counts has {len(token_counts)} bytes, {rows_counted} rows need "
                             f"{4 * rows_counted} (uint32) or {8 * rows_counted} (uint64)")
        header["token_counts"] = bytes(token_counts)
    return [_pack(header)] if payload is None else [_pack(header), payload]


def encode_end(*, run: str, seq: int, final_iter: int | None, published: int, dropped: int,
               publisher: str = "") -> list[bytes]:
    """Frames of an `end` message."""
    return [_pack({"v": PROTOCOL_VERSION, "kind": KIND_END, "run": run, "seq": seq, "publisher": publisher,
                   "final_iter": final_iter, "published": published, "dropped": dropped})]


def encode_heartbeat(*, run: str, seq: int, publisher: str = "") -> list[bytes]:
    """Frames of a `heartbeat` message."""
    return [_pack({"v": PROTOCOL_VERSION, "kind": KIND_HEARTBEAT, "run": run, "seq": seq, "publisher": publisher})]


# ---------------------------------------------------------------- decoding

def _as_view(frame: Any) -> memoryview:
    # zmq.Frame exposes .buffer; bytes and memoryview are buffers already. No zmq import needed here.
    buf = getattr(frame, "buffer", frame)
    try:
        view = memoryview(buf)
    except TypeError:
        raise ProtocolError(f"frame of type {type(frame).__name__} is not a buffer") from None
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Header:
    """Typed accessors over an unpacked header map; every failure names the field and value."""

    def __init__(self, data: dict, limits: Limits) -> None:
        self.data, self.limits = data, limits

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise ProtocolError(f"header: missing key {key!r} in {self.data.get('kind', '?')} message")
        return self.data[key]

    def int_(self, key: str, *, minimum: int = 0, maximum: int = _U64_MAX, optional: bool = False) -> int | None:
        value = self._get(key)
        if value is None and optional:
            return None
        if type(value) is not int:  # bool is an int subclass and never a valid count
            raise ProtocolError(f"header: {key} must be an integer, got {type(value).__name__} {_short(value)}")
        if not minimum <= value <= maximum:
            raise ProtocolError(f"header: {key}={value} is outside [{minimum}, {maximum}]")
        return value

    def str_(self, key: str, *, optional: bool = False, max_chars: int | None = None) -> str | None:
        value = self._get(key)
        if value is None and optional:
            return None
        if type(value) is not str:
            raise ProtocolError(f"header: {key} must be a string, got {type(value).__name__} {_short(value)}")
        if len(value.encode("utf-8", "surrogatepass")) > self.limits.max_string_bytes:
            raise ProtocolError(f"header: {key} is longer than max_string_bytes={self.limits.max_string_bytes}")
        if max_chars is not None and len(value) > max_chars:
            raise ProtocolError(f"header: {key} of {len(value)} characters is longer than {max_chars}")
        return value

    def float_(self, key: str) -> float:
        value = self._get(key)
        if type(value) not in (float, int) or not math.isfinite(value):
            raise ProtocolError(f"header: {key} must be a finite number, got {_short(value)}")
        return float(value)

    def dict_(self, key: str, *, optional: bool = False) -> dict | None:
        value = self._get(key)
        if value is None and optional:
            return None
        if type(value) is not dict:
            raise ProtocolError(f"header: {key} must be a map, got {type(value).__name__} {_short(value)}")
        for k in value:
            if type(k) is not str:
                raise ProtocolError(f"header: {key} has a non-string key {_short(k)}")
        return value


MAX_TENSOR_NAME_CHARS: Final = 64
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def check_tensor_name(name: Any) -> str:
    """Return `name` if it is a usable tensor name (it becomes part of W&B keys: analysis/<name>/...), else raise."""
    if type(name) is not str or not 0 < len(name) <= MAX_TENSOR_NAME_CHARS or not _TENSOR_NAME.fullmatch(name):
        raise ProtocolError(f"header: tensor name must be 1-{MAX_TENSOR_NAME_CHARS} characters of A-Z a-z 0-9 _ . -, "
                            f"got {_short(name)}")
    return name


def check_meta(meta: Any, limits: Limits = DEFAULT_LIMITS, field_name: str = "meta") -> dict[str, Any]:
    """Return `meta` if it is a hello's bounded meta map, else raise ProtocolError (None gives {}).

    A map with string keys whose values are None, bools, ints, finite floats, strings, or lists and
    maps of those, at most `max_meta_depth` levels deep, `max_meta_items` keys and values in all and
    `max_meta_bytes` UTF-8 bytes of keys and strings in all: what a peer sends here is kept for the
    run's lifetime, so it is bounded whatever the header's size.
    """
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ProtocolError(f"header: {field_name} must be a map, got {type(meta).__name__} {_short(meta)}")
    budget = [limits.max_meta_items, limits.max_meta_bytes]  # items left, bytes left

    def spend(items: int, nbytes: int) -> None:
        budget[0] -= items
        budget[1] -= nbytes
        if budget[0] < 0:
            raise ProtocolError(f"header: {field_name} has more than max_meta_items={limits.max_meta_items} "
                                "keys and values")
        if budget[1] < 0:
            raise ProtocolError(f"header: {field_name} holds more than max_meta_bytes={limits.max_meta_bytes} "
                                "bytes of text")

    def walk(value: Any, depth: int, where: str) -> None:
        # isinstance, not type(): what msgpack packs as a map, array or string (a TorchVersion is a str)
        is_map = isinstance(value, dict)
        if is_map or isinstance(value, (list, tuple)):
            if depth > limits.max_meta_depth:
                raise ProtocolError(f"header: {where} nests deeper than max_meta_depth={limits.max_meta_depth}")
            spend(len(value) * (2 if is_map else 1), 0)
            for key, item in (value.items() if is_map else enumerate(value)):
                if is_map:
                    if not isinstance(key, str):
                        raise ProtocolError(f"header: {where} has a non-string key {_short(key)}")
                    spend(0, len(key.encode("utf-8", "surrogatepass")))
                walk(item, depth + 1, f"{where}.{key}" if is_map else f"{where}[{key}]")
        elif isinstance(value, str):
            spend(0, len(value.encode("utf-8", "surrogatepass")))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ProtocolError(f"header: {where} must be a finite number, got {value}")
        elif value is not None and not isinstance(value, int):  # bool is an int
            raise ProtocolError(f"header: {where} has a value of type {type(value).__name__} (allowed: null, "
                                "bool, number, string, list, map)")

    walk(meta, 1, field_name)
    return meta


def check_wandb_info(info: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any] | None:
    """Return `info` if it is a hello's W&B map (flat: short string keys, null/bool/number/short string
    values, at most `max_wandb_entries`), else raise ProtocolError; None stays None."""
    if info is None:
        return None
    if not isinstance(info, dict):
        raise ProtocolError(f"header: wandb must be a map, got {type(info).__name__} {_short(info)}")
    if len(info) > limits.max_wandb_entries:
        raise ProtocolError(f"header: wandb has {len(info)} entries, more than max_wandb_entries="
                            f"{limits.max_wandb_entries}")
    for key, value in info.items():
        if not isinstance(key, str) or not 0 < len(key) <= limits.max_metric_key_chars:
            raise ProtocolError(f"header: wandb key {_short(key)} must be a string of 1-{limits.max_metric_key_chars} "
                                "characters")
        if isinstance(value, str):
            if len(value) > limits.max_wandb_value_chars:
                raise ProtocolError(f"header: wandb.{key} is longer than max_wandb_value_chars="
                                    f"{limits.max_wandb_value_chars}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"header: wandb.{key} must be a finite number, got {value}")
        elif value is not None and not isinstance(value, (int, float)):
            raise ProtocolError(f"header: wandb.{key} must be null, a bool, a number or a string, got "
                                f"{type(value).__name__}")
    return info


def check_run_name(run: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    """Return `run` if it is a usable run name (it becomes a directory on the daemon side), else raise."""
    if type(run) is not str or not run:
        raise ProtocolError(f"header: run must be a non-empty string, got {_short(run)}")
    if len(run) > limits.max_run_chars:
        raise ProtocolError(f"header: run name of {len(run)} characters exceeds max_run_chars={limits.max_run_chars}")
    if run in (".", "..") or _RUN_FORBIDDEN.search(run):
        raise ProtocolError(f"header: run={_short(run)} may not be '.', '..' or contain '/', '\\' or control characters")
    return run


def _unpack_header(frame: memoryview, limits: Limits) -> dict:
    if frame.nbytes > limits.max_header_bytes:
        raise ProtocolError(f"header: {frame.nbytes} bytes exceeds max_header_bytes={limits.max_header_bytes}")
    try:
        data = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True,
            # bytes only as a snapshot's token_counts (4 or 8 per row, checked after), no ext, no timestamps
            max_str_len=limits.max_string_bytes, max_bin_len=min(8 * limits.max_rows, limits.max_header_bytes),
            max_ext_len=0,
            # Arrays in a header are a shape (2) and a hello's vocabulary: refused before allocation.
            # (a vocabulary longer than max_rows could not match any snapshot we accept either)
            max_array_len=max(min(limits.max_vocab_tokens, limits.max_rows), 16), max_map_len=limits.max_map_len)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(f"header: not a valid msgpack map within limits ({type(exc).__name__}: {exc})") from None
    if type(data) is not dict:
        raise ProtocolError(f"header: must be a msgpack map, got {type(data).__name__}")
    return data


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate a received multipart message and return it; raises ProtocolError and nothing else."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError(f"message: expected a non-empty list of frames, got {_short(frames)}")
    header = _Header(_unpack_header(_as_view(frames[0]), limits), limits)
    version = header._get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(f"header: v={_short(version)} is not the supported protocol version {PROTOCOL_VERSION}")
    kind = header._get("kind")
    if kind not in KINDS:
        raise ProtocolError(f"header: kind={_short(kind)} is not one of {list(KINDS)}")
    run = check_run_name(header._get("run"), limits)
    seq = header.int_("seq")
    publisher = header.str_("publisher", max_chars=limits.max_publisher_chars)
    if kind == KIND_SNAPSHOT:
        return _decode_snapshot(frames, header, run, seq, publisher)
    if len(frames) != 1:
        raise ProtocolError(f"message: {kind} has {len(frames)} frames, expected 1")
    if kind == KIND_HEARTBEAT:
        return Heartbeat(run=run, seq=seq, publisher=publisher)
    if kind == KIND_HELLO:
        vocab = header._get("vocab")
        if vocab is not None:
            if type(vocab) is not list:
                raise ProtocolError(f"header: vocab must be a list of strings, got {type(vocab).__name__}")
            if len(vocab) > limits.max_vocab_tokens:
                raise ProtocolError(f"header: vocab has {len(vocab)} tokens, more than max_vocab_tokens={limits.max_vocab_tokens}")
            total = 0
            for i, token in enumerate(vocab):
                if type(token) is not str:
                    raise ProtocolError(f"header: vocab[{i}] must be a string, got {type(token).__name__} {_short(token)}")
                total += len(token)  # characters: a lower bound of the UTF-8 bytes, exact for ASCII
            if total > limits.max_vocab_bytes or (
                    total * 4 > limits.max_vocab_bytes
                    and sum(len(t.encode("utf-8", "surrogatepass")) for t in vocab) > limits.max_vocab_bytes):
                raise ProtocolError(f"header: vocab strings exceed max_vocab_bytes={limits.max_vocab_bytes}")
        rank, world_size = _rank_and_world(header)
        return Hello(run=run, seq=seq, pid=header.int_("pid", maximum=2**31),
                     host=header.str_("host", max_chars=limits.max_host_chars), vocab=vocab,
                     wandb=check_wandb_info(header._get("wandb"), limits),
                     meta=check_meta(header._get("meta"), limits), publisher=publisher,
                     rank=rank, world_size=world_size)
    return End(run=run, seq=seq, final_iter=header.int_("final_iter", optional=True),
               published=header.int_("published"), dropped=header.int_("dropped"), publisher=publisher)


def _rank_and_world(header: _Header) -> tuple[int, int]:
    # Optional: a publisher that predates sharding (or a single process) says neither: rank 0 of 1.
    if "world_size" not in header.data and "rank" not in header.data:
        return 0, 1
    world_size = header.int_("world_size", minimum=1, maximum=header.limits.max_world_size)
    rank = header.int_("rank", maximum=world_size - 1)
    return rank, world_size  # type: ignore[return-value]


def _pair(header: _Header, key: str) -> tuple[int, int]:
    value = header._get(key)
    if type(value) is not list or len(value) != 2 or any(type(n) is not int for n in value):
        raise ProtocolError(f"header: {key} must be [rows, cols] (2 integers), got {_short(value)}")
    return value[0], value[1]


def _global_shape(header: _Header, dtype: str) -> tuple[int, int]:
    limits = header.limits
    g_rows, g_cols = _pair(header, "global_shape")
    if not 1 <= g_rows <= limits.max_rows:
        raise ProtocolError(f"header: global_shape rows={g_rows} is outside [1, max_rows={limits.max_rows}]")
    if not 1 <= g_cols <= limits.max_cols:
        raise ProtocolError(f"header: global_shape cols={g_cols} is outside [1, max_cols={limits.max_cols}]")
    g_bytes = g_rows * g_cols * DTYPE_ITEMSIZE[dtype]
    if g_bytes > limits.max_payload_bytes:
        raise ProtocolError(f"header: global_shape {[g_rows, g_cols]} x {dtype} = {g_bytes} bytes exceeds "
                            f"max_payload_bytes={limits.max_payload_bytes}")
    return g_rows, g_cols


def _part_geometry(header: _Header, dtype: str, shape: list[int]) -> tuple[tuple[int, int], tuple[int, int] | None,
                                                                            int | None] | None:
    """(global_shape, offset, start) of a sharded part, validated against the limits and the part's shape; None if whole."""
    data = header.data
    if "start" in data:
        if "offset" in data:
            raise ProtocolError("header: a part has either offset (a block) or start (an element range), not both")
        g_rows, g_cols = _global_shape(header, dtype)
        total = g_rows * g_cols
        start = header.int_("start", maximum=total - 1)
        if start + shape[0] > total:
            raise ProtocolError(f"header: element range [{start}, {start + shape[0]}) does not lie within "
                                f"global_shape {[g_rows, g_cols]} ({total} elements)")
        return (g_rows, g_cols), None, start
    if "global_shape" not in data and "offset" not in data:
        return None
    if len(shape) != 2:
        raise ProtocolError(f"header: shape {shape} of a block part must be [rows, cols]")
    rows, cols = shape
    g_rows, g_cols = _global_shape(header, dtype)
    r0, c0 = _pair(header, "offset")
    if r0 < 0 or c0 < 0 or r0 + rows > g_rows or c0 + cols > g_cols:
        raise ProtocolError(f"header: part {[rows, cols]} at offset {[r0, c0]} does not lie within "
                            f"global_shape {[g_rows, g_cols]}")
    return (g_rows, g_cols), (r0, c0), None


def _decode_snapshot(frames: Sequence[Any], header: _Header, run: str, seq: int, publisher: str) -> Snapshot:
    limits = header.limits
    dtype = header.str_("dtype")
    if dtype not in DTYPE_ITEMSIZE:
        raise ProtocolError(f"header: dtype={_short(dtype)} is not one of {sorted(DTYPE_ITEMSIZE)}")
    shape = header._get("shape")
    if "start" in header.data:  # an element-range part: [numel], checked against global_shape below
        if type(shape) is not list or len(shape) != 1 or type(shape[0]) is not int:
            raise ProtocolError(f"header: shape of an element-range part must be [numel] (1 integer), got {_short(shape)}")
        if not 1 <= shape[0] <= limits.max_rows * limits.max_cols:
            raise ProtocolError(f"header: shape numel={shape[0]} is outside [1, {limits.max_rows * limits.max_cols}]")
    else:
        if type(shape) is not list or len(shape) != 2 or any(type(n) is not int for n in shape):
            raise ProtocolError(f"header: shape must be [rows, cols] (2-D, integers), got {_short(shape)}")
        rows, cols = shape
        if not 1 <= rows <= limits.max_rows:
            raise ProtocolError(f"header: shape rows={rows} is outside [1, max_rows={limits.max_rows}]")
        if not 1 <= cols <= limits.max_cols:
            raise ProtocolError(f"header: shape cols={cols} is outside [1, max_cols={limits.max_cols}]")
    nbytes = header.int_("nbytes")
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if nbytes != expected:
        raise ProtocolError(f"header: nbytes={nbytes} does not match shape {shape} x {dtype} = {expected}")
    if nbytes > limits.max_payload_bytes:
        raise ProtocolError(f"header: nbytes={nbytes} exceeds max_payload_bytes={limits.max_payload_bytes}")
    shm_data = header.dict_("shm", optional=True)
    payload: memoryview | None = None
    shm: ShmRef | None = None
    if shm_data is None:
        if len(frames) != 2:
            raise ProtocolError(f"message: inline snapshot has {len(frames)} frames, expected 2 (header, payload)")
        payload = _as_view(frames[1])
        if payload.nbytes != nbytes:
            raise ProtocolError(f"payload: frame has {payload.nbytes} bytes, header nbytes={nbytes}")
    else:
        if len(frames) != 1:
            raise ProtocolError(f"message: shared-memory snapshot has {len(frames)} frames, expected 1")
        sub = _Header(shm_data, limits)
        segment = sub.str_("segment")
        if not SHM_NAME_RE.match(segment):
            raise ProtocolError(f"header: shm.segment={_short(segment)} is not a segment name this protocol creates")
        shm = ShmRef(segment=segment, offset=sub.int_("offset", maximum=4096), slot_seq=sub.int_("slot_seq"))
        if shm.slot_seq % 2:
            raise ProtocolError(f"header: shm.slot_seq={shm.slot_seq} is odd (slot was mid-write)")
    part = _part_geometry(header, dtype, shape)
    # Optional: absent from older publishers' headers.
    metrics = check_metrics(header.data.get("metrics"), limits)
    counts = header.data.get("token_counts")
    if counts is not None:
        counted_rows = part[0][0] if part else shape[0]
        if type(counts) is not bytes:
            raise ProtocolError(f"header: token_counts must be bytes, got {type(counts).__name__}")
        unpack_token_counts(counts, counted_rows)  # length and range; raises ProtocolError
    return Snapshot(run=run, iter=header.int_("iter"), seq=seq,
                    name=check_tensor_name(header.str_("name", max_chars=limits.max_tensor_name_chars)), dtype=dtype,
                    shape=tuple(shape), nbytes=nbytes, sent_at=header.float_("sent_at"), payload=payload,
                    shm=shm, publisher=publisher, global_shape=part[0] if part else None,
                    offset=part[1] if part else None, metrics=metrics, start=part[2] if part else None,
                    token_counts=counts)
