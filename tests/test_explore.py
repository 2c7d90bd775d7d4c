"""`analysis-daemon explore`: per-token data from a real replay, the JSON API against a float64 reference,
hostile token strings, and the page in headless Chromium."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from analysis_daemon.cli import main as cli_main
from analysis_daemon.metrics.bins import HIST_BINS, HIST_RANGE
from analysis_daemon.metrics.geometry import _bin_map, _RowsAbove, geometry_neighbours_and_sizes
from analysis_daemon.metrics.token_map import token_coordinates
from tests.conftest import free_tcp_port
from tests.test_daemon import DaemonProc, publisher_for

pytest.importorskip("starlette", reason="the explorer's extra: pip install -e '.[explore]'")
pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parent.parent
V, D, GROUPS = 600, 16, 30
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'


def snapshots() -> dict[int, np.ndarray]:
    """Three snapshots of 30 planted groups of 20 tokens, each a rotated, slightly moved copy of the last."""
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(GROUPS, D, generator=gen, dtype=torch.float64) * 3
    w = centres.repeat_interleave(V // GROUPS, dim=0) + torch.randn(V, D, generator=gen, dtype=torch.float64)
    out = {}
    for step in (100, 200, 300):
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
        w = w @ q + 0.05 * step / 100 * torch.randn(V, D, generator=gen, dtype=torch.float64)
        out[step] = w.float().numpy()
    return out


def vocab() -> list[str]:
    words = [f"tok{i}" for i in range(V)]
    words[5], words[6], words[7] = "king", HOSTILE, "tab\there"
    return words


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, np.ndarray]]:
    """A real replay of the three snapshots (with a vocabulary) into a results directory."""
    tmp = tmp_path_factory.mktemp("explore")
    ckpts = tmp / "ckpts"
    ckpts.mkdir()
    snaps = snapshots()
    for step, w in snaps.items():
        np.save(ckpts / f"step{step}.npy", w)
    (ckpts / "vocab.txt").write_text("\n".join(vocab()) + "\n")
    old = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "WANDB_MODE")}
    os.environ.update(OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled")
    threads = torch.get_num_threads()
    try:
        code = cli_main(["replay", str(ckpts), "--run", "planted", "--results-dir", str(tmp / "runs"),
                         "--threads", "1", "--nice", "0", "--no-console"])
    finally:
        torch.set_num_threads(threads)
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        logger = logging.getLogger("embedding_monitor.daemon")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    assert code == 0
    return tmp / "runs", snaps


# Token ids the trainer feeds before each snapshot of the "tally" run (600 and -1 are out of range: the
# publisher counts them apart and never sends them).
FED = {100: [[5, 5, 5, 7, 599, 0]], 200: [[1, 2, 3, 5], [5, 9, 600, -1]], 300: []}


def expected_counts() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(tokens fed before each snapshot, running total) per iteration of the "tally" run, by bincount."""
    seen, total, running = {}, {}, np.zeros(V, dtype=np.int64)
    for it, batches in FED.items():
        ids = np.array([i for b in batches for i in b if 0 <= i < V], dtype=np.int64)
        seen[it] = np.bincount(ids, minlength=V)
        running = running + seen[it]
        total[it] = running
    return seen, total


@pytest.fixture(scope="module")
def tally(replayed) -> dict[int, np.ndarray]:
    """A real daemon (with --tensorboard) fed the same snapshots by a real publisher that counts known token
    ids between them (run "tally", beside the replayed run); returns its snapshots."""
    runs, snaps = replayed
    tmp = runs.parent
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", WANDB_DIR=str(tmp),
               OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    d = DaemonProc(tmp, env, endpoint, "--exit-on-end", "--no-wandb", "--no-console", "--galaxy-rows", "0",
                   "--tensorboard", str(tmp / "tb"), "--tensorboard-projector-keep", "3", tag="tally")
    try:
        pub = publisher_for(endpoint, "tally", vocab=vocab())  # the vocabulary gives count_tokens its rows
        for n, (it, batches) in enumerate(FED.items(), start=1):
            for batch in batches:
                pub.count_tokens(torch.tensor(batch))
            assert pub.publish(torch.from_numpy(snaps[it]), it)
            d.wait_results("tally", n)
        pub.close()
        assert d.wait_exit() == 0, d.log()
    finally:
        d.kill()
    assert d.results_dir == runs
    return snaps


@pytest.fixture(scope="module")
def old_run(replayed) -> Path:
    """The replayed run as an explorer of before the neighbourhood sizes and token counts wrote it:
    a copy without nbhd.npy / tokens_*.npy and without their meta.json keys (run "planted-old")."""
    runs, _ = replayed
    old = runs / "planted-old"
    shutil.copytree(runs / "planted", old)
    for it_dir in (old / "tokens").iterdir():
        if it_dir.is_dir():
            for name in ("nbhd.npy", "tokens_seen.npy", "tokens_total.npy"):
                (it_dir / name).unlink(missing_ok=True)
            meta = json.loads((it_dir / "meta.json").read_text())
            for key in ("threshold", "tokens_total_since"):
                meta.pop(key, None)
            (it_dir / "meta.json").write_text(json.dumps(meta))
    return old


@pytest.fixture(scope="module")
def server(replayed, tally, old_run) -> str:
    """A real `analysis-daemon explore` process on a free loopback port over the three runs; its base URL."""
    runs, _ = replayed
    port = free_tcp_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "analysis_daemon", "explore", str(runs), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"ready on http://127.0.0.1:{port}/" in line, (line, proc.stderr.read() if proc.poll() else "")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as res:
            body = res.read()
            kind = res.headers.get("Content-Type", "")
            return res.status, json.loads(body) if "json" in kind else (body, res.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def reference_neighbours(w: np.ndarray, token: int, k: int) -> tuple[list[int], np.ndarray]:
    """float64: the k rows of highest cosine with `token` (itself excluded), and the cosines."""
    unit = w.astype(np.float64) / np.linalg.norm(w.astype(np.float64), axis=1, keepdims=True)
    cos = unit @ unit[token]
    cos[token] = -np.inf
    order = np.argsort(-cos, kind="stable")[:k]
    return order.tolist(), cos[order]


def reference_drift(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """float64 per-token cosine after centring and the orthogonal Procrustes fit (DESIGN's definition)."""
    x = prev.astype(np.float64) - prev.mean(axis=0)
    y = cur.astype(np.float64) - cur.mean(axis=0)
    u, _, vt = np.linalg.svd(x.T @ y)
    xr = x @ (u @ vt)
    return (xr * y).sum(1) / (np.linalg.norm(xr, axis=1) * np.linalg.norm(y, axis=1))


def reference_sizes(w: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """float64: each row's count of other rows with cosine > threshold (-1 for non-finite or zero rows), and
    the smallest |cosine - threshold| over the pairs counted (how far the data keeps from the threshold)."""
    w = w.astype(np.float64)
    norms = np.linalg.norm(w, axis=1)
    valid = np.isfinite(w).all(axis=1) & (norms > 0)
    unit = w[valid] / norms[valid, None]
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    out = np.full(w.shape[0], -1, dtype=np.int64)
    out[valid] = (cos > threshold).sum(axis=1)
    np.fill_diagonal(cos, np.nan)
    return out, float(np.nanmin(np.abs(cos - threshold)))


def size_tolerance(d: int) -> float:
    """Bound on |cosine the pass compares - float64 cosine| of float32 input rows. The pass compares
    x = k*cos + c, a float32 dot product of d + 1 terms [k*u_i, c].[u_j, 1] whose absolute values add up
    to at most k + c (unit rows): error <= gamma_{d+1} (k + c) with gamma_n = n u / (1 - n u), u = 2^-24,
    plus k u for rounding k*u_i; normalising the rows in float32 moves each cosine by at most ~2 (d + 2) u."""
    u = 2.0 ** -24
    k, off = _bin_map(*HIST_RANGE, HIST_BINS)
    c = off - k * HIST_RANGE[0]
    gamma = (d + 1) * u / (1 - (d + 1) * u)
    return (gamma * (k + c) + k * u) / k + 2 * (d + 2) * u


@pytest.mark.parametrize("dense", [False, True], ids=["sparse-hits", "dense-sums"])
def test_neighbourhood_sizes_match_a_float64_reference(dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted clusters (30 groups of 20), a non-finite and a zero row; thresholds on a bin edge (0.7, the
    uint8 path) and off the edges; chunks that split the triangle unevenly; both ways of counting a block."""
    monkeypatch.setattr(_RowsAbove, "_DENSE", 2.0 if not dense else 0.0)  # never / always the dense sums
    w = snapshots()[300].copy()
    w[17] = np.nan
    w[333] = 0.0
    tol = size_tolerance(D)
    for threshold in (0.7, 0.6123, -0.3):
        expected, margin = reference_sizes(w, threshold)
        assert margin > tol, (threshold, margin, tol)  # no pair within rounding of the threshold: exact counts
        for chunk, knn_k in ((37, 3), (1000, 0)):  # 16 blocks of 37 rows and one of 8 (with neighbour lists,
            # whose block mask the sizes borrow); one block (the square alone)
            geo, _, sizes = geometry_neighbours_and_sizes(torch.from_numpy(w), threshold, chunk, knn_k=knn_k)
            assert sizes.dtype == torch.int32 and sizes.tolist() == expected.tolist(), (threshold, chunk)
            # ordered pairs: each pair counts once for each of its rows, so the sizes add up to the pair count
            assert int(sizes[sizes >= 0].sum()) == geo["local_density"]["neighbor_pairs"]
            assert geo["local_density"]["average_neighborhood_size"] == pytest.approx(expected[expected >= 0].mean())
        # sampled geometry: exact for the sampled rows (each meets every row), unknown for the others
        _, _, sampled = geometry_neighbours_and_sizes(torch.from_numpy(w), threshold, 64, knn_k=0, sample_rows=50,
                                                      seed=3)
        known = sampled >= 0
        assert int(known.sum()) == 50 and sampled[known].tolist() == expected[known.numpy()].tolist()


def test_token_data_is_written_whole_and_bounded(replayed) -> None:
    runs, _ = replayed
    tokens = runs / "planted" / "tokens"
    dirs = sorted(p.name for p in tokens.iterdir())
    assert dirs == ["000000000100", "000000000200", "000000000300", "vocab.json"]  # no temporary left
    meta = json.loads((tokens / "000000000300" / "meta.json").read_text())
    assert meta["rows"] == V and meta["k"] == 10 and meta["prev_iter"] == 200 and meta["threshold"] == 0.7
    # ids + cosines (V x k x 4 each), drift, norm, neighbourhood size (V x 4 each), xy (V x 8), the .npy headers
    assert V * (10 * 8 + 20) <= meta["bytes"] <= V * (10 * 8 + 20) + 6 * 128
    assert not (tokens / "000000000100" / "drift.npy").exists()  # the first snapshot has no drift
    assert not (tokens / "000000000300" / "tokens_seen.npy").exists()  # replay has no token counts
    assert meta["tokens_total_since"] is None
    assert json.loads((tokens / "vocab.json").read_text())[6] == HOSTILE


def test_keep_removes_the_oldest_iterations(tmp_path: Path) -> None:
    from analysis_daemon.pipeline import TokenArrays
    from analysis_daemon.sinks.token_data import TokenDataSink

    sink = TokenDataSink(tmp_path, keep=2)
    arrays = TokenArrays(knn_ids=None, knn_cos=None, drift=None, norm=torch.ones(4), xy=torch.zeros(4, 2))
    for it in (5, 10, 15):
        sink.handle_arrays({"run": "r", "iter": it, "shape": [4, 2]}, arrays)
    assert sorted(p.name for p in (tmp_path / "r" / "tokens").iterdir()) == ["000000000010", "000000000015"]


def test_api_matches_a_float64_reference(replayed, server: str) -> None:
    _, snaps = replayed
    assert get(f"{server}/api/runs") == (200, {"runs": ["planted", "planted-old", "tally"]})
    assert get(f"{server}/api/iters") == (200, {"run": "planted", "iters": [100, 200, 300]})
    for it in (100, 300):
        for token in (0, 5, 123, 599):
            status, body = get(f"{server}/api/neighbours?iter={it}&token={token}&k=10")
            assert status == 200 and body["iter"] == it and body["id"] == token
            ids, cos = reference_neighbours(snaps[it], token, 10)
            assert [n[0] for n in body["neighbours"]] == ids
            # float32 dot products of unit rows: |error| <= d * 2^-24 * a few
            np.testing.assert_allclose([n[2] for n in body["neighbours"]], cos, atol=1e-5)
            assert [n[1] for n in body["neighbours"]] == [vocab()[i] for i in ids]
    status, body = get(f"{server}/api/neighbours?iter=300&token=king&k=3")
    assert status == 200 and body["id"] == 5 and body["token"] == "king" and len(body["neighbours"]) == 3
    status, body = get(f"{server}/api/token?token=king")
    assert status == 200 and body["id"] == 5 and body["iters"] == [100, 200, 300]
    assert body["drift_cosine"][0] is None  # the first snapshot has no drift
    for i, it in enumerate((200, 300), start=1):
        expected = reference_drift(snaps[it - 100], snaps[it])[5]
        assert body["drift_cosine"][i] == pytest.approx(expected, abs=1e-4)
    assert body["norm"] == pytest.approx([float(np.linalg.norm(snaps[it][5].astype(np.float64))) for it in (100, 200, 300)],
                                         rel=1e-6)
    for token in (5, 6, 123, 599):
        status, body = get(f"{server}/api/token?token={token}")
        sizes = [reference_sizes(snaps[it], 0.7) for it in (100, 200, 300)]
        assert all(margin > size_tolerance(D) for _, margin in sizes)  # exact: no pair within rounding of 0.7
        assert status == 200 and body["neighbourhood_size"] == [int(s[token]) for s, _ in sizes]
        assert body["tokens_seen"] == body["tokens_total"] == body["tokens_total_since"] == [None] * 3  # not counted
    status, (raw, headers) = get(f"{server}/api/points?iter=200")
    assert status == 200 and headers["X-Rows"] == str(V) and len(raw) == 7 * V * 4
    x = np.frombuffer(raw, dtype="<f4")
    assert np.isfinite(x[: 2 * V]).all() and np.isnan(x[6 * V :]).all()  # no frequency: not counted
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")


def test_token_counts_from_a_real_publisher(tally, server: str, replayed) -> None:
    runs, _ = replayed
    seen, total = expected_counts()
    for it in FED:
        where = runs / "tally" / "tokens" / f"{it:012d}"
        assert np.load(where / "tokens_seen.npy").tolist() == seen[it].tolist()
        assert np.load(where / "tokens_total.npy").tolist() == total[it].tolist()
        assert json.loads((where / "meta.json").read_text())["tokens_total_since"] == 100
        sizes = np.load(where / "nbhd.npy")
        record = next(r for r in map(json.loads, (runs / "tally" / "analysis.jsonl").read_text().splitlines())
                      if r["iter"] == it)
        assert record["tokens_seen"] == int(seen[it].sum())
        assert int(sizes.sum()) == record["geometry"]["local_density"]["neighbor_pairs"]
        assert sizes.tolist() == reference_sizes(tally[it], 0.7)[0].tolist()
    status, body = get(f"{server}/api/token?run=tally&token=king")
    assert status == 200 and body["id"] == 5 and body["iters"] == [100, 200, 300]
    assert body["tokens_seen"] == [3, 2, 0] and body["tokens_total"] == [3, 5, 5]
    assert body["tokens_total_since"] == [100, 100, 100]
    status, (raw, _) = get(f"{server}/api/points?iter=300&run=tally")
    assert np.frombuffer(raw, dtype="<f4")[6 * V :].tolist() == total[300].astype(np.float32).tolist()
    # the TensorBoard projector's metadata: the running total as the frequency column
    for it in FED:
        rows = [line.split("\t") for line in
                (runs.parent / "tb" / "tally" / "projector~" / f"iter_{it:09d}" / "metadata.tsv").read_text().splitlines()]
        col = rows[0].index("frequency")
        assert [int(r[col]) for r in rows[1:]] == total[it].tolist()


def test_data_written_before_sizes_and_counts_is_still_served(old_run, server: str) -> None:
    status, body = get(f"{server}/api/token?run=planted-old&token=king")
    assert status == 200 and body["iters"] == [100, 200, 300] and body["norm"][0] is not None
    assert body["neighbourhood_size"] == body["tokens_seen"] == body["tokens_total"] == [None] * 3
    status, body = get(f"{server}/api/neighbours?run=planted-old&iter=300&token=king&k=3")
    assert status == 200 and len(body["neighbours"]) == 3
    status, (raw, _) = get(f"{server}/api/points?iter=300&run=planted-old")
    assert status == 200 and len(raw) == 7 * V * 4


@pytest.mark.parametrize("query, status, message", [
    ("/api/neighbours?iter=300&token=no-such-token", 404, "no token 'no-such-token'"),
    ("/api/neighbours?iter=301&token=5", 404, "iteration 301 has no token data"),
    ("/api/neighbours?iter=abc&token=5", 400, "?iter= must be an integer"),
    ("/api/neighbours?iter=300&token=5&k=0", 400, "?k= must be in [1, 100]"),
    ("/api/neighbours?iter=300&token=600", 404, "out of range"),
    ("/api/token?token=5&run=../../etc", 404, "no run '../../etc'"),
    ("/api/token", 400, "missing ?token="),
])
def test_bad_requests_are_one_line_json_errors(server: str, query: str, status: int, message: str) -> None:
    code, body = get(server + query)
    assert code == status and message in body["error"] and "\n" not in body["error"]


def test_nothing_outside_the_package_and_results_can_be_read(server: str) -> None:
    for path in ("/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/cli.py", "/static/..%2f..%2fcli.py",
                 "/etc/passwd", "/api/../../etc/passwd"):
        try:
            with urllib.request.urlopen(server + path, timeout=10) as res:
                body = res.read()
        except urllib.error.HTTPError as exc:
            assert exc.code in (400, 404), path
            continue
        assert b"root:" not in body and b"def main" not in body, path


def test_map_coordinates_do_not_spin_or_flip_between_iterations() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2000, 32, generator=gen) * torch.linspace(3, 0.5, 32)  # two clear leading axes
    first = token_coordinates(w)
    for seed in range(4):  # any orthogonal transform (reflections too) plus a translation
        q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(seed)))
        again = token_coordinates(w @ q + 5.0, previous=first)
        assert torch.allclose(again, first, atol=1e-3 * float(first.abs().max()))
    w[3, 0] = float("nan")
    xy = token_coordinates(w, previous=first)
    assert torch.isnan(xy[3]).all() and torch.isfinite(xy[torch.arange(2000) != 3]).all()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                               *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian package `chromium`)")
def test_the_page_in_headless_chromium(replayed, server: str, tmp_path: Path) -> None:
    _, snaps = replayed
    url = f"{server}/?token={6}&iter=200"  # the hostile token, by id
    dom = _headless("--window-size=1300,900", "--dump-dom", url).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="' in body and 'data-ready="error"' not in body, dom[:2000]
    assert 'data-token="6"' in body and "pwned" not in body
    assert f'data-drawn="{V}"' in body  # every token is on the map at the fitted view
    ids, _ = reference_neighbours(snaps[200], 6, 10)
    shown = [int(i) for i in re.findall(r'<li data-id="(\d+)"', dom)]
    assert shown == ids
    # the hostile string is text in the title, never an element
    assert "&lt;img src=x" in dom and "<img src=x" not in dom
    # the three small charts: drift (two iterations have one), norm and neighbourhood size (three each)
    for chart, points in (("chart-drift", 2), ("chart-norm", 3), ("chart-nbhd", 3)):
        assert re.search(rf'<canvas id="{chart}"[^>]*data-points="{points}"', dom), chart
    png = tmp_path / "explore.png"
    _headless("--window-size=1300,900", f"--screenshot={png}", url)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn map, not a blank page


@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian package `chromium`)")
def test_the_page_colours_by_frequency_in_headless_chromium(tally, old_run, server: str) -> None:
    _, total = expected_counts()
    dom = _headless("--window-size=1300,900", "--dump-dom", f"{server}/?run=tally&token=king&iter=300&colour=frequency").stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="' in body and 'data-ready="error"' not in body, dom[:2000]
    assert 'data-colour="frequency"' in body and f'data-drawn="{V}"' in body
    assert f'data-unseen="{int((total[300] == 0).sum())}"' in body  # every never-seen token drawn apart
    assert "tokens fed in total, log scale" in dom and "tokens seen: 5 in total since iteration 100" in dom
    assert re.search(r'<canvas id="chart-nbhd"[^>]*data-points="3"', dom)
    # data written before the sizes existed: the chart says so instead of drawing
    dom = _headless("--window-size=1300,900", "--dump-dom", f"{server}/?run=planted-old&token=king&iter=300").stdout
    assert re.search(r'<canvas id="chart-nbhd"[^>]*data-points="0"', dom) and 'data-token="5"' in dom
