"""A minimal receiver that prints one JSON line per message: for debugging a trainer's stream, and for tests.

    python -m protocol.listen tcp://127.0.0.1:5555 [--count N] [--digest] [--stall]

It validates every message with protocol.decode, copies shared-memory payloads out (releasing the
slots), and prints e.g. {"kind": "snapshot", "run": "r", "iter": 10, "via": "shm", ...}; a rejected
message prints {"kind": "rejected", "error": "..."}. With --stall it binds and never reads (a stuck daemon).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time

import zmq

from .messages import End, Hello, Limits, ProtocolError, Snapshot, decode
from .security import CurveServer
from .shm import ShmReader
from .transport import bind_receiver


def describe(msg, shm: ShmReader, digest: bool) -> dict:
    """One JSON-able line for a decoded message (copies shared-memory payloads out, releasing the slot)."""
    out = {"kind": type(msg).__name__.lower(), "run": msg.run, "seq": msg.seq, "publisher": msg.publisher}
    if isinstance(msg, Hello):
        out.update(pid=msg.pid, host=msg.host, vocab_len=None if msg.vocab is None else len(msg.vocab),
                   wandb=msg.wandb, meta=msg.meta)
    elif isinstance(msg, Snapshot):
        data = shm.copy_out(msg.shm, msg.nbytes) if msg.shm is not None else msg.payload
        out.update(iter=msg.iter, name=msg.name, dtype=msg.dtype, shape=list(msg.shape), nbytes=msg.nbytes,
                   sent_at=msg.sent_at, via="shm" if msg.shm is not None else "inline", metrics=msg.metrics)
        if digest:
            out["digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    elif isinstance(msg, End):
        out.update(final_iter=msg.final_iter, published=msg.published, dropped=msg.dropped)
    # other kinds (heartbeat) carry nothing beyond the common fields
    out["t_done"] = time.time()
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m protocol.listen`."""
    parser = argparse.ArgumentParser(prog="python -m protocol.listen", description=__doc__.splitlines()[0])
    parser.add_argument("endpoint", help="where to bind, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/em.sock")
    parser.add_argument("--count", type=int, default=0, help="exit after this many messages (0: run until killed)")
    parser.add_argument("--digest", action="store_true", help="print a blake2b digest of each payload")
    parser.add_argument("--stall", action="store_true", help="bind but never read")
    parser.add_argument("--max-payload-bytes", type=int, default=None, help="reject larger snapshots (default: protocol limit)")
    parser.add_argument("--curve-secret", help="server NAME.key_secret")
    parser.add_argument("--curve-authorized", help="directory of authorised client *.key files")
    parser.add_argument("--allow-insecure", action="store_true", help="allow a non-loopback tcp endpoint without CurveZMQ")
    args = parser.parse_args(argv)
    limits = Limits() if args.max_payload_bytes is None else Limits(max_payload_bytes=args.max_payload_bytes)
    curve = CurveServer(args.curve_secret, args.curve_authorized) if args.curve_secret else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    try:
        sock = bind_receiver(ctx, args.endpoint, limits, curve=curve, allow_insecure=args.allow_insecure)
    except (ValueError, zmq.ZMQError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    shm = ShmReader()
    print(f"listen ready on {args.endpoint}", flush=True)
    seen = 0
    try:
        while not args.count or seen < args.count:
            if args.stall:
                time.sleep(3600)
                continue
            if not sock.poll(1000):
                continue
            frames = sock.recv_multipart(copy=False)
            try:
                line = describe(decode(frames, limits), shm, args.digest)
            except ProtocolError as exc:
                line = {"kind": "rejected", "error": str(exc), "t_done": time.time()}
            print(json.dumps(line), flush=True)
            seen += 1
    finally:
        shm.close()
        sock.close(0)
        if curve is not None:
            curve.stop()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
