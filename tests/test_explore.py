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
from analysis_daemon.metrics.token_map import token_coordinates
from tests.conftest import free_tcp_port

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


@pytest.fixture(scope="module")
def server(replayed) -> str:
    """A real `analysis-daemon explore` process on a free loopback port; its base URL."""
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


def test_token_data_is_written_whole_and_bounded(replayed) -> None:
    runs, _ = replayed
    tokens = runs / "planted" / "tokens"
    dirs = sorted(p.name for p in tokens.iterdir())
    assert dirs == ["000000000100", "000000000200", "000000000300", "vocab.json"]  # no temporary left
    meta = json.loads((tokens / "000000000300" / "meta.json").read_text())
    assert meta["rows"] == V and meta["k"] == 10 and meta["prev_iter"] == 200
    # ids + cosines (V x k x 4 each), drift, norm (V x 4 each), xy (V x 8), plus the .npy headers
    assert V * (10 * 8 + 16) <= meta["bytes"] <= V * (10 * 8 + 16) + 5 * 128
    assert not (tokens / "000000000100" / "drift.npy").exists()  # the first snapshot has no drift
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
    assert get(f"{server}/api/runs") == (200, {"runs": ["planted"]})
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
    status, (raw, headers) = get(f"{server}/api/points?iter=200")
    assert status == 200 and headers["X-Rows"] == str(V) and len(raw) == 6 * V * 4
    x = np.frombuffer(raw, dtype="<f4")
    assert np.isfinite(x[: 2 * V]).all()
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")


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
    png = tmp_path / "explore.png"
    _headless("--window-size=1300,900", f"--screenshot={png}", url)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn map, not a blank page
