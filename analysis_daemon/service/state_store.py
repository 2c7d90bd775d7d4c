"""--state-dir persistence: each run's baseline snapshot survives a crash (SIGKILL) and a restart.

Layout, one directory per run: `snapshot-<iter>-<seq>.bin` (the raw C-order bytes) and `state.json`
(a small sidecar naming that file, its dtype, shape and byte count, plus the hello info). Both are
private (0600, directories 0700), written to a temporary name, fsynced and renamed, and the sidecar is renamed last, so a crash at
any point leaves either the old complete state or the new one. No pickle anywhere.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..files import PRIVATE_DIR_MODE, make_dirs, write_atomic  # private (0600), whatever the umask
from ..paths import run_dirname
from ..records import HelloInfo, SnapshotData

log = logging.getLogger("embedding_monitor.daemon")

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StateStoreError(ValueError):
    """A state directory entry that cannot be used (corrupt, truncated, unknown format)."""


def sweep_temporary_files(root: Path) -> int:
    """Remove `*.tmp` files left in `root` and its run directories by a daemon killed mid-write."""
    removed = 0
    for pattern in ("*.tmp", "*/*.tmp"):
        for path in root.glob(pattern):
            try:
                path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("state dir: cannot remove stale %s: %s", path, exc)
    return removed


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # best effort: the rename is done, and the caller must not undo it
        pass
    finally:
        os.close(fd)


class StateStore:
    """Saves and loads each run's baseline snapshot and hello info under one directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        # Raw embeddings and vocabularies: the directories are 0700 and every file 0600 (files.py).
        make_dirs(self.root, PRIVATE_DIR_MODE)
        if self.root.stat().st_mode & 0o077:
            log.warning("state dir %s is open to other users (mode %o); the files in it are private (0600) "
                        "anyway", self.root, self.root.stat().st_mode & 0o777)
        removed = sweep_temporary_files(self.root)
        if removed:
            log.info("state dir: removed %d stale temporary file(s) of an interrupted write", removed)
        # The receive loop saves hellos and the worker saves snapshots: one sidecar, one writer at a time.
        self._lock = threading.Lock()

    def _run_dir(self, run: str) -> Path:
        return make_dirs(self.root / run_dirname(run), PRIVATE_DIR_MODE)

    def _read_sidecar(self, run_dir: Path) -> dict[str, Any]:
        path = run_dir / "state.json"
        if not path.exists():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def _write_sidecar(self, run_dir: Path, sidecar: dict[str, Any]) -> None:
        sidecar["format"] = FORMAT_VERSION
        sidecar["written_at"] = time.time()
        write_atomic(run_dir / "state.json", json.dumps(sidecar).encode("utf-8"))
        _fsync_dir(run_dir)

    def save_snapshot(self, run: str, snap: SnapshotData) -> None:
        """Persist `snap` as `run`'s baseline, replacing the previous one atomically."""
        raw = snap.tensor.detach().contiguous().view(torch.uint8).numpy()
        with self._lock:
            self._save_snapshot(run, snap, raw)

    def _save_snapshot(self, run: str, snap: SnapshotData, raw: Any) -> None:
        run_dir = self._run_dir(run)
        sidecar = self._read_sidecar(run_dir)
        old_file = (sidecar.get("snapshot") or {}).get("file")
        fname = f"snapshot-{snap.iter}-{snap.seq}.bin"
        write_atomic(run_dir / fname, memoryview(raw).cast("B"))
        try:
            self._point_sidecar_at(run_dir, run, snap, raw, sidecar, fname)
        except BaseException:
            if fname != old_file:  # the sidecar still names the old snapshot: this one is garbage
                (run_dir / fname).unlink(missing_ok=True)
            raise
        if old_file and old_file != fname:
            (run_dir / old_file).unlink(missing_ok=True)

    def _point_sidecar_at(self, run_dir: Path, run: str, snap: SnapshotData, raw: Any,
                          sidecar: dict[str, Any], fname: str) -> None:
        sidecar["run"] = run
        sidecar["snapshot"] = {"file": fname, "iter": snap.iter, "seq": snap.seq, "name": snap.name,
                               "dtype": snap.dtype, "shape": snap.shape, "nbytes": memoryview(raw).nbytes,
                               "received_at": snap.received_at}
        self._write_sidecar(run_dir, sidecar)

    def begin_analysis(self, run: str, snap: SnapshotData) -> None:
        """Persist `snap`, about to be analysed, beside the baseline; commit_analysis() promotes it.

        The baseline stays the last snapshot whose result was delivered, so after a crash the next
        record's prev_iter names an iteration that has a record, and the interrupted one is on disk
        to be analysed again (see the daemon's start-up).
        """
        raw = snap.tensor.detach().contiguous().view(torch.uint8).numpy()
        with self._lock:
            run_dir = self._run_dir(run)
            sidecar = self._read_sidecar(run_dir)
            base = (sidecar.get("snapshot") or {}).get("file")
            old = (sidecar.get("analysing") or {}).get("file")
            fname = f"snapshot-{snap.iter}-{snap.seq}.bin"
            if fname == base:  # the same iteration again (a resumed trainer): never overwrite the baseline
                fname = f"snapshot-{snap.iter}-{snap.seq}-repeat.bin"
            write_atomic(run_dir / fname, memoryview(raw).cast("B"))
            sidecar["run"] = run
            sidecar["analysing"] = {"file": fname, "iter": snap.iter, "seq": snap.seq, "name": snap.name,
                                    "dtype": snap.dtype, "shape": snap.shape, "nbytes": memoryview(raw).nbytes,
                                    "received_at": snap.received_at}
            try:
                self._write_sidecar(run_dir, sidecar)
            except OSError:
                if fname != old:  # nothing names the new file: do not leave it behind
                    (run_dir / fname).unlink(missing_ok=True)
                raise
            if old and old not in (fname, base):
                (run_dir / old).unlink(missing_ok=True)

    def commit_analysis(self, run: str, snap: SnapshotData) -> None:
        """`snap`'s result was delivered: it becomes the run's baseline (and the old one is deleted)."""
        with self._lock:
            run_dir = self._run_dir(run)
            sidecar = self._read_sidecar(run_dir)
            info = sidecar.get("analysing") or {}
            if info.get("iter") != snap.iter or info.get("seq") != snap.seq:
                return  # begin_analysis failed (disk full?): nothing to promote
            old = (sidecar.get("snapshot") or {}).get("file")
            sidecar["snapshot"] = sidecar.pop("analysing")
            sidecar.pop("not_analysed", None)  # reported in this result's skipped_iters
            self._write_sidecar(run_dir, sidecar)
            if old and old != info["file"]:
                (run_dir / old).unlink(missing_ok=True)

    def note_not_analysed(self, run: str, iters: list[int]) -> None:
        """Remember iterations received but never analysed (shutdown) for the run's next result."""
        with self._lock:
            run_dir = self._run_dir(run)
            sidecar = self._read_sidecar(run_dir)
            sidecar["run"] = run
            sidecar["not_analysed"] = sorted(set(sidecar.get("not_analysed") or []) | set(iters))
            self._write_sidecar(run_dir, sidecar)

    def interrupted_runs(self) -> list[str]:
        """Runs whose snapshot was being analysed when the daemon stopped (reads only the sidecars)."""
        out = []
        for run_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                sidecar = self._read_sidecar(run_dir)
            except (OSError, ValueError):
                continue
            if isinstance(sidecar, dict) and sidecar.get("analysing") and isinstance(sidecar.get("run"), str):
                out.append(sidecar["run"])
        return out

    def load_pending(self, run: str) -> tuple[SnapshotData | None, list[int]]:
        """`run`'s interrupted snapshot (being analysed when the daemon stopped) and its not-analysed iterations."""
        run_dir = self.root / run_dirname(run)
        try:
            sidecar = self._read_sidecar(run_dir)
            if sidecar.get("run") != run:
                return None, []
            not_analysed = [int(i) for i in sidecar.get("not_analysed") or []]
            info = sidecar.get("analysing")
            return (self._read_snapshot(run_dir, info) if info else None), not_analysed
        except (StateStoreError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("state dir: ignoring the interrupted snapshot of run %s: %s", run, exc)
            return None, []

    def save_hello(self, run: str, hello: HelloInfo) -> None:
        """Persist `run`'s hello info (vocabulary, wandb info) so a restarted daemon still has it."""
        with self._lock:
            run_dir = self._run_dir(run)
            sidecar = self._read_sidecar(run_dir)
            sidecar["run"] = run
            vocab = hello.vocab
            sidecar["hello"] = asdict(replace(hello, vocab=None))  # a CompactVocab is not JSON: list it
            sidecar["hello"]["vocab"] = list(vocab) if vocab is not None else None
            self._write_sidecar(run_dir, sidecar)

    def _load_run(self, run_dir: Path) -> tuple[str, SnapshotData | None, HelloInfo | None]:
        try:
            sidecar = self._read_sidecar(run_dir)
        except (OSError, ValueError) as exc:
            raise StateStoreError(f"unreadable state.json: {exc}") from exc
        if sidecar.get("format") != FORMAT_VERSION or not isinstance(sidecar.get("run"), str):
            raise StateStoreError(f"state.json has unknown format {sidecar.get('format')!r}")
        hello = None
        if isinstance(sidecar.get("hello"), dict):
            h = sidecar["hello"]
            hello = HelloInfo(pid=h.get("pid"), host=h.get("host"), vocab=h.get("vocab"),
                              wandb=h.get("wandb"), meta=h.get("meta") or {})
        info = sidecar.get("snapshot")
        return sidecar["run"], (self._read_snapshot(run_dir, info) if info else None), hello

    def _read_snapshot(self, run_dir: Path, info: dict[str, Any]) -> SnapshotData:
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise StateStoreError(f"unknown dtype {info.get('dtype')!r}")
        shape = [int(x) for x in info["shape"]]
        data = (run_dir / info["file"]).read_bytes()
        expected = shape[0] * shape[1] * torch.tensor([], dtype=dtype).element_size()
        if len(data) != info["nbytes"] or len(data) != expected:
            raise StateStoreError(f"{info['file']} has {len(data)} bytes, expected {expected}")
        tensor = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
        return SnapshotData(iter=int(info["iter"]), seq=int(info["seq"]), name=str(info["name"]),
                            tensor=tensor, received_at=float(info["received_at"]))

    def _try_load(self, run_dir: Path) -> tuple[str, SnapshotData | None, HelloInfo | None] | None:
        try:
            return self._load_run(run_dir)
        except (StateStoreError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("state dir: ignoring %s: %s", run_dir, exc)
            return None

    def load_all(self) -> dict[str, tuple[SnapshotData | None, HelloInfo | None]]:
        """Every run's saved (baseline snapshot, hello info); unusable entries are logged and skipped."""
        out: dict[str, tuple[SnapshotData | None, HelloInfo | None]] = {}
        for run_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            loaded = self._try_load(run_dir)
            if loaded is not None:
                out[loaded[0]] = loaded[1:]
        return out

    def load(self, run: str) -> tuple[SnapshotData | None, HelloInfo | None] | None:
        """One run's saved (baseline snapshot, hello info), or None when there is none usable."""
        run_dir = self.root / run_dirname(run)
        if not run_dir.is_dir():
            return None
        loaded = self._try_load(run_dir)
        return loaded[1:] if loaded is not None and loaded[0] == run else None
