"""Reading a shared-memory slot: the checked preadv copy (ShmReader today) vs the mmap copy it replaced.

    .venv/bin/python benchmarks/bench_shm_read.py [--rows 50304 --cols 768 --rounds 7]

(a) mmap, cached mapping: the old reader's steady state (a mapping kept open across reads; np.copyto).
(b) mmap, fresh mapping: open + mmap + copy + unmap per read (what "never trust a cached mapping" costs
    with mmap, and still exposed to SIGBUS on truncation).
(c) ShmReader.copy_out: open, fstat checks, preadv into our own buffer, seq re-check, release, close.
Rounds are interleaved; medians are printed, and the ratios of (c) to (a) and (b).
"""
from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from protocol.shm import HEADER_BYTES, SHM_DIR, ShmReader, ShmWriter  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50304)
    p.add_argument("--cols", type=int, default=768)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    nbytes = args.rows * args.cols * 4
    writer, reader = ShmWriter(1, reclaim_after_s=0.0), ShmReader()
    slot = writer.acquire(nbytes)
    np.copyto(np.frombuffer(slot.payload(), dtype=np.uint8), np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8))
    ref = writer.commit(slot)
    path = SHM_DIR / slot.name
    fd = os.open(path, os.O_RDWR)
    cached = mmap.mmap(fd, HEADER_BYTES + nbytes)
    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    try:
        for _ in range(args.rounds):
            out = np.empty(nbytes, dtype=np.uint8)
            t = time.perf_counter()
            np.copyto(out, np.frombuffer(cached, dtype=np.uint8, count=nbytes, offset=HEADER_BYTES))
            times["a"].append(time.perf_counter() - t)

            t = time.perf_counter()
            f2 = os.open(path, os.O_RDWR)
            mm = mmap.mmap(f2, HEADER_BYTES + nbytes)
            out = np.empty(nbytes, dtype=np.uint8)
            src = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=HEADER_BYTES)
            np.copyto(out, src)
            del src
            mm.close()
            os.close(f2)
            times["b"].append(time.perf_counter() - t)

            # copy_out releases the slot; mark it READY again (same seq) so the next round can read it.
            t = time.perf_counter()
            got = reader.copy_out(ref, nbytes)
            times["c"].append(time.perf_counter() - t)
            os.pwrite(fd, (2).to_bytes(8, "little"), 8)
            del got
    finally:
        cached.close()
        os.close(fd)
        writer.close()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    gbps = nbytes / 1e9
    print(f"bench_shm_read.py, {args.rows} x {args.cols} float32 ({nbytes / 1e6:.1f} MB), median of {args.rounds} interleaved rounds")
    print(f"(a) mmap, cached mapping, np.copyto      {med['a']:8.2f} ms  {gbps / med['a'] * 1000:6.2f} GB/s")
    print(f"(b) mmap, fresh mapping per read          {med['b']:8.2f} ms  {gbps / med['b'] * 1000:6.2f} GB/s")
    print(f"(c) ShmReader.copy_out (checks + preadv)  {med['c']:8.2f} ms  {gbps / med['c'] * 1000:6.2f} GB/s")
    print(f"    ratio (c)/(a) {med['c'] / med['a']:.3f}   (c)/(b) {med['c'] / med['b']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
