"""`analysis-daemon report`: one self-contained HTML page from a run's results file.

    analysis-daemon report runs/my-run                  (writes runs/my-run/report.html)
    analysis-daemon report runs/my-run/analysis.jsonl -o /tmp/my-run.html

The page needs no network and no JavaScript: the plots are inline SVG drawn by report_svg. Lines of the
results file that are not a JSON object with an integer `iter` (a crash mid-write, hand edits) are
skipped and counted on the page; a missing key only removes the plot that needs it, with a note. Every
string from the file (token strings come from the trainer over the network) is HTML-escaped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .report_svg import Chart, Heatmap, Series, esc, fmt, heatmap, line_chart

RESULTS_NAME = "analysis.jsonl"
REPORT_NAME = "report.html"
PROBE_HISTORY_ROWS = 12  # iterations shown per probe in its evolution table (the newest ones)
PROBE_HISTORY_NEIGHBOURS = 5
ALERT_ROWS = 50  # alerts listed in full up to this many; beyond, the first and last halves
MAX_MARKERS = 100  # alert marks drawn on each chart
TOKEN_TABLE_ROWS = 20  # rows of each most/least drifted table (the daemon's --top-k may list more)


class ReportError(Exception):
    """A problem the user can fix (missing file, nothing to report); shown as one `Error:` line."""


@dataclass
class Results:
    """The usable records of a results file, one per iteration, in iteration order."""

    path: Path
    records: list[dict[str, Any]]
    skipped_lines: int = 0
    skip_reasons: list[str] = field(default_factory=list)  # the first few, for the page
    duplicates: int = 0
    other_runs: list[str] = field(default_factory=list)


def _get(obj: Any, *keys: str | int) -> Any:
    for k in keys:
        if isinstance(k, int):
            if not isinstance(obj, list) or not -len(obj) <= k < len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[k] if isinstance(k, int) else obj.get(k)
    return obj


def _num(obj: Any, *keys: str | int) -> float | None:
    """A finite number at obj[keys...], else None (wrong type, missing, NaN: all the same to a plot)."""
    v = _get(obj, *keys)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _int(obj: Any, *keys: str | int) -> int | None:
    v = _get(obj, *keys)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _list(obj: Any, *keys: str | int) -> list[Any]:
    """The list at obj[keys...], else an empty list."""
    v = _get(obj, *keys)
    return v if isinstance(v, list) else []


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


def load_results(path: Path, run: str | None = None) -> Results:
    """Read a results file, skipping (and counting) lines that are not usable records."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    by_iter: dict[int, dict[str, Any]] = {}
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
        if not isinstance(rec, dict):
            skip(lineno, "not a JSON object")
            continue
        if _int(rec, "iter") is None:
            skip(lineno, "no integer 'iter'")
            continue
        name = rec.get("run") if isinstance(rec.get("run"), str) else ""
        runs[name] = runs.get(name, 0) + 1
        parsed.append((lineno, rec))
    if run is None and len(runs) > 1:
        names = ", ".join(sorted(repr(r) for r in runs))
        raise ReportError(f"{path} holds several runs ({names}): choose one with --run NAME")
    if run is not None and run not in runs:
        raise ReportError(f"{path} has no records of run {run!r} (runs: {', '.join(sorted(runs)) or 'none'})")
    res.other_runs = sorted(r for r in runs if run is not None and r != run)
    for _, rec in parsed:
        if run is not None and rec.get("run") != run:
            continue
        if rec["iter"] in by_iter:  # the same iteration twice (a restart): the newer line wins
            res.duplicates += 1
        by_iter[rec["iter"]] = rec
    res.records = [by_iter[k] for k in sorted(by_iter)]
    if not res.records:
        raise ReportError(f"{path} has no usable results ({res.skipped_lines} malformed line(s) skipped)")
    return res


# ----------------------------------------------------------------------------------------------- sections

def _vocabulary(records: list[dict[str, Any]]) -> dict[int, str]:
    """Token id -> string from everything the records name (drift lists, probes)."""
    vocab: dict[int, str] = {}
    for r in records:
        for which in ("most", "least"):
            ids = _get(r, "drift", f"{which}_drifted_tokens")
            strings = _get(r, "drift", f"{which}_drifted_token_strings")
            if isinstance(ids, list) and isinstance(strings, list):
                for pair, s in zip(ids, strings):
                    tid = _int(pair, 0)
                    if tid is not None and isinstance(s, str):
                        vocab[tid] = s
        for p in _list(r, "insight", "probes"):
            if _int(p, "token_id") is not None and isinstance(_get(p, "token"), str):
                vocab[p["token_id"]] = p["token"]
            for n in _list(p, "neighbours"):
                if _int(n, 0) is not None and isinstance(_get(n, 1), str):
                    vocab[n[0]] = n[1]
    return vocab


def _token(tid: Any, vocab: dict[int, str], string: Any = None) -> str:
    """Escaped display of a token: its string in quotes and its id, or the id alone."""
    s = string if isinstance(string, str) else vocab.get(tid) if isinstance(tid, int) else None
    ident = esc(tid) if isinstance(tid, int) and not isinstance(tid, bool) else "?"
    return f'<span class="tok">{esc(repr(s))}</span> <span class="id">#{ident}</span>' if s is not None \
        else f'<span class="id">#{ident}</span>'


def _alerts(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(r["iter"], a) for r in records for a in _list(r, "alerts") if isinstance(a, dict)]


def _series(records: list[dict[str, Any]], label: str, *keys: str, **kw: Any) -> Series:
    return Series(label, [r["iter"] for r in records], [_num(r, *keys) for r in records], **kw)


def _has(records: list[dict[str, Any]], *keys: str) -> bool:
    return any(_num(r, *keys) is not None for r in records)


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _charts(specs: Iterable[tuple[bool, str, str]]) -> str:
    """A row of charts; a chart whose data is missing becomes a note."""
    out = []
    for present, svg, missing in specs:
        out.append(f'<div class="fig">{svg}</div>' if present else _note(missing))
    return '<div class="row">' + "".join(out) + "</div>"


def header_section(res: Results) -> str:
    """Run, iterations covered, counters, skipped iterations, malformed lines."""
    recs = res.records
    last = recs[-1]
    iters = [r["iter"] for r in recs]
    skipped = sorted({i for r in recs for i in _list(r, "skipped_iters") if isinstance(i, int)})
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
    rows.append(("Skipped iterations", esc(", ".join(map(str, skipped))) if skipped
                 else "none (every snapshot received was analysed)"))
    total = sum(_num(r, "seconds") or 0.0 for r in recs)
    rows.append(("Analysis time", f"{fmt(total, 2)} s in total, {fmt(total / len(recs), 3)} s per result"))
    bad = f"{res.skipped_lines} malformed line(s) skipped"
    if res.skip_reasons:
        bad += ": " + esc("; ".join(res.skip_reasons)) + (" ..." if res.skipped_lines > len(res.skip_reasons) else "")
    if res.duplicates:
        bad += f"; {res.duplicates} repeated iteration(s), the newest line kept"
    if res.other_runs:
        bad += f"; other runs in the file left out: {esc(', '.join(res.other_runs))}"
    rows.append(("Input", bad))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<section id="summary"><table class="kv">{body}</table></section>'


def alerts_section(records: list[dict[str, Any]]) -> str:
    """Every alert the daemon raised, in iteration order."""
    alerts = _alerts(records)
    if not alerts:
        return ('<section id="alerts"><h2>Alerts</h2>' + _note("No alerts in these results "
                "(none raised, or the daemon that wrote them does not raise alerts).") + "</section>")
    shown = alerts if len(alerts) <= ALERT_ROWS else alerts[:ALERT_ROWS // 2] + [None] + alerts[-ALERT_ROWS // 2:]
    rows = "".join(f'<tr><td colspan="6">... {len(alerts) - ALERT_ROWS} more ...</td></tr>' if x is None else
                   f'<tr><td>{x[0]}</td><td class="alert">{esc(x[1].get("kind", "?"))}</td>'
                   f'<td>{esc(x[1].get("message", ""))}</td><td>{esc(x[1].get("metric", ""))}</td>'
                   f'<td>{fmt(_num(x[1], "value"))}</td><td>{fmt(_num(x[1], "bound"))}</td></tr>' for x in shown)
    marks = len({it for it, _ in alerts})
    note = _note(f"The charts mark the first {MAX_MARKERS} of the {marks} iterations with alerts.") \
        if marks > MAX_MARKERS else ""
    return (f'<section id="alerts"><h2>Alerts ({len(alerts)})</h2>{note}<table><tr><th>iter</th><th>kind</th>'
            f'<th>message</th><th>metric</th><th>value</th><th>bound</th></tr>{rows}</table></section>')


def drift_section(records: list[dict[str, Any]], markers: list[tuple[float, str]]) -> str:
    """Average cosine and euclidean drift against the previous snapshot."""
    d = [r for r in records if isinstance(r.get("drift"), dict)]
    cos = Chart("Drift: average cosine similarity (1 = no movement)", "cosine",
                [_series(d, "avg cosine", "drift", "average_cosine_similarity")], markers=markers)
    euc = Chart("Drift: average euclidean distance", "distance",
                [_series(d, "avg euclidean", "drift", "average_euclidean_distance")], markers=markers)
    why = "no drift in these results (drift needs two snapshots of the same shape)"
    return ('<section id="drift"><h2>Semantic drift</h2><p>Each point compares a snapshot with the previous one '
            'after the best rotation (Orthogonal Procrustes), so a rotation of the whole space is not drift.</p>'
            + _charts([(_has(d, "drift", "average_cosine_similarity"), line_chart(cos), why),
                       (_has(d, "drift", "average_euclidean_distance"), line_chart(euc), why)]) + "</section>")


def geometry_section(records: list[dict[str, Any]], markers: list[tuple[float, str]]) -> str:
    """Neighbourhood size, mean similarity with its std band, and the similarity histogram heatmap."""
    thr = next((t for r in reversed(records) if (t := _num(r, "geometry", "local_density", "threshold")) is not None),
               None)
    nb = Chart(f"Average neighbourhood size (cosine > {fmt(thr, 2)})", "tokens",
               [_series(records, "avg neighbours", "geometry", "local_density", "average_neighborhood_size",
                        digits=3)], markers=markers)
    means = [_num(r, "geometry", "global_sparsity", "mean_similarity") for r in records]
    stds = [_num(r, "geometry", "global_sparsity", "std_similarity") for r in records]
    # the band is clipped to [-1, 1]: cosines live there even when mean + std does not
    band_lo = [max(m - s, -1.0) if m is not None and s is not None else None for m, s in zip(means, stds)]
    band_hi = [min(m + s, 1.0) if m is not None and s is not None else None for m, s in zip(means, stds)]
    ms = Chart("Mean pairwise cosine similarity", "cosine",
               [Series("mean", [r["iter"] for r in records], means, band_lo, band_hi, band_label="band: +/- std")],
               markers=markers)
    parts = ['<section id="geometry"><h2>Geometry: local density and global sparsity</h2>',
             _charts([(_has(records, "geometry", "local_density", "average_neighborhood_size"), line_chart(nb),
                       "no neighbourhood sizes in these results"),
                      (any(m is not None for m in means), line_chart(ms), "no mean similarity in these results")]),
             _histogram_heatmap(records, thr), "</section>"]
    return "".join(parts)


def _histogram_heatmap(records: list[dict[str, Any]], threshold: float | None) -> str:
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
                 hlines=[(threshold, f"neighbour threshold {threshold:g}")] if threshold is not None else ())
    note = _note(f"{dropped} result(s) with a histogram of another shape left out.") if dropped else ""
    return (f'<div class="fig wide">{heatmap(hm)}</div><p>Each column is one result; each row one of the '
            f'{nbin} similarity bins from {edges[0]:g} to {edges[-1]:g}. Collapse shows as the mass moving up '
            f'towards 1; healthy galaxies as a bright band near 0 with a tail above the threshold.</p>' + note)


def insight_section(records: list[dict[str, Any]], markers: list[tuple[float, str]]) -> str:
    """Effective rank, isotropy, row norms, frozen tokens and neighbourhood drift over iterations."""
    if not any(isinstance(r.get("insight"), dict) for r in records):
        return ('<section id="insight"><h2>Effective rank, isotropy, norms</h2>'
                + _note("No 'insight' metrics in these results (written by an older daemon): effective rank, "
                        "isotropy, row norms, frozen tokens and neighbourhood drift are omitted.") + "</section>")
    it = [r["iter"] for r in records]
    er = Chart("Effective rank (RankMe)", "effective rank",
               [_series(records, "effective rank", "insight", "effective_rank", digits=2)], markers=markers)
    iso = Chart("Isotropy", "value", [_series(records, "partition ratio (1 = isotropic)", "insight", "isotropy",
                                              "partition_ratio"),
                                      _series(records, "|mean unit vector| (0 = no cone)", "insight", "isotropy",
                                              "mean_unit_vector_norm")], markers=markers)
    norms = Chart("Row norms", "L2 norm", [Series(
        "mean", it, [_num(r, "insight", "row_norms", "mean") for r in records],
        [_num(r, "insight", "row_norms", "min") for r in records],
        [_num(r, "insight", "row_norms", "max") for r in records], band_label="band: min to max")],
        markers=markers)
    frozen = Chart("Frozen tokens (rows unchanged since the previous snapshot)", "tokens",
                   [_series(records, "frozen", "insight", "frozen_tokens", "count", digits=0)], markers=markers)
    k = next((v for r in reversed(records) if (v := _int(r, "insight", "neighbourhood_drift", "k")) is not None), None)
    nd = Chart(f"Neighbourhood drift: mean overlap of the {k or 'k'} nearest neighbours", "overlap",
               [_series(records, "mean overlap", "insight", "neighbourhood_drift", "mean_overlap")], markers=markers)
    return ('<section id="insight"><h2>Effective rank, isotropy, norms</h2>' + _charts([
        (_has(records, "insight", "effective_rank"), line_chart(er), "no effective rank in these results"),
        (_has(records, "insight", "isotropy", "partition_ratio")
         or _has(records, "insight", "isotropy", "mean_unit_vector_norm"), line_chart(iso),
         "no isotropy in these results"),
        (_has(records, "insight", "row_norms", "mean"), line_chart(norms), "no row norms in these results"),
        (_has(records, "insight", "frozen_tokens", "count"), line_chart(frozen),
         "no frozen-token counts (first snapshot only, or not measured)"),
        (_has(records, "insight", "neighbourhood_drift", "mean_overlap"), line_chart(nd),
         "no neighbourhood drift (needs two snapshots)")]) + "</section>")


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


def tokens_section(records: list[dict[str, Any]], vocab: dict[int, str]) -> str:
    """The latest result's most and least drifted tokens (and the neighbourhoods that changed most)."""
    with_drift = [r for r in records if isinstance(r.get("drift"), dict)]
    if not with_drift:
        return '<section id="tokens"><h2>Most and least drifted tokens</h2>' + _note(
            "No drift in these results, so no drifted tokens.") + "</section>"
    r = with_drift[-1]
    d = r["drift"]
    parts = [f'<section id="tokens"><h2>Most and least drifted tokens (iter {r["iter"]} vs '
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
    parts.append("</div></section>")
    return "".join(parts)


def probes_section(records: list[dict[str, Any]], vocab: dict[int, str]) -> str:
    """Each probe token's nearest neighbours in the latest result, and how they evolved."""
    with_probes = [r for r in records if isinstance(_get(r, "insight", "probes"), list) and r["insight"]["probes"]]
    if not with_probes:
        return '<section id="probes"><h2>Probe tokens</h2>' + _note(
            "No probe tokens in these results (start the daemon with --probe to follow chosen tokens).") + "</section>"
    latest = with_probes[-1]
    parts = [f'<section id="probes"><h2>Probe tokens: nearest neighbours at iter {latest["iter"]}</h2>'
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
    parts.append("</section>")
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
"""


def build_report(res: Results) -> str:
    """The whole HTML page for these results."""
    recs = res.records
    vocab = _vocabulary(recs)
    tips: dict[int, list[str]] = {}  # one marker per iteration, at most MAX_MARKERS of them
    for it, a in _alerts(recs):
        tips.setdefault(it, []).append(f"{a.get('kind', '?')}: {a.get('message', '')}")
    markers = [(float(it), f"alert at iter {it}: " + "; ".join(t)) for it, t in list(tips.items())[:MAX_MARKERS]]
    run = recs[-1].get("run", "?")
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>Embedding report: {esc(run)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Embedding report: {esc(run)}</h1>",
        header_section(res), alerts_section(recs), drift_section(recs, markers),
        geometry_section(recs, markers), insight_section(recs, markers), tokens_section(recs, vocab),
        probes_section(recs, vocab),
        f'<p class="foot">Generated by analysis-daemon report on {esc(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} '
        f"from {esc(res.path)}. Hover a point for its value.</p></body></html>\n"])


def build_parser() -> argparse.ArgumentParser:
    """The `analysis-daemon report` argument parser."""
    p = argparse.ArgumentParser(
        prog="analysis-daemon report",
        description="Turn a run's results (runs/<run>/analysis.jsonl) into one self-contained HTML page: drift, "
                    "neighbourhood size, mean similarity, the similarity histogram over time, effective rank, "
                    "alerts and probe tokens. Needs no network to view.")
    p.add_argument("results", type=Path, metavar="RESULTS",
                   help=f"a run directory (runs/<run>) or a results file ({RESULTS_NAME})")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.html",
                   help=f"where to write the page (default: {REPORT_NAME} next to the results file)")
    p.add_argument("--run", metavar="NAME", help="the run to report when the file holds several")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `analysis-daemon report RESULTS [-o OUT.html]`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = resolve_results_path(args.results)
        res = load_results(path, args.run)
        out = args.output or path.parent / REPORT_NAME
        try:
            out.write_text(build_report(res), encoding="utf-8")
        except OSError as exc:
            raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except ReportError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    note = f", {res.skipped_lines} malformed line(s) skipped" if res.skipped_lines else ""
    print(f"report: {out} ({len(res.records)} results, iterations {res.records[0]['iter']} to "
          f"{res.records[-1]['iter']}{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
