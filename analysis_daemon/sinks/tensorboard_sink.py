"""TensorBoard sink: scalars and histograms at the training iteration, and the embedding projector.

    analysis-daemon --tensorboard tb/        then        tensorboard --logdir tb/

Per trainer run one TensorBoard run, `DIR/<run>/` (a run's other tensors, records whose "tensor" is
not the run's default one, get their own `DIR/<run>/<tensor>/`):
- every scalar the W&B sink logs, under the same keys (scalars.py: `analysis/drift_cosine_sim`, ...;
  the trainer's metrics under their own names), with the **training iteration as the step**;
- the pairwise-similarity and row-norm histograms (what `SummaryWriter.add_histogram_raw` writes, from the record's bins);
- the embedding projector: for each analysed snapshot (the latest `projector_keep` of them: each costs
  the matrix's size on disk) the matrix and a metadata TSV with one row per token (its string, drift
  cosine, row norm, galaxy cluster, under-trained flag, frequency, where known): projector.py.

The event records are made by torch's summary builders (`torch.utils.tensorboard.summary`, what its
SummaryWriter uses) and framed by tensorboard's RecordWriter; each result's records are appended at
once, fsynced, and cut back off if the write fails. (SummaryWriter itself writes from a thread of its
own, which on a full disk dies with a traceback and leaves half a record.) A result that could not be
written (disk full, read-only directory) is counted as lost, once even when its projector failed too;
the next result tries again with a fresh event file.
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..safetext import first_line
from ..paths import run_dirname
from . import Sink
from .projector import Projector
from .scalars import histograms, scalar_metrics

log = logging.getLogger("embedding_monitor.daemon")

DEFAULT_PROJECTOR_KEEP = 5
MAX_OPEN_WRITERS = 64  # event files open at once; the least recently used is closed past this
INSTALL_HINT = "pip install 'embedding-monitor[tensorboard]'"


def missing_package() -> str | None:
    """Why the TensorBoard sink cannot run here (one line that says how to fix it), or None when it can."""
    try:
        from tensorboard.plugins.projector import projector_config_pb2  # noqa: F401
        from torch.utils.tensorboard.summary import histogram_raw, scalar  # noqa: F401
    except ImportError as exc:
        return f"--tensorboard needs the tensorboard package ({first_line(exc)}): {INSTALL_HINT}"
    return None


def named_tensor(result: dict[str, Any]) -> str | None:
    """The record's tensor when it is not its run's default one (which keeps the run's own folder), else None."""
    tensor = result.get("tensor")
    if result.get("default_tensor", True) is not False or not isinstance(tensor, str) or not tensor:
        return None
    return tensor


class _EventFile:
    """One TensorBoard event file, appended one whole result at a time.

    The records are framed by tensorboard's own RecordWriter (length, masked CRCs) into memory, then
    written with one append and fsynced; a failed write is cut back to the file's previous size, so a
    reader never meets half a record. Written on the caller's thread: an error is the caller's to count.
    """

    _made = itertools.count()

    def __init__(self, directory: Path) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        directory.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a directory's event files in name order: the time, then a zero-padded counter
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(self._made):06d}"
        self.path = directory / name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self.append([Event(wall_time=time.time(), file_version="brain.Event:2")])
        except OSError:
            self.close()
            self.path.unlink(missing_ok=True)
            raise

    def append(self, events: list[Any]) -> None:
        """Append `events` whole and make them durable, or leave the file as it was and raise OSError."""
        from tensorboard.summary.writer.record_writer import RecordWriter

        buf = io.BytesIO()
        framing = RecordWriter(buf)
        for event in events:
            framing.write(event.SerializeToString())
        view = memoryview(buf.getvalue())
        size = os.fstat(self.fd).st_size
        try:
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass
            raise

    def close(self) -> None:
        """Close the file (its records are on disk already)."""
        try:
            os.close(self.fd)
        except OSError:
            pass


class TensorBoardSink(Sink):
    """Writes each result's scalars and histograms (and its projector snapshot) to TensorBoard files."""

    name = "tensorboard"

    def __init__(self, logdir: str | Path, projector_keep: int = DEFAULT_PROJECTOR_KEEP) -> None:
        if projector_keep < 0:
            raise ValueError(f"--tensorboard-projector-keep must be >= 0 (0: no projector), got {projector_keep}")
        self.logdir = Path(logdir)
        self.projector_keep = projector_keep
        self._vocab: dict[str, list[str] | None] = {}  # each run's token strings, from its hello
        self._files: OrderedDict[tuple[str, str | None], _EventFile] = OrderedDict()  # open, least recent first
        self._projectors: dict[tuple[str, str | None], Projector] = {}
        self._failing: str | None = None
        self._last_lost: tuple[Any, ...] | None = None
        self._lost_in_episode = 0

    def directory(self, run: str, tensor: str | None) -> Path:
        """The TensorBoard run directory of `run` (and its named `tensor`)."""
        base = self.logdir / run_dirname(run)
        return base / run_dirname(tensor) if tensor else base

    @staticmethod
    def _key(result: dict[str, Any]) -> tuple[str, str | None]:
        return str(result["run"]), named_tensor(result)

    def _events(self, key: tuple[str, str | None]) -> "_EventFile":
        events = self._files.get(key)
        if events is not None:
            self._files.move_to_end(key)
            return events
        while len(self._files) >= MAX_OPEN_WRITERS:
            self._close_file(next(iter(self._files)))
        events = self._files[key] = _EventFile(self.directory(*key))
        return events

    def _close_file(self, key: tuple[str, str | None]) -> None:
        events = self._files.pop(key, None)
        if events is not None:
            events.close()

    def handle(self, result: dict[str, Any]) -> None:
        """Append the result's scalars and histograms, at its training iteration, to its run's event file."""
        from tensorboard.compat.proto.event_pb2 import Event
        from torch.utils.tensorboard.summary import histogram_raw, scalar

        key = self._key(result)
        step = int(result["iter"])
        finished = result.get("finished_at")
        walltime = float(finished) if isinstance(finished, (int, float)) and not isinstance(finished, bool) else time.time()
        events = [Event(wall_time=walltime, step=step, summary=scalar(tag, value))
                  for tag, value in scalar_metrics(result).items()]
        for tag, (counts, bins) in histograms(result).items():
            centres = [(a + b) / 2 for a, b in zip(bins, bins[1:])]  # the record keeps bins, not the values
            events.append(Event(wall_time=walltime, step=step, summary=histogram_raw(
                tag, min=bins[0], max=bins[-1], num=sum(counts), sum=sum(c * x for c, x in zip(counts, centres)),
                sum_squares=sum(c * x * x for c, x in zip(counts, centres)), bucket_limits=bins[1:],
                bucket_counts=counts)))
        try:
            self._events(key).append(events)
        except OSError as exc:  # disk full, read-only: this result is lost here, the next one tries again
            self._close_file(key)
            self._lose(result, exc)
            return
        self._recovered()

    def run_hello(self, run: str, hello: Any) -> None:
        """Keep the run's token strings for the projector's `token` column."""
        vocab = getattr(hello, "vocab", None)
        self._vocab[run] = list(vocab) if vocab else None

    def handle_arrays(self, result: dict[str, Any], arrays: Any) -> None:
        """Add the snapshot (`arrays.weights`, with its per-token values) to its run's projector; the
        latest `projector_keep` are kept."""
        if self.projector_keep <= 0 or getattr(arrays, "weights", None) is None:
            return
        key = self._key(result)
        try:
            projector = self._projectors.get(key)
            if projector is None:
                directory = self.directory(*key)
                directory.mkdir(parents=True, exist_ok=True)
                projector = self._projectors[key] = Projector(directory, self.projector_keep)
            name = result.get("name")
            label = key[1] or (name if isinstance(name, str) and name else "embedding")
            projector.add(result, arrays, self._vocab.get(key[0]), label)
        except OSError as exc:
            self._lose(result, exc)
            return
        self._recovered()

    def _lose(self, result: dict[str, Any], exc: BaseException) -> None:
        this = (self._key(result), result.get("iter"), result.get("seq"))
        if this != self._last_lost:  # its scalars and its projector both failed: one result lost, not two
            self._last_lost = this
            self.count_lost(1)
            self._lost_in_episode += 1
        if self._failing is None:
            self._failing = first_line(exc)
            log.error("tensorboard: cannot write run %s iter %s (%s); counted as lost, trying again with "
                      "each new result", result.get("run"), result.get("iter"), self._failing)

    def _recovered(self) -> None:
        if self._failing is not None:
            log.warning("tensorboard: writable again; %d result(s) lost meanwhile (%s)", self._lost_in_episode,
                        self._failing)
            self._failing, self._lost_in_episode = None, 0

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """Close the run's event files and forget its projector (a later result starts new ones)."""
        for key in [k for k in self._files if k[0] == run]:
            self._close_file(key)
        for key in [k for k in self._projectors if k[0] == run]:
            del self._projectors[key]
        self._vocab.pop(run, None)

    def held_runs(self) -> set[str]:
        """Runs with a vocabulary, an open event file or a projector kept."""
        return set(self._vocab) | {k[0] for k in self._files} | {k[0] for k in self._projectors}

    def close(self) -> None:
        """Close every event file (each result was made durable when it was written)."""
        for key in list(self._files):
            self._close_file(key)
        self._projectors.clear()
        self._vocab.clear()
