"""How long publish() blocks the training thread, and how fast snapshots reach a receiving process.

    python benchmarks/bench_hook.py [--rows 50304] [--cols 768] [--reps 15] [--threads N]
    python benchmarks/bench_hook.py --stall --rows 128256 --cols 4096 --reps 4   # first vs steady only
    python benchmarks/bench_hook.py --faults                                    # what page faults cost
    python benchmarks/bench_hook.py --sharded 2                                 # per-rank publish, 2 ranks
    python benchmarks/bench_hook.py --copy                                      # publish's copy, old vs new

Prints medians for a V x d float32 CPU tensor: a plain numpy copy of the tensor (fresh array, and
into a preallocated one: memcpy bandwidth), publish() with no daemon, publish() to a receiving
process through shared memory and through tcp, and the delivery throughput of each path (bytes /
time from the start of publish() until the receiver holds its own copy or frame).
The receiver is `python -m protocol.listen` in its own process; it copies shm payloads out.

No stall: the first and second publishes of a run (the second while the receiver still holds the
first, so a second slot/buffer is needed) against the steady-state median, with and without
`publisher.prepare(weight)` before the loop. --faults times writing 154 MB into fresh memory (page
faults on the writing thread) against reused, MAP_POPULATE'd and huge-page memory. --sharded N runs N
torchrun CPU ranks that each publish their Shard(0) block of a DTensor, and prints each rank's times.
--copy times the training thread's copy alone, interleaved round by round: publish's copy (a memcpy
between data pointers, never a numpy view of the weight) against the numpy-view copy it replaced
(which left the weight's storage not resizable: FSDP's free crashed) and torch's copy_ (intra-op pool).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer_hook import EmbeddingPublisher  # noqa: E402
from trainer_hook.publisher import _copy_into  # noqa: E402


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


@contextmanager
def listener_and_publisher(run: str, shared_memory: bool) -> Iterator[tuple[subprocess.Popen, EmbeddingPublisher]]:
    """A `protocol.listen` receiver in a child process and a publisher connected to it (closed after)."""
    endpoint = free_endpoint()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    listener = subprocess.Popen([sys.executable, "-m", "protocol.listen", endpoint], stdout=subprocess.PIPE,
                                env=env, text=True)
    try:
        assert listener.stdout.readline().startswith("listen ready")
        pub = EmbeddingPublisher(endpoint, run=run, shared_memory=shared_memory)
        assert pub.wait_connected(10), "publisher never connected"
        yield listener, pub
        pub.close()
    finally:
        listener.kill()
        listener.wait()


def bench_delivery(weight: torch.Tensor, reps: int, shared_memory: bool) -> dict:
    with listener_and_publisher("bench", shared_memory) as (listener, pub):
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
    nbytes = weight.numel() * weight.element_size()
    return {"first_ms": first * 1e3, "publish_ms": median_ms(blocking), "copyto_ms": median_ms(copies[1:]),
            "deliver_ms": median_ms(latency), "gbps": nbytes / statistics.median(latency) / 1e9}


def wait_snapshots(listener: subprocess.Popen, n: int) -> None:
    got = 0
    while got < n:
        msg = json.loads(listener.stdout.readline())
        got += msg["kind"] == "snapshot"


def bench_stall(weight: torch.Tensor, reps: int, shared_memory: bool, prepare: bool) -> dict:
    """Blocking time of the first, second (receiver still busy with the first) and steady-state publishes."""
    with listener_and_publisher("bench-stall", shared_memory) as (listener, pub):
        if prepare:
            assert pub.prepare(weight, timeout=300), "prepare() did not finish"  # before the loop, as in the README
        times, sent = [], 0
        for i in range(2):  # back to back: the second needs the second slot / buffer
            t = time.perf_counter()
            sent += pub.publish(weight, i)  # may drop (counted) while the buffers are still being prepared
            times.append(time.perf_counter() - t)
        wait_snapshots(listener, sent)
        dropped = 2 - sent
        if pub._prepared is not None:  # without prepare(): the sender thread makes the buffers now
            pub._prepared.done.wait(600)
        time.sleep(0.5)
        for i in range(2, 2 + reps):
            t = time.perf_counter()
            assert pub.publish(weight, i), "snapshot dropped"
            times.append(time.perf_counter() - t)
            wait_snapshots(listener, 1)
    steady = statistics.median(times[2:])
    return {"first": times[0] * 1e3, "second": times[1] * 1e3, "steady": steady * 1e3,
            "worst": max(times) * 1e3, "ratio": max(times) / steady, "dropped": dropped}


def bench_copy(rows: int, cols: int, reps: int) -> None:
    """The copy publish() does on the training thread, against the numpy-view copy it replaced and torch's copy_."""
    weight = torch.randn(rows, cols)  # one source for every method: the same pages, the same caches
    shape, nbytes = (rows, cols), weight.numel() * 4
    dst = torch.from_numpy(np.empty(nbytes, dtype=np.uint8))
    dst.fill_(0)  # faulted in: only the copies are timed

    def numpy_view() -> None:  # before: np.copyto(dst.numpy(), weight...numpy())
        np.copyto(dst.numpy(), weight.view(torch.uint8).view(-1).numpy())

    def torch_copy() -> None:
        with torch.no_grad():
            dst.view(torch.float32).view(shape).copy_(weight)

    methods = {"publish's copy (memcpy of data pointers)": lambda: _copy_into(dst, weight, torch.float32, shape),
               "before: np.copyto of a numpy view of w": numpy_view,
               f"torch copy_ ({torch.get_num_threads()} intra-op threads)": torch_copy}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for i in range(reps):
        order = list(methods)[i % 3:] + list(methods)[:i % 3]  # rotate: none always runs first
        for name in order:
            t = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t)
    fresh, old = torch.randn(1001, 64), torch.randn(1001, 64)  # what each copy leaves behind
    version = fresh._version
    _copy_into(torch.empty(fresh.numel() * 4, dtype=torch.uint8), fresh, torch.float32, (1001, 64))
    untouched = fresh._version == version and fresh.untyped_storage().resizable()
    np.copyto(np.empty(old.numel() * 4, dtype=np.uint8), old.view(torch.uint8).view(-1).numpy())
    print(f"copy of {rows} x {cols} float32 ({nbytes / 1e6:.1f} MB) into a preallocated buffer, medians of {reps} "
          f"interleaved rounds; cpus {os.cpu_count()}")
    for name, samples in times.items():
        ms = median_ms(samples)
        print(f"  {name:44s} {ms:8.2f} ms   {nbytes / ms / 1e6:6.2f} GB/s")
    print(f"  after publish's copy: version unchanged and storage resizable: {untouched}; after the numpy view: "
          f"resizable {old.untyped_storage().resizable()}")


def bench_faults(nbytes: int = 50304 * 768 * 4, reps: int = 5) -> None:
    """Time writing `nbytes` into memory that is fresh (faults), reused, pre-populated or huge-paged."""
    import mmap

    src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32).view(np.uint8)
    reused = np.empty(nbytes, dtype=np.uint8)
    reused[:] = 0

    def fresh_numpy() -> float:
        t = time.perf_counter()
        dst = np.empty(nbytes, dtype=np.uint8)
        np.copyto(dst, src)
        return time.perf_counter() - t

    def reuse() -> float:
        t = time.perf_counter()
        np.copyto(reused, src)
        return time.perf_counter() - t

    def anon(flags: int, advice: int | None) -> tuple[float, float]:
        t = time.perf_counter()
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
        if advice is not None:
            mm.madvise(advice)
        setup = time.perf_counter() - t
        dst = np.frombuffer(mm, dtype=np.uint8)
        t = time.perf_counter()
        np.copyto(dst, src)
        copy = time.perf_counter() - t
        del dst
        mm.close()
        return setup, copy

    def shm_slot(populate: bool) -> tuple[float, float]:
        path = f"/dev/shm/emon-bench-{os.getpid()}"
        t = time.perf_counter()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0))
        finally:
            os.close(fd)
            os.unlink(path)
        setup = time.perf_counter() - t
        dst = np.frombuffer(mm, dtype=np.uint8)
        t = time.perf_counter()
        np.copyto(dst, src)
        copy = time.perf_counter() - t
        del dst
        mm.close()
        return setup, copy

    def med(fn):
        runs = [fn() for _ in range(reps)]
        if isinstance(runs[0], tuple):
            return tuple(statistics.median(r[i] for r in runs) * 1e3 for i in range(2))
        return statistics.median(runs) * 1e3, None

    print(f"page faults: writing {nbytes / 1e6:.0f} MB (medians of {reps}; setup = allocation/mapping, copy = memcpy)")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    shmem_thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    print(f"  transparent huge pages: {thp.read_text().strip() if thp.exists() else 'n/a'}; "
          f"shmem: {shmem_thp.read_text().strip() if shmem_thp.exists() else 'n/a'}")
    rows = [("reused buffer (already faulted in)", med(reuse)),
            ("fresh np.empty, faults while copying", med(fresh_numpy)),
            ("anonymous mmap, faults while copying", med(lambda: anon(0, None))),
            ("anonymous mmap + MAP_POPULATE", med(lambda: anon(mmap.MAP_POPULATE, None))),
            ("anonymous mmap + madvise(MADV_HUGEPAGE)", med(lambda: anon(0, getattr(mmap, "MADV_HUGEPAGE", 14)))),
            ("/dev/shm slot, fallocate, no populate", med(lambda: shm_slot(False))),
            ("/dev/shm slot, fallocate + MAP_POPULATE", med(lambda: shm_slot(True)))]
    for label, (a, b) in rows:
        if b is None:
            print(f"  {label:44s} total {a:8.1f} ms")
        else:
            print(f"  {label:44s} total {a + b:8.1f} ms  (setup {a:7.1f}, copy {b:7.1f})")


def sharded_rank(rows: int, cols: int, endpoint: str, reps: int) -> None:
    """Run by torchrun (--sharded): publish this rank's Shard(0) block of a rows x cols DTensor, print times."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    w = distribute_tensor(torch.randn(rows, cols), init_device_mesh("cpu", (dist.get_world_size(),)), [Shard(0)])
    pub = EmbeddingPublisher(endpoint, run="bench-sharded")
    pub.prepare(w)
    time.sleep(2.0)  # connected and prepared (the sender thread faults the slots in)
    times = []
    for i in range(reps):
        dist.barrier()
        t = time.perf_counter()
        ok = pub.publish(w, i)
        times.append(time.perf_counter() - t)
        deadline = time.monotonic() + 30
        while ok and pub.published < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.3)  # the receiver copies the parts out
    pub.close()
    local = tuple(w.to_local().shape)
    print(f"rank {rank}: block {local[0]} x {local[1]} ({local[0] * local[1] * 4 / 1e6:.1f} MB): publish first "
          f"{times[0] * 1e3:.2f} ms, median {statistics.median(times) * 1e3:.2f} ms, worst {max(times) * 1e3:.2f} ms",
          flush=True)
    dist.destroy_process_group()


def bench_sharded(nproc: int, rows: int, cols: int, reps: int) -> None:
    endpoint = free_endpoint()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    listener = subprocess.Popen([sys.executable, "-m", "protocol.listen", endpoint], stdout=subprocess.PIPE,
                                env=env, text=True)
    try:
        assert listener.stdout.readline().startswith("listen ready")
        print(f"sharded: {nproc} torchrun CPU ranks, DTensor {rows} x {cols} float32 Shard(0), shm, prepare() first")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", __file__, "--sharded-rank", endpoint, "--rows", str(rows),
                               "--cols", str(cols), "--reps", str(reps)], env=env, capture_output=True, text=True)
        for line in sorted(l for l in proc.stdout.splitlines() if l.startswith("rank ")):
            print("  " + line)
        if proc.returncode:
            print(proc.stderr[-3000:])
    finally:
        listener.kill()
        listener.wait()


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50304)
    parser.add_argument("--cols", type=int, default=768)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in this process")
    parser.add_argument("--stall", action="store_true", help="only the first-vs-steady publish measurement")
    parser.add_argument("--faults", action="store_true", help="only the page-fault measurement")
    parser.add_argument("--sharded", type=int, default=0, metavar="N", help="only the sharded run with N ranks")
    parser.add_argument("--copy", action="store_true", help="only publish's copy, against the numpy-view copy")
    parser.add_argument("--sharded-rank", metavar="ENDPOINT", help=argparse.SUPPRESS)  # torchrun's child
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sharded_rank:
        return sharded_rank(args.rows, args.cols, args.sharded_rank, args.reps)
    if args.faults:
        return bench_faults()
    if args.copy:
        return bench_copy(args.rows, args.cols, max(args.reps, 3))
    if args.sharded:
        return bench_sharded(args.sharded, args.rows, args.cols, args.reps)
    weight = torch.randn(args.rows, args.cols)
    if args.stall:
        return print_stall(weight, args.reps)
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
    print_stall(weight, args.reps)


def print_stall(weight: torch.Tensor, reps: int) -> None:
    """First, second and worst publish against the steady state, shm and tcp, without and with prepare()."""
    print(f"no stall: {weight.shape[0]} x {weight.shape[1]} float32, first two publishes back to back, then "
          f"{reps} steady ones")
    for shared_memory, label in ((True, "shm"), (False, "tcp")):
        for prepare in (False, True):
            r = bench_stall(weight, reps, shared_memory, prepare)
            print(f"  {label} {'prepare()   ' if prepare else 'no prepare()'}  first {r['first']:8.1f} ms  second "
                  f"{r['second']:8.1f} ms  dropped {r['dropped']}  steady {r['steady']:8.1f} ms  "
                  f"worst/steady {r['ratio']:5.2f}x")


if __name__ == "__main__":
    main()
