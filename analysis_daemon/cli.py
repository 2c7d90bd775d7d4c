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

from .options import (add_analysis_options, add_limit_options, add_output_options, analysis_settings, fail,
                      make_sinks, set_threads_and_priority, setup_logging, snapshot_limits)

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


def _ensure_passive_omp(argv: list[str]) -> None:
    # Importing the analysis_daemon package may already have loaded torch (its __init__ re-exports the
    # math); libgomp read OMP_WAIT_POLICY then. If it was unset, re-run ourselves with it set.
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        os.execv(sys.executable, [sys.executable, "-m", "analysis_daemon", *argv])


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
