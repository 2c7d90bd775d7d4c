"""Token histories for the report: one line per token over iterations (drift, neighbourhood, probes, norms).

The records hold per-token values only for the tokens a result lists: its --top-k most and least drifted
tokens (with their drift cosine), the tokens whose neighbourhood changed most (with their overlap), and
the probes (with their nearest neighbours). A token's line therefore has a point where a result listed
it and breaks where none did; the page says so beside the charts. The "token_stats" of a result give the
row norm and neighbourhood size of every token the daemon follows (listed once, followed from then on).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .records import Page, RunView, get, integer, lst, note, num, token_label, with_breaks
from .svg import WIDE_PALETTE, Chart, Series, esc, line_chart

LAST_TOKENS = 8  # the latest result's most (least) drifted tokens followed back in time
UNION_TOKENS = 4  # plus the tokens most often among the first LAST_TOKENS over the whole run
MAX_LISTED = 1000  # entries read from one result's token list (the daemon writes --top-k of them)
MAX_PROBES = 12  # probe tokens followed
MAX_MAPS = 400  # galaxy maps read for the cluster-size history (evenly over a longer run)
MAX_MAP_POINTS = 4000  # points read per map (as the galaxy section draws)
MAX_STATS = 1000  # token_stats entries read per result (the daemon writes at most 256)
MAX_STAT_LINES = 16  # tokens drawn in the norm and neighbourhood-size charts


def _listed(rec: dict[str, Any], *keys: str) -> dict[int, float]:
    """token id -> value of a result's [[token_id, value], ...] list."""
    out: dict[int, float] = {}
    for pair in lst(rec, *keys)[:MAX_LISTED]:
        tid, value = integer(pair, 0), num(pair, 1)
        if tid is not None and value is not None:
            out.setdefault(tid, value)
    return out


def chosen_tokens(records: list[dict[str, Any]], *keys: str) -> list[int]:
    """The latest listing's first tokens, then those most often near the top of the list over the run."""
    listings = [[integer(p, 0) for p in lst(r, *keys)[:LAST_TOKENS]] for r in records]
    listings = [[t for t in ids if t is not None] for ids in listings if ids]
    if not listings:
        return []
    chosen = list(dict.fromkeys(listings[-1]))
    often = Counter(t for ids in listings for t in dict.fromkeys(ids))
    extra = [t for t, _ in often.most_common() if t not in chosen]
    return chosen + extra[:UNION_TOKENS]


def _token_chart(page: Page, view: RunView, title: str, y_label: str, tokens: list[int],
                 values: list[dict[int, float]], xs: list[float], vocab: dict[int, str]) -> str:
    series = []
    for k, tid in enumerate(tokens):
        bx, by = with_breaks(view, xs, [v.get(tid) for v in values])
        series.append(Series(token_label(tid, vocab), bx, by, colour=WIDE_PALETTE[k % len(WIDE_PALETTE)]))
    chart = Chart(title, y_label, series, markers=page.markers, x_range=page.x_range, width=560,
                  gaps=view.gaps, skips=view.skips)
    return f'<div class="fig">{line_chart(chart)}</div>'


def _drift_charts(page: Page, view: RunView, vocab: dict[int, str]) -> list[str]:
    recs = [r for r in view.records if isinstance(r.get("drift"), dict)]
    if not recs:
        return [note("Drifted tokens: no drift in these results (drift needs two snapshots of the same shape).")]
    xs = [float(r["iter"]) for r in recs]
    # a token listed as most drifted in one result may be least drifted in another: both lists feed both charts
    values = [{**_listed(r, "drift", "least_drifted_tokens"), **_listed(r, "drift", "most_drifted_tokens")}
              for r in recs]
    out = []
    for which, title in (("most", "Most drifted tokens: drift cosine (1 = did not move)"),
                         ("least", "Least drifted tokens: drift cosine")):
        tokens = chosen_tokens(recs, "drift", f"{which}_drifted_tokens")
        out.append(_token_chart(page, view, title, "cosine", tokens, values, xs, vocab) if tokens
                   else note(f"{which.capitalize()} drifted tokens: the results list none."))
    return out


def _neighbourhood_chart(page: Page, view: RunView, vocab: dict[int, str]) -> list[str]:
    recs = [r for r in view.records if isinstance(get(r, "insight", "neighbourhood_drift"), dict)]
    tokens = chosen_tokens(recs, "insight", "neighbourhood_drift", "most_changed_tokens")
    if not tokens:
        return []
    k = integer(recs[-1], "insight", "neighbourhood_drift", "k")
    values = [_listed(r, "insight", "neighbourhood_drift", "most_changed_tokens") for r in recs]
    return [_token_chart(page, view, f"Changed neighbourhoods: overlap of {k or 'k'} neighbours with before",
                         "overlap", tokens, values, [float(r["iter"]) for r in recs], vocab)]


def _probe_ids(records: list[dict[str, Any]]) -> list[int]:
    """The probe token ids of the latest result that has probes."""
    latest = next((r for r in reversed(records) if lst(r, "insight", "probes")), None)
    ids = [integer(p, "token_id") for p in lst(latest, "insight", "probes")[:MAX_PROBES]]
    return [t for t in ids if t is not None]


def _probe_charts(page: Page, view: RunView, vocab: dict[int, str]) -> list[str]:
    recs = [r for r in view.records if lst(r, "insight", "probes")]
    if not recs:
        return []
    nearest: list[dict[int, float]] = []
    kept: list[dict[int, float]] = []
    previous: dict[int, set[int]] = {}
    probes: dict[int, None] = {}
    for r in recs:
        near, keep, current = {}, {}, {}
        for p in lst(r, "insight", "probes")[:MAX_PROBES]:
            tid = integer(p, "token_id")
            if tid is None:
                continue
            probes.setdefault(tid, None)
            ids = [n for n in (integer(x, 0) for x in lst(p, "neighbours")[:MAX_LISTED]) if n is not None]
            first = num(p, "neighbours", 0, 2)
            if first is not None:
                near[tid] = first
            current[tid] = set(ids)
            if ids and tid in previous:
                keep[tid] = len(previous[tid] & current[tid]) / len(ids)
        nearest.append(near)
        kept.append(keep)
        previous = current
    xs = [float(r["iter"]) for r in recs]
    tokens = list(probes)[:MAX_PROBES]
    return [_token_chart(page, view, "Probe tokens: cosine of the nearest neighbour", "cosine", tokens, nearest,
                         xs, vocab),
            _token_chart(page, view, "Probe tokens: neighbours kept from the previous result", "fraction kept",
                         tokens, kept, xs, vocab)]


def _galaxy_chart(page: Page, view: RunView, vocab: dict[int, str], tokens: list[int]) -> list[str]:
    """Size of each followed token's cluster in the galaxy maps (1: no neighbour), for tokens in the map."""
    recs = [r for r in view.records if isinstance(get(r, "galaxy", "points"), list)]
    if not recs or not tokens:
        return []
    step = max(1, -(-len(recs) // MAX_MAPS))  # a long run: every n-th map, the line is as readable
    recs = recs[::step] + ([recs[-1]] if (len(recs) - 1) % step else [])
    wanted, values = set(tokens), []
    for r in recs:
        cluster_of: dict[int, int] = {}
        sizes: Counter[int] = Counter()
        for p in lst(r, "galaxy", "points")[:MAX_MAP_POINTS]:
            tid, c = integer(p, 0), integer(p, 3)
            if tid is None or c is None:
                continue
            sizes[c] += 1
            if tid in wanted:
                cluster_of[tid] = c
        values.append({t: float(1 if c == -1 else sizes[c]) for t, c in cluster_of.items()})
    shown = [t for t in tokens if any(t in v for v in values)]
    if not shown:
        return [note("Galaxy cluster sizes: none of the followed tokens is in the map's subset of rows.")]
    return [_token_chart(page, view, "Followed tokens: size of their cluster in the galaxy map", "tokens in cluster",
                         shown, values, [float(r["iter"]) for r in recs], vocab)]


def _stats(rec: dict[str, Any]) -> tuple[dict[int, float], dict[int, float], int]:
    """token id -> norm, token id -> neighbourhood size from a result's token_stats; malformed entries counted."""
    norms: dict[int, float] = {}
    sizes: dict[int, float] = {}
    bad = 0
    for entry in lst(rec, "token_stats", "tokens")[:MAX_STATS]:
        tid, norm, size = integer(entry, 0), num(entry, 1), get(entry, 2)
        size_ok = size is None or (integer(entry, 2) is not None and size >= 0)
        if tid is None or not isinstance(entry, list) or len(entry) != 3 or not size_ok \
                or (norm is None and get(entry, 1) is not None):
            bad += 1
            continue
        if norm is not None:
            norms.setdefault(tid, norm)
        if size is not None:
            sizes.setdefault(tid, float(size))
    return norms, sizes, bad


def _stats_charts(page: Page, view: RunView, vocab: dict[int, str], tokens: list[int]) -> list[str]:
    """Norm and neighbourhood size of the followed tokens over iterations (the records' token_stats)."""
    recs = [r for r in view.records if isinstance(get(r, "token_stats"), dict)]
    if not recs or not tokens:
        return []
    norms, sizes, bad = [], [], 0
    for r in recs:
        n, s, b = _stats(r)
        norms.append(n)
        sizes.append(s)
        bad += b
    shown = [t for t in tokens if any(t in v for v in norms) or any(t in v for v in sizes)][:MAX_STAT_LINES]
    out = [note(f"Token norms and neighbourhood sizes: {bad} malformed token_stats entr"
                f"{'y' if bad == 1 else 'ies'} skipped.")] if bad else []
    if not shown:
        return out + [note("Token norms and neighbourhood sizes: the results give none for the followed tokens.")]
    thr = num(recs[-1], "token_stats", "threshold")
    xs = [float(r["iter"]) for r in recs]
    return out + [
        _token_chart(page, view, "Followed tokens: row norm", "L2 norm", shown, norms, xs, vocab),
        _token_chart(page, view, f"Followed tokens: neighbourhood size (cosine > {thr:.2f})" if thr is not None
                     else "Followed tokens: neighbourhood size", "other tokens", shown, sizes, xs, vocab)]


def history_section(page: Page, vocabs: dict[str, dict[int, str]]) -> str:
    """Per run: the drift of its most and least drifted tokens, changed neighbourhoods and probes over time."""
    parts = ['<section id="histories"><h2>Token histories</h2><p>A line per token over iterations: the latest '
             f"result's {LAST_TOKENS} most (least) drifted tokens plus up to {UNION_TOKENS} that were most often "
             "among them over the run, the neighbourhoods that changed most, and every probe token. A result "
             "lists only its --top-k most and least drifted tokens, so a token's line breaks where it was not "
             "among them. With galaxy maps in the results, the size of the cluster each followed token (the "
             f"latest {LAST_TOKENS // 2} most drifted and the probes) belongs to. For the latest "
             f"{LAST_TOKENS // 2} most and {LAST_TOKENS // 2} least drifted tokens and the probes: their row norm "
             "and neighbourhood size (other tokens above the cosine threshold) at every result, from the "
             "results' token_stats: once a result lists a token, the daemon keeps following it (up to 256 "
             "tokens per run), so these lines run on from there.</p>"]
    for view in page.runs:
        vocab = vocabs.get(view.label, {})
        if page.multi:
            parts.append(f'<h3 class="run"><span class="swatch" style="background:{view.colour}"></span>'
                         f"{esc(view.label)}</h3>")
        drifted = [r for r in view.records if isinstance(r.get("drift"), dict)]
        followed = list(dict.fromkeys(chosen_tokens(drifted, "drift", "most_drifted_tokens")[:LAST_TOKENS // 2]
                                      + _probe_ids(view.records)))[:MAX_PROBES]
        least = chosen_tokens(drifted, "drift", "least_drifted_tokens")[:LAST_TOKENS // 2]
        stats_tokens = list(dict.fromkeys(
            chosen_tokens(drifted, "drift", "most_drifted_tokens")[:LAST_TOKENS // 2] + least
            + _probe_ids(view.records)))
        charts = _drift_charts(page, view, vocab) + _neighbourhood_chart(page, view, vocab) \
            + _probe_charts(page, view, vocab) + _galaxy_chart(page, view, vocab, followed) \
            + _stats_charts(page, view, vocab, stats_tokens)
        parts.append('<div class="row">' + "".join(charts) + "</div>")
    parts.append("</section>")
    return "".join(parts)
