"""Per-token data for the explorer: `<results-dir>/<run>/tokens/<iter>/` beside the run's analysis.jsonl.

Each analysed iteration gets a directory of plain `.npy` arrays (no pickles; read back with
`allow_pickle=False` and memory-mapped, so a query touches a few pages, not the files):
    knn_ids.npy   (V, k) int32    every token's k nearest tokens by cosine, best first (-1: none)
    knn_cos.npy   (V, k) float32  their cosines (L2-normalised rows, as the geometry pass)
    drift.npy     (V,)   float32  drift cosine against the previous snapshot (NaN: none)
    norm.npy      (V,)   float32  row norm
    xy.npy        (V, 2) float32  map coordinates, aligned across iterations
    nbhd.npy      (V,)   int32    neighbourhood size: tokens with cosine above the threshold (-1: not known)
    tokens_seen.npy  (V,) uint32  tokens the trainer fed since its previous snapshot (only when it counted)
    tokens_total.npy (V,) int64   tokens fed in total since meta.json's `tokens_total_since` (when counted)
    meta.json     iteration, shape, k, bytes, threshold, tokens_total_since
and the run gets `tokens/vocab.json` (the trainer's token strings, each cut to 200 characters) once.
An iteration is written into a hidden temporary directory and renamed into place, so a reader sees a
whole iteration or none; only the newest `keep` iterations are kept (oldest removed first). A write
that fails (full disk, read-only directory) leaves nothing behind, is logged once per episode and
counted as lost. Neighbour lists exist only for exact geometry (a sampled pass has them for a sample).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..files import PRIVATE_FILE_MODE, dir_mode_for, make_dirs, write_atomic
from ..paths import run_dirname
from . import Sink

log = logging.getLogger("embedding_monitor.daemon")

DEFAULT_KEEP = 50  # iterations per run: about 250 MB at 50304 tokens with k = 10 (5.0 MB each; 5.6 with counts)
MAX_TOKEN_CHARS = 200  # as the galaxy map: a hostile vocabulary cannot blow up the files
ITER_DIGITS = 12  # zero-padded directory names sort as iterations


def iter_dirname(iteration: int, tensor: str | None = None) -> str:
    """The directory of one iteration (a non-default tensor gets its own suffix)."""
    base = f"{iteration:0{ITER_DIGITS}d}"
    return base if not tensor else f"{base}-{run_dirname(tensor)}"


def _write_json(path: Path, value: Any, mode: int = PRIVATE_FILE_MODE) -> None:
    write_atomic(path, json.dumps(value).encode("utf-8"), mode, tmp=path.with_name(f".{path.name}.tmp"))


class TokenDataSink(Sink):
    """Writes each analysed iteration's per-token arrays whole or not at all, keeping the newest `keep`."""

    name = "token-data"

    def __init__(self, results_dir: str | Path, keep: int = DEFAULT_KEEP, mode: int = PRIVATE_FILE_MODE) -> None:
        if keep < 1:
            raise ValueError(f"--token-data-keep must be at least 1, got {keep}")
        self.results_dir = Path(results_dir)
        self.mode = mode  # token strings and neighbour lists: private like the results (--results-mode)
        self.keep = keep
        self._vocab: dict[str, list[str | None] | None] = {}  # per run, until its first write
        self._failing = False

    def tokens_dir(self, run: str) -> Path:
        """Where `run`'s per-token data goes."""
        return self.results_dir / run_dirname(run) / "tokens"

    def handle(self, result: dict[str, Any]) -> None:
        """Records go to the results file; this sink only takes arrays."""

    def run_hello(self, run: str, hello: Any) -> None:
        vocab = getattr(hello, "vocab", None)
        self._vocab[run] = [t[:MAX_TOKEN_CHARS] if isinstance(t, str) else None for t in vocab] if vocab else None

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        self._vocab.pop(run, None)

    def held_runs(self) -> set[str]:
        """Runs whose vocabulary waits for their first write."""
        return set(self._vocab)

    def handle_arrays(self, result: dict[str, Any], arrays: Any) -> None:
        run, iteration = str(result.get("run")), int(result["iter"])
        # the run's default tensor keeps the plain directory (what the explorer reads); another gets a suffix
        named = isinstance(result.get("tensor"), str) and result.get("default_tensor") is False
        tensor = result["tensor"] if named else None
        base = self.tokens_dir(run)
        final = base / iter_dirname(iteration, tensor)
        tmp = base / f".{final.name}.tmp"
        try:
            make_dirs(base, dir_mode_for(self.mode))
            if run in self._vocab:
                vocab = self._vocab.pop(run)
                if vocab is not None:
                    _write_json(base / "vocab.json", vocab, self.mode)
            shutil.rmtree(tmp, ignore_errors=True)
            make_dirs(tmp, dir_mode_for(self.mode))
            written = 0
            for name, tensor_value in arrays.stored().items():
                path = tmp / f"{name}.npy"
                with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode), "wb") as f:
                    os.fchmod(f.fileno(), self.mode)  # exactly the mode, whatever the umask
                    np.save(f, tensor_value.detach().cpu().numpy(), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                written += path.stat().st_size
            rows = int(arrays.norm.shape[0])
            k = int(arrays.knn_ids.shape[1]) if arrays.knn_ids is not None else 0
            _write_json(tmp / "meta.json", mode=self.mode, value={"iter": iteration, "tensor": tensor, "rows": rows, "k": k,
                                            "shape": result.get("shape"), "bytes": written,
                                            "prev_iter": result.get("prev_iter"),
                                            "threshold": ((result.get("geometry") or {}).get("local_density")
                                                          or {}).get("threshold"),
                                            "tokens_total_since": getattr(arrays, "tokens_total_since", None)})
            if final.exists():  # a repeated iteration (a resumed trainer): the newest analysis wins
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._prune(base)
            if self._failing:
                log.info("token data: writing again under %s", self.results_dir)
                self._failing = False
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self.count_lost(1)
            if not self._failing:
                log.error("token data: iteration %d of run %s not written (%s: %s); counted as lost, the "
                          "explorer will lack it", iteration, run, type(exc).__name__, exc)
                self._failing = True

    def _prune(self, base: Path) -> None:
        done = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
