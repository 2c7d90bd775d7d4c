"""The embedding projector's files of one TensorBoard run directory: the matrices, their per-token
metadata, and `projector_config.pbtxt` naming the latest K of them.

    DIR/<run>/projector_config.pbtxt                 tensorboard's ProjectorConfig, as text
    DIR/<run>/projector~/iter_<N>/tensor.bytes       the (V, d) matrix, raw float32 (tensor_shape in the config)
                                                     (iter_<N>~<k>: the same iteration analysed again)
    DIR/<run>/projector~/iter_<N>/metadata.tsv       a header, then one row per token

Every file is written whole or not at all (temporary file, fsync, rename); the config is rewritten only
after the files it names are complete, and the files of a snapshot past K are deleted only after the
config stopped naming them, so a crash or a full disk leaves the previous, consistent projector.
Token strings come from the trainer over the network: `tsv_cell` escapes and cuts them, so none can add
a row or a column to the table.
"""
from __future__ import annotations

import logging
import math
import unicodedata
from pathlib import Path
from typing import Any

from ..safetext import first_line
from ..files import write_atomic

log = logging.getLogger("embedding_monitor.daemon")

CONFIG_NAME = "projector_config.pbtxt"
# per run: projector~/iter_<N>/{tensor.bytes,metadata.tsv}; the "~" keeps it apart from the tensors'
# subfolders (run_dirname never makes a name ending in "~")
PROJECTOR_DIR = "projector~"
MAX_TOKEN_CHARS = 100  # a token string's cell is cut to this many characters (after escaping)
MAX_CONFIG_BYTES = 1 << 20  # an existing projector config read back at start-up (ours are a few KB)


def tsv_cell(text: str, limit: int = MAX_TOKEN_CHARS) -> str:
    """`text` as one TSV cell: backslash, tab, newlines and every other control or separator character
    escaped (\\t, \\n, \\xNN, \\uNNNN), then cut to `limit` characters (an ellipsis marks the cut)."""
    out: list[str] = []
    size = 0
    for ch in text:
        if ch == "\\":
            piece = "\\\\"
        elif ch in "\t\n\r":
            piece = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}[ch]
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"):
            code = ord(ch)
            piece = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
        else:
            piece = ch
        if size + len(piece) > limit:
            out.append("\u2026")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _fmt(value: float) -> str:
    """A number for the TSV; empty (unknown) for NaN."""
    return f"{value:.6g}" if math.isfinite(value) else ""


def _ids(pairs: Any, rows: int) -> list[int]:
    """The in-range integer ids of a record's [[id, ...], ...] list (a record is untrusted input)."""
    out = []
    for pair in pairs if isinstance(pairs, list) else []:
        tid = pair[0] if isinstance(pair, list) and pair else pair
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < rows:
            out.append(tid)
    return out


def metadata_columns(result: dict[str, Any], arrays: Any, vocab: list[str] | None) -> list[tuple[str, list[str]]]:
    """The TSV's columns, each (name, one cell per token), from the analysis: the per-token arrays (drift
    cosine, row norm, frequency when counted), the record (galaxy clusters, under-trained tokens) and
    the trainer's vocabulary. A column with nothing known for this snapshot is left out."""
    rows = int(arrays.norm.shape[0])
    vocab = vocab or []
    columns: list[tuple[str, list[str]]] = [
        ("token", [tsv_cell(vocab[i]) if i < len(vocab) and isinstance(vocab[i], str) else f"#{i}"
                   for i in range(rows)]),
        ("id", [str(i) for i in range(rows)]),
    ]
    if arrays.drift is not None:
        columns.append(("drift_cosine", [_fmt(v) for v in arrays.drift.tolist()]))
    columns.append(("row_norm", [_fmt(v) for v in arrays.norm.tolist()]))
    galaxy = result.get("galaxy")
    if isinstance(galaxy, dict) and isinstance(galaxy.get("points"), list):
        cluster = [""] * rows  # outside the map's subset of rows: unknown
        for point in galaxy["points"]:
            if isinstance(point, list) and len(point) == 4 and _ids([point], rows) and isinstance(point[3], int) \
                    and not isinstance(point[3], bool):
                cluster[point[0]] = str(point[3])
        columns.append(("galaxy_cluster", cluster))
    insight = result.get("insight")
    if isinstance(insight, dict) and isinstance(insight.get("undertrained_tokens"), list):
        flagged = set(_ids(insight["undertrained_tokens"], rows))
        columns.append(("undertrained", ["1" if i in flagged else "0" for i in range(rows)]))
    # tokens the trainer fed in total (the run's running total of the snapshots' counts), when it counted
    counts = getattr(arrays, "tokens_total", None)
    if counts is not None and int(counts.numel()) == rows:
        columns.append(("frequency", [str(int(c)) for c in counts.flatten().tolist()]))
    return columns


def metadata_tsv(result: dict[str, Any], arrays: Any, vocab: list[str] | None) -> bytes:
    """The projector's metadata: a header, then one row per token."""
    columns = metadata_columns(result, arrays, vocab)
    lines = ["\t".join(name for name, _ in columns)]
    lines += ["\t".join(cells) for cells in zip(*(values for _, values in columns))]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _folder(tensor_path: str) -> str:
    """The snapshot folder a config entry names ("iter_<N>" or "iter_<N>~<k>"), "" when not one of ours."""
    parts = Path(tensor_path).parts
    return parts[1] if len(parts) == 3 and parts[0] == PROJECTOR_DIR and parts[1].startswith("iter_") else ""


class Projector:
    """The projector of one TensorBoard run directory: its config entries, newest last."""

    def __init__(self, directory: Path, keep: int) -> None:
        from tensorboard.plugins.projector import projector_config_pb2

        self.directory, self.keep = directory, keep
        self.config = projector_config_pb2.ProjectorConfig()
        path = directory / CONFIG_NAME
        try:
            if path.is_file() and path.stat().st_size <= MAX_CONFIG_BYTES:
                from google.protobuf import text_format
                text_format.Parse(path.read_text(encoding="utf-8"), self.config)
        except Exception as exc:  # another writer's or a damaged file: start over, it is rewritten whole
            log.warning("tensorboard: %s could not be read (%s); starting a new projector config", path,
                        first_line(exc))
            self.config.Clear()

    def add(self, result: dict[str, Any], arrays: Any, vocab: list[str] | None, label: str) -> None:
        """Write one snapshot's matrix (`arrays.weights`) and metadata, then the config naming the latest
        `keep` of them; `label` names the snapshot in the projector's menu (`<label> @ iter <N>`)."""
        from google.protobuf import text_format

        iteration = int(result["iter"])
        base = f"iter_{iteration:09d}"
        same = [e for e in self.config.embeddings if _folder(e.tensor_path).split("~", 1)[0] == base]
        name = base
        for n in range(1, len(same) + 2):  # a repeated iteration (a resumed trainer): a new folder, the
            if all(_folder(e.tensor_path) != name for e in same):  # old one is removed once unnamed
                break
            name = f"{base}~{n}"
        folder = self.directory / PROJECTOR_DIR / name
        tensor_path = f"{PROJECTOR_DIR}/{name}/tensor.bytes"
        matrix = arrays.weights.detach().to("cpu").float().contiguous()
        new = self.config.__class__()
        for e in self.config.embeddings:
            if e not in same:
                new.embeddings.add().CopyFrom(e)
        e = new.embeddings.add()
        e.tensor_name = f"{label} @ iter {iteration}"
        e.tensor_path = tensor_path
        e.metadata_path = f"{PROJECTOR_DIR}/{name}/metadata.tsv"
        e.tensor_shape.extend([int(s) for s in matrix.shape])
        dropped = [e.tensor_path for e in same]
        while len(new.embeddings) > self.keep:
            dropped.append(new.embeddings[0].tensor_path)
            del new.embeddings[0]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / "tensor.bytes", memoryview(matrix.numpy()).cast("B"))
            write_atomic(folder / "metadata.tsv", metadata_tsv(result, arrays, vocab))
            write_atomic(self.directory / CONFIG_NAME, text_format.MessageToString(new).encode("utf-8"))
        except OSError:
            self._remove(tensor_path)  # a new folder no config names: nothing of it left behind
            raise
        self.config = new
        for tensor_path in dropped:  # only now: the config no longer names them
            self._remove(tensor_path)

    def _remove(self, tensor_path: str) -> None:
        """Delete a snapshot's folder, if it is one of ours (a config read back may name anything)."""
        name = _folder(tensor_path)
        if not name:
            return  # not one of ours: never delete what a config we did not write names
        folder = self.directory / PROJECTOR_DIR / name
        for f in ("tensor.bytes", "metadata.tsv"):
            try:
                (folder / f).unlink()
            except FileNotFoundError:
                pass
        try:
            folder.rmdir()
        except OSError:
            pass
