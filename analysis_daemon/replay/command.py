"""`analysis-daemon replay PATH...`: the daemon's analysis over saved checkpoints, no training needed.

    analysis-daemon replay out/checkpoints --run my-run             # nanoGPT ckpt_*.pt files
    analysis-daemon replay hf-run/ --sample-rows 4096               # checkpoint-500/, checkpoint-1000/, ...
    analysis-daemon replay step1000.safetensors step2000.safetensors --tensor encoder.embed.weight

Each checkpoint's embedding becomes a snapshot at its iteration (checkpoints.py) and goes through the
same `worker.analyse` and the same sinks as a live snapshot, so the results file, the console block,
the W&B run (iteration axis) and `analysis-daemon report` are what the live daemon would have made.
Only the previous and the current embedding are held. A checkpoint that cannot be read is reported in
one line and skipped; the drift of the next one is measured against the last good one, and the exit
status is 1 when any failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from ..options import (add_analysis_options, add_limit_options, add_output_options, analysis_settings, fail,
                       make_sinks, set_threads_and_priority, setup_logging, snapshot_limits)

log = logging.getLogger("embedding_monitor.daemon")


def build_parser() -> argparse.ArgumentParser:
    """The `replay` argument parser: paths, run, tensor, and the daemon's analysis and output options."""
    p = argparse.ArgumentParser(
        prog="analysis-daemon replay",
        description="Analyse saved checkpoints as if a trainer had published their embeddings: drift "
                    "between consecutive checkpoints, geometry and insight of each, written to the "
                    "console, <results-dir>/<run>/analysis.jsonl and W&B exactly as the live daemon "
                    "does. PATH is a checkpoint (a Hugging Face model directory, a .safetensors, "
                    ".pt/.pth/.bin/.ckpt torch file such as nanoGPT's ckpt.pt, or a .npy array) or a "
                    "directory of them (checkpoint-500/, step1000/, ckpt_000200.pt, ...), ordered by "
                    "iteration.",
        epilog="Iterations come from the checkpoint (iter_num, global_step, trainer_state.json), else "
               "from the last number in its name, else from the order given. Token strings come from "
               "tokenizer.json, vocab.txt or meta.json beside the weights (or one directory up). Torch "
               "files are loaded weights-only: a pickle that would build any other object is refused. "
               "Every checkpoint is held to the live daemon's limits (--max-rows, --max-cols, --max-bytes "
               "before its embedding is read; --max-cost: sampled geometry or refused); raise them for a "
               "larger model. "
               "Exit status: 0 all analysed, 1 some checkpoints failed (each named on stderr), 2 usage.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files or directories")
    p.add_argument("--run", help="run name for the results directory and W&B (default: the name of the "
                                 "first PATH, a file's directory)")
    p.add_argument("--tensor", metavar="NAME", action="append",
                   help="name of a tensor to analyse, when the embedding has none of the usual names "
                        "(transformer.wte.weight, model.embed_tokens.weight, ...); repeatable: each tensor "
                        "drifts against its own previous checkpoint, the first is the run's default tensor "
                        "(e.g. --tensor model.embed_tokens.weight --tensor lm_head.weight)")
    add_limit_options(p)
    add_analysis_options(p)
    add_output_options(p)
    return p


def default_run_name(paths: list[str]) -> str:
    """The first path's name: a directory's own name, a file's directory name (or stem at the top)."""
    first = Path(paths[0]).resolve()
    if first.is_dir():
        return first.name or "replay"
    return first.parent.name or first.stem or "replay"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """`replay [####....] k/n name  elapsed H:MM:SS  ETA H:MM:SS` on stderr.

    On a terminal one line is redrawn in place (also during a long geometry pass); otherwise, as in a
    log file, one line per checkpoint.
    """

    def __init__(self, total: int, stream: IO[str] | None = None, width: int = 24) -> None:
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.done, self.fraction, self.label = 0, 0.0, ""
        self._last_draw = 0.0

    def line(self) -> str:
        """The bar as text."""
        progress = min(self.total, self.done + self.fraction)
        filled = round(self.width * progress / max(1, self.total))
        elapsed = time.monotonic() - self.started
        eta = _clock(elapsed / progress * (self.total - progress)) if progress > 0 else "--:--"
        current = min(self.done + 1, self.total)
        return (f"replay [{'#' * filled}{'.' * (self.width - filled)}] checkpoint {current}/{self.total} "
                f"{self.label}  elapsed {_clock(elapsed)}  ETA {eta}")

    def _draw(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def start(self, k: int, label: str) -> None:
        """Checkpoint k (0-based) begins."""
        self.done, self.fraction, self.label = k, 0.0, label
        self._draw()

    def update(self, fraction: float) -> None:
        """The running checkpoint is `fraction` done (redrawn at most twice a second, terminals only)."""
        self.fraction = fraction
        now = time.monotonic()
        if self.tty and now - self._last_draw >= 0.5:
            self._last_draw = now
            self._draw()

    def finish(self) -> None:
        """Every checkpoint is done."""
        self.done, self.fraction, self.label = self.total, 0.0, "done"
        self._draw(final=True)


def main(args: argparse.Namespace) -> int:
    """Run a replay from parsed options; the exit status."""
    setup_logging(args.log_level, args.log_file, args.results_mode)
    from .checkpoints import CheckpointError, expand, order

    try:
        settings = analysis_settings(args)
        limits, cost = snapshot_limits(args)
        checkpoints = order(expand(args.paths))
    except (ValueError, CheckpointError) as exc:
        return fail(str(exc))
    threads = set_threads_and_priority(args, log)
    run = args.run or default_run_name(args.paths)
    log.info("replay: run %s, %d checkpoint(s), %d analysis thread(s)%s", run, len(checkpoints), threads,
             f", sampled geometry ({settings.sample_rows} rows)" if settings.sample_rows else "")
    seen: dict[int, Path] = {}
    for ckpt in checkpoints:
        if ckpt.iter in seen:
            log.warning("replay: %s and %s both stand for iteration %d", seen[ckpt.iter], ckpt.path, ckpt.iter)
        seen.setdefault(ckpt.iter, ckpt.path)
    try:
        sinks = make_sinks(args, settings, threads, close_timeout=60.0)
    except ValueError as exc:
        return fail(str(exc))
    try:
        failures = _replay(run, checkpoints, args.tensor, settings, sinks, limits, cost)
    except KeyboardInterrupt:
        log.warning("replay: interrupted; the results written so far are complete")
        return 130
    finally:
        sinks.close()
    analysed = len(checkpoints) - len(failures)
    if failures:
        print(f"replay: {len(failures)} of {len(checkpoints)} checkpoint(s) failed, {analysed} analysed:",
              file=sys.stderr)
        for path, reason in failures:
            print(f"  {reason}" if str(path) in reason else f"  {path}: {reason}", file=sys.stderr)
        return 1
    log.info("replay: %d checkpoint(s) analysed, results in %s", analysed, args.results_dir)
    return 0


def _replay(run: str, checkpoints: list[Any], tensor_names: list[str] | None, settings: Any,
            sinks: Any, limits: Any, cost: Any) -> list[tuple[Path, str]]:
    """Analyse `checkpoints` in order into `sinks`; the (path, reason) of each one that failed.

    `tensor_names`: the tensors to read from each checkpoint (the first is the run's default tensor);
    None or empty: the embedding found by its usual names. Each tensor drifts against its own previous.
    `limits` bound what is read of each checkpoint, `cost` what its analysis may cost (as in the daemon).
    """
    from .checkpoints import CheckpointError, read_embedding
    from .vocab_files import load_vocab
    from ..records import Counters, HelloInfo, Job, RunInsight, SnapshotData
    from ..pipeline import analyse
    from ..cost import plan as plan_cost

    counters = Counters()
    wanted: list[str | None] = list(dict.fromkeys(tensor_names or [])) or [None]
    insight = {name: RunInsight() for name in wanted}
    previous: dict[str | None, SnapshotData] = {}
    first: dict[str | None, SnapshotData] = {}  # drift since initialisation is measured against it
    hello_sent = False
    vocabs: dict[Path, Any] = {}  # per directory: checkpoint-500/ and checkpoint-1000/ share one
    sources: set[Path] = set()
    failures: list[tuple[Path, str]] = []
    bar = ProgressBar(len(checkpoints) * len(wanted))
    for k, (ckpt, tensor_name) in enumerate((c, t) for c in checkpoints for t in wanted):
        bar.start(k, ckpt.path.name if len(wanted) == 1 else f"{ckpt.path.name} {tensor_name}")
        try:
            if ckpt.error:
                raise CheckpointError(ckpt.error)
            emb = read_embedding(ckpt.path, tensor_name, limits)
            rows, cols = emb.tensor.shape
            refused, sample = plan_cost(rows, cols, cost, settings.chunk_size,
                                        settings.knn_k if settings.extras else 0, settings.sample_rows)
            if refused is not None:
                raise CheckpointError(f"{ckpt.path}: tensor {emb.name!r} {refused}")
        except CheckpointError as exc:
            counters.rejected += 1
            failures.append((ckpt.path, str(exc)))
            log.error("replay: %s", exc)
            continue
        counters.received += 1
        vocab = emb.vocab
        if vocab is None:
            near = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
            if near not in vocabs:
                try:
                    vocabs[near], source = load_vocab(near, emb.tensor.shape[0])
                    if source is not None and source not in sources:
                        sources.add(source)
                        log.info("replay: token strings from %s (%d tokens)", source, len(vocabs[near]))
                except CheckpointError as exc:
                    vocabs[near] = None
                    log.warning("replay: no token strings for %s: %s", near, exc)
            vocab = vocabs[near]
        if vocab is not None and len(vocab) < emb.tensor.shape[0]:
            log.debug("replay: vocabulary of %d tokens for %d rows", len(vocab), emb.tensor.shape[0])
        hello = HelloInfo(pid=os.getpid(), host=socket.gethostname(), vocab=vocab,
                          meta={"replay": True, "source": str(ckpt.path)})
        if not hello_sent:
            sinks.run_hello(run, hello)
            hello_sent = True
        if sample is not None:
            log.info("replay: %s: the exact geometry of %dx%d is over --max-cost %.2g: analysing it sampled "
                     "from %d rows", ckpt.path.name, rows, cols, cost.max_cost, sample)
        snap = SnapshotData(iter=int(ckpt.iter), seq=k, name=emb.name, tensor=emb.tensor, metrics=emb.metrics,
                            sample_rows=sample)
        del emb
        if tensor_name not in first and settings.since_init:
            first[tensor_name] = snap
        job = Job(run=run, current=snap, previous=previous.get(tensor_name), skipped_iters=[], hello=hello,
                  first=first.get(tensor_name), default_tensor=tensor_name == wanted[0])
        result = analyse(job, settings, bar.update, insight[tensor_name])
        counters.analysed += 1
        result["counters"] = counters.as_dict()
        result["daemon_counters"] = counters.as_dict()
        previous[tensor_name] = snap  # the next drift is measured against the last checkpoint that could be read
        # as the daemon reports it: what is held until the next result (every tensor's baselines)
        held = {id(s): s.nbytes for s in (*previous.values(), *first.values())}
        result["memory_held_bytes"] = sum(held.values())
        result["checkpoint"] = str(ckpt.path)
        result["iter_source"] = ckpt.iter_source
        sinks.handle(result)
        del job
    bar.finish()
    summary = counters.as_dict()
    summary["failed"] = len(failures)
    sinks.run_ended(run, summary)
    return failures
