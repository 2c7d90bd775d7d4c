"""What the daemon loses in ordinary accidents: a full disk, a read-only results dir, an unreachable W&B.

Run:  .venv/bin/python benchmarks/bench_accidents.py [--repo DIR] [--skip-disk] [--skip-wandb]

`--repo` runs the daemon of another checkout (e.g. an older commit in a git worktree) so before and
after can be compared with the same scenarios. The disk scenarios need root (they mount a 1 MiB tmpfs,
fill it with a filler file, remount it read-only; unmounted afterwards). Printed per scenario: results
analysed, whole lines in analysis.jsonl, unparseable lines, results missing, `*.tmp` files left in the
state dir, and the daemon's final "stopped" line; for W&B (online, WANDB_BASE_URL on a closed port, a
fake API key): seconds from the trainer's end to the daemon's exit, and whether the results are in a
wandb run file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(repo: Path, endpoint: str, err: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    d = subprocess.Popen([sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--threads", "1",
                          "--nice", "0", "--exit-on-end", *args], stdout=subprocess.PIPE, stderr=open(err, "w"),
                         text=True, cwd=err.parent,
                         env=dict(env, PYTHONPATH=str(repo), OMP_WAIT_POLICY="PASSIVE"))
    while "ready" not in (d.stdout.readline() if d.stdout else "ready"):
        if d.poll() is not None:
            raise SystemExit(f"daemon failed: {err.read_text()[-2000:]}")
    return d


def _fill(fs: Path) -> Path:
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


def _count_lines(path: Path) -> tuple[int, int]:
    if not path.exists():
        return 0, 0
    raw = path.read_bytes()
    parts = raw.split(b"\n")
    lines = parts[:-1] + ([parts[-1]] if parts[-1] else [])
    ok = 0
    for line in lines:
        with contextlib.suppress(ValueError):
            json.loads(line)
            ok += 1
    return ok, len(lines) - ok


def disk(repo: Path, scenario: str, base: Path) -> str:
    """One disk scenario ('full' or 'read-only'); the line to print."""
    import torch
    import zmq

    sys.path.insert(0, str(repo))
    from protocol import encode_end, encode_hello, encode_snapshot

    fs = base / scenario
    fs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)], check=True)
    try:
        args = ["--results-dir", str(fs / "runs"), "--no-wandb"]
        if scenario == "full":
            args += ["--state-dir", str(fs / "state")]
        else:
            (fs / "runs").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        endpoint, err = f"tcp://127.0.0.1:{_port()}", base / f"{scenario}.err"
        d = _daemon(repo, endpoint, err, dict(os.environ), *args)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(endpoint)

        def analysed() -> int:
            return len(re.findall(r"iter \d+: analysed in", err.read_text()))

        def send(it: int) -> None:  # and wait for its analysis, so none is skipped
            w = torch.randn(256, 16)
            sock.send_multipart(encode_snapshot(run="r", iter=it, seq=it, name="wte", dtype="float32",
                                                shape=[256, 16], payload=w.numpy().tobytes()))
            while analysed() < it + 1:
                time.sleep(0.02)

        sock.send_multipart(encode_hello(run="r", seq=0, pid=os.getpid(), host="bench"))
        if scenario == "full":  # 3 written; full with one page left (a short write); 25 more; freed; 2 more
            for it in range(3):
                send(it)
            filler = _fill(fs)
            os.truncate(filler, filler.stat().st_size - 4096)
            for it in range(3, 28):
                send(it)
            filler.unlink()
            for it in range(28, 30):
                send(it)
        else:
            for it in range(10):
                send(it)
        n = analysed()
        sock.send_multipart(encode_end(run="r", seq=99, final_iter=n - 1, published=n, dropped=0))
        d.communicate(timeout=120)
        sock.close(0)
        ctx.term()
        ok, bad = _count_lines(fs / "runs" / "r" / "analysis.jsonl")
        tmp = len(list((fs / "state").rglob("*.tmp"))) if (fs / "state").exists() else 0
        log = err.read_text()
        stopped = [line.split("INFO ", 1)[1] for line in log.splitlines() if "stopped:" in line]
        return (f"{scenario}: analysed {n}, whole lines {ok}, unparseable lines {bad}, results missing {n - ok}, "
                f".tmp left {tmp}, ERROR lines {log.count(' ERROR ')}\n    {stopped[0] if stopped else 'no stopped line'}")
    finally:
        subprocess.run(["umount", "-l", str(fs)])


def wandb_unreachable(repo: Path, base: Path) -> str:
    """Seconds from the trainer's end to the daemon's exit with W&B online but unreachable."""
    import torch

    sys.path.insert(0, str(repo))
    from trainer_hook import EmbeddingPublisher

    wdir = base / "wandb"
    wdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(WANDB_MODE="online", WANDB_BASE_URL=f"http://127.0.0.1:{_port()}", WANDB_API_KEY="x" * 40,
               WANDB_DIR=str(wdir))
    endpoint = f"tcp://127.0.0.1:{_port()}"
    d = _daemon(repo, endpoint, wdir / "d.err", env, "--results-dir", str(wdir / "runs"))
    pub = EmbeddingPublisher(endpoint, run="wb")
    for i in range(3):
        pub.publish(torch.randn(64, 16), i * 10)
        time.sleep(0.5)
    pub.close()
    ended = time.monotonic()
    d.communicate(timeout=600)
    took = time.monotonic() - ended
    sys.path.insert(0, str(ROOT))
    from tests.wandb_history import history  # reads the .wandb file back (this checkout's reader)

    rows = {}
    for f in sorted(wdir.rglob("*.wandb")):
        try:
            rows[f.parent.name] = sum("analysis/iter" in r for r in history(f))
        except Exception as exc:  # a run file wandb gave up on mid-way
            rows[f.parent.name] = f"unreadable ({type(exc).__name__})"
    return (f"wandb unreachable: daemon exit {took:.1f} s after the trainer's end (rc {d.returncode}); "
            f"results logged per wandb run file (3 sent): {rows}")


def main() -> None:
    """Print the figures of each scenario."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose daemon to run (default: this one)")
    p.add_argument("--skip-disk", action="store_true", help="leave out the full disk / read-only scenarios")
    p.add_argument("--skip-wandb", action="store_true", help="leave out the unreachable W&B scenario")
    args = p.parse_args()
    repo = args.repo.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-accidents-") as tmp:
        base = Path(tmp)
        print(f"daemon of {repo}")
        if not args.skip_disk:
            if os.geteuid() != 0:
                print("disk scenarios: skipped (need root to mount a tmpfs)")
            else:
                for scenario in ("full", "read-only"):
                    print(disk(repo, scenario, base), flush=True)
        if not args.skip_wandb:
            print(wandb_unreachable(repo, base), flush=True)


if __name__ == "__main__":
    main()
