"""`analysis-daemon explore RESULTS [--host 127.0.0.1] [--port 8765]`: serve the explorer.

    analysis-daemon explore runs/my-run                 # one run: http://127.0.0.1:8765/
    analysis-daemon explore runs/                       # every run under runs/ (a selector on the page)
    analysis-daemon explore runs/my-run --port 9000     # open http://127.0.0.1:9000/?token=king&iter=500
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The `explore` argument parser."""
    p = argparse.ArgumentParser(
        prog="analysis-daemon explore",
        description="A local web app over a run's per-token data (written by the daemon and by replay "
                    "unless --no-token-data): the whole vocabulary on a map coloured by drift, norm, galaxy "
                    "cluster or under-trained flag, a slider over the analysed iterations, any token's "
                    "nearest neighbours and its drift and norm over time. Read-only.",
        epilog="The page and its scripts ship with the package (nothing is fetched from elsewhere). "
               "It binds loopback by default: anyone who can reach --host can read the run's token data.")
    p.add_argument("results", type=Path, metavar="RESULTS",
                   help="a run directory (RESULTS_DIR/<run>), its analysis.jsonl, or a results directory "
                        "holding several runs")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; another address exposes the data to the network)")
    p.add_argument("--port", type=int, default=8765, help="port to bind (default: %(default)s)")
    return p


def main(argv: list[str]) -> int:
    """Run the explorer until interrupted; the exit status."""
    from ..options import fail

    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        return fail(f"the explorer needs starlette and uvicorn ({exc.name} is missing): "
                    "pip install -e '.[explore]'")
    from .data import ExploreError, find_runs
    try:
        runs = find_runs(args.results)
    except ExploreError as exc:
        return fail(str(exc))
    if not 0 <= args.port <= 65535:
        return fail(f"--port must be in [0, 65535], got {args.port}")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"explore: warning: binding {args.host}: anyone who can reach it can read these runs' token data",
              file=sys.stderr)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:  # bound here, so the ready line is true when printed and a busy port is one Error line
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        return fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    port = sock.getsockname()[1]
    with_data = sum(1 for r in runs.values() if r.iters())
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"analysis-daemon explore ready on http://{url_host}:{port}/ ({len(runs)} run(s), "
          f"{with_data} with token data)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(runs), log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0
