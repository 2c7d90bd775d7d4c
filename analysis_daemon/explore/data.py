"""Reading one results directory's per-token data (sinks/token_data.py) for the explorer, read-only.

Nothing a client sends becomes a path: runs are found once at start-up and chosen by name from that
list, iterations are integers formatted into directory names. Arrays are memory-mapped `.npy` files
loaded with `allow_pickle=False` and checked against the shapes their meta.json states, so a query
reads a few pages. Token strings come from the trainer and are hostile: they are returned as JSON
strings and the page only ever sets them as text.
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import run_from_dirname
from ..sinks.token_data import ITER_DIGITS, MAX_TOKEN_CHARS

MAX_JSON_BYTES = 64 * 1024 * 1024  # vocab.json of a 1M-token vocabulary is ~20 MB
CACHED_ITERS = 16  # iterations whose arrays stay mapped (a few file descriptors each)
_ITER_RE = re.compile(rf"^\d{{{ITER_DIGITS}}}$")  # the default tensor's directories only


class ExploreError(Exception):
    """A request names something that is not there (the message is one line; the API answers 404)."""


@dataclass
class IterArrays:
    """One iteration's per-token arrays (memory-mapped); knn_* and drift may be absent."""

    iter: int
    norm: np.ndarray
    xy: np.ndarray
    drift: np.ndarray | None
    knn_ids: np.ndarray | None
    knn_cos: np.ndarray | None
    # absent in data written before they existed, and where not known (sampled geometry has sizes for
    # its sample only: -1 elsewhere; counts only when the trainer counted tokens)
    nbhd: np.ndarray | None = None
    tokens_seen: np.ndarray | None = None
    tokens_total: np.ndarray | None = None
    tokens_total_since: int | None = None


def _load(path: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
    """The memory-mapped array in `path` (None when absent), refused unless it has `shape` and `dtype`."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ExploreError(f"{path}: not a plain .npy array ({exc})") from None
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise ExploreError(f"{path}: {arr.dtype} {list(arr.shape)}, expected {dtype} {list(shape)}")
    return arr


def read_json(path: Path) -> Any:
    """A JSON file of ours, bounded in size and nesting (one-line ExploreError otherwise)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ExploreError(f"{path}: larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ExploreError(f"{path}: not valid JSON ({type(exc).__name__})") from None


class RunData:
    """One run's results directory: its analysed iterations, vocabulary and per-token arrays."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.tokens = run_dir / "tokens"
        self.name = run_from_dirname(run_dir.name) or run_dir.name
        self._cache: OrderedDict[int, IterArrays] = OrderedDict()
        self._vocab: list[str | None] | None = None
        self._ids: dict[str, int] | None = None
        self._records: dict[int, dict[str, Any]] = {}
        self._records_stamp: tuple[int, int] | None = None

    def iters(self) -> list[int]:
        """The iterations with token data, ascending (re-read each time: the daemon may add some)."""
        if not self.tokens.is_dir():
            return []
        return sorted(int(p.name) for p in self.tokens.iterdir() if _ITER_RE.match(p.name) and p.is_dir())

    def vocab(self) -> list[str | None]:
        """The run's token strings (empty when the trainer sent none)."""
        if self._vocab is None:
            path = self.tokens / "vocab.json"
            raw = read_json(path) if path.is_file() else []
            if not isinstance(raw, list):
                raise ExploreError(f"{path}: not a list of token strings")
            self._vocab = [t[:MAX_TOKEN_CHARS] if isinstance(t, str) else None for t in raw]
        return self._vocab

    def rows(self) -> int:
        """V, from the newest iteration."""
        iters = self.iters()
        if not iters:
            raise ExploreError(f"run {self.name!r} has no token data (was it analysed with --no-token-data?)")
        return int(self.arrays(iters[-1]).norm.shape[0])

    def token_string(self, token_id: int) -> str | None:
        """The string of `token_id`, or None."""
        vocab = self.vocab()
        return vocab[token_id] if 0 <= token_id < len(vocab) else None

    def resolve(self, spec: str) -> int:
        """The token id named by `spec`: an id ("1234"), else a token string (exact, then with the BPE
        space markers Ġ / ▁ in front); ExploreError when there is no such token."""
        rows = self.rows()
        spec = spec[: MAX_TOKEN_CHARS * 4]
        if spec.strip().isdigit():
            token_id = int(spec.strip())
            if token_id < rows:
                return token_id
            raise ExploreError(f"token id {token_id} is out of range (the embedding has {rows} rows)")
        if self._ids is None:
            self._ids = {}
            for i, tok in enumerate(self.vocab()):
                if tok is not None and i < rows:
                    self._ids.setdefault(tok, i)
        for candidate in (spec, "Ġ" + spec, "▁" + spec, " " + spec, spec.strip()):
            if candidate in self._ids:
                return self._ids[candidate]
        raise ExploreError(f"no token {spec!r} in this run's vocabulary")

    def arrays(self, iteration: int) -> IterArrays:
        """The per-token arrays of `iteration` (memory-mapped, cached); ExploreError when it has none."""
        cached = self._cache.get(iteration)
        if cached is not None:
            self._cache.move_to_end(iteration)
            return cached
        where = self.tokens / f"{iteration:0{ITER_DIGITS}d}"
        if iteration < 0 or not where.is_dir():
            raise ExploreError(f"iteration {iteration} has no token data in run {self.name!r}")
        meta = read_json(where / "meta.json")
        rows, k = int(meta.get("rows", -1)), int(meta.get("k", 0))
        norm = _load(where / "norm.npy", (rows,), "float32")
        xy = _load(where / "xy.npy", (rows, 2), "float32")
        if norm is None or xy is None:
            raise ExploreError(f"{where}: norm.npy or xy.npy missing")
        arrays = IterArrays(iter=iteration, norm=norm, xy=xy, drift=_load(where / "drift.npy", (rows,), "float32"),
                            knn_ids=_load(where / "knn_ids.npy", (rows, k), "int32") if k else None,
                            knn_cos=_load(where / "knn_cos.npy", (rows, k), "float32") if k else None,
                            nbhd=_load(where / "nbhd.npy", (rows,), "int32"),
                            tokens_seen=_load(where / "tokens_seen.npy", (rows,), "uint32"),
                            tokens_total=_load(where / "tokens_total.npy", (rows,), "int64"))
        since = meta.get("tokens_total_since")
        if isinstance(since, int) and not isinstance(since, bool) and arrays.tokens_total is not None:
            arrays.tokens_total_since = since
        self._cache[iteration] = arrays
        while len(self._cache) > CACHED_ITERS:
            self._cache.popitem(last=False)
        return arrays

    def neighbours(self, iteration: int, token_id: int, k: int) -> list[list[Any]]:
        """[[id, token, cosine], ...] nearest first: the token's k nearest at `iteration`."""
        arrays = self.arrays(iteration)
        if arrays.knn_ids is None or arrays.knn_cos is None:
            raise ExploreError(f"iteration {iteration} has no neighbour lists (sampled geometry or --no-extras)")
        ids = arrays.knn_ids[token_id, :k]
        cos = arrays.knn_cos[token_id, :k]
        return [[int(i), self.token_string(int(i)), float(c)] for i, c in zip(ids, cos) if i >= 0]

    def record(self, iteration: int) -> dict[str, Any] | None:
        """The results file's record of `iteration` (the report's tolerant reader; re-read when it grows)."""
        path = self.dir / "analysis.jsonl"
        if not path.is_file():
            return None
        stamp = (path.stat().st_size, path.stat().st_mtime_ns)
        if self._records_stamp != stamp:
            from ..report.page import ReportError, load_results
            try:
                loaded = load_results(path)
                self._records = {int(r["iter"]): r for r in loaded.records}
            except ReportError:
                self._records = {}
            self._records_stamp = stamp
        return self._records.get(iteration)

    def categories(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        """Per token: galaxy cluster id (-2 outside the map's subset, -1 singleton) and under-trained
        flag (1, 0, NaN when the record says nothing), from the iteration's record."""
        rows = int(self.arrays(iteration).norm.shape[0])
        cluster = np.full(rows, -2.0, dtype=np.float32)
        flagged = np.full(rows, np.nan, dtype=np.float32)
        rec = self.record(iteration) or {}
        for point in ((rec.get("galaxy") or {}).get("points") or []):
            if isinstance(point, list) and len(point) >= 4 and isinstance(point[0], int) and 0 <= point[0] < rows:
                cluster[point[0]] = float(point[3]) if isinstance(point[3], (int, float)) else -1.0
        listed = (rec.get("insight") or {}).get("undertrained_tokens")
        if isinstance(listed, list):
            flagged[:] = 0.0
            for entry in listed:
                if isinstance(entry, list) and entry and isinstance(entry[0], int) and 0 <= entry[0] < rows:
                    flagged[entry[0]] = 1.0
        return cluster, flagged

    def history(self, token_id: int) -> dict[str, list[Any]]:
        """The token's drift cosine, norm, neighbourhood size and token counts at every iteration with
        token data, each a list aligned with "iters" (None where not known)."""
        out: dict[str, list[Any]] = {name: [] for name in ("iters", "drift_cosine", "norm", "neighbourhood_size",
                                                           "tokens_seen", "tokens_total", "tokens_total_since")}
        for it in self.iters():
            try:
                arrays = self.arrays(it)
            except ExploreError:
                continue
            if token_id >= arrays.norm.shape[0]:
                continue
            out["iters"].append(it)
            value = float(arrays.drift[token_id]) if arrays.drift is not None else math.nan
            out["drift_cosine"].append(value if math.isfinite(value) else None)
            n = float(arrays.norm[token_id])
            out["norm"].append(n if math.isfinite(n) else None)
            size = int(arrays.nbhd[token_id]) if arrays.nbhd is not None else -1
            out["neighbourhood_size"].append(size if size >= 0 else None)
            out["tokens_seen"].append(int(arrays.tokens_seen[token_id]) if arrays.tokens_seen is not None else None)
            total = arrays.tokens_total
            out["tokens_total"].append(int(total[token_id]) if total is not None else None)
            out["tokens_total_since"].append(arrays.tokens_total_since if total is not None else None)
        return out


def find_runs(path: Path) -> dict[str, RunData]:
    """The runs under `path`: a run directory (holding tokens/ or analysis.jsonl), a results file, or a
    directory of run directories. ExploreError when there is none."""
    path = path.resolve()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ExploreError(f"{path} does not exist")
    candidates = [path] if (path / "tokens").is_dir() or (path / "analysis.jsonl").is_file() else sorted(
        p for p in path.iterdir() if p.is_dir() and ((p / "tokens").is_dir() or (p / "analysis.jsonl").is_file()))
    runs = {}
    for directory in candidates:
        run = RunData(directory)
        runs.setdefault(run.name, run)
    if not runs:
        raise ExploreError(f"{path} holds no run results (RESULTS_DIR/<run>/analysis.jsonl and tokens/)")
    return runs
