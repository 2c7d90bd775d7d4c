"""How long publish() blocks the training thread, and how fast snapshots reach a receiving process.

    python benchmarks/bench_hook.py [--rows 50304] [--cols 768] [--reps 15] [--threads N]

Prints medians for a V x d float32 CPU tensor: a plain numpy copy of the tensor (fresh array, and
into a preallocated one: memcpy bandwidth), publish() with no daemon, publish() to a receiving
process through shared memory and through tcp, and the delivery throughput of each path (bytes /
time from the start of publish() until the receiver holds its own copy or frame).
The receiver is `python -m protocol.listen` in its own process; it copies shm payloads out.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer_hook import EmbeddingPublisher  # noqa: E402


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench_numpy(array: np.ndarray, reps: int) -> tuple[float, float]:
    fresh, into = [], []
    dst = np.empty_like(array)
    for _ in range(reps):
        t = time.perf_counter()
        copy = array.copy()
        fresh.append(time.perf_counter() - t)
        del copy
        t = time.perf_counter()
        np.copyto(dst, array)
        into.append(time.perf_counter() - t)
    return median_ms(fresh), median_ms(into)


def bench_no_daemon(weight: torch.Tensor, reps: int) -> float:
    pub = EmbeddingPublisher(free_endpoint(), run="bench-alone")
    times = []
    for i in range(reps):
        t = time.perf_counter()
        pub.publish(weight, i)
        times.append(time.perf_counter() - t)
    pub.close(timeout=1.0)
    return median_ms(times)


def bench_delivery(weight: torch.Tensor, reps: int, shared_memory: bool) -> dict:
    endpoint = free_endpoint()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    listener = subprocess.Popen([sys.executable, "-m", "protocol.listen", endpoint], stdout=subprocess.PIPE,
                                env=env, text=True)
    try:
        assert listener.stdout.readline().startswith("listen ready")
        pub = EmbeddingPublisher(endpoint, run="bench", shared_memory=shared_memory)
        deadline = time.monotonic() + 10
        while not pub.connected:
            assert time.monotonic() < deadline, "publisher never connected"
            time.sleep(0.01)
        blocking, latency, copies, first = [], [], [], None
        array, dst = weight.numpy(), np.empty(weight.shape, dtype=np.float32)
        for i in range(reps + 1):
            t = time.perf_counter()
            np.copyto(dst, array)  # the baseline, measured under the same conditions as the publish after it
            copies.append(time.perf_counter() - t)
            start_wall, t = time.time(), time.perf_counter()
            ok = pub.publish(weight, i)
            took = time.perf_counter() - t
            assert ok, "snapshot dropped"
            while True:  # wait for this snapshot to arrive before the next (no drops, no overlap)
                msg = json.loads(listener.stdout.readline())
                if msg["kind"] == "snapshot":
                    break
            if i == 0:
                first = took  # creates and pre-faults the slot or buffer
                continue
            blocking.append(took)
            latency.append(msg["t_done"] - start_wall)
        pub.close()
    finally:
        listener.kill()
        listener.wait()
    nbytes = weight.numel() * weight.element_size()
    return {"first_ms": first * 1e3, "publish_ms": median_ms(blocking), "copyto_ms": median_ms(copies[1:]),
            "deliver_ms": median_ms(latency), "gbps": nbytes / statistics.median(latency) / 1e9}


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50304)
    parser.add_argument("--cols", type=int, default=768)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in this process")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weight = torch.randn(args.rows, args.cols)
    nbytes = weight.numel() * 4
    print(f"tensor {args.rows} x {args.cols} float32 = {nbytes / 1e6:.1f} MB; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, reps {args.reps} (medians)")
    fresh, into = bench_numpy(weight.numpy(), args.reps)
    print(f"numpy copy, fresh array (a.copy())       {fresh:8.2f} ms")
    print(f"numpy copy, preallocated (np.copyto)     {into:8.2f} ms   memcpy bandwidth {nbytes / into / 1e6:.2f} GB/s")
    alone = bench_no_daemon(weight, args.reps * 4)
    print(f"publish, no daemon (copy skipped)        {alone:8.3f} ms   (nothing can be sent, so nothing is copied)")
    for shared_memory, label in ((True, "shm"), (False, "tcp")):
        r = bench_delivery(weight, args.reps, shared_memory)
        print(f"publish, daemon via {label}                  {r['publish_ms']:8.2f} ms   "
              f"{r['publish_ms'] / fresh:.2f}x a.copy(); {r['publish_ms'] / r['copyto_ms']:.2f}x np.copyto interleaved "
              f"({r['copyto_ms']:.2f} ms); first publish {r['first_ms']:.1f} ms")
        print(f"delivery via {label} (publish -> receiver)    {r['deliver_ms']:8.2f} ms   {r['gbps']:.2f} GB/s")


if __name__ == "__main__":
    main()
