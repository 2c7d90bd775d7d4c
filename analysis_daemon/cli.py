"""Command line of the analysis daemon.

    analysis-daemon --results-dir runs                                      (same as python -m analysis_daemon)
    analysis-daemon keygen DIR --name daemon                                (CurveZMQ keypair, via protocol)
    analysis-daemon report runs/my-run -o report.html                       (HTML report of a run's results)
    analysis-daemon report runs/lr-3e-4 runs/lr-1e-3                         (several runs compared on one page)
    analysis-daemon replay out/checkpoints --run my-run                     (analyse saved checkpoints, replay.py)
    analysis-daemon explore runs/my-run                                     (web app over per-token data)

torch is imported only after the thread settings are in place: OMP_WAIT_POLICY=PASSIVE must be in the
environment before libgomp loads (busy-waiting OpenMP threads in two processes on the same cores
double the trainer's step time, see DESIGN.md), and it cannot be changed once torch is imported.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

LOGGER = "embedding_monitor.daemon"

# Every subcommand: its name -> the module holding its `build_parser()` and `main(argv)`. main() dispatches
# through this table and the CLI reference (docs/hooks/cli_reference.py) documents every entry, so a
# subcommand added here appears in both, and one missing here is not reachable at all.
SUBCOMMANDS: dict[str, str] = {
    "keygen": "protocol.keygen",
    "report": "analysis_daemon.report.page",
    "replay": "analysis_daemon.replay.command",
    "explore": "analysis_daemon.explore.command",
}


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of subcommand `name`, its usage line as the user types it."""
    import importlib

    module = importlib.import_module(SUBCOMMANDS[name])
    if name == "keygen":
        return module.build_parser(prog="analysis-daemon keygen")
    return module.build_parser()


def default_threads() -> int:
    """Half the CPU cores this process may run on (at least 1): the rest stay free for a trainer."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option has help text; tests check it)."""
    p = argparse.ArgumentParser(
        prog="analysis-daemon",
        description="Receive embedding snapshots from trainers, measure drift and geometry, and report "
                    "each result to the console, <results-dir>/<run>/analysis.jsonl and W&B. "
                    "`analysis-daemon keygen DIR [--name NAME]` makes a CurveZMQ keypair; "
                    "`analysis-daemon report RUN_DIR [RUN_DIR ...] [-o OUT.html]` turns runs' results into one "
                    "HTML page (several runs on shared axes); "
                    "`analysis-daemon replay PATH...` analyses saved checkpoints the same way "
                    "(`analysis-daemon replay --help`); "
                    "`analysis-daemon explore RESULTS` serves a local web app over a run's per-token data.",
        epilog="W&B follows wandb's own settings: WANDB_MODE (online/offline/disabled), WANDB_PROJECT, "
               "WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_DIR, WANDB_API_KEY; a trainer's hello message, "
               "when it names a project and group, takes precedence.")
    net = p.add_argument_group("network")
    net.add_argument("--listen", default=None, metavar="ENDPOINT",
                     help="ZeroMQ endpoint to bind: tcp://HOST:PORT or ipc:///path (default: an ipc socket only this "
                          "user can reach, $XDG_RUNTIME_DIR/embedding-monitor/daemon.sock, else "
                          "/tmp/embedding-monitor-UID/daemon.sock, in a directory created with mode 0700 and checked; "
                          "trainers use the same default). A tcp port is open to every user of the host: use "
                          "CurveZMQ keys for tcp beyond loopback, and see docs/privacy-and-transport.md")
    net.add_argument("--curve-secret", type=Path, metavar="FILE",
                     help="the daemon's CurveZMQ secret key file (NAME.key_secret from `analysis-daemon "
                          "keygen`); enables authentication and encryption")
    net.add_argument("--curve-authorized-dir", type=Path, metavar="DIR",
                     help="directory of the trainers' public keys (*.key) allowed to connect "
                          "(required with --curve-secret)")
    net.add_argument("--allow-insecure", action="store_true",
                     help="allow binding a non-loopback tcp endpoint without CurveZMQ (trusted networks only)")

    shared = p.add_argument_group("shared host (limits per peer and per snapshot; see docs/security.md)")
    shared.add_argument("--max-connections", type=int, default=256, metavar="N",
                        help="connections of other users (not the daemon's own uid or an --allow-uid) open at "
                             "once, all together; more are closed as soon as they are accepted. The daemon's "
                             "own user is never refused (default: %(default)s)")
    shared.add_argument("--max-connections-per-source", type=int, default=32, metavar="N",
                        help="connections one other local user (by uid) or one remote address may hold at "
                             "once, so one cannot take every place (default: %(default)s)")
    shared.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="SECONDS",
                        help="ping every connection this often (default: %(default)s)")
    shared.add_argument("--peer-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="drop a connection that sent nothing, not even a heartbeat reply, for this long "
                             "(default: %(default)s)")
    shared.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="drop a connection that has not completed its handshake by then (default: %(default)s)")
    shared.add_argument("--max-vocab-tokens", type=int, metavar="N",
                        help="reject a hello whose vocabulary has more tokens (default: 1048576)")
    shared.add_argument("--max-vocab-bytes", type=int, metavar="N",
                        help="reject a hello whose token strings total more UTF-8 bytes (default: 16 MiB)")
    shared.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                        help="also read shared-memory segments owned by this uid, and treat its connections "
                             "and runs like the daemon's own user's (default: only the daemon's own uid); repeatable")
    shared.add_argument("--reject-log-interval", type=float, default=10.0, metavar="SECONDS",
                        help="log at most one line per kind of rejected message or refused connection this "
                             "often, with the count suppressed meanwhile (default: %(default)s)")

    add_limit_options(p)
    add_analysis_options(p)
    out = add_output_options(p)
    out.add_argument("--state-dir", type=Path,
                     help="keep each run's last analysed snapshot here so drift continues across a restart "
                          "(read back only when that run reappears)")

    scale = p.add_argument_group("scale (see docs/scale.md)")
    scale.add_argument("--executor", choices=["inprocess", "ray"], default="inprocess",
                       help="where each analysis runs: inprocess (this process, one at a time) or ray (a Ray "
                            "task on the cluster at RAY_ADDRESS, or on a local Ray instance when it is unset; "
                            "GPU tasks with --device cuda; needs the [ray] extra). Receiving, run state and "
                            "sinks stay in this daemon (default: %(default)s)")
    scale.add_argument("--max-concurrent", type=int, metavar="N",
                       help="--executor ray: at most N analyses at once, one per run at a time (default: what "
                            "the cluster fits: its CPUs / --threads, or its GPUs with --device cuda)")

    life = p.add_argument_group("lifecycle")
    life.add_argument("--exit-on-end", action="store_true",
                      help="exit 0 once every run that connected has sent `end` and its work is done (runs of "
                           "other local users, not the daemon's uid or an --allow-uid, are not waited for)")
    life.add_argument("--run-timeout", type=float, default=60.0, metavar="SECONDS",
                      help="close a run (like `end`: its waiting snapshots analysed, state saved, memory "
                           "released) whose publishers have been silent this long; publishers heartbeat "
                           "every 5 s, and one on this host whose process died is closed at once "
                           "(default: %(default)s)")
    life.add_argument("--max-pending-bytes", metavar="SIZE",
                      help="snapshots waiting for analysis may hold this much memory (e.g. 512M, 4G); they are "
                           "analysed in order, late but at their own iteration, and skipped only past it "
                           "(default: a quarter of the RAM, at most 8G; here "
                           f"{_default_budget()})")
    life.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                      help="on SIGTERM/SIGINT, let the running analysis finish for this long, then "
                           "abandon it (default: %(default)s)")
    life.add_argument("--assembly-timeout", type=float, default=120.0, metavar="SECONDS",
                      help="sharded (FSDP2/tensor-parallel) runs: drop an iteration whose parts have not all "
                           "arrived within this long; an ending run waits at most this long for them "
                           "(default: %(default)s)")
    return p


def _default_budget() -> str:
    from .service.backlog import default_max_pending_bytes, human
    return human(default_max_pending_bytes())


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

    from .service.cost import DEFAULT_MAX_COST, DEFAULT_MAX_MEMORY, CostLimits
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
    from .service.files import parse_mode
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
                     help="keep every token's nearest neighbours, drift cosine, norm and map position per "
                          "analysed iteration in RESULTS_DIR/<run>/tokens/ for `analysis-daemon explore` "
                          "(about 4.8 MB per iteration at 50304 tokens; default: on)")
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
    from .service.logsafe import SafeFormatter  # peer-supplied text never reaches the log raw

    fmt = SafeFormatter("%(asctime)s analysis-daemon %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        from .service.files import dir_mode_for, make_dirs, open_for_append
        make_dirs(log_file.parent, dir_mode_for(mode))
        os.close(open_for_append(log_file, mode))  # created with its mode before logging opens it
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False
    return logger


def _ensure_passive_omp(argv: list[str]) -> None:
    # Importing the analysis_daemon package may already have loaded torch (its __init__ re-exports the
    # math); libgomp read OMP_WAIT_POLICY then. If it was unset, re-run ourselves with it set.
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        os.execv(sys.executable, [sys.executable, "-m", "analysis_daemon", *argv])


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


def raise_fd_limit(max_connections: int, log: logging.Logger) -> None:
    """Raise the soft open-file limit to the hard one, and warn when --max-connections does not fit in it.

    Every connection is a descriptor until the gate refuses it; a daemon out of descriptors cannot
    accept its trainers or open their shared-memory slots.
    """
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit: %s", exc)
        return
    if max_connections + 64 > soft:
        log.warning("--max-connections %d is close to the open-file limit %d: lower it or raise the limit "
                    "(ulimit -n)", max_connections, soft)


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `analysis-daemon` / `python -m analysis_daemon`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replay"]:  # parsed before OMP_WAIT_POLICY is set, which may re-execute us
        from .replay.command import main as replay_main
        replay_args = subcommand_parser("replay").parse_args(argv[1:])
        _ensure_passive_omp(argv)
        return replay_main(replay_args)
    if argv[:1] == ["keygen"]:
        from protocol.keygen import main as keygen_main
        return keygen_main(argv[1:], prog="analysis-daemon keygen")
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    _ensure_passive_omp(argv)
    log = setup_logging(args.log_level, args.log_file, args.results_mode)

    import torch  # noqa: F401  only now: see the module docstring

    from protocol import CurveServer

    from .service.daemon import Daemon, DaemonConfig

    for name in ("max_connections", "max_connections_per_source", "max_vocab_tokens", "max_vocab_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        settings = analysis_settings(args, check_device=args.executor != "ray")
        limits, cost = snapshot_limits(args)
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    except ValueError as exc:
        return fail(str(exc))
    if not args.run_timeout > 0:
        return fail(f"--run-timeout must be more than 0 seconds, got {args.run_timeout}")
    from .service.backlog import default_max_pending_bytes, parse_bytes
    try:
        max_pending = (parse_bytes(args.max_pending_bytes) if args.max_pending_bytes is not None
                       else default_max_pending_bytes())
    except ValueError as exc:
        return fail(f"--max-pending-bytes: {exc}")
    threads = set_threads_and_priority(args, log)
    raise_fd_limit(args.max_connections, log)
    for name in ("heartbeat_interval", "peer_timeout", "handshake_timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            return fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.reject_log_interval < 0:
        return fail(f"--reject-log-interval must be >= 0, got {args.reject_log_interval}")

    vocab_overrides = {k: v for k, v in (("max_vocab_tokens", args.max_vocab_tokens),
                                         ("max_vocab_bytes", args.max_vocab_bytes)) if v is not None}
    if vocab_overrides:
        from dataclasses import replace
        limits = replace(limits, **vocab_overrides)

    from protocol.endpoints import UnsafeEndpoint, default_endpoint, ensure_private_dir, ipc_path, private_dir
    try:
        if args.listen is None:
            args.listen = default_endpoint()  # its directory created 0700 and checked (owner, mode, no symlink)
        elif ipc_path(args.listen) is not None and ipc_path(args.listen).parent == private_dir():
            ensure_private_dir()
    except UnsafeEndpoint as exc:
        return fail(str(exc))
    curve = None
    if args.curve_secret or args.curve_authorized_dir:
        if not (args.curve_secret and args.curve_authorized_dir):
            return fail("CurveZMQ needs both --curve-secret and --curve-authorized-dir")
        try:
            curve = CurveServer(args.curve_secret, args.curve_authorized_dir)
        except ValueError as exc:
            return fail(str(exc))

    executor = None
    if args.executor == "ray":
        from .service.ray_executor import RayExecutor
        try:
            executor = RayExecutor(device=settings.device, threads=threads, max_concurrent=args.max_concurrent)
        except ValueError as exc:
            return fail(str(exc))
    try:
        sinks = make_sinks(args, settings, threads, close_timeout=None)
    except ValueError as exc:
        if executor is not None:
            executor.close()
        return fail(str(exc))
    from protocol import PeerLimits

    peers = PeerLimits(heartbeat_interval=args.heartbeat_interval, peer_timeout=args.peer_timeout,
                       handshake_timeout=args.handshake_timeout)
    config = DaemonConfig(
        cost=cost, peers=peers, max_connections=args.max_connections,
        max_per_source=args.max_connections_per_source, allow_uids=tuple(args.allow_uid),
        reject_log_interval=args.reject_log_interval,
        listen=args.listen, limits=limits, exit_on_end=args.exit_on_end, state_dir=args.state_dir,
        shutdown_grace=args.shutdown_grace, curve=curve, allow_insecure=args.allow_insecure,
        run_timeout=args.run_timeout, assembly_timeout=args.assembly_timeout, max_pending_bytes=max_pending, analysis=settings,
        executor=executor)
    log.info("starting: %d analysis thread(s), nice +%d, OMP_WAIT_POLICY=%s, sinks: %s", threads,
             max(args.nice, 0), os.environ.get("OMP_WAIT_POLICY"), ", ".join(s.name for s in sinks.sinks))
    try:
        daemon = Daemon(config, sinks)
        status = daemon.serve()
        # Stopped, flushed and counted (the "stopped" line is out): a SIGTERM/SIGINT from now on (launch.sh
        # stopping a daemon that Ctrl-C already stopped) must not turn a clean exit into status 143/130.
        # SIG_IGN, not a Python handler: interpreter shutdown resets Python handlers to the default (death).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        return status
    except ValueError as exc:  # bad endpoint, insecure endpoint refused
        sinks.close()
        return fail(str(exc))
    except Exception as exc:
        import zmq
        if isinstance(exc, zmq.ZMQError):
            sinks.close()
            return fail(f"cannot listen on {args.listen}: {exc} (is another daemon running there?)")
        raise


if __name__ == "__main__":
    sys.exit(main())
