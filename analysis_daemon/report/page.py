"""`analysis-daemon report`: one self-contained HTML page from one or several runs' results files.

    analysis-daemon report runs/my-run                  (writes runs/my-run/report.html)
    analysis-daemon report runs/my-run/analysis.jsonl -o /tmp/my-run.html
    analysis-daemon report runs/lr-3e-4 runs/lr-1e-3    (one page, the runs on shared axes: runs/compare.html)

The page needs no network and no JavaScript: the plots are inline SVG drawn by report_svg. Lines of the
results file that are not a JSON object with an integer `iter` (a crash mid-write, hand edits) are
skipped and counted on the page; a missing key only removes the plot that needs it, with a note. Every
string from the file (token strings come from the trainer over the network) is HTML-escaped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .records import Page, Results, RunView, get as _get, integer as _int, lst as _list, note as _note
from .records import MAX_SKIPPED_READ, num as _num, run_view, token_html as _token
from .records import vocabulary as _vocabulary, with_breaks
from .galaxy import galaxy_section
from .history import history_section
from .svg import PALETTE, Chart, Heatmap, Series, esc, fmt, heatmap, line_chart
from ..files import PRIVATE_FILE_MODE, parse_mode, write_atomic as write_file_atomic

RESULTS_NAME = "analysis.jsonl"
REPORT_NAME = "report.html"
PROBE_HISTORY_ROWS = 12  # iterations shown per probe in its evolution table (the newest ones)
PROBE_HISTORY_NEIGHBOURS = 5
ALERT_ROWS = 50  # alerts listed in full up to this many; beyond, the first and last halves
MAX_MARKERS = 100  # alert marks drawn on each chart
TOKEN_TABLE_ROWS = 20  # rows of each most/least drifted table (the daemon's --top-k may list more)
COMPARE_NAME = "compare.html"
MAX_RUNS = len(PALETTE)  # one colour per run, and a legend that stays readable
MAX_METRIC_NAMES = 64  # trainer metric names read from the records (the protocol allows 64 per snapshot)
MAX_METRIC_CHARTS = 6  # charts of non-loss metrics; the other names are listed
METRIC_DASHES = ("", "6 3", "2 2", "8 3 2 3", "1 3", "10 4")  # tells a run's metrics apart in multi-run charts


class ReportError(Exception):
    """A problem the user can fix (missing file, nothing to report); shown as one `Error:` line."""


def resolve_results_path(arg: Path) -> Path:
    """RESULTS as given on the command line: a run directory (its analysis.jsonl) or the file itself."""
    if arg.is_dir():
        path = arg / RESULTS_NAME
        if not path.is_file():
            raise ReportError(f"{arg} has no {RESULTS_NAME}: pass a run directory (runs/<run>) or a results file")
        return path
    if not arg.exists():
        raise ReportError(f"{arg} does not exist: pass a run directory (runs/<run>) or its {RESULTS_NAME}")
    return arg


def load_results(path: Path, run: str | None = None, tensor: str | None = None, *, every_run: bool = False,
                 per_tensor: bool = False) -> Results:
    """Read a results file, skipping (and counting) lines that are not usable records.

    One record per iteration (a repeated iteration keeps the one with drift, else the newer line);
    `per_tensor`: one per (tensor, iteration); `every_run`: a file holding several runs is no error,
    one record per (run, ...). Records come in iteration order. `tensor`: only that tensor's records
    (records carry "tensor"); None: every tensor with `per_tensor`, else the run's default tensor.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    by_iter: dict[Any, dict[str, Any]] = {}
    res = Results(path=path, records=[])
    runs: dict[str, int] = {}

    def skip(lineno: int, reason: str) -> None:
        res.skipped_lines += 1
        if len(res.skip_reasons) < 5:
            res.skip_reasons.append(f"line {lineno}: {reason}")

    parsed: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            skip(lineno, "not valid JSON (partial or corrupted line)")
            continue
        except RecursionError:  # nesting no record of ours has; the parser stops at the recursion limit
            skip(lineno, "JSON nested too deeply")
            continue
        if not isinstance(rec, dict):
            skip(lineno, "not a JSON object")
            continue
        if _int(rec, "iter") is None:
            skip(lineno, "no integer 'iter'")
            continue
        if (rec.get("tensor") != tensor) if tensor is not None else (not per_tensor and rec.get("default_tensor") is False):
            continue  # another tensor of the run: a report shows one tensor (--tensor NAME picks it)
        name = rec.get("run") if isinstance(rec.get("run"), str) else ""
        runs[name] = runs.get(name, 0) + 1
        parsed.append((lineno, rec))
    if run is None and len(runs) > 1 and not every_run:
        names = ", ".join(sorted(repr(r) for r in runs))
        raise ReportError(f"{path} holds several runs ({names}): choose one with --run NAME")
    if run is not None and run not in runs:
        raise ReportError(f"{path} has no records of run {run!r} (runs: {', '.join(sorted(runs)) or 'none'})")
    res.other_runs = sorted(r for r in runs if run is not None and r != run)
    for _, rec in parsed:
        if run is not None and rec.get("run") != run:
            continue
        key = (rec["iter"], str(rec.get("run")) if every_run else "",
               str(rec.get("tensor") or "") if per_tensor else "")
        old = by_iter.get(key)
        if old is not None:  # the same iteration twice (a resumed trainer, a re-analysis after a restart)
            res.duplicates += 1
            if old.get("drift") is not None and rec.get("drift") is None:
                continue  # the one with drift is kept; else the newer line
        by_iter[key] = rec
    res.records = [by_iter[k] for k in sorted(by_iter)]
    if not res.records:
        raise ReportError(f"{path} has no usable results ({res.skipped_lines} malformed line(s) skipped)")
    return res


# ----------------------------------------------------------------------------------------------- sections

def _alerts(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(r["iter"], a) for r in records for a in _list(r, "alerts") if isinstance(a, dict)]


def _run_series(page: Page, label: str, getter: Callable[[dict[str, Any]], float | None], *,
                band: tuple[Callable[[dict[str, Any]], float | None], Callable[[dict[str, Any]], float | None]]
                | None = None, dash: str = "", **kw: Any) -> list[Series]:
    """One series per run (coloured by run when there are several), split at the run's gaps."""
    out = []
    for view in page.runs:
        recs = view.records
        cols = [[getter(r) for r in recs]]
        if band is not None:
            cols += [[band[0](r) for r in recs], [band[1](r) for r in recs]]
        xs, ys, *bands = with_breaks(view, [r["iter"] for r in recs], *cols)
        out.append(Series(label, xs, ys, *(bands or (None, None)), colour=view.colour if page.multi else "",
                          group=view.label if page.multi else "", dash=dash, **kw))
    return out


def _at(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: _num(r, *keys)


def _has(page: Page, *keys: str) -> bool:
    return any(_num(r, *keys) is not None for v in page.runs for r in v.records)


def _chart(page: Page, title: str, y_label: str, series: list[Series], width: int = 560) -> Chart:
    """A chart on the page's shared iteration axis, with every run's gaps and skipped iterations marked."""
    return Chart(title, y_label, series, markers=page.markers, x_range=page.x_range, width=width,
                 gaps=[g for v in page.runs for g in v.gaps], skips=[k for v in page.runs for k in v.skips])


def _charts(specs: Iterable[tuple[bool, str, str]]) -> str:
    """A row of charts; a chart whose data is missing becomes a note."""
    out = []
    for present, svg, missing in specs:
        out.append(f'<div class="fig">{svg}</div>' if present else _note(missing))
    return '<div class="row">' + "".join(out) + "</div>"


def _run_heading(page: Page, view: RunView) -> str:
    """A run's name with its colour swatch (several runs), else nothing."""
    return (f'<h3 class="run"><span class="swatch" style="background:{view.colour}"></span>{esc(view.label)}</h3>'
            if page.multi else "")


def header_section(page: Page) -> str:
    """Per run: iterations covered, counters, skipped iterations, malformed lines."""
    tables = []
    for view in page.runs:
        res = view.res
        recs = res.records
        last = recs[-1]
        iters = [r["iter"] for r in recs]
        skipped = sorted({i for r in recs for i in _list(r, "skipped_iters")[:MAX_SKIPPED_READ]
                          if isinstance(i, int) and not isinstance(i, bool)})
        rows = [("Run", esc(last.get("run", "?"))),
                ("Results file", esc(res.path)),
                ("Results", f"{len(recs)} (iterations {iters[0]} to {iters[-1]})"),
                ("Iterations", esc(", ".join(map(str, iters)) if len(iters) <= 40
                                   else ", ".join(map(str, iters[:20])) + ", ..., " + ", ".join(map(str, iters[-5:]))))]
        shape = _get(last, "shape")
        if isinstance(shape, list):
            rows.append(("Embedding", f"{esc(' x '.join(map(str, shape)))} {esc(last.get('dtype', ''))} "
                                      f"(tensor {esc(last.get('name', '?'))})"))
        for key, label in (("counters", "Run counters"), ("daemon_counters", "Daemon counters")):
            c = _get(last, key)
            if isinstance(c, dict):
                rows.append((label, ", ".join(f"{esc(k)} {esc(v)}" for k, v in c.items())))
        shown = ", ".join(map(str, skipped[:100])) + (f", ... ({len(skipped)} in all)" if len(skipped) > 100 else "")
        rows.append(("Skipped iterations", esc(shown) + " (marked with a triangle on every chart)" if skipped
                     else "none (every snapshot received was analysed)"))
        missing = [g for g in view.gaps if g[2].endswith(f"iter {g[1]}")]
        if missing:
            rows.append(("Gaps", f"{len(missing)} interval(s) much longer than the usual {fmt(view.step, 0)} "
                                 "iterations (hatched on every chart): " + esc(", ".join(
                                     f"{int(a)} to {int(b)}" for a, b, _, _ in missing[:20]))))
        total = sum(_num(r, "seconds") or 0.0 for r in recs)
        rows.append(("Analysis time", f"{fmt(total, 2)} s in total, {fmt(total / len(recs), 3)} s per result"))
        bad = f"{res.skipped_lines} malformed line(s) skipped"
        if res.skip_reasons:
            bad += ": " + esc("; ".join(res.skip_reasons)) + (" ..." if res.skipped_lines > len(res.skip_reasons)
                                                               else "")
        if res.duplicates:
            bad += f"; {res.duplicates} repeated iteration(s), the one with drift kept, else the newest"
        if res.other_runs:
            bad += f"; other runs in the file left out: {esc(', '.join(res.other_runs))}"
        rows.append(("Input", bad))
        body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        tables.append(f'<div class="tbl">{_run_heading(page, view)}<table class="kv">{body}</table></div>')
    return f'<section id="summary">{"".join(tables)}</section>'


def alerts_section(page: Page) -> str:
    """Every alert the daemon raised, in iteration order (run by run)."""
    alerts = [(v, it, a) for v in page.runs for it, a in _alerts(v.records)]
    if not alerts:
        return ('<section id="alerts"><h2>Alerts</h2>' + _note("No alerts in these results "
                "(none raised, or the daemon that wrote them does not raise alerts).") + "</section>")
    shown = alerts if len(alerts) <= ALERT_ROWS else alerts[:ALERT_ROWS // 2] + [None] + alerts[-ALERT_ROWS // 2:]
    run_th = "<th>run</th>" if page.multi else ""
    rows = "".join(f'<tr><td colspan="7">... {len(alerts) - ALERT_ROWS} more ...</td></tr>' if x is None else
                   "<tr>" + (f"<td>{esc(x[0].label)}</td>" if page.multi else "")
                   + f'<td>{x[1]}</td><td class="alert">{esc(x[2].get("kind", "?"))}</td>'
                   f'<td>{esc(x[2].get("message", ""))}</td><td>{esc(x[2].get("metric", ""))}</td>'
                   f'<td>{fmt(_num(x[2], "value"))}</td><td>{fmt(_num(x[2], "bound"))}</td></tr>' for x in shown)
    marks = len({(v.label, it) for v, it, _ in alerts})
    note = _note(f"The charts mark the first {MAX_MARKERS} of the {marks} iterations with alerts.") \
        if marks > MAX_MARKERS else ""
    return (f'<section id="alerts"><h2>Alerts ({len(alerts)})</h2>{note}<table><tr>{run_th}<th>iter</th><th>kind</th>'
            f'<th>message</th><th>metric</th><th>value</th><th>bound</th></tr>{rows}</table></section>')


def _metric_names(page: Page) -> list[str]:
    """Trainer metric names in the records (first seen first), at most MAX_METRIC_NAMES."""
    names: dict[str, None] = {}
    for v in page.runs:
        for r in v.records:
            m = r.get("metrics")
            if isinstance(m, dict):
                for k, val in m.items():
                    if len(names) >= MAX_METRIC_NAMES:
                        return list(names)
                    if isinstance(k, str) and _num(m, k) is not None:
                        names.setdefault(k, None)
    return list(names)


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[:width] + "..."


def metrics_section(page: Page) -> str:
    """The trainer's own metrics (loss first) on the iteration axis, above drift and neighbourhood size."""
    names = _metric_names(page)
    head = '<section id="metrics"><h2>Training loss beside drift</h2>'
    if not names:
        return head + _note("No trainer metrics in these results: the trainer passes them with "
                            "publish(weight, iter, metrics={'train/loss': ...}) (train.py sends its losses).") \
            + "</section>"
    losses = [n for n in names if "loss" in n.lower()][:len(METRIC_DASHES)]
    others = [n for n in names if n not in losses]

    def series(name: str, k: int) -> list[Series]:
        return _run_series(page, _short(name), lambda r: _num(r, "metrics", name),
                           dash=METRIC_DASHES[k % len(METRIC_DASHES)] if page.multi else "")

    charts = []
    if losses:
        charts.append((True, line_chart(_chart(page, "Trainer loss", "loss", [
            s for k, n in enumerate(losses) for s in series(n, k)])), ""))
    for n in others[:MAX_METRIC_CHARTS]:
        charts.append((True, line_chart(_chart(page, f"Trainer metric: {_short(n, 60)}", _short(n, 30),
                                               series(n, 0))), ""))
    rest = others[MAX_METRIC_CHARTS:]
    left = _note(f"{len(rest)} more metric(s) not plotted: {', '.join(_short(n, 30) for n in rest)}") \
        if rest else ""
    return (head + "<p>What the trainer passed with each snapshot (its losses first), on the same iteration axis "
            "as the drift and the neighbourhood size below, so a loss spike and an embedding jump line up.</p>"
            + _charts(charts) + left + "</section>")


def drift_section(page: Page) -> str:
    """Average cosine and euclidean drift against the previous snapshot."""
    cos = _chart(page, "Drift: average cosine similarity (1 = no movement)", "cosine",
                 _run_series(page, "avg cosine", _at("drift", "average_cosine_similarity")))
    euc = _chart(page, "Drift: average euclidean distance", "distance",
                 _run_series(page, "avg euclidean", _at("drift", "average_euclidean_distance")))
    why = "no drift in these results (drift needs two snapshots of the same shape)"
    return ('<section id="drift"><h2>Semantic drift</h2><p>Each point compares a snapshot with the previous one '
            'after the best rotation (Orthogonal Procrustes), so a rotation of the whole space is not drift.</p>'
            + _charts([(_has(page, "drift", "average_cosine_similarity"), line_chart(cos), why),
                       (_has(page, "drift", "average_euclidean_distance"), line_chart(euc), why)]) + "</section>")


def _threshold(records: list[dict[str, Any]]) -> float | None:
    return next((t for r in reversed(records) if (t := _num(r, "geometry", "local_density", "threshold"))
                 is not None), None)


def geometry_section(page: Page) -> str:
    """Neighbourhood size, mean similarity with its std band, and the similarity histogram heatmap."""
    thr = _threshold([r for v in page.runs for r in v.records])
    nb = _chart(page, f"Average neighbourhood size (cosine > {fmt(thr, 2)})", "tokens",
                _run_series(page, "avg neighbours", _at("geometry", "local_density", "average_neighborhood_size"),
                            digits=3))

    def mean(r: dict[str, Any]) -> float | None:
        return _num(r, "geometry", "global_sparsity", "mean_similarity")

    def std(r: dict[str, Any]) -> float | None:
        return _num(r, "geometry", "global_sparsity", "std_similarity")

    # the band is clipped to [-1, 1]: cosines live there even when mean + std does not
    def lo(r: dict[str, Any]) -> float | None:
        m, s = mean(r), std(r)
        return max(m - s, -1.0) if m is not None and s is not None else None

    def hi(r: dict[str, Any]) -> float | None:
        m, s = mean(r), std(r)
        return min(m + s, 1.0) if m is not None and s is not None else None

    ms = _chart(page, "Mean pairwise cosine similarity", "cosine",
                _run_series(page, "mean", mean, band=(lo, hi), band_label="band: +/- std"))
    parts = ['<section id="geometry"><h2>Geometry: local density and global sparsity</h2>',
             _charts([(_has(page, "geometry", "local_density", "average_neighborhood_size"), line_chart(nb),
                       "no neighbourhood sizes in these results"),
                      (_has(page, "geometry", "global_sparsity", "mean_similarity"), line_chart(ms),
                       "no mean similarity in these results")])]
    for view in page.runs:
        parts.append(_run_heading(page, view) + _histogram_heatmap(page, view, _threshold(view.records)))
    parts.append("</section>")
    return "".join(parts)


def _histogram_heatmap(page: Page, view: RunView, threshold: float | None) -> str:
    records = view.records
    edges: list[float] | None = None
    for r in reversed(records):
        e = _get(r, "geometry", "global_sparsity", "histogram_bins")
        if isinstance(e, list) and len(e) >= 2 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in e) \
                and e[-1] > e[0]:
            edges = [float(x) for x in e]
            break
    if edges is None:
        return _note("Similarity histogram: no histogram in these results, heatmap omitted.")
    nbin = len(edges) - 1
    cols, labels, dropped = [], [], 0
    for r in records:
        g = _get(r, "geometry", "global_sparsity")
        counts = _get(g, "histogram_counts")
        if not (isinstance(counts, list) and len(counts) == nbin
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in counts)):
            dropped += 1 if isinstance(g, dict) else 0
            continue
        total = sum(counts) + (_num(g, "below_range_count") or 0) + (_num(g, "above_range_count") or 0)
        cols.append([c / total if total > 0 else 0.0 for c in counts])
        labels.append(r["iter"])
    if not cols:
        return _note("Similarity histogram: no usable histogram counts, heatmap omitted.")
    hm = Heatmap("Similarity histogram over time (colour = fraction of pairs, log scale)", cols, labels, edges,
                 hlines=[(threshold, f"neighbour threshold {threshold:g}")] if threshold is not None else (),
                 step=view.step, x_range=page.x_range, gaps=view.gaps, skips=view.skips)
    note = _note(f"{dropped} result(s) with a histogram of another shape left out.") if dropped else ""
    return (f'<div class="fig wide">{heatmap(hm)}</div><p>Each column is one result, at its iteration (gaps stay '
            f'white and hatched); each row one of the {nbin} similarity bins from {edges[0]:g} to {edges[-1]:g}. '
            'Collapse shows as the mass moving up towards 1; healthy galaxies as a bright band near 0 with a tail '
            'above the threshold.</p>' + note)


def insight_section(page: Page) -> str:
    """Effective rank, isotropy, row norms, frozen tokens and neighbourhood drift over iterations."""
    if not any(isinstance(r.get("insight"), dict) for v in page.runs for r in v.records):
        return ('<section id="insight"><h2>Effective rank, isotropy, norms</h2>'
                + _note("No 'insight' metrics in these results (written by an older daemon): effective rank, "
                        "isotropy, row norms, frozen tokens and neighbourhood drift are omitted.") + "</section>")
    er = _chart(page, "Effective rank (RankMe)", "effective rank",
                _run_series(page, "effective rank", _at("insight", "effective_rank"), digits=2))
    iso = _chart(page, "Isotropy", "value",
                 _run_series(page, "partition ratio (1 = isotropic)", _at("insight", "isotropy", "partition_ratio"))
                 + _run_series(page, "|mean unit vector| (0 = no cone)",
                               _at("insight", "isotropy", "mean_unit_vector_norm"),
                               dash=METRIC_DASHES[1] if page.multi else ""))
    norms = _chart(page, "Row norms", "L2 norm", _run_series(
        page, "mean", _at("insight", "row_norms", "mean"),
        band=(_at("insight", "row_norms", "min"), _at("insight", "row_norms", "max")), band_label="band: min to max"))
    frozen = _chart(page, "Frozen tokens (rows unchanged since the previous snapshot)", "tokens",
                    _run_series(page, "frozen", _at("insight", "frozen_tokens", "count"), digits=0))
    k = next((v for view in page.runs for r in reversed(view.records)
              if (v := _int(r, "insight", "neighbourhood_drift", "k")) is not None), None)
    nd = _chart(page, f"Neighbourhood drift: mean overlap of the {k or 'k'} nearest neighbours", "overlap",
                _run_series(page, "mean overlap", _at("insight", "neighbourhood_drift", "mean_overlap")))
    return ('<section id="insight"><h2>Effective rank, isotropy, norms</h2>' + _charts([
        (_has(page, "insight", "effective_rank"), line_chart(er), "no effective rank in these results"),
        (_has(page, "insight", "isotropy", "partition_ratio")
         or _has(page, "insight", "isotropy", "mean_unit_vector_norm"), line_chart(iso),
         "no isotropy in these results"),
        (_has(page, "insight", "row_norms", "mean"), line_chart(norms), "no row norms in these results"),
        (_has(page, "insight", "frozen_tokens", "count"), line_chart(frozen),
         "no frozen-token counts (first snapshot only, or not measured)"),
        (_has(page, "insight", "neighbourhood_drift", "mean_overlap"), line_chart(nd),
         "no neighbourhood drift (needs two snapshots)")]) + "</section>")


def research_section(page: Page) -> str:
    """Linear CKA, drift since the first snapshot, the common mode and the under-trained token count."""
    cka = _chart(page, "Linear CKA (1 = same geometry up to rotation, scale and shift)", "CKA",
                 _run_series(page, "vs previous", _at("drift", "linear_cka"))
                 + _run_series(page, "vs first snapshot", _at("drift_since_init", "linear_cka"),
                               dash=METRIC_DASHES[1] if page.multi else ""))
    since = _chart(page, "Drift since the first snapshot: average cosine similarity", "cosine",
                   _run_series(page, "since init", _at("drift_since_init", "average_cosine_similarity")))
    common = _chart(page, "Common mode: mean row shift / average row norm, and |mean row| / average row norm",
                    "ratio", _run_series(page, "shift since previous", _at("drift", "common_mode", "mean_shift_relative"))
                    + _run_series(page, "|mean| ratio", _at("drift", "common_mode", "mean_norm_ratio"),
                                  dash=METRIC_DASHES[1] if page.multi else ""))
    under = _chart(page, "Under-trained tokens (a tight group training has not moved)", "tokens",
                   _run_series(page, "under-trained", _at("insight", "undertrained", "count"), digits=0))
    return ('<section id="research"><h2>CKA, drift since initialisation, common mode, under-trained tokens</h2>'
            "<p>See docs/research-metrics.md for the definitions and how to read them.</p>" + _charts([
                (_has(page, "drift", "linear_cka"), line_chart(cka), "no linear CKA (needs two snapshots)"),
                (_has(page, "drift_since_init", "average_cosine_similarity"), line_chart(since),
                 "no drift since the first snapshot (first snapshot only, or --no-since-init)"),
                (_has(page, "drift", "common_mode", "mean_norm_ratio"), line_chart(common),
                 "no common-mode figures (needs two snapshots)"),
                (_has(page, "insight", "undertrained", "count"), line_chart(under),
                 "no under-trained search in these results (--no-undertrained or --no-extras)")]) + "</section>")


def _undertrained_block(records: list[dict[str, Any]], vocab: dict[int, str]) -> str:
    """The latest result's under-trained tokens, most confident first."""
    with_search = [r for r in records if isinstance(_get(r, "insight", "undertrained"), dict)]
    if not with_search:
        return ""
    r = with_search[-1]
    under = r["insight"]["undertrained"]
    how = "change since the first snapshot" if under.get("method") == "since_init" else "weights alone"
    return (f'<h2>Under-trained tokens at iter {r["iter"]}: {esc(under.get("count"))} ({how})</h2><div class="row">'
            + _pairs_table("Most certain first (score 1 = the group's centre)", r["insight"].get("undertrained_tokens"),
                           under.get("token_strings"), vocab, "score") + "</div>")


def _pairs_table(title: str, pairs: Any, strings: Any, vocab: dict[int, str], value: str) -> str:
    if not isinstance(pairs, list) or not pairs:
        return _note(f"{title}: not in the latest result.")
    strings = strings if isinstance(strings, list) else []
    rows = []
    if len(pairs) > TOKEN_TABLE_ROWS:
        title += f" (first {TOKEN_TABLE_ROWS} of {len(pairs)})"
    for n, pair in enumerate(pairs[:TOKEN_TABLE_ROWS], 1):
        s = strings[n - 1] if n - 1 < len(strings) else None
        rows.append(f"<tr><td>{n}</td><td>{_token(_get(pair, 0), vocab, s)}</td>"
                    f"<td>{fmt(_num(pair, 1))}</td></tr>")
    return (f'<div class="tbl"><h3>{esc(title)}</h3><table><tr><th>#</th><th>token</th><th>{esc(value)}</th></tr>'
            + "".join(rows) + "</table></div>")


def _tokens_block(records: list[dict[str, Any]], vocab: dict[int, str]) -> str:
    """The latest result's most and least drifted tokens (and the neighbourhoods that changed most)."""
    with_drift = [r for r in records if isinstance(r.get("drift"), dict)]
    if not with_drift:
        return '<h2>Most and least drifted tokens</h2>' + _note(
            "No drift in these results, so no drifted tokens.")
    r = with_drift[-1]
    d = r["drift"]
    parts = [f'<h2>Most and least drifted tokens (iter {r["iter"]} vs '
             f'{esc(r.get("prev_iter"))})</h2><div class="row">',
             _pairs_table("Most drifted (lowest cosine)", d.get("most_drifted_tokens"),
                          d.get("most_drifted_token_strings"), vocab, "cosine"),
             _pairs_table("Least drifted (highest cosine)", d.get("least_drifted_tokens"),
                          d.get("least_drifted_token_strings"), vocab, "cosine")]
    nd = _get(records[-1], "insight", "neighbourhood_drift")
    if isinstance(nd, dict):
        parts.append(_pairs_table(f"Neighbourhoods that changed most (overlap of {nd.get('k', 'k')} neighbours)",
                                  nd.get("most_changed_tokens"), nd.get("most_changed_token_strings"), vocab,
                                  "overlap"))
    frozen = _get(records[-1], "insight", "frozen_tokens")
    if isinstance(frozen, dict) and _int(frozen, "count"):
        ids, strings = _list(frozen, "token_ids"), _list(frozen, "token_strings")
        listed = ", ".join(_token(t, vocab, strings[i] if i < len(strings) else None)
                           for i, t in enumerate(ids[:TOKEN_TABLE_ROWS]))
        more = " ..." if frozen["count"] > min(len(ids), TOKEN_TABLE_ROWS) else ""
        parts.append(f'<div class="tbl"><h3>Frozen tokens: {frozen["count"]}</h3><p>{listed}{more}</p></div>')
    parts.append("</div>")
    return "".join(parts)


def _probes_block(records: list[dict[str, Any]], vocab: dict[int, str]) -> str:
    """Each probe token's nearest neighbours in the latest result, and how they evolved."""
    with_probes = [r for r in records if isinstance(_get(r, "insight", "probes"), list) and r["insight"]["probes"]]
    if not with_probes:
        return '<h2>Probe tokens</h2>' + _note(
            "No probe tokens in these results (start the daemon with --probe to follow chosen tokens).")
    latest = with_probes[-1]
    parts = [f'<h2>Probe tokens: nearest neighbours at iter {latest["iter"]}</h2>'
             '<div class="row">']
    for p in latest["insight"]["probes"]:
        if not isinstance(p, dict):
            continue
        neigh = [n for n in _list(p, "neighbours") if isinstance(n, list)]
        rows = "".join(f"<tr><td>{i}</td><td>{_token(_get(n, 0), vocab, _get(n, 1))}</td>"
                       f"<td>{fmt(_num(n, 2))}</td></tr>" for i, n in enumerate(neigh, 1))
        parts.append(f'<div class="tbl probe"><h3>{_token(p.get("token_id"), vocab, p.get("token"))}</h3>'
                     f'<table><tr><th>#</th><th>neighbour</th><th>cosine</th></tr>{rows}</table></div>')
    parts.append("</div>")
    parts.append(f"<h3>Evolution (top {PROBE_HISTORY_NEIGHBOURS} neighbours, newest {PROBE_HISTORY_ROWS} results)</h3>")
    ids = [p.get("token_id") for p in latest["insight"]["probes"] if isinstance(p, dict)]
    for tid in ids:
        rows = []
        for r in with_probes[-PROBE_HISTORY_ROWS:]:
            p = next((q for q in r["insight"]["probes"] if isinstance(q, dict) and q.get("token_id") == tid), None)
            if p is None:
                continue
            cells = ", ".join(f"{_token(_get(n, 0), vocab, _get(n, 1))} {fmt(_num(n, 2), 2)}"
                              for n in _list(p, "neighbours")[:PROBE_HISTORY_NEIGHBOURS] if isinstance(n, list))
            rows.append(f"<tr><td>{r['iter']}</td><td>{cells}</td></tr>")
        parts.append(f'<div class="tbl evo"><h4>{_token(tid, vocab)}</h4><table><tr><th>iter</th>'
                     f'<th>nearest neighbours (cosine)</th></tr>{"".join(rows)}</table></div>')
    return "".join(parts)


_CSS = """
body{font-family:sans-serif;margin:20px;color:#222;max-width:1180px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:14px;margin:8px 0 4px} h4{font-size:13px;margin:6px 0 2px}
table{border-collapse:collapse;font-size:12px} th,td{border:1px solid #ddd;padding:2px 6px;text-align:left}
table.kv th{background:#f4f4f4;width:170px} .row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.fig{border:1px solid #e5e5e5} .note{color:#8a5a00;background:#fff7e0;padding:4px 8px;font-size:12px}
.tok{font-family:monospace} .id{color:#888;font-size:11px} .alert{color:#b00;font-weight:bold}
.tbl{margin-bottom:8px} .evo td:first-child{width:50px} p{font-size:13px;margin:4px 0}
.swatch{display:inline-block;width:12px;height:12px;margin:0 5px 0 10px;vertical-align:-1px;border-radius:2px}
.legend{font-size:13px} h3.run{font-size:14px;margin:14px 0 4px}
"""


def _per_run(page: Page, section: str, block: Callable[[RunView], str]) -> str:
    """One section holding a block per run; with several runs each block's headings name its run."""
    parts = [f'<section id="{section}">']
    for view in page.runs:
        html = block(view)
        if page.multi:
            tag = (f'<span class="swatch" style="background:{view.colour}"></span>{esc(view.label)}: ')
            html = html.replace("<h2>", "<h2>" + tag, 1)
        parts.append(html)
    parts.append("</section>")
    return "".join(parts)


def _labels(results: list[Results]) -> list[str]:
    """A label per run: its name, made unique with the results file when two runs share a name."""
    names = [str(r.records[-1].get("run", "?")) for r in results]
    return [n if names.count(n) == 1 else f"{n} ({r.path})" for n, r in zip(names, results)]


def make_page(results: list[Results]) -> Page:
    """The runs of the page with their colours, gaps, shared iteration range and alert marks."""
    views = []
    for k, (res, label) in enumerate(zip(results, _labels(results))):
        views.append(run_view(res, label, PALETTE[k % len(PALETTE)], f"{label}: " if len(results) > 1 else ""))
    iters = [r["iter"] for v in views for r in v.records]
    tips: dict[tuple[str, int], list[str]] = {}  # one marker per run and iteration, at most MAX_MARKERS
    for v in views:
        for it, a in _alerts(v.records):
            tips.setdefault((v.label, it), []).append(f"{a.get('kind', '?')}: {a.get('message', '')}")
    markers = [(float(it), (f"{label}: " if len(views) > 1 else "") + f"alert at iter {it}: " + "; ".join(t))
               for (label, it), t in list(tips.items())[:MAX_MARKERS]]
    return Page(views, (float(min(iters)), float(max(iters))), markers)


def build_report(results: Results | list[Results]) -> str:
    """The whole HTML page for one run's results, or for several runs compared on shared axes."""
    page = make_page([results] if isinstance(results, Results) else results)
    vocabs = {v.label: _vocabulary(v.records) for v in page.runs}
    names = ", ".join(v.label for v in page.runs)
    title = f"Embedding report: {esc(names)}" if not page.multi else f"Embedding runs compared: {esc(names)}"
    legend = "" if not page.multi else '<p class="legend">' + " ".join(
        f'<span class="swatch" style="background:{v.colour}"></span>{esc(v.label)}' for v in page.runs) + "</p>"
    sources = ", ".join(str(v.res.path) for v in page.runs)
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>", legend,
        header_section(page), alerts_section(page), metrics_section(page), drift_section(page),
        geometry_section(page), insight_section(page), research_section(page),
        history_section(page, vocabs), galaxy_section(page, vocabs),
        _per_run(page, "tokens", lambda v: _tokens_block(v.records, vocabs[v.label])),
        _per_run(page, "undertrained", lambda v: _undertrained_block(v.records, vocabs[v.label])),
        _per_run(page, "probes", lambda v: _probes_block(v.records, vocabs[v.label])),
        f'<p class="foot">Generated by analysis-daemon report on {esc(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} '
        f"from {esc(sources)}. Hover a point for its value.</p></body></html>\n"])


def build_parser() -> argparse.ArgumentParser:
    """The `analysis-daemon report` argument parser."""
    p = argparse.ArgumentParser(
        prog="analysis-daemon report",
        description="Turn runs' results (runs/<run>/analysis.jsonl) into one self-contained HTML page: trainer "
                    "loss, drift, neighbourhood size, mean similarity, the similarity histogram over time, effective "
                    "rank, token histories, the galaxy map, alerts and probe tokens. Several runs go on shared "
                    "axes, one colour per run. Needs no network to view.")
    p.add_argument("results", type=Path, metavar="RESULTS", nargs="+",
                   help=f"a run directory (runs/<run>) or a results file ({RESULTS_NAME}); several to compare runs "
                        f"(at most {MAX_RUNS})")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.html",
                   help=f"where to write the page (default: {REPORT_NAME} next to the results file; with several "
                        f"runs {COMPARE_NAME} in their common parent directory)")
    p.add_argument("--run", metavar="NAME", help="the run to report when a file holds several")
    p.add_argument("--tensor", metavar="NAME",
                   help="the tensor to report when the run sent several (e.g. lm_head); default: the run's "
                        "main tensor (the first it sent)")
    p.add_argument("--mode", type=parse_mode, default=PRIVATE_FILE_MODE, metavar="MODE",
                   help="file mode of the page: it shows token strings and metrics, so it is private by "
                        "default; 0644 lets every user of the host read it (default: 0600)")
    return p


def _default_output(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0].parent / REPORT_NAME
    # runs/a/analysis.jsonl and runs/b/analysis.jsonl: runs/compare.html, beside the run directories
    return Path(os.path.commonpath([str(p.resolve().parent) for p in paths])) / COMPARE_NAME


def write_atomic(out: Path, text: str, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write the page (file mode `mode`) to a temporary file beside `out`, then rename: never a half-written report."""
    try:
        write_file_atomic(out, text.encode("utf-8"), mode, fsync=False,
                          tmp=out.with_name(f".{out.name}.{os.getpid()}.tmp"))
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """Entry point of `analysis-daemon report RESULTS [RESULTS ...] [-o OUT.html]`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if len(args.results) > MAX_RUNS:
            raise ReportError(f"{len(args.results)} runs given, at most {MAX_RUNS} fit on one page: "
                              "compare fewer runs at a time")
        paths = [resolve_results_path(r) for r in args.results]
        if len({p.resolve() for p in paths}) < len(paths):
            raise ReportError("the same results file is given twice: pass each run once")
        results = [load_results(path, args.run, args.tensor) for path in paths]
        out = args.output or _default_output(paths)
        write_atomic(out, build_report(results), args.mode)
    except ReportError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    def covered(res: Results) -> str:
        note = f", {res.skipped_lines} malformed line(s) skipped" if res.skipped_lines else ""
        return f"{len(res.records)} results, iterations {res.records[0]['iter']} to {res.records[-1]['iter']}{note}"

    if len(results) == 1:
        print(f"report: {out} ({covered(results[0])})")
    else:
        print(f"report: {out} ({len(results)} runs compared)")
        for label, res in zip(_labels(results), results):
            print(f"  {label}: {covered(res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
