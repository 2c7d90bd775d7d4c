"""The explorer at GPT-2 and Llama-3 vocabulary sizes: bytes kept per iteration, the cost of making them,
query latency of the JSON API, and how long the page takes to draw the whole vocabulary.

    python benchmarks/bench_explore.py [--rows 50304] [--iters 10] [--queries 200] [--no-browser]

Token data is written with the daemon's own sink (random neighbour lists of the right size: query cost
does not depend on their values), then a real `analysis-daemon explore` process is queried over HTTP.
The page is timed in headless Chromium (Debian's `chromium`) when it is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from analysis_daemon.metrics.token_map import token_coordinates  # noqa: E402
from analysis_daemon.pipeline import TokenArrays  # noqa: E402
from analysis_daemon.sinks.token_data import TokenDataSink  # noqa: E402


def per_iteration_bytes(rows: int, k: int = 10, counted: bool = False) -> int:
    """knn ids + cosines (4 bytes each), drift, norm, neighbourhood size (4 each), xy (8), and when the
    trainer counts tokens, the counts since its previous snapshot (uint32) and the running total (int64):
    independent of d."""
    return rows * (k * 8 + 4 + 4 + 4 + 8 + (4 + 8 if counted else 0))


def fetch_ms(url: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as res:
        body = res.read()
    return (time.perf_counter() - t0) * 1000, body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50304)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    v, k = args.rows, 10
    for counted in (False, True):
        print(f"bytes per analysed iteration (k = {k}{', token counts' if counted else ''}): 50304 tokens "
              f"{per_iteration_bytes(50304, counted=counted) / 1e6:.2f} MB, 128256 tokens "
              f"{per_iteration_bytes(128256, counted=counted) / 1e6:.2f} MB (the width d does not matter)")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(v, args.cols, generator=gen)
    t0 = time.perf_counter()
    xy = token_coordinates(w)
    t_xy = time.perf_counter() - t0
    rotated = w @ torch.linalg.qr(torch.randn(args.cols, args.cols, generator=gen)).Q
    t0 = time.perf_counter()
    token_coordinates(rotated, previous=xy)
    t_xy_aligned = time.perf_counter() - t0
    from analysis_daemon.metrics.drift import measure_semantic_drift
    t0 = time.perf_counter()
    measure_semantic_drift(w, rotated)
    t_drift = time.perf_counter() - t0
    print(f"map coordinates of {v} x {args.cols}: {t_xy:.2f} s, aligned to the previous {t_xy_aligned:.2f} s; "
          f"for scale, the drift of the same pair {t_drift:.2f} s ({torch.get_num_threads()} threads)")

    with tempfile.TemporaryDirectory() as tmp:
        sink = TokenDataSink(tmp, keep=args.iters)
        vocab = [f"tok{i}" for i in range(v)]
        sink.run_hello("bench", type("Hello", (), {"vocab": vocab})())
        t_write = []
        for it in range(args.iters):
            arrays = TokenArrays(knn_ids=torch.randint(0, v, (v, k), generator=gen, dtype=torch.int32),
                                 knn_cos=torch.rand(v, k, generator=gen), drift=torch.rand(v, generator=gen),
                                 norm=torch.rand(v, generator=gen) + 1, xy=xy,
                                 nbhd=torch.randint(0, 50, (v,), generator=gen, dtype=torch.int32),
                                 tokens_seen=torch.randint(0, 1000, (v,), generator=gen).to(torch.uint32),
                                 tokens_total=torch.randint(0, 10**6, (v,), generator=gen), tokens_total_since=0)
            t0 = time.perf_counter()
            sink.handle_arrays({"run": "bench", "iter": 100 * it, "shape": [v, args.cols]}, arrays)
            t_write.append(time.perf_counter() - t0)
        on_disk = sum(f.stat().st_size for f in (Path(tmp) / "bench" / "tokens" / "000000000100").iterdir())
        print(f"write one iteration with token counts (fsynced, atomic rename): median "
              f"{statistics.median(t_write) * 1000:.0f} ms; {on_disk / 1e6:.2f} MB on disk")
        port = 18765 + os.getpid() % 1000
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "analysis_daemon", "explore", str(Path(tmp) / "bench"),
                                 "--port", str(port)], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert "ready" in proc.stdout.readline()
            base = f"http://127.0.0.1:{port}"
            fetch_ms(f"{base}/api/iters")
            rng = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, v, (args.queries,), generator=rng).tolist()
            last = 100 * (args.iters - 1)
            nb = [fetch_ms(f"{base}/api/neighbours?iter={last}&token={t}&k=10")[0] for t in tokens]
            by_string = [fetch_ms(f"{base}/api/neighbours?iter={last}&token=tok{t}&k=10")[0] for t in tokens[:50]]
            tok = [fetch_ms(f"{base}/api/token?token={t}")[0] for t in tokens[:50]]
            pts_ms, pts = fetch_ms(f"{base}/api/points?iter={last}")
            voc_ms, voc = fetch_ms(f"{base}/api/vocab")

            def summary(xs: list[float]) -> str:
                xs = sorted(xs)
                return f"median {statistics.median(xs):.1f} ms, p95 {xs[int(0.95 * (len(xs) - 1))]:.1f} ms"
            print(f"GET /api/neighbours by id ({len(nb)} queries): {summary(nb)}")
            print(f"GET /api/neighbours by token string ({len(by_string)}): {summary(by_string)}")
            print(f"GET /api/token, {args.iters} iterations each ({len(tok)}): {summary(tok)}")
            print(f"GET /api/points: {pts_ms:.0f} ms for {len(pts) / 1e6:.2f} MB; GET /api/vocab: {voc_ms:.0f} ms "
                  f"for {len(voc) / 1e6:.2f} MB")
            chromium = shutil.which("chromium")
            if chromium and not args.no_browser:
                with tempfile.TemporaryDirectory() as profile:
                    t0 = time.perf_counter()
                    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking", "--no-first-run",
                                          f"--user-data-dir={profile}", "--window-size=1300,900",
                                          "--virtual-time-budget=30000", "--dump-dom",
                                          f"{base}/?token=tok17&iter={last}"],
                                         capture_output=True, text=True, timeout=300).stdout
                    wall = time.perf_counter() - t0
                ready = re.search(r'data-ready="(\d+)"', out)
                drawn = re.search(r'data-drawn="(\d+)"', out)
                print(f"page: first map drawn {ready.group(1) if ready else '?'} ms after the script started "
                      f"({drawn.group(1) if drawn else '?'} points drawn); chromium start to DOM dump "
                      f"{wall:.1f} s wall")
        finally:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
