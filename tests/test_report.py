"""`analysis-daemon report`: the HTML page from a real training run, its escaping, bad input, Chromium rendering."""
from __future__ import annotations

import base64
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from analysis_daemon.report.page import Results, build_report, load_results, main
from analysis_daemon.report.svg import esc, fmt, nice_ticks
from tests.conftest import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
RUN = "report-test"
V = 40
# Every token string is hostile: whatever the page shows of them must arrive escaped.
HOSTILE = [f'<script>alert({i})</script>&"t{i}' for i in range(V)]
WAIT_S = 90


def _child_env(tmp: Path) -> dict[str, str]:
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
               PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    return env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real short run: train.py on a bin dataset with hostile token strings, published to a real daemon."""
    tmp = tmp_path_factory.mktemp("report-run")
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20000), ("val", 4000)):
        rng.integers(0, V, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": V, "itos": HOSTILE}))
    env = _child_env(tmp)
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    daemon_help = subprocess.run([sys.executable, "-m", "analysis_daemon", "--help"], env=env, capture_output=True,
                                 text=True, timeout=WAIT_S).stdout
    probe = ["--probe", "3,5"] if "--probe" in daemon_help else []  # probes once the daemon has them
    out, err = open(tmp / "daemon.out", "w"), open(tmp / "daemon.err", "w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", str(tmp / "runs"),
         "--threads", "1", "--nice", "0", "--exit-on-end", "--no-wandb", *probe],
        stdout=out, stderr=err, env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + WAIT_S
        while "ready" not in (tmp / "daemon.out").read_text():
            assert daemon.poll() is None, (tmp / "daemon.err").read_text()
            assert time.monotonic() < deadline, "daemon not ready in time"
            time.sleep(0.05)
        train = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--dataset=bin", f"--data_dir={data}", "--max_iters=40",
             "--eval_interval=10", "--eval_iters=2", "--batch_size=8", f"--out_dir={tmp / 'out'}",
             f"--run_name={RUN}", "--wandb_log=False", f"--analysis_endpoint={endpoint}"],
            env=env, capture_output=True, text=True, timeout=WAIT_S, cwd=tmp)
        assert train.returncode == 0, train.stderr[-3000:]
        assert daemon.wait(WAIT_S) == 0, (tmp / "daemon.err").read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        out.close()
        err.close()
    return tmp / "runs" / RUN


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _svgs(page: str) -> list[ET.Element]:
    """Every inline SVG of the page, parsed as XML (fails on malformed markup)."""
    return [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", page, re.S)]


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def _png_pixels(png: bytes) -> list[list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB PNG written with filter 0 (what report_svg writes)."""
    w, h = _png_size(png)
    pos, idat = 8, b""
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = []
    for y in range(h):
        line = raw[y * (3 * w + 1):(y + 1) * (3 * w + 1)]
        assert line[0] == 0
        rows.append([tuple(line[1 + 3 * x:4 + 3 * x]) for x in range(w)])
    return rows


def _heatmap_png(page: str) -> bytes:
    heat = [s for s in _svgs(page) if s.get("class") == "heatmap"]
    assert len(heat) == 1
    image = heat[0].find("{http://www.w3.org/2000/svg}image")
    return base64.b64decode(image.get("href").split(",", 1)[1])


def test_report_from_a_real_run_shows_its_numbers(run_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "analysis_daemon", "report", str(run_dir)], capture_output=True,
                          text=True, timeout=WAIT_S, env=_child_env(run_dir))
    assert proc.returncode == 0, proc.stderr
    recs = _records(run_dir / "analysis.jsonl")
    iters = [r["iter"] for r in recs]
    assert iters == [0, 10, 20, 30, 40]
    assert proc.stdout == f"report: {run_dir / 'report.html'} (5 results, iterations 0 to 40)\n"
    page = (run_dir / "report.html").read_text()

    for section in ("summary", "alerts", "drift", "geometry", "insight", "tokens", "probes"):
        assert f'<section id="{section}">' in page
    assert f"<h1>Embedding report: {RUN}</h1>" in page
    assert ", ".join(map(str, iters)) in page
    last = recs[-1]
    assert ", ".join(f"{k} {v}" for k, v in last["counters"].items()) in page
    assert f"{last['shape'][0]} x {last['shape'][1]} float32" in page
    # Every plotted value is in the page as a point's tooltip.
    for r in recs[1:]:
        assert f"avg cosine, iter {r['iter']}: {r['drift']['average_cosine_similarity']:.4f}<" in page
        assert f"avg euclidean, iter {r['iter']}: {r['drift']['average_euclidean_distance']:.4f}<" in page
    for r in recs:
        g = r["geometry"]
        assert f"avg neighbours, iter {r['iter']}: {g['local_density']['average_neighborhood_size']:.3f}<" in page
        assert f"mean, iter {r['iter']}: {g['global_sparsity']['mean_similarity']:.4f}<" in page

    # The heatmap has one pixel column per result and one row per bin; empty bins are the pale background.
    pixels = _heatmap_png(page)
    counts = [r["geometry"]["global_sparsity"]["histogram_counts"] for r in recs]
    assert _png_size(pixels) == (len(recs), len(counts[0]))
    grid = _png_pixels(pixels)
    for col, c in enumerate(counts):
        for b, n in enumerate(c):
            assert (grid[len(c) - 1 - b][col] == (245, 245, 245)) == (n == 0), (col, b)
    assert len(_svgs(page)) >= 5  # 2 drift + 2 geometry charts + heatmap (+ insight charts when present)

    # The latest drift's token strings are shown, escaped; nothing executable gets through.
    assert "<script" not in page.lower()
    for s in last["drift"]["most_drifted_token_strings"][:20] + last["drift"]["least_drifted_token_strings"][:20]:
        assert esc(repr(s)) in page
    assert "&lt;script&gt;alert(" in page
    if any("insight" in r for r in recs):  # a daemon with the extra metrics
        for r in recs:
            assert f"effective rank, iter {r['iter']}: {r['insight']['effective_rank']:.2f}<" in page
    else:
        assert "No &#x27;insight&#x27; metrics in these results" in page


def _with_insight(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The real records plus the newer daemon's keys, with known values (probes name hostile strings)."""
    out = []
    for n, r in enumerate(recs):
        r = json.loads(json.dumps(r))
        r["insight"] = {
            "effective_rank": 30.0 - 2.5 * n,
            "isotropy": {"partition_ratio": 0.9 - 0.1 * n, "mean_unit_vector_norm": 0.05 * n},
            "row_norms": {"min": 0.5, "mean": 1.0 + n, "max": 2.0 + 2 * n, "histogram_counts": [1, 2],
                          "histogram_bins": [0, 1, 2]},
            "frozen_tokens": None if n == 0 else {"count": n, "token_ids": list(range(n))},
            "neighbourhood_drift": None if n == 0 else {"k": 10, "mean_overlap": 0.5 + 0.1 * n,
                                                        "most_changed_tokens": [[7, 0.1], [8, 0.2]]},
            "probes": [{"token_id": 3, "token": HOSTILE[3],
                        "neighbours": [[9 + n, HOSTILE[9 + n], 0.8 - 0.01 * n], [11, None, 0.5]]}],
        }
        r["alerts"] = [{"kind": "collapse", "message": f'rank <{n}> & "falling"', "metric": "effective_rank",
                        "value": 30.0 - 2.5 * n, "bound": 25.0}] if n >= 3 else []
        out.append(r)
    return out


def test_insight_alerts_and_probes_are_plotted_and_tabled(run_dir: Path, tmp_path: Path, capsys) -> None:
    recs = _with_insight(_records(run_dir / "analysis.jsonl"))
    path = tmp_path / "analysis.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main([str(path)]) == 0
    page = (tmp_path / "report.html").read_text()
    _svgs(page)
    for r in recs:
        ins = r["insight"]
        assert f"effective rank, iter {r['iter']}: {ins['effective_rank']:.2f}<" in page
        assert f"iter {r['iter']}: {ins['isotropy']['partition_ratio']:.4f}<" in page
        assert f"mean, iter {r['iter']}: {ins['row_norms']['mean']:.4f}<" in page
        if ins["frozen_tokens"]:
            assert f"frozen, iter {r['iter']}: {ins['frozen_tokens']['count']}<" in page
            assert f"mean overlap, iter {r['iter']}: {ins['neighbourhood_drift']['mean_overlap']:.4f}<" in page
    alerts = [(r["iter"], a) for r in recs for a in r["alerts"]]
    assert f"<h2>Alerts ({len(alerts)})</h2>" in page
    for it, a in alerts:
        assert f"<td>{it}</td><td class=\"alert\">collapse</td><td>{esc(a['message'])}</td>" in page
        assert f"alert at iter {it}: collapse" in page  # the red marker on the charts
    assert "Neighbourhoods that changed most (overlap of 10 neighbours)" in page
    # Probe: the latest neighbours (strings escaped, ids, cosines), and one evolution row per result.
    latest = recs[-1]["insight"]["probes"][0]
    assert f"Probe tokens: nearest neighbours at iter {recs[-1]['iter']}" in page
    for tid, s, cos in latest["neighbours"]:
        assert f"#{tid}</span></td><td>{cos:.4f}</td>" in page
        if s is not None:
            assert esc(repr(s)) in page
    for r in recs:
        assert f"<tr><td>{r['iter']}</td><td>" in page
    assert "<script" not in page.lower()


def test_many_alerts_are_listed_first_and_last(tmp_path: Path, capsys) -> None:
    from analysis_daemon.report.page import ALERT_ROWS, MAX_MARKERS

    n = MAX_MARKERS + 10
    path = tmp_path / "analysis.jsonl"
    path.write_text("".join(json.dumps({"run": "r", "iter": i, "drift": {"average_cosine_similarity": 0.5},
                                        "alerts": [{"kind": "drift_spike", "message": f"spike {i}"}]}) + "\n"
                            for i in range(n)))
    assert main([str(path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert f"<h2>Alerts ({n})</h2>" in page and f"... {n - ALERT_ROWS} more ..." in page
    shown = [i for i in range(n) if f"<td>spike {i}</td>" in page]
    assert shown == list(range(ALERT_ROWS // 2)) + list(range(n - ALERT_ROWS // 2, n))
    assert f"mark the first {MAX_MARKERS} of the {n} iterations with alerts" in page
    assert page.count('class="marker"') == MAX_MARKERS  # on the one chart with data


def test_malformed_and_partial_lines_are_skipped_and_counted(run_dir: Path, tmp_path: Path, capsys) -> None:
    lines = (run_dir / "analysis.jsonl").read_text().splitlines(keepends=True)
    bad = ["this is not json\n", "[1, 2, 3]\n", '{"iter": "ten"}\n']
    path = tmp_path / "analysis.jsonl"
    # a garbage line in the middle, and a last line cut short by a crash mid-write
    path.write_text("".join(lines[:2] + bad + lines[2:]) + lines[-1][: len(lines[-1]) // 2])
    assert main([str(path), "-o", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"({len(lines)} results, iterations 0 to 40, 4 malformed line(s) skipped)\n")
    page = (tmp_path / "r.html").read_text()
    last_line = len(lines) + len(bad) + 1
    assert ("4 malformed line(s) skipped: line 3: not valid JSON (partial or corrupted line); line 4: not a "
            f"JSON object; line 5: no integer &#x27;iter&#x27;; line {last_line}: not valid JSON") in page
    assert _png_size(_heatmap_png(page))[0] == len(lines)


def test_missing_keys_leave_notes_instead_of_plots(tmp_path: Path, capsys) -> None:
    path = tmp_path / "analysis.jsonl"
    path.write_text("".join(json.dumps({"run": "bare", "iter": i, "drift": None}) + "\n" for i in (0, 5)))
    assert main([str(path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert _svgs(page) == []
    for note in ("no drift in these results", "no neighbourhood sizes in these results",
                 "no mean similarity in these results", "Similarity histogram: no histogram in these results",
                 "No &#x27;insight&#x27; metrics", "No drift in these results, so no drifted tokens",
                 "No probe tokens in these results", "No alerts in these results"):
        assert note in page, note
    assert "0, 5" in page


def test_one_checkpoint_charts_show_the_value_not_a_trend(run_dir: Path, tmp_path: Path, capsys) -> None:
    first = (run_dir / "analysis.jsonl").read_text().splitlines()[1]  # one record that has drift and metrics
    record = json.loads(first)
    path = tmp_path / "analysis.jsonl"
    path.write_text(first + "\n")
    assert main([str(path), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    ns = "{http://www.w3.org/2000/svg}"
    charts = [svg for svg in _svgs(page) if svg.get("class") == "chart"]
    assert charts
    value = fmt(record["drift"]["average_cosine_similarity"], 4)
    drift_chart = next(c for c in charts if value in [t.text for t in c.iter(f"{ns}text")])
    for svg in charts:
        texts = [t.text or "" for t in svg.iter(f"{ns}text")]
        if any(t == "no data" for t in texts):
            continue
        assert "one analysed iteration: no trend yet" in texts
        assert not svg.findall(f"{ns}polyline")  # no line through one point
        # the iteration axis has one tick, the record's own iteration: no -1 or 1 invented around it
        ticks = [t for t in svg.iter(f"{ns}text") if t.get("text-anchor") == "middle" and (t.text or "").lstrip("-").isdigit()]
        assert [t.text for t in ticks] == [str(record["iter"])]
        values = [t.text for t in svg.iter(f"{ns}text") if t.get("class") == "value"]
        assert values and all(v == v.strip() for v in values)
    assert [t.get("class") for t in drift_chart.iter(f"{ns}text") if t.text == value] == ["value"]


def test_errors_are_one_line(tmp_path: Path, capsys) -> None:
    proc = subprocess.run([sys.executable, "-m", "analysis_daemon", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=WAIT_S, env=_child_env(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr == f"Error: {tmp_path / 'nope'} does not exist: pass a run directory (runs/<run>) " \
                          f"or its analysis.jsonl\n"
    (tmp_path / "empty").mkdir()
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    two = tmp_path / "two.jsonl"
    two.write_text('{"run": "a", "iter": 1}\n{"run": "b", "iter": 2}\n')
    cases = [([str(tmp_path / "empty")], f"{tmp_path / 'empty'} has no analysis.jsonl"),
             ([str(garbage)], "has no usable results (1 malformed line(s) skipped)"),
             ([str(two)], "holds several runs ('a', 'b'): choose one with --run NAME"),
             ([str(two), "--run", "c"], "has no records of run 'c' (runs: a, b)"),
             ([str(two), "--run", "a", "-o", str(tmp_path / "no" / "dir" / "r.html")], "cannot write")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and err.count("\n") == 1 and message in err, err
    assert main([str(two), "--run", "b", "-o", str(tmp_path / "b.html")]) == 0
    assert "other runs in the file left out: a" in (tmp_path / "b.html").read_text()


def test_help_is_reachable_from_the_daemon_command(capsys) -> None:
    from analysis_daemon.cli import build_parser
    from analysis_daemon.cli import main as cli_main

    assert "analysis-daemon report" in build_parser().format_help()
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "RESULTS" in out and "-o OUT.html" in out and "--run NAME" in out


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["drift", "geometry", "insight", "alerts", "skipped_iters",
                                                 "counters", "shape", "run", "seconds", "prev_iter", "metrics",
                                                 "token_stats", "galaxy"]), _json),
                min_size=1, max_size=4), st.integers(1, 3))
def test_any_json_shape_renders_without_error(fields: list[dict[str, Any]], runs: int) -> None:
    recs = [dict(f, iter=i) for i, f in enumerate(fields)]
    # one run, or the same records as several runs (the multi-run page)
    page = build_report([Results(path=Path(f"{k}.jsonl"), records=recs) for k in range(runs)])
    _svgs(page)
    assert page.endswith("</html>\n")


def test_hostile_metrics_galaxy_and_skips_are_bounded_and_escaped(tmp_path: Path, capsys) -> None:
    from analysis_daemon.report.page import MAX_METRIC_CHARTS, MAX_METRIC_NAMES
    from analysis_daemon.report.galaxy import MAX_POINTS
    from analysis_daemon.report.records import MAX_SKIP_MARKS

    evil = '<svg onload="alert(1)">'
    recs = []
    for i in range(3):
        recs.append({
            "run": evil, "iter": i * 1000, "drift": {"average_cosine_similarity": 0.9},
            "metrics": {f"{evil}{k}": float(k) for k in range(100)} | {"train/loss": "high", "val/loss": None},
            "skipped_iters": list(range(i * 1000 - 999, i * 1000)) * 20 + ["x", True],
            "galaxy": {"method": evil, "explained_variance": [0.5, "x"],
                       "points": [[t, t * 0.1, 1.0, t % 3] for t in range(MAX_POINTS + 50)] + [[1, 2], "p", None],
                       "clusters": [{"id": 0, "size": 5, "members": [[1, evil], ["y", 2], 7]}, {"id": "x"}, 3]},
        })
    path = tmp_path / "analysis.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main([str(path)]) == 0
    page = (tmp_path / "report.html").read_text()
    _svgs(page)
    assert evil not in page and "<script" not in page.lower()
    assert esc(evil) in page
    # at most MAX_METRIC_NAMES metric names read; the non-numeric losses leave no loss chart
    assert "Trainer loss" not in page
    assert page.count('aria-label="Trainer metric: ') == MAX_METRIC_CHARTS
    assert f"{MAX_METRIC_NAMES - MAX_METRIC_CHARTS} more metric(s) not plotted" in page
    # skipped-iteration marks are bounded per chart
    assert max(len(re.findall(r'class="skip"', s)) for s in re.findall(r"<svg\b.*?</svg>", page, re.S)) \
        == MAX_SKIP_MARKS
    assert f"{53 * 3} point(s) beyond {MAX_POINTS} per map not drawn" in page  # 50 good, 3 garbage
    big = [s for s in _svgs(page) if (s.get("aria-label") or "").startswith("Galaxy map at iter 2000")]
    assert len(big) == 1 and len(big[0].findall("{http://www.w3.org/2000/svg}circle")) == MAX_POINTS


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False), st.floats(allow_nan=False, allow_infinity=False))
@example(0.0, 5e-324)  # a subnormal range: once a math domain error
@example(-1e-320, 1e-320)
@example(1e308, 1.7976931348623157e308)
def test_axis_ticks_are_round_bounded_and_inside_the_range(a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    ticks = nice_ticks(lo, hi, 5)
    assert len(ticks) <= 18
    if hi > lo and math.isfinite(hi - lo) and (hi - lo) > abs(hi) * 1e-9:  # a range floats can subdivide
        slack = (hi - lo) * 1e-6
        assert len(ticks) >= 2 and all(lo - slack <= t <= hi + slack for t in ticks)
        steps = {round((y - x) / (ticks[1] - ticks[0]), 6) for x, y in zip(ticks, ticks[1:])}
        assert steps == {1.0}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def _idat_bytes(png: bytes) -> int:
    pos, total = 8, 0
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        total += n if kind == b"IDAT" else 0
        pos += 12 + n
    return total


@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian package `chromium`): "
                                                "apt-get install -y chromium")
def test_renders_in_headless_chromium(run_dir: Path, tmp_path: Path, capsys) -> None:
    chromium = _chromium()
    report = tmp_path / "report.html"
    assert main([str(run_dir), "-o", str(report)]) == 0
    page = report.read_text()
    dom = _headless(chromium, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The browser's DOM holds every chart and the heatmap's image: the page parsed as intended.
    assert dom.stdout.count("<svg") == page.count("<svg") >= 5
    assert dom.stdout.count("<polyline") == page.count("<polyline") > 0
    assert 'class="heatmap"' in dom.stdout and "data:image/png;base64," in dom.stdout

    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    shots = {}
    for name, html in (("report", report), ("blank", blank)):
        png = tmp_path / f"{name}.png"
        shot = _headless(chromium, f"--screenshot={png}", "--window-size=1200,2400", html.as_uri())
        assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
        shots[name] = png.read_bytes()
    assert _png_size(shots["report"]) == (1200, 2400)
    # A page of plots compresses far worse than an empty one of the same size.
    assert _idat_bytes(shots["report"]) > 10 * _idat_bytes(shots["blank"])
