"""`analysis-daemon report RUN_DIR RUN_DIR`: two real runs on shared axes, gaps, token histories, galaxy map."""
from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from analysis_daemon.report.page import main
from analysis_daemon.report.svg import PALETTE
from tests.conftest import free_tcp_port
from analysis_daemon.report.svg import esc, fmt
from tests.test_report import _chromium, _headless, _png_pixels, _png_size

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 120
RATES = {"lr-3e-3": "3e-3", "lr-3e-4": "3e-4"}
SVG = "{http://www.w3.org/2000/svg}"


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
                PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real short runs of train.py (planted-group corpus, two learning rates), each to its own real daemon."""
    tmp = tmp_path_factory.mktemp("compare")
    env = _env(tmp)
    procs = []
    try:
        for run in RATES:
            endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
            out = open(tmp / f"{run}.daemon.out", "w")
            err = open(tmp / f"{run}.daemon.err", "w")
            procs.append((run, endpoint, out, err, subprocess.Popen(
                [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", str(tmp / "runs"),
                 "--threads", "1", "--nice", "0", "--exit-on-end", "--no-wandb", "--probe", "10,11"],
                stdout=out, stderr=err, env=env, cwd=tmp)))
        deadline = time.monotonic() + WAIT_S
        for run, _, _, _, daemon in procs:
            while "ready" not in (tmp / f"{run}.daemon.out").read_text():
                assert daemon.poll() is None, (tmp / f"{run}.daemon.err").read_text()
                assert time.monotonic() < deadline, "daemon not ready in time"
                time.sleep(0.05)
        trainers = [subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--dataset=synthetic", "--max_iters=120", "--eval_interval=10",
             "--eval_iters=2", "--batch_size=8", f"--learning_rate={RATES[run]}", f"--out_dir={tmp / run}",
             f"--run_name={run}", "--wandb_log=False", f"--analysis_endpoint={endpoint}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
            for run, endpoint, _, _, _ in procs]
        for t in trainers:
            _, stderr = t.communicate(timeout=WAIT_S)
            assert t.returncode == 0, stderr[-3000:]
        for run, _, _, _, daemon in procs:
            assert daemon.wait(WAIT_S) == 0, (tmp / f"{run}.daemon.err").read_text()[-3000:]
    finally:
        for _, _, out, err, daemon in procs:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)
            out.close()
            err.close()
    return {run: tmp / "runs" / run for run in RATES}


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _png_pixels_any(png: bytes) -> np.ndarray:
    """(h, w, 3) RGB pixels of an 8-bit RGB/RGBA PNG with any row filters (what Chromium writes)."""
    w, h = _png_size(png)
    pos, idat, ctype = 8, b"", None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IHDR":
            ctype = png[pos + 17]
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    bpp = {2: 3, 6: 4}[ctype]
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.uint8)
    for y in range(h):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: a running sum per channel
            cur = (np.cumsum(line.reshape(w, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = line + prev
        else:  # Average and Paeth depend on the pixel to the left: byte by byte
            cur_b, up = bytearray(line.tobytes()), prev.tobytes()
            for i in range(w * bpp):
                a = cur_b[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    cur_b[i] = (cur_b[i] + (a + b) // 2) & 255
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur_b[i] = (cur_b[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(cur_b), dtype=np.uint8)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)[:, :, :3]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "analysis.jsonl").read_text().splitlines()]


def _page(out: Path) -> str:
    page = out.read_text()
    assert "<script" not in page.lower()
    return page


def _svgs(page: str) -> list[ET.Element]:
    """Every inline SVG, parsed as XML (fails on malformed markup)."""
    return [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", page, re.S)]


def _titled(svg: ET.Element, tag: str) -> dict[str, ET.Element]:
    """Elements of one kind in an SVG by their tooltip text."""
    return {el.find(f"{SVG}title").text: el for el in svg.iter(f"{SVG}{tag}") if el.find(f"{SVG}title") is not None}


def _chart(page: str, title: str) -> ET.Element:
    found = [s for s in _svgs(page) if s.get("aria-label") == title]
    assert len(found) == 1, (title, len(found))
    return found[0]


def _point(svg: ET.Element, prefix: str) -> tuple[float, float]:
    """cx, cy of the one point whose tooltip starts with prefix."""
    hits = [el for tip, el in _titled(svg, "circle").items() if tip.startswith(prefix)]
    assert len(hits) == 1, (prefix, len(hits))
    return float(hits[0].get("cx")), float(hits[0].get("cy"))


def _copy_run(src: Path, dst: Path, edit: Any = None) -> Path:
    """A copy of a real run directory, its records passed through edit(list) -> list."""
    recs = _records(src)
    if edit is not None:
        recs = edit(recs)
    dst.mkdir(parents=True)
    (dst / "analysis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst


def test_two_real_runs_share_axes_one_colour_per_run(two_runs: dict[str, Path]) -> None:
    dirs = list(two_runs.values())
    proc = subprocess.run([sys.executable, "-m", "analysis_daemon", "report", *map(str, dirs)], capture_output=True,
                          text=True, timeout=WAIT_S, env=_env(dirs[0]))
    assert proc.returncode == 0, proc.stderr
    out = dirs[0].parent / "compare.html"  # beside the run directories
    recs = {run: _records(d) for run, d in two_runs.items()}
    assert proc.stdout == (f"report: {out} (2 runs compared)\n" + "".join(
        f"  {run}: {len(r)} results, iterations 0 to {r[-1]['iter']}\n" for run, r in recs.items()))
    page = _page(out)
    assert "<h1>Embedding runs compared: lr-3e-3, lr-3e-4</h1>" in page
    for colour, run in zip(PALETTE, RATES):
        assert f'<span class="swatch" style="background:{colour}"></span>{run}' in page
        assert f"<tr><th>Run</th><td>{run}</td></tr>" in page  # a summary table per run
    cos = _chart(page, "Drift: average cosine similarity (1 = no movement)")
    nb = _chart(page, "Average neighbourhood size (cosine > 0.70)")
    for (run, rs), colour in zip(recs.items(), PALETTE):
        # every point of every run is on the chart, in the run's colour, with its exact value
        for r in rs[1:]:
            tip = f"{run}: avg cosine, iter {r['iter']}: {r['drift']['average_cosine_similarity']:.4f}"
            assert _titled(cos, "circle")[tip].get("fill") == colour
        for r in rs:
            tip = f"{run}: avg neighbours, iter {r['iter']}: " \
                  f"{r['geometry']['local_density']['average_neighborhood_size']:.3f}"
            assert _titled(nb, "circle")[tip].get("fill") == colour
        # one unbroken line, unless the daemon skipped snapshots (a loaded machine): then it breaks there
        skipped = {i for r in rs for i in r["skipped_iters"]}
        drift_iters = [r["iter"] for r in rs[1:]]
        breaks = sum(1 for a, b in zip(drift_iters, drift_iters[1:]) if any(a < i < b for i in skipped))
        lines = [p for p in cos.iter(f"{SVG}polyline") if p.get("stroke") == colour]
        assert len(lines) == 1 + breaks
    # Shared axes: the same iteration sits at the same x on every chart and for both runs.
    both = sorted(set.intersection(*({r["iter"] for r in rs[1:]} for rs in recs.values())))
    xs = {_point(c, f"{run}: {label}, iter {both[-1]}:")[0] for c, label in ((cos, "avg cosine"),
                                                                             (nb, "avg neighbours"))
          for run in RATES}
    assert len(xs) == 1
    # The trainer's losses (train.py passes them with each snapshot) on the same axis, one colour per run.
    loss = _chart(page, "Trainer loss")
    lr = _titled(_chart(page, "Trainer metric: train/learning_rate"), "circle")
    for (run, rs), colour in zip(recs.items(), PALETTE):
        for r in rs:
            for name in ("train/loss", "eval/loss"):
                assert _titled(loss, "circle")[f"{run}: {name}, iter {r['iter']}: {r['metrics'][name]:.4f}"] \
                    .get("fill") == colour
            assert f"{run}: train/learning_rate, iter {r['iter']}: {fmt(r['metrics']['train/learning_rate'])}" in lr
        assert _point(loss, f"{run}: train/loss, iter {rs[-1]['iter']}:")[0] == _point(
            cos, f"{run}: avg cosine, iter {rs[-1]['iter']}:")[0]
    # What the comparison is for: the faster learning rate moves the embedding more (lower mean drift
    # cosine) and forms galaxies (neighbourhoods) within 120 steps, the slower one hardly any yet.
    fast, slow = recs["lr-3e-3"], recs["lr-3e-4"]

    def mean_cos(rs: list[dict[str, Any]]) -> float:
        return sum(r["drift"]["average_cosine_similarity"] for r in rs[1:]) / (len(rs) - 1)

    assert mean_cos(fast) < mean_cos(slow)
    last = [rs[-1]["geometry"]["local_density"]["average_neighborhood_size"] for rs in (fast, slow)]
    assert last[0] > last[1]
    assert _point(nb, f"lr-3e-3: avg neighbours, iter {fast[-1]['iter']}:")[1] \
        < _point(nb, f"lr-3e-4: avg neighbours, iter {slow[-1]['iter']}:")[1]  # higher on the page
    assert sum(1 for s in _svgs(page) if s.get("class") == "heatmap") == 2  # one per run

    # The daemon's galaxy maps: up to 8 small multiples per run, and the latest map with a tooltip per token.
    from analysis_daemon.report.galaxy import SNAPSHOTS
    scatters = [s for s in _svgs(page) if s.get("class") == "scatter"]
    assert len(scatters) == sum(min(SNAPSHOTS, len(rs)) + 1 for rs in recs.values())
    for run, rs in recs.items():
        g = rs[-1]["galaxy"]
        hover = _titled(_chart(page, f"{run}: Galaxy map at iter {rs[-1]['iter']} (hover a point for its token)"),
                        "circle")
        assert len(hover) == len(g["points"]) == g["rows"]
        alone = sum(1 for p in g["points"] if p[3] == -1)
        assert sum(1 for tip in hover if tip.endswith(": alone (no neighbour above the threshold)")) == alone
        for c in g["clusters"]:
            for tid, string in c["members"]:
                assert f"{string!r} #{tid}: cluster {c['id']} ({c['size']} tokens)" in hover
        assert f"Clusters at iter {rs[-1]['iter']}: {g['cluster_count']} (largest first" in page


def test_numeric_axis_gaps_and_skipped_iterations(two_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    # iteration 30 missing (a daemon down for a while), iteration 45 skipped by the daemon (received, not analysed)
    def edit(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # real values at iterations 0, 10, ..., 60 whatever the daemon skipped on a loaded machine
        recs = [dict(recs[k % len(recs)], iter=10 * k, skipped_iters=[]) for k in range(7)]
        recs = [r for r in recs if r["iter"] != 30]
        next(r for r in recs if r["iter"] == 50)["skipped_iters"] = [45]
        return recs

    run = _copy_run(two_runs["lr-3e-3"], tmp_path / "lr-3e-3", edit)
    assert main([str(run)]) == 0
    page = _page(run / "report.html")
    recs = _records(run)
    cos = _chart(page, "Drift: average cosine similarity (1 = no movement)")
    x = {r["iter"]: _point(cos, f"avg cosine, iter {r['iter']}:")[0] for r in recs[1:]}
    # a numeric axis: 20 -> 40 is twice as wide as 40 -> 50 and 50 -> 60
    assert x[40] - x[20] == pytest.approx(2 * (x[50] - x[40]), abs=0.2)
    assert x[60] - x[50] == pytest.approx(x[50] - x[40], abs=0.2)
    # the line breaks at the missing and at the skipped iteration: 10-20, 40 alone, 50-60
    segments = [len(p.get("points").split()) for p in cos.iter(f"{SVG}polyline")]
    assert segments == [2, 1, 2], segments
    gaps = _titled(cos, "rect")
    assert "no results between iter 20 and iter 40" in gaps
    assert "iterations 40 to 50: 1 skipped, not analysed (45)" in gaps
    assert "iter 45 skipped (received, not analysed)" in _titled(cos, "path")
    assert "Gaps</th><td>1 interval(s) much longer than the usual 10 iterations" in page
    assert "<th>Skipped iterations</th><td>45 (marked with a triangle on every chart)" in page
    # the heatmap places each result at its iteration: 7 slots for 0..60, slot 30 empty (white)
    heat = next(s for s in _svgs(page) if s.get("class") == "heatmap")
    png = base64.b64decode(heat.find(f"{SVG}image").get("href").split(",", 1)[1])
    grid = _png_pixels(png)
    assert len(grid[0]) == 7
    assert all(row[3] == (255, 255, 255) for row in grid)
    assert all(any(row[k] != (255, 255, 255) for row in grid) for k in (0, 1, 2, 4, 5, 6))
    assert "iter 40" in _titled(heat, "rect") and "iter 30" not in _titled(heat, "rect")


def test_token_histories_follow_the_drifted_tokens_and_probes(two_runs: dict[str, Path], tmp_path: Path,
                                                             capsys) -> None:
    from analysis_daemon.report.history import LAST_TOKENS

    run = two_runs["lr-3e-3"]
    assert main([str(run), "-o", str(tmp_path / "r.html")]) == 0
    page = _page(tmp_path / "r.html")
    recs = [r for r in _records(run) if r["drift"]]
    last = recs[-1]["drift"]
    chart = _chart(page, "Most drifted tokens: drift cosine (1 = did not move)")
    points = _titled(chart, "circle")
    legend = [t.text for t in chart.iter(f"{SVG}text")]
    for tid, s in zip([p[0] for p in last["most_drifted_tokens"][:LAST_TOKENS]],
                      last["most_drifted_token_strings"][:LAST_TOKENS]):
        label = f"{s!r} #{tid}"
        assert label in legend
        for r in recs:  # a point wherever a result listed the token, with the listed cosine; none elsewhere
            listed = {t: c for t, c in r["drift"]["least_drifted_tokens"] + r["drift"]["most_drifted_tokens"]}
            tips = [tip for tip in points if tip.startswith(f"{label}, iter {r['iter']}: ")]
            assert tips == ([f"{label}, iter {r['iter']}: {listed[tid]:.4f}"] if tid in listed else [])
    least = _titled(_chart(page, "Least drifted tokens: drift cosine"), "circle")
    tid, cos = recs[-1]["drift"]["least_drifted_tokens"][0]
    assert f"{recs[-1]['drift']['least_drifted_token_strings'][0]!r} #{tid}, iter {recs[-1]['iter']}: {cos:.4f}" \
        in least
    # every probe (the daemon ran with --probe 10,11): its nearest neighbour's cosine at every result
    near = _titled(_chart(page, "Probe tokens: cosine of the nearest neighbour"), "circle")
    for r in _records(run):
        for p in r["insight"]["probes"]:
            assert f"{p['token']!r} #{p['token_id']}, iter {r['iter']}: {p['neighbours'][0][2]:.4f}" in near
    assert len(near) == 2 * len(_records(run))
    kept = _titled(_chart(page, "Probe tokens: neighbours kept from the previous result"), "circle")
    a, b = _records(run)[-2:]
    for pa, pb in zip(a["insight"]["probes"], b["insight"]["probes"]):
        share = len({n[0] for n in pa["neighbours"]} & {n[0] for n in pb["neighbours"]}) / len(pb["neighbours"])
        assert f"{pb['token']!r} #{pb['token_id']}, iter {b['iter']}: {share:.4f}" in kept
    # norm and neighbourhood size of the followed tokens (the records' token_stats) at every result
    thr = _records(run)[-1]["token_stats"]["threshold"]
    norms = _titled(_chart(page, "Followed tokens: row norm"), "circle")
    sizes = _titled(_chart(page, f"Followed tokens: neighbourhood size (cosine > {thr:.2f})"), "circle")
    strings = {p["token_id"]: p["token"] for p in _records(run)[-1]["insight"]["probes"]}
    shown = [*strings, last["most_drifted_tokens"][0][0], last["least_drifted_tokens"][0][0]]
    strings[shown[2]], strings[shown[3]] = last["most_drifted_token_strings"][0], last["least_drifted_token_strings"][0]
    for r in _records(run):
        stats = {t: (n, c) for t, n, c in r["token_stats"]["tokens"]}
        assert {10, 11} <= set(stats)  # the probes: every result
        for tid in shown:
            tips = [tip for tip in norms if tip.startswith(f"{strings[tid]!r} #{tid}, iter {r['iter']}: ")]
            assert tips == ([f"{strings[tid]!r} #{tid}, iter {r['iter']}: {stats[tid][0]:.4f}"] if tid in stats else [])
            if tid in stats:
                assert f"{strings[tid]!r} #{tid}, iter {r['iter']}: {stats[tid][1]:.4f}" in sizes
    assert len(norms) == len(sizes) and len(norms) >= 2 * len(_records(run))
    assert "are not in the results" not in page

    def hostile(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:  # malformed entries: skipped and counted
        recs[-1]["token_stats"]["tokens"] += [[10, "x", 3], ["10", 1.0, 3], [10, 1.0, -2], [10, 1.0, 2.5], [10], 7,
                                              [True, 1.0, 1]]
        recs[-2]["token_stats"] = {"threshold": "<b>", "tokens": {"a": 1}}
        return recs

    bad = _copy_run(run, tmp_path / "hostile", hostile)
    assert main([str(bad), "-o", str(tmp_path / "h.html")]) == 0
    page = _page(tmp_path / "h.html")
    assert "Token norms and neighbourhood sizes: 7 malformed token_stats entries skipped." in page
    tips = _titled(_chart(page, "Followed tokens: row norm"), "circle")
    gone = [tip for tip in norms if f", iter {_records(run)[-2]['iter']}: " in tip]
    assert gone and len(tips) == len(norms) - len(gone)  # the second-to-last result has no points now
    assert not any(f", iter {_records(run)[-2]['iter']}: " in tip for tip in tips)


HOSTILE_MEMBER = '<img src=x onerror="alert(1)">'


def _with_metrics_and_galaxy(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real records plus `metrics` and `galaxy` as the daemon writes them (known values, planted groups)."""
    vocab = {t: s for r in recs if r["drift"] for which in ("most", "least")
             for (t, _), s in zip(r["drift"][f"{which}_drifted_tokens"], r["drift"][f"{which}_drifted_token_strings"])}
    groups = sorted({s.split("_")[0] for s in vocab.values() if "_" in s})
    out = []
    for n, r in enumerate(recs):
        r = json.loads(json.dumps(r))
        r["metrics"] = {"train/loss": 4.0 - 0.3 * n, "eval/loss": 4.1 - 0.25 * n, "lr": 1e-3 * (n + 1),
                        "<b>acc</b>": 0.1 * n}
        points, members = [], {}
        for tid in sorted(vocab):
            s = vocab[tid]
            g = groups.index(s.split("_")[0]) if "_" in s else -1
            angle = 2 * math.pi * g / max(len(groups), 1)
            spread = 0.5 / (n + 1) * ((tid * 7919) % 13 - 6) / 6
            x, y = (math.cos(angle) + spread, math.sin(angle) - spread) if g >= 0 else (spread, -spread)
            cluster = g if g >= 0 and n >= 2 else -1
            points.append([tid, x, y, cluster])
            if cluster >= 0:
                members.setdefault(cluster, []).append([tid, HOSTILE_MEMBER if tid == sorted(vocab)[20] else s])
        points += [["x", 1.0, 2.0, 0], [5, 1.0]]  # malformed: skipped and counted
        r["galaxy"] = {"method": "pca", "rows": len(vocab), "seed": 0, "explained_variance": [0.31, 0.22],
                       "points": points, "clusters": [{"id": c, "size": len(m), "members": m}
                                                      for c, m in sorted(members.items())]}
        out.append(r)
    return out


def test_loss_beside_drift_and_the_galaxy_map(two_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from analysis_daemon.report.galaxy import SINGLETON, SNAPSHOTS

    dirs = [_copy_run(d, tmp_path / run, _with_metrics_and_galaxy) for run, d in two_runs.items()]
    out = tmp_path / "both.html"
    assert main([*map(str, dirs), "-o", str(out)]) == 0
    page = _page(out)
    loss = _titled(_chart(page, "Trainer loss"), "circle")
    for d in dirs:
        for r in _records(d):
            for name in ("train/loss", "eval/loss"):
                assert f"{d.name}: {name}, iter {r['iter']}: {r['metrics'][name]:.4f}" in loss
        # loss, drift and neighbourhood size line up: one x per iteration across the three
        it = _records(d)[-1]["iter"]
        assert len({_point(_chart(page, t), f"{d.name}: {label}, iter {it}:")[0] for t, label in (
            ("Trainer loss", "train/loss"), ("Drift: average cosine similarity (1 = no movement)", "avg cosine"),
            ("Average neighbourhood size (cosine > 0.70)", "avg neighbours"))}) == 1
    assert "Trainer metric: lr" in page and "Trainer metric: &lt;b&gt;acc&lt;/b&gt;" in page
    assert "<b>acc" not in page

    recs = _records(dirs[0])
    scatters = [s for s in _svgs(page) if s.get("class") == "scatter"]
    # per run: small multiples (a map per result here) and the latest map
    assert len(scatters) == sum(min(SNAPSHOTS, len(_records(d))) + 1 for d in dirs)
    assert f"iter {recs[0]['iter']}: 0 clusters" in page
    last = recs[-1]["galaxy"]
    n_clusters = len(last["clusters"])
    assert f"iter {recs[-1]['iter']}: {n_clusters} clusters" in page
    big = _chart(page, f"{dirs[0].name}: Galaxy map at iter {recs[-1]['iter']} (hover a point for its token)")
    hover = _titled(big, "circle")
    assert len(hover) == len(last["points"]) - 2  # every valid point has its tooltip
    sizes = {c["id"]: c["size"] for c in last["clusters"]}
    strings = {t: s for c in last["clusters"] for t, s in c["members"]}
    colour_of_cluster: dict[int, str] = {}
    for tid, _, _, cluster in last["points"][:-2]:
        if cluster == -1:
            tip = next(t for t in hover if t.startswith("#" + str(tid) + ":") or f"#{tid}: alone" in t)
            assert tip.endswith("alone (no neighbour above the threshold)") and hover[tip].get("fill") == SINGLETON
            continue
        tip = f"{strings[tid]!r} #{tid}: cluster {cluster} ({sizes[cluster]} tokens)"
        assert tip in hover, tip
        colour_of_cluster.setdefault(cluster, hover[tip].get("fill"))
        assert hover[tip].get("fill") == colour_of_cluster[cluster]  # a colour per cluster
    assert len(set(colour_of_cluster.values())) == n_clusters  # distinct (fewer clusters than hues)
    # small multiples: coloured by the cluster at that snapshot, in the colours of the latest map
    first = next(s for s in scatters if s.get("aria-label") == f"iter {recs[0]['iter']}: 0 clusters")  # run 1
    assert {c.get("fill") for c in first.iter(f"{SVG}circle")} == {SINGLETON}
    final = next(s for s in scatters if s.get("aria-label") == f"iter {recs[-1]['iter']}: {n_clusters} clusters")
    assert {c.get("fill") for c in final.iter(f"{SVG}circle")} == {c.get("fill") for c in hover.values()}
    # token histories: the probes' cluster sizes in every map (1 = alone)
    sizes_chart = [s for s in _svgs(page)
                   if s.get("aria-label") == "Followed tokens: size of their cluster in the galaxy map"]
    assert len(sizes_chart) == 2  # one per run
    assert sum(s.get("aria-label") == "Followed tokens: row norm" for s in _svgs(page)) == 2
    tips = _titled(sizes_chart[0], "circle")
    for r in recs:
        pts = [p for p in r["galaxy"]["points"] if len(p) == 4 and isinstance(p[0], int)]
        for probe in r["insight"]["probes"]:
            c = next(p[3] for p in pts if p[0] == probe["token_id"])
            size = 1 if c == -1 else sum(1 for p in pts if p[3] == c)
            assert f"{probe['token']!r} #{probe['token_id']}, iter {r['iter']}: {size:.4f}" in tips
    assert "PC1 (31.0% of variance)" in page
    assert f"Clusters at iter {recs[-1]['iter']}: {n_clusters} (largest first)" in page
    assert esc(repr(HOSTILE_MEMBER)) in page and HOSTILE_MEMBER not in page
    assert f"{2 * min(len(recs), SNAPSHOTS)} malformed point(s) skipped in the maps shown" in page


def test_multi_run_page_renders_in_headless_chromium(two_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("needs headless Chromium (Debian package `chromium`): apt-get install -y chromium")
    dirs = [_copy_run(d, tmp_path / run, _with_metrics_and_galaxy) for run, d in two_runs.items()]
    report = tmp_path / "compare.html"
    assert main([*map(str, dirs), "-o", str(report)]) == 0
    page = report.read_text()
    dom = _headless(chromium, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    for tag in ("<svg", "<polyline", "<circle", "<title>"):
        assert dom.stdout.count(tag) == page.count(tag) > 0, tag
    shot = tmp_path / "compare.png"
    # half the pixels per axis (Chromium's smallest scale): the long page in a picture small enough to decode here
    run = _headless(chromium, f"--screenshot={shot}", "--window-size=1200,9000", "--force-device-scale-factor=0.5",
                    "--hide-scrollbars", report.as_uri())
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    png = shot.read_bytes()
    assert _png_size(png) == (600, 4500)
    pixels = _png_pixels_any(png)
    # The page is drawn all the way down (charts, heatmaps, galaxy maps, tables), not a blank remainder:
    # every band of 600 CSS pixels holds many non-white pixels, and both run colours appear (their swatches).
    inked = (pixels != 255).any(axis=2)
    for top in range(0, 4500 - 300, 300):
        assert inked[top:top + 300].sum() > 2000, top
    colours = {tuple(int(v) for v in p) for p in np.unique(pixels.reshape(-1, 3), axis=0)}
    assert {_rgb(c) for c in PALETTE[:2]} <= colours
    if os.environ.get("REPORT_SCREENSHOT_DIR"):  # keep the picture for a person to look at
        Path(os.environ["REPORT_SCREENSHOT_DIR"], "compare.png").write_bytes(png)


def test_same_run_name_twice_errors_and_default_output(two_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from analysis_daemon.report.page import MAX_RUNS

    src = two_runs["lr-3e-3"]
    a = _copy_run(src, tmp_path / "host-a" / "lr-3e-3")
    b = _copy_run(src, tmp_path / "host-b" / "lr-3e-3")
    assert main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"report: {tmp_path / 'compare.html'} (2 runs compared)\n")  # their common parent
    page = _page(tmp_path / "compare.html")
    for d in (a, b):  # the same run name, told apart by its results file
        assert f"lr-3e-3 ({d / 'analysis.jsonl'}): avg cosine, iter" in page
    flat = tmp_path / "flat"  # two results files side by side: the page goes beside them
    flat.mkdir()
    for name, d in (("a.jsonl", a), ("b.jsonl", b)):
        (flat / name).write_bytes((d / "analysis.jsonl").read_bytes())
    assert main([str(flat / "a.jsonl"), str(flat / "b.jsonl")]) == 0
    assert capsys.readouterr().out.startswith(f"report: {flat / 'compare.html'} (2 runs compared)\n")
    cases = [([str(a), str(a / "analysis.jsonl")], "the same results file is given twice: pass each run once"),
             ([str(a)] * (MAX_RUNS + 1), f"{MAX_RUNS + 1} runs given, at most {MAX_RUNS} fit on one page")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Error: ") and err.count("\n") == 1 and message in err, err
