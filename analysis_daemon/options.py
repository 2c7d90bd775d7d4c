"""The command-line options and helpers that the daemon and its subcommands share.

`analysis-daemon` (cli.py), `replay` and `explore` build their parsers from these builders and turn parsed
options into settings, limits and sinks with these helpers, so the commands parse and check an option the
same way; the commands import this module, never each other.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

LOGGER = "embedding_monitor.daemon"


def default_threads() -> int:
    """Half the CPU cores this process may run on (at least 1): the rest stay free for a trainer."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """Bounds on one snapshot (live) or checkpoint (replay), checked from its shape before any work."""
    lim = p.add_argument_group("limits of one snapshot (checked from its shape before any work)")
    lim.add_argument("--max-rows", type=int, metavar="V",
                     help="refuse a snapshot with more rows (vocabulary size) than this (default: 4194304)")
    lim.add_argument("--max-cols", type=int, metavar="D",
                     help="refuse a snapshot with more columns (embedding width) than this (default: 65536)")
    lim.add_argument("--max-bytes", type=int, metavar="N",
                     help="refuse a snapshot whose tensor has more bytes than this (default: a quarter of "
                          "--max-analysis-memory, since a float32 analysis needs about 4x its size)")
    lim.add_argument("--max-cost", type=float, default=None, metavar="MULADDS",
                     help="estimated analysis cost, in multiply-add equivalents, above which the geometry is "
                          "sampled (at least 1000 rows) or, when even that does not fit, the snapshot is "
                          "refused; bounds how long one job holds the worker (default: 2e12, about 1.25 "
                          "GPT-2 snapshots; the model: benchmarks/bench_cost_model.py)")
    lim.add_argument("--max-analysis-memory", type=int, default=None, metavar="BYTES",
                     help="refuse a snapshot whose estimated analysis memory is higher (default: 4 GiB)")
    lim.add_argument("--min-cols", type=int, default=2, metavar="D",
                     help="refuse snapshots narrower than this (default: %(default)s; a 1-wide embedding "
                          "has only cosines of +-1 and costs V^2 pairs)")


def snapshot_limits(args: argparse.Namespace) -> tuple[Any, Any]:
    """(protocol Limits, cost.CostLimits) from the limit options; ValueError names a bad value.

    The payload bound is at most a quarter of the analysis memory bound: a float32 payload needs about
    4x its size to analyse (cost.estimate_memory), so a larger one could only be refused after arriving.
    """
    from dataclasses import replace

    from protocol import DEFAULT_LIMITS

    from .cost import DEFAULT_MAX_COST, DEFAULT_MAX_MEMORY, CostLimits
    for name in ("max_rows", "max_cols", "max_bytes", "min_cols", "max_analysis_memory"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_cost is not None and not args.max_cost > 0:
        raise ValueError(f"--max-cost must be positive, got {args.max_cost}")
    cost = CostLimits(max_cost=args.max_cost or DEFAULT_MAX_COST, min_cols=args.min_cols,
                      max_memory=args.max_analysis_memory or DEFAULT_MAX_MEMORY)
    overrides = {k: v for k, v in (("max_rows", args.max_rows), ("max_cols", args.max_cols),
                                   ("max_payload_bytes", args.max_bytes)) if v is not None}
    limits = replace(DEFAULT_LIMITS, **overrides)
    if limits.max_payload_bytes > cost.max_memory // 4:
        limits = replace(limits, max_payload_bytes=cost.max_memory // 4)
    return limits, cost


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    """The analysis, insight and alert options (shared by the daemon and `replay`)."""
    ana = p.add_argument_group("analysis")
    ana.add_argument("--threshold", type=float, default=0.7,
                     help="cosine similarity above which two tokens count as neighbours (default: %(default)s)")
    ana.add_argument("--chunk-size", type=int, default=512,
                     help="rows per block of the pairwise similarity pass; memory is O(chunk x V) "
                          "(default: %(default)s)")
    ana.add_argument("--top-k", type=int, default=50,
                     help="how many most/least drifted tokens to report (default: %(default)s)")
    ana.add_argument("--threads", type=int, default=None,
                     help="torch threads for the analysis (default: half the usable cores, at least 1, "
                          f"here {default_threads()}, leaving the rest to a trainer on the same host)")
    ana.add_argument("--nice", type=int, default=10,
                     help="raise the process's niceness by this much so a trainer on the same host wins "
                          "the CPU (default: %(default)s; 0 keeps the priority)")
    ana.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                     help="log a progress line this often during a long analysis (default: %(default)s)")
    ana.add_argument("--sample-rows", type=int, metavar="N",
                     help="sampled geometry: estimate the neighbourhood size and histogram (with 95%% "
                          "intervals) from N random rows, each against all rows: cost N x V instead of "
                          "V^2/2; mean/std stay exact; N >= V is the exact pass (default: exact)")
    ana.add_argument("--sample-seed", type=int, default=0, metavar="S",
                     help="seed of the sampled rows (the same rows for every snapshot; default: %(default)s)")
    ana.add_argument("--device", default="cpu", metavar="cpu|cuda|auto",
                     help="where the math runs: cpu, cuda (or cuda:N; a GPU's blocks are sized to a quarter of "
                          "its free memory) or auto (cuda when there is one, else cpu); each record names the "
                          "device and chunk size used (default: %(default)s)")

    ins = p.add_argument_group("insight and alerts")
    ins.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                     help="compute the insight metrics (effective rank, isotropy, row norms, frozen tokens, "
                          "neighbourhood drift, probes), the galaxy map and the partial-collapse search; --no-extras leaves "
                          "drift and geometry only "
                          "(default: on)")
    ins.add_argument("--knn-k", type=int, default=10,
                     help="nearest neighbours per token for the neighbourhood drift (default: %(default)s)")
    ins.add_argument("--probe", action="append", default=[], metavar="TOKENS",
                     help="comma-separated probe tokens, as strings (looked up in the trainer's vocabulary) "
                          "or ids, e.g. --probe king,queen,paris or --probe 17,42; repeatable")
    ins.add_argument("--probe-k", type=int, default=10,
                     help="neighbours listed per probe token (default: %(default)s)")
    ins.add_argument("--collapse-mean-sim", type=float, default=0.9,
                     help="alert when the mean pairwise cosine exceeds this (default: %(default)s)")
    ins.add_argument("--collapse-min-rank-fraction", type=float, default=0.1,
                     help="alert when the effective rank falls below this fraction of the embedding width "
                          "(default: %(default)s)")
    ins.add_argument("--drift-window", type=int, default=20,
                     help="recent drift values a drift spike is judged against (at least 5 needed; "
                          "default: %(default)s)")
    ins.add_argument("--drift-spike-mads", type=float, default=3.0,
                     help="alert when the drift cosine is this many robust std (1.4826 x MAD) below the "
                          "median of the recent drift values (default: %(default)s)")
    ins.add_argument("--since-init", action=argparse.BooleanOptionalAction, default=True,
                     help="keep each run's first snapshot (one more V x d in memory, counted in memory_held_bytes) "
                          "and report drift_since_init against it; it also sharpens the under-trained token search "
                          "(default: on)")
    ins.add_argument("--undertrained", action=argparse.BooleanOptionalAction, default=True,
                     help="search for under-trained tokens (rows training has not moved beyond a common mode; "
                          "insight.undertrained_tokens); part of --extras (default: on)")
    ins.add_argument("--undertrained-jump", type=float, default=0.001, metavar="SHARE",
                     help="alert when the under-trained token count rises by at least this share of the vocabulary "
                          "(and 8 tokens) since the previous result; 0 turns the alert off (default: %(default)s)")
    ins.add_argument("--partial-collapse-share", type=float, default=0.2, metavar="SHARE",
                     help="alert when a clump of at least this share of the vocabulary are all each other's "
                          "neighbours (cosine > --threshold); 0 turns it off (default: %(default)s)")
    ins.add_argument("--galaxy-rows", type=int, default=2000, metavar="N",
                     help="points of the galaxy map (2-D PCA, clusters of the neighbour graph): all rows up to "
                          "N, else a fixed random subset of N; 0 turns the map off (default: %(default)s)")
    ins.add_argument("--galaxy-seed", type=int, default=0,
                     help="seed of the galaxy map's subset of rows, the same at every iteration "
                          "(default: %(default)s)")
    ins.add_argument("--alert-interval", type=float, default=300.0, metavar="SECONDS",
                     help="at most one logged warning and wandb.alert per kind per run this often "
                          "(every alert still goes into the results file; default: %(default)s)")


def add_output_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The results, log, console and W&B options (shared by the daemon and `replay`); the group."""
    out = p.add_argument_group("output")
    out.add_argument("--results-dir", type=Path, default=Path("runs"),
                     help="results go to RESULTS_DIR/<run>/analysis.jsonl (default: %(default)s)")
    from .files import parse_mode
    out.add_argument("--results-mode", type=parse_mode, default=0o600, metavar="MODE",
                     help="file mode of the results files (analysis.jsonl) and the log file; their new "
                          "directories follow it (0600 -> 0700, 0644 -> 0755). Results hold token strings "
                          "and metrics: they are private by default; 0644 shares them with every user of "
                          "the host (default: 0600)")
    out.add_argument("--log-file", type=Path,
                     help="also write the log, and each result's summary block, to this file (created "
                          "with --results-mode)")
    out.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="log level (default: %(default)s)")
    out.add_argument("--no-console", action="store_true",
                     help="do not print the summary block of each result on stdout (the --log-file "
                          "still gets it)")
    out.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                     help="log results to W&B, one wandb run per trainer run (default: on; "
                          "WANDB_MODE=disabled also turns it off)")
    out.add_argument("--wandb-project",
                     help="W&B project when the trainer's hello names none (default: WANDB_PROJECT, "
                          "else embedding-monitor)")
    out.add_argument("--wandb-init-timeout", type=float, default=20.0, metavar="SECONDS",
                     help="give up starting a W&B run after this long (W&B unreachable) and log that run "
                          "offline instead, for `wandb sync` later (default: %(default)s)")
    out.add_argument("--wandb-finish-timeout", type=float, default=20.0, metavar="SECONDS",
                     help="at the end of a run (and at exit) wait at most this long for W&B to take the "
                          "data; what is left stays in the run's wandb folder, and the log names the "
                          "`wandb sync` command that uploads it (default: %(default)s)")
    out.add_argument("--token-data", action=argparse.BooleanOptionalAction, default=True,
                     help="keep every token's nearest neighbours, drift cosine, norm, neighbourhood size, map "
                          "position and (when the trainer counts them) token counts per analysed iteration in "
                          "RESULTS_DIR/<run>/tokens/ for `analysis-daemon explore` (about 5.0 MB per iteration "
                          "at 50304 tokens, 5.8 MB with counts; default: on)")
    out.add_argument("--token-data-keep", type=int, default=50, metavar="N",
                     help="keep the token data of the newest N analysed iterations per run, removing older "
                          "ones (default: %(default)s)")
    add_tensorboard_options(p)
    return out


def add_tensorboard_options(p: argparse.ArgumentParser) -> None:
    """The TensorBoard sink's options (shared by the daemon and `replay`)."""
    tb = p.add_argument_group("TensorBoard (needs the tensorboard extra: pip install 'embedding-monitor[tensorboard]')")
    tb.add_argument("--tensorboard", type=Path, metavar="DIR",
                    help="also write TensorBoard files, one TensorBoard run per trainer run in DIR/<run>/ (a "
                         "named tensor of a run with several in DIR/<run>/<tensor>/): the W&B scalars and the "
                         "trainer's metrics at the training iteration, the similarity and row-norm histograms, "
                         "and the embedding projector with per-token metadata; view with "
                         "`tensorboard --logdir DIR`")
    tb.add_argument("--tensorboard-projector-keep", type=int, default=5, metavar="K",
                    help="keep the projector of the latest K analysed snapshots per run (each costs the "
                         "matrix's size on disk, V x d x 4 bytes); 0: no projector (default: %(default)s)")


def setup_logging(level: str, log_file: Path | None, mode: int = 0o600) -> logging.Logger:
    """stderr (and optionally a file, created with `mode`) handlers on the daemon's logger."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    from .safetext import SafeFormatter  # peer-supplied text never reaches the log raw

    fmt = SafeFormatter("%(asctime)s analysis-daemon %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        from .files import dir_mode_for, make_dirs, open_for_append
        make_dirs(log_file.parent, dir_mode_for(mode))
        os.close(open_for_append(log_file, mode))  # created with its mode before logging opens it
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False
    return logger


def analysis_settings(args: argparse.Namespace, check_device: bool = True) -> Any:
    """The AnalysisSettings of parsed options (from `add_analysis_options`); ValueError names a bad one.

    `check_device` False (--executor ray): --device names the cluster's device, not this host's.
    """
    from .metrics.alerts import AlertSettings
    from .pipeline import AnalysisSettings

    for name in ("threshold", "chunk_size", "top_k", "threads", "knn_k", "probe_k", "sample_rows"):
        value = getattr(args, name)
        if value is not None and name != "threshold" and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.drift_window < 5:
        raise ValueError(f"--drift-window must be at least 5, got {args.drift_window}")
    if args.alert_interval < 0 or args.drift_spike_mads <= 0:
        raise ValueError("--alert-interval must be >= 0 and --drift-spike-mads > 0")
    if not 0 <= args.undertrained_jump <= 1:
        raise ValueError(f"--undertrained-jump must be in [0, 1] (0: off), got {args.undertrained_jump}")
    if not 0 <= args.partial_collapse_share <= 1:
        raise ValueError(f"--partial-collapse-share must be in [0, 1] (0: off), got {args.partial_collapse_share}")
    if args.galaxy_rows < 0:
        raise ValueError(f"--galaxy-rows must be >= 0 (0: no map), got {args.galaxy_rows}")
    probes = tuple(t.strip() for spec in args.probe for t in spec.split(",") if t.strip())
    from .metrics.device import DEVICE_CHOICES, resolve_device
    if check_device:
        device = resolve_device(args.device, logging.getLogger(LOGGER))  # DeviceUnavailable is a ValueError
    elif args.device.split(":")[0] not in DEVICE_CHOICES:
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {args.device!r}")
    else:  # the cluster's: auto is decided here, where the daemon runs
        device = resolve_device(args.device, logging.getLogger(LOGGER)) if args.device == "auto" else args.device
    return AnalysisSettings(
        device=str(device),
        threshold=args.threshold, chunk_size=args.chunk_size, top_k=args.top_k,
        progress_interval=args.progress_interval, extras=args.extras, knn_k=args.knn_k, probes=probes,
        probe_k=args.probe_k, sample_rows=args.sample_rows, sample_seed=args.sample_seed,
        galaxy_rows=args.galaxy_rows, galaxy_seed=args.galaxy_seed, since_init=args.since_init,
        undertrained=args.undertrained,
        # the per-token arrays: for the explorer's token data, and for the TensorBoard projector
        token_data=bool(getattr(args, "token_data", False))
        or (getattr(args, "tensorboard", None) is not None and getattr(args, "tensorboard_projector_keep", 0) > 0),
        alerts=AlertSettings(collapse_mean_sim=args.collapse_mean_sim,
                             collapse_min_rank_fraction=args.collapse_min_rank_fraction,
                             drift_window=args.drift_window, drift_spike_mads=args.drift_spike_mads,
                             interval=args.alert_interval, partial_collapse_share=args.partial_collapse_share,
                             undertrained_jump=args.undertrained_jump))


def set_threads_and_priority(args: argparse.Namespace, log: logging.Logger) -> int:
    """Apply --threads and --nice to this process; the thread count used."""
    import torch

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    if args.nice > 0:
        try:
            os.nice(args.nice)
        except OSError as exc:
            log.warning("could not lower the priority (--nice %d): %s", args.nice, exc)
    return threads


def make_sinks(args: argparse.Namespace, settings: Any, threads: int, close_timeout: float | None) -> Any:
    """The SinkSet of parsed output options: console (unless --no-console), results file, W&B, TensorBoard.

    `close_timeout` None: the W&B sink derives it from --wandb-init-timeout and --wandb-finish-timeout.
    Raises ValueError for a timeout that is not positive, or --tensorboard without its package.
    """
    from .sinks import Sink, SinkSet
    from .sinks.console import ConsoleSink
    from .sinks.jsonl import JsonlSink

    if args.wandb_init_timeout <= 0 or args.wandb_finish_timeout <= 0:
        raise ValueError("--wandb-init-timeout and --wandb-finish-timeout must be > 0 seconds")
    tensorboard = None
    if args.tensorboard is not None:  # first: a missing package must stop us before any sink starts a thread
        if args.tensorboard_projector_keep < 0:
            raise ValueError("--tensorboard-projector-keep must be >= 0 (0: no projector), "
                             f"got {args.tensorboard_projector_keep}")
        from .sinks.tensorboard_sink import TensorBoardSink, missing_package
        problem = missing_package()
        if problem is not None:
            raise ValueError(problem)
        tensorboard = TensorBoardSink(args.tensorboard, projector_keep=args.tensorboard_projector_keep)
    sinks: list[Sink] = [JsonlSink(args.results_dir, mode=args.results_mode)]
    if args.token_data:
        from .sinks.token_data import TokenDataSink
        sinks.append(TokenDataSink(args.results_dir, keep=args.token_data_keep, mode=args.results_mode))
    if not args.no_console or args.log_file is not None:
        # The summary blocks also go to the log file, so following the log (`./launch.sh tail`) shows
        # the metrics; the terminal still gets them once, on stdout.
        sinks.insert(0, ConsoleSink(to_stdout=not args.no_console, copy_to=args.log_file))
    if args.wandb and os.environ.get("WANDB_MODE", "").lower() != "disabled":
        from .sinks.wandb_sink import WandbSink
        config = {"threshold": settings.threshold, "chunk_size": settings.chunk_size, "top_k": settings.top_k,
                  "threads": threads, "extras": settings.extras, "knn_k": settings.knn_k,
                  "probes": list(settings.probes), "galaxy_rows": settings.galaxy_rows,
                  "galaxy_seed": settings.galaxy_seed,
                  "partial_collapse_share": settings.alerts.partial_collapse_share}
        if settings.sample_rows is not None:
            config.update(sample_rows=settings.sample_rows, sample_seed=settings.sample_seed)
        sinks.append(WandbSink(default_project=args.wandb_project, close_timeout=close_timeout, config=config,
                               init_timeout=args.wandb_init_timeout, finish_timeout=args.wandb_finish_timeout))
    if tensorboard is not None:
        sinks.append(tensorboard)
    return SinkSet(sinks)


def fail(message: str) -> int:
    """Print the one-line `Error: ...` a person sees for a usage problem; exit status 2."""
    print(f"Error: {message}", file=sys.stderr)
    return 2
