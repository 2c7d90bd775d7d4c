"""Read back what a wandb run wrote offline: history rows, metric definitions and run info.

An offline run's `run-<id>.wandb` file is a LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB
blocks of records, each with a 7-byte crc/length/type header; records longer than a block are split
FIRST/MIDDLE/LAST) whose records are wandb's own protobuf `Record` messages. We parse them with
wandb's protobuf classes, so this reads exactly what `wandb sync` would upload.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic 0xBEE1, version 0
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    """Every protobuf Record in the .wandb file at `path`, in order (checksums verified)."""
    data = Path(path).read_bytes()
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a wandb transaction log (header {ident!r} {magic:#x} {version})")
    pos = _FILE_HEADER.size
    records, parts = [], []
    while pos + _RECORD_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # zero padding at the end of a block or the file
            pos += left_in_block
            continue
        start = pos + _RECORD_HEADER.size
        chunk = data[start:start + length]
        if len(chunk) < length:
            break  # the writer was killed mid-record: what came before is complete
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos = start + length
        if kind == _FULL:
            parts = [chunk]
        elif kind == _FIRST:
            parts = [chunk]
            continue
        elif kind == _MIDDLE:
            parts.append(chunk)
            continue
        else:
            parts.append(chunk)
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(b"".join(parts))
        records.append(rec)
        parts = []
    return records


def history(path: str | Path) -> list[dict[str, Any]]:
    """The run's history rows as dicts (values JSON-decoded; nested keys joined with '.')."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or ".".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def metric_definitions(path: str | Path) -> list[dict[str, Any]]:
    """define_metric records: name or glob_name, step_metric."""
    out = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "metric":
            m = rec.metric
            out.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
    return out


def run_info(path: str | Path) -> dict[str, Any]:
    """The run record: project, group, name, job type, config (JSON-decoded)."""
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            config = {item.key: json.loads(item.value_json) for item in r.config.update}
            return {"project": r.project, "group": r.run_group, "name": r.display_name,
                    "job_type": r.job_type, "id": r.run_id, "config": config}
    raise ValueError(f"{path}: no run record")


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    """Every run-*.wandb file under `wandb_dir` (offline runs)."""
    return sorted(Path(wandb_dir).rglob("run-*.wandb"))


def table(run_file: str | Path, path: str) -> dict[str, Any]:
    """A wandb.Table logged by the run of `run_file`, from its history entry's `path`
    (e.g. row["analysis/galaxy.path"]): {"columns": [...], "data": [[...], ...]} as wandb wrote it."""
    found = Path(run_file).parent / "files" / path
    if not found.is_file():
        raise FileNotFoundError(f"{found}: no such table file beside {run_file}")
    return json.loads(found.read_text())
