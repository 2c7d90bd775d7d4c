"""The galaxy map in the report: small multiples over time, the latest map with a tooltip per token, clusters.

A record's `galaxy` (written by the daemon) holds a 2-D projection of a fixed subset of rows and the
clusters found from the neighbour graph: {"method", "rows", "seed", "explained_variance": [f, f],
"points": [[token_id, x, y, cluster], ...], "clusters": [{"id", "size", "members": [[token_id, str|null]]}]},
cluster -1 being a singleton. Every field is checked here; bad points are skipped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .records import Page, RunView, get, integer, lst, note, num, token_html, token_label
from .svg import Scatter, esc, scatter

SNAPSHOTS = 8  # small multiples per run, evenly spaced over its maps
MAX_POINTS = 4000  # points drawn per map (the daemon's subset is normally smaller)
MAX_CLUSTERS = 400  # clusters read per map
CLUSTER_ROWS = 20  # clusters listed under the latest map
CLUSTER_MEMBERS = 12  # members shown per listed cluster
SINGLETON = "#c8c8c8"
OTHER_CLUSTER = "#8a8a8a"  # clusters beyond the palette (the smallest ones)
# 20 distinguishable hues for the largest clusters (Okabe-Ito first, then Tableau-like colours).
CLUSTER_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
                   "#8C564B", "#17BECF", "#9467BD", "#BCBD22", "#E41A1C", "#1F3A93", "#FB9A99", "#2CA02C",
                   "#B15928", "#6A3D9A", "#FF7F00", "#666600")


@dataclass
class GalaxyMap:
    """One record's map, checked: points, clusters (largest first) and what was wrong with the rest."""

    iter: int
    points: list[tuple[int, float, float, int]]
    clusters: list[tuple[int, int, list[tuple[int, Any]]]]  # (id, size, members)
    method: str = "?"
    rows: int | None = None
    vocab_rows: int | None = None  # V: the map shows `rows` of them
    threshold: float | None = None  # the cosine that links two tokens of a cluster
    cluster_count: int | None = None  # every cluster, where the list names only the largest
    explained: list[float] = field(default_factory=list)
    bad_points: int = 0
    more_points: int = 0


def parse_galaxy(rec: dict[str, Any]) -> GalaxyMap | None:
    """The record's galaxy map with malformed points skipped (counted), or None when it has none."""
    g = rec.get("galaxy")
    if not isinstance(g, dict) or not isinstance(g.get("points"), list):
        return None
    raw = g["points"]
    gm = GalaxyMap(rec["iter"], [], [], method=str(g.get("method", "?"))[:40], rows=integer(g, "rows"),
                   vocab_rows=integer(g, "vocab_rows"), threshold=num(g, "threshold"),
                   cluster_count=integer(g, "cluster_count"),
                   explained=[v for v in (num(g, "explained_variance", i) for i in range(2)) if v is not None])
    for p in raw[:MAX_POINTS]:
        tid, x, y, c = integer(p, 0), num(p, 1), num(p, 2), integer(p, 3)
        if tid is None or x is None or y is None or c is None or not (isinstance(p, list) and len(p) == 4):
            gm.bad_points += 1
            continue
        gm.points.append((tid, x, y, c))
    gm.more_points = max(len(raw) - MAX_POINTS, 0)
    for c in lst(g, "clusters")[:MAX_CLUSTERS]:
        cid, size = integer(c, "id"), integer(c, "size")
        if cid is None or size is None:
            continue
        members = [(m[0], get(m, 1)) for m in lst(c, "members")[:CLUSTER_MEMBERS * 4] if integer(m, 0) is not None]
        gm.clusters.append((cid, size, members))
    gm.clusters.sort(key=lambda c: (-c[1], c[0]))
    return gm


def _colours(latest: GalaxyMap) -> dict[int, str]:
    """Colour of each cluster id of the latest map: the largest clusters get the distinct hues."""
    sizes: dict[int, int] = {cid: size for cid, size, _ in latest.clusters if cid != -1}
    for _, _, _, c in latest.points:  # clusters the list left out still get a colour
        if c != -1:
            sizes.setdefault(c, 0)
    order = sorted(sizes, key=lambda c: (-sizes[c], c))
    return {c: CLUSTER_COLOURS[k] if k < len(CLUSTER_COLOURS) else OTHER_CLUSTER for k, c in enumerate(order)}


def _axis_label(gm: GalaxyMap, k: int) -> str:
    name = "PC" if gm.method.lower() == "pca" else f"{gm.method} axis "
    if len(gm.explained) > k and 0 <= gm.explained[k] <= 1:
        return f"{name}{k + 1} ({100 * gm.explained[k]:.1f}% of variance)"
    return f"{name}{k + 1}"


def _evenly(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _run_galaxy(view: RunView, vocab: dict[int, str], prefix: str) -> str:
    # only the maps drawn are parsed: a long run holds hundreds of them
    with_map = [r for r in view.records if isinstance(get(r, "galaxy", "points"), list)]
    maps = [gm for r in _evenly(with_map, SNAPSHOTS) if (gm := parse_galaxy(r)) is not None]
    if not maps:
        return note("No galaxy map in these results (written by a daemon that does not compute it).")
    latest = maps[-1]
    colour_of = _colours(latest)
    sizes = {cid: size for cid, size, _ in latest.clusters}
    rows = f", {latest.rows} points" if latest.rows is not None else ""
    if latest.rows is not None and latest.vocab_rows is not None:
        rows = f", {latest.rows} of the {latest.vocab_rows} tokens (the same ones in every map)"
    link = f"; a cluster: tokens linked by a cosine above {latest.threshold:g}" if latest.threshold is not None else ""
    parts = [f"<p>{len(with_map)} map(s), {len(maps)} shown; method {esc(latest.method)}{rows}{link}"
             ". Small multiples: each point "
             "is a token, coloured by its cluster at that snapshot; a cluster keeps its id, hence its colour, "
             "while it keeps most of its points, so you watch the galaxies form (light grey: a token with no "
             "neighbour; dark grey: a cluster that is gone by the latest map or beyond the 20 largest).</p>",
             '<div class="row multiples">']
    for gm in maps:
        n_clusters = len({c for *_, c in gm.points if c != -1})
        # the daemon keeps a cluster's id while it keeps most of its points, so a galaxy keeps its colour;
        # a cluster gone by the latest map is dark grey
        pts = [(x, y, SINGLETON if c == -1 else colour_of.get(c, OTHER_CLUSTER), "") for _, x, y, c in gm.points]
        pts.sort(key=lambda p: p[2] != SINGLETON)  # singletons underneath
        small = Scatter(f"iter {gm.iter}: {n_clusters} clusters", pts, size=132, radius=1.4, axes=False)
        parts.append(f'<div class="fig">{scatter(small)}</div>')
    parts.append("</div>")
    pts = []
    for tid, x, y, c in latest.points:
        where = f"cluster {c} ({sizes[c]} tokens)" if c != -1 and c in sizes else f"cluster {c}" if c != -1 \
            else "alone (no neighbour above the threshold)"
        pts.append((x, y, colour_of.get(c, SINGLETON), f"{token_label(tid, vocab, 40)}: {where}"))
    pts.sort(key=lambda p: p[2] != SINGLETON)
    big = scatter(Scatter(f"{prefix}Galaxy map at iter {latest.iter} (hover a point for its token)", pts,
                          _axis_label(latest, 0), _axis_label(latest, 1), size=560, radius=2.6))
    rows = []
    for cid, size, members in [c for c in latest.clusters if c[0] != -1][:CLUSTER_ROWS]:
        swatch = f'<span class="swatch" style="background:{colour_of.get(cid, OTHER_CLUSTER)}"></span>'
        shown = ", ".join(token_html(tid, vocab, s) for tid, s in members[:CLUSTER_MEMBERS])
        more = " ..." if size > min(len(members), CLUSTER_MEMBERS) else ""
        rows.append(f"<tr><td>{swatch}{cid}</td><td>{size}</td><td>{shown}{more}</td></tr>")
    n_real = sum(1 for c in latest.clusters if c[0] != -1)
    if latest.cluster_count is not None and latest.cluster_count > n_real:  # the daemon lists the largest only
        n_real = latest.cluster_count
    alone = sum(1 for *_, c in latest.points if c == -1)
    listing = (f'<div class="tbl"><h3>Clusters at iter {latest.iter}: {n_real} (largest first'
               + (f", first {min(CLUSTER_ROWS, len(rows))}" if n_real > len(rows) else "")
               + f"); {alone} point(s) alone</h3>"
               "<table><tr><th>cluster</th><th>tokens</th><th>largest members</th></tr>" + "".join(rows)
               + "</table></div>") if rows else note(f"No clusters at iter {latest.iter}: every token is alone.")
    bad = sum(gm.bad_points for gm in maps)
    more = sum(gm.more_points for gm in maps)
    notes = (note(f"{bad} malformed point(s) skipped in the maps shown.") if bad else "") \
        + (note(f"{more} point(s) beyond {MAX_POINTS} per map not drawn.") if more else "")
    return "".join(parts) + f'<div class="row"><div class="fig">{big}</div>{listing}</div>' + notes


def galaxy_section(page: Page, vocabs: dict[str, dict[int, str]]) -> str:
    """Per run: how the clusters formed over time, and the latest map to explore."""
    parts = ['<section id="galaxy"><h2>Galaxy map</h2><p>A 2-D projection of the embedding (the same subset of '
             "tokens at every snapshot, aligned between snapshots so the map does not spin) with the clusters of "
             "its neighbour graph coloured.</p>"]
    for view in page.runs:
        if page.multi:
            parts.append(f'<h3 class="run"><span class="swatch" style="background:{view.colour}"></span>'
                         f"{esc(view.label)}</h3>")
        parts.append(_run_galaxy(view, vocabs.get(view.label, {}), f"{view.label}: " if page.multi else ""))
    parts.append("</section>")
    return "".join(parts)
