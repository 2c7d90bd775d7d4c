"""Small inline-SVG plots for the HTML report: line charts (with bands), a heatmap and a scatter plot.

No plotting library: the report must open anywhere without network or JavaScript, and the project's
dependencies stay torch, numpy, wandb, pyzmq, msgpack. Every string that reaches the SVG goes through
`esc`, so token strings from the network cannot inject markup.
"""
from __future__ import annotations

import base64
import html
import math
import re
import sys
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

# Colour-blind friendly line colours (Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
# Lines of one chart beyond the first seven (token histories): more distinct hues after Okabe-Ito's.
WIDE_PALETTE = PALETTE + ("#8C564B", "#7F7F7F", "#BCBD22", "#17BECF", "#9467BD", "#2CA02C", "#F0027F",
                          "#666600", "#1F3A93", "#B15928", "#6A3D9A", "#FB9A99", "#33A02C")
# A handful of points of the viridis colour map; the heatmap interpolates between them.
_VIRIDIS = ((68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
            (31, 158, 137), (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37))
_FONT = 'font-family="sans-serif" font-size="11"'
_TITLE = 'font-family="sans-serif" font-size="13" font-weight="bold"'


# Characters XML 1.0 does not allow at all (inline SVG is XML): shown as \xNN instead of breaking the page.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(value: object) -> str:
    """HTML/XML-escape anything (quotes included); characters XML forbids become a visible \\xNN."""
    return html.escape(_NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)), quote=True)


def fmt(value: float | None, digits: int = 4) -> str:
    """A number for people: fixed decimals for ordinary values, scientific for tiny or huge ones."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 10 ** -digits):
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}f}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(hi - lo)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(count, 1)
    if raw < sys.float_info.min:  # a subnormal (or underflowed) step: floats cannot subdivide [lo, hi]
        return [lo, hi]
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    for n in range(3 * count + 3):  # bounded: at float precision limits `first + n * step` may not move
        t = first + n * step
        if t > hi + step * 1e-9:
            break
        if t < lo - step * 1e-9:  # ceil's tolerance may land one step below
            continue
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
    return ticks


def _tick_label(t: float, step: float) -> str:
    if step >= 1 and abs(t) < 1e6:
        return f"{t:.0f}"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    return f"{t:.{min(decimals, 6)}f}" if abs(t) >= 1e-3 or t == 0 else f"{t:.1e}"


@dataclass
class Series:
    """One line of a chart: y values at x positions (None = gap), optionally a band lower..upper."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    lower: Sequence[float | None] | None = None
    upper: Sequence[float | None] | None = None
    colour: str = ""
    digits: int = 4
    band_label: str = ""
    group: str = ""  # the run, when several share the chart: prefixes the legend and every tooltip
    dash: str = ""  # SVG stroke-dasharray: tells apart two metrics of one run (the colour is the run's)


@dataclass
class Chart:
    """Geometry of one line chart."""

    title: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    x_label: str = "iteration"
    width: int = 560
    height: int = 280
    markers: Sequence[tuple[float, str]] = ()  # vertical marks (x, tooltip), e.g. alerts
    x_range: tuple[float, float] | None = None  # shared by every chart of a page, so they line up
    skips: Sequence[tuple[float, str, str]] = ()  # (x, tooltip, colour): iterations skipped, ticked at the bottom
    gaps: Sequence[tuple[float, float, str, str]] = ()  # (from, to, tooltip, colour): no results in between

    def has_x_span(self) -> bool:
        """Whether the page's shared x range covers more than one iteration (other charts have others)."""
        return self.x_range is not None and all(map(math.isfinite, self.x_range)) and self.x_range[0] < self.x_range[1]


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _segments(xs: Sequence[float], ys: Sequence[float | None]) -> list[list[tuple[float, float]]]:
    out: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys):
        if _finite(y):
            out[-1].append((x, y))  # type: ignore[arg-type]
        elif out[-1]:
            out.append([])
    return [s for s in out if s]


HATCH_ID = "gap-hatch"
# One hatch pattern per SVG (ids must be unique per document only in theory; browsers resolve the first).
_HATCH = (f'<defs><pattern id="{HATCH_ID}" width="6" height="6" patternUnits="userSpaceOnUse" '
          'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#bbb" stroke-width="1.5"/>'
          '</pattern></defs>')


def _x_domain(chart: Chart, xs_all: list[float]) -> tuple[float, float]:
    if chart.x_range is not None and all(math.isfinite(v) for v in chart.x_range):
        x0, x1 = chart.x_range
    else:
        x0, x1 = min(xs_all), max(xs_all)
    return (x0 - 1, x1 + 1) if x1 <= x0 else (x0, x1)


def x_axis(parts: list[str], x0: float, x1: float, px: Any, y: float, count: int = 6) -> None:
    """Round ticks and labels of a numeric iteration axis along y."""
    xt = [t for t in nice_ticks(x0, x1, count) if x0 <= t <= x1]
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    for t in xt:
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{y}" y2="{y + 4}" stroke="#555"/>')
        parts.append(f'<text x="{px(t):.1f}" y="{y + 16}" {_FONT} text-anchor="middle">'
                     f'{esc(_tick_label(t, xstep))}</text>')


def gap_marks(parts: list[str], chart_gaps: Sequence[tuple[float, float, str, str]],
              chart_skips: Sequence[tuple[float, str, str]], x0: float, x1: float, px: Any, top: float,
              ph: float) -> None:
    """Hatched spans where a run has no results, and a tick per skipped iteration (each with a tooltip)."""
    for g0, g1, tip, colour in chart_gaps:
        a, b = max(g0, x0), min(g1, x1)
        if b > a:
            parts.append(f'<rect class="gap" x="{px(a):.1f}" y="{top}" width="{px(b) - px(a):.1f}" height="{ph}" '
                         f'fill="url(#{HATCH_ID})" fill-opacity="0.5" stroke="{colour}" stroke-opacity="0.35">'
                         f'<title>{esc(tip)}</title></rect>')
    for x, tip, colour in chart_skips:
        if x0 <= x <= x1:
            parts.append(f'<path class="skip" d="M{px(x):.1f},{top + ph - 9:.1f} l-4,9 h8 z" fill="{colour}" '
                         f'fill-opacity="0.8"><title>{esc(tip)}</title></path>')


def _runs_of_finite(rows: list[tuple[float, float | None, float | None]]) -> list[list[tuple[float, float, float]]]:
    out: list[list[tuple[float, float, float]]] = [[]]
    for x, lo, hi in rows:
        if _finite(lo) and _finite(hi):
            out[-1].append((x, lo, hi))  # type: ignore[arg-type]
        elif out[-1]:
            out.append([])
    return [r for r in out if r]


def line_chart(chart: Chart) -> str:
    """An SVG line chart; every point carries a tooltip 'iter X: value' (SVG <title>).

    A None value breaks the line (a gap), so does a band's None; gaps and skipped iterations are marked.
    """
    left, right, bottom = 64, 14, 42
    ncols = 1 if len(chart.series) <= 4 else 2  # many lines (token histories): a two-column legend
    nrows = math.ceil(len(chart.series) / ncols)
    top = 30 + 15 * nrows  # the legend sits between the title and the plot
    w, h = chart.width, chart.height + 15 * nrows
    pw, ph = w - left - right, h - top - bottom
    xs_all = [x for s in chart.series for x, y in zip(s.xs, s.ys) if _finite(y)]
    ys_all = [y for s in chart.series for y in s.ys if _finite(y)]
    for s in chart.series:
        for band in (s.lower, s.upper):
            ys_all += [v for v in band or () if _finite(v)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="{esc(chart.title)}">',
             f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
             f'<text x="{left}" y="16" {_TITLE}>{esc(chart.title)}</text>']
    if not xs_all:
        parts.append(f'<text x="{w / 2}" y="{h / 2}" {_FONT} text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    parts.insert(1, _HATCH)
    x0, x1 = _x_domain(chart, xs_all)
    # One iteration on the whole axis (a one-checkpoint report): no line, no trend, no invented iterations
    # around it; the point is marked with its value, at the middle, with a y-axis around the value.
    single = min(xs_all) == max(xs_all) and not chart.has_x_span()
    y0, y1 = min(ys_all), max(ys_all)
    pad = (y1 - y0) * 0.06 if y1 > y0 else (abs(y0) * 0.05 or 0.5)
    # counts, norms and sizes never go below 0: the padding must not invent negative ticks for them
    y0, y1 = (max(y0 - pad, 0.0) if y0 >= 0 else y0 - pad), y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    yt = nice_ticks(y0, y1, 5)
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for t in yt:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e3e3e3"/>')
        parts.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" {_FONT} text-anchor="end">'
                     f'{esc(_tick_label(t, ystep))}</text>')
    if single:
        only = xs_all[0]
        parts.append(f'<line x1="{px(only):.1f}" x2="{px(only):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#555"/>')
        parts.append(f'<text x="{px(only):.1f}" y="{top + ph + 16}" {_FONT} text-anchor="middle">'
                     f'{esc(f"{only:g}")}</text>')
        parts.append(f'<text class="single" x="{left + pw / 2:.1f}" y="{top + 14}" {_FONT} text-anchor="middle">'
                     f'one analysed iteration: no trend yet</text>')
    else:
        x_axis(parts, x0, x1, px, top + ph)
    gap_marks(parts, chart.gaps, chart.skips, x0, x1, px, top, ph)
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#555"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 6}" {_FONT} text-anchor="middle">{esc(chart.x_label)}</text>')
    parts.append(f'<text transform="translate(13,{top + ph / 2}) rotate(-90)" {_FONT} '
                 f'text-anchor="middle">{esc(chart.y_label)}</text>')
    for x, tip in chart.markers:
        if x0 <= x <= x1:
            parts.append(f'<line class="marker" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + ph}" '
                         f'stroke="#c00" stroke-dasharray="4 3"><title>{esc(tip)}</title></line>')
    for i, s in enumerate(chart.series):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        prefix = f"{s.group}: " if s.group else ""
        if s.lower is not None and s.upper is not None:
            for pts in _runs_of_finite(list(zip(s.xs, s.lower, s.upper))):
                poly = [f"{px(x):.1f},{py(hi):.1f}" for x, _, hi in pts]
                poly += [f"{px(x):.1f},{py(lo):.1f}" for x, lo, _ in reversed(pts)]
                parts.append(f'<polygon class="band" points="{" ".join(poly)}" fill="{colour}" '
                             f'fill-opacity="0.15" stroke="none"/>')
        for seg in _segments(s.xs, s.ys):
            if single:  # one point: its circle and value below, no line
                continue
            pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in seg)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}/>')
        radius = 4.0 if single else 2.6 if len(s.xs) <= 150 else 1.0  # dense series: dots must not hide the line
        for x, y in zip(s.xs, s.ys):
            if _finite(y) and x0 <= x <= x1:
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{radius}" fill="{colour}">'
                             f'<title>{esc(prefix + s.label)}, iter {x:g}: {esc(fmt(y, s.digits))}</title></circle>')
                if single:  # the number itself, beside its point
                    parts.append(f'<text class="value" x="{px(x) + 8:.1f}" y="{py(y) + 4:.1f}" {_FONT} '
                                 f'fill="{colour}">{esc(fmt(y, s.digits))}</text>')
        label = prefix + s.label + (f" ({s.band_label})" if s.band_label else "")
        ly = 32 + 15 * (i % nrows)
        legend_x_i = left + 4 + (i // nrows) * (w - left - right) // ncols
        parts.append(f'<line x1="{legend_x_i}" x2="{legend_x_i + 14}" y1="{ly - 3}" y2="{ly - 3}" '
                     f'stroke="{colour}" stroke-width="3"{dash}/>')
        parts.append(f'<text x="{legend_x_i + 18}" y="{ly + 1}" {_FONT}>{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def colour_at(t: float) -> tuple[int, int, int]:
    """The viridis colour at t in [0, 1] (clamped)."""
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1) if math.isfinite(t) else 0.0
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


def png_rgb(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """Encode rows of RGB pixels (top row first) as a PNG file."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


@dataclass
class Heatmap:
    """Columns (one per result) of values over bins; values are fractions, shown on a log colour scale."""

    title: str
    columns: list[list[float]]  # columns[i][b]: fraction in bin b of result i
    column_labels: list[float]  # the iteration of each column
    bin_edges: list[float]  # len(bins) + 1 edges, ascending
    y_label: str = "cosine similarity"
    x_label: str = "iteration"
    hlines: Sequence[tuple[float, str]] = ()  # horizontal marks (value, label), e.g. the neighbour threshold
    width: int = 1080
    height: int = 340
    step: float = 0.0  # iterations per column slot (the run's usual interval); 0: from the labels
    x_range: tuple[float, float] | None = None  # iterations shown, shared with the line charts
    skips: Sequence[tuple[float, str, str]] = ()
    gaps: Sequence[tuple[float, float, str, str]] = ()


MAX_SLOTS = 1500  # pixel columns of a heatmap at most: a longer run gets wider slots


def slot_grid(labels: Sequence[float], step: float) -> tuple[float, float, int]:
    """(first iteration, slot width, slot count) placing every column at its iteration on a numeric axis."""
    first, last = min(labels), max(labels)
    if not step > 0 or not math.isfinite(step):
        diffs = sorted(b - a for a, b in zip(sorted(labels), sorted(labels)[1:]) if b > a)
        step = diffs[len(diffs) // 2] if diffs else 1.0
    if (last - first) / step + 1 > MAX_SLOTS:
        step = (last - first) / (MAX_SLOTS - 1)
    return first, step, int(round((last - first) / step)) + 1


def heatmap(hm: Heatmap) -> str:
    """An SVG heatmap on a numeric iteration axis: one embedded PNG (one pixel per slot and bin), axes in SVG.

    Each column sits at its own iteration; slots without a result stay white and a hatched span with a
    tooltip marks every gap, so skipped or missing iterations show as gaps, not as neighbours.
    """
    left, right, top, bottom = 64, 110, 30, 42
    w, h = hm.width, hm.height
    pw, ph = w - left - right, h - top - bottom
    nbin = len(hm.bin_edges) - 1
    first, step, nslot = slot_grid(hm.column_labels, hm.step)
    positive = [v for col in hm.columns for v in col if v > 0 and math.isfinite(v)]
    vmax = max(positive, default=1.0)
    vmin = max(min(positive, default=1e-6), vmax * 1e-6)
    lmin, lmax = math.log10(vmin), math.log10(vmax)
    if lmax - lmin < 1e-9:
        lmin = lmax - 1
    empty, missing = (245, 245, 245), (255, 255, 255)
    slots: list[list[float] | None] = [None] * nslot
    for col, it in zip(hm.columns, hm.column_labels):  # a later column in the same slot wins
        slots[min(max(int(round((it - first) / step)), 0), nslot - 1)] = col
    rows = []
    for b in reversed(range(nbin)):  # the PNG's first row is the highest similarity
        row = []
        for col in slots:
            v = (col[b] if b < len(col) else 0.0) if col is not None else None
            row.append(missing if v is None else colour_at((math.log10(v) - lmin) / (lmax - lmin))
                       if v > 0 and math.isfinite(v) else empty)
        rows.append(row)
    data = base64.b64encode(png_rgb(rows)).decode("ascii")
    lo, hi = hm.bin_edges[0], hm.bin_edges[-1]
    x0, x1 = first - step / 2, first + (nslot - 0.5) * step
    if hm.x_range is not None and all(math.isfinite(v) for v in hm.x_range):
        x0, x1 = min(x0, hm.x_range[0] - step / 2), max(x1, hm.x_range[1] + step / 2)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + (1 - (v - lo) / (hi - lo)) * ph

    ix0, ix1 = px(first - step / 2), px(first + (nslot - 0.5) * step)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="{esc(hm.title)}">', _HATCH,
             f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
             f'<text x="{left}" y="16" {_TITLE}>{esc(hm.title)}</text>',
             f'<image x="{ix0:.2f}" y="{top}" width="{ix1 - ix0:.2f}" height="{ph}" preserveAspectRatio="none" '
             f'style="image-rendering:pixelated" href="data:image/png;base64,{data}"/>']
    # a gap of the line charts runs from result to result; here the results' own columns are not part of it
    gaps = [(a + step / 2, b - step / 2, tip, c) for a, b, tip, c in hm.gaps if b - a > step * 1.01]
    gap_marks(parts, gaps, hm.skips, x0, x1, px, top, ph)
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#555"/>')
    cw = px(first + step) - px(first)
    for it in hm.column_labels:  # invisible cells give each column a tooltip
        parts.append(f'<rect class="col" x="{px(it) - cw / 2:.2f}" y="{top}" width="{cw:.2f}" height="{ph}" '
                     f'fill="transparent"><title>iter {it:g}</title></rect>')
    for t in nice_ticks(lo, hi, 6):
        if lo <= t <= hi:
            parts.append(f'<line x1="{left - 4}" x2="{left}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#555"/>')
            parts.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" {_FONT} text-anchor="end">{t:g}</text>')
    for v, label in hm.hlines:
        if lo <= v <= hi:
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#fff" '
                         f'stroke-dasharray="5 4" stroke-width="1.2"/>')
            parts.append(f'<text x="{left + pw - 4}" y="{py(v) - 4:.1f}" {_FONT} fill="#fff" stroke="#000" '
                         f'stroke-width="2.5" paint-order="stroke" text-anchor="end">{esc(label)}</text>')
    x_axis(parts, x0, x1, px, top + ph, 10)
    parts.append(f'<text x="{left + pw / 2}" y="{h - 6}" {_FONT} text-anchor="middle">{esc(hm.x_label)}</text>')
    parts.append(f'<text transform="translate(13,{top + ph / 2}) rotate(-90)" {_FONT} '
                 f'text-anchor="middle">{esc(hm.y_label)}</text>')
    # colour bar: 10^k ticks between vmin and vmax
    bx, bw = left + pw + 24, 14
    steps = 40
    for s in range(steps):
        y = top + s * ph / steps
        r, g, b = colour_at(1 - (s + 0.5) / steps)
        parts.append(f'<rect x="{bx}" y="{y:.1f}" width="{bw}" height="{ph / steps + 0.6:.1f}" '
                     f'fill="rgb({r},{g},{b})"/>')
    parts.append(f'<rect x="{bx}" y="{top}" width="{bw}" height="{ph}" fill="none" stroke="#555"/>')
    ends = [(lmax, f"{vmax:.1e}"), (lmin, f"{vmin:.1e}")]  # the extremes, then the decades between them
    decades = [(float(k), f"1e{k}") for k in range(math.ceil(lmin), math.floor(lmax) + 1)
               if min(abs(k - lmin), abs(lmax - k)) > 0.12 * (lmax - lmin)]
    for lv, label in ends + decades:
        y = top + (1 - (lv - lmin) / (lmax - lmin)) * ph
        parts.append(f'<line x1="{bx + bw}" x2="{bx + bw + 4}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555"/>')
        parts.append(f'<text x="{bx + bw + 6}" y="{y + 4:.1f}" {_FONT}>{label}</text>')
    parts.append(f'<text transform="translate({w - 8},{top + ph / 2}) rotate(-90)" {_FONT} '
                 f'text-anchor="middle">fraction of pairs (log)</text>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class Scatter:
    """Points of a 2-D map (the galaxy map): (x, y, colour, tooltip); an empty tooltip draws no <title>."""

    title: str
    points: list[tuple[float, float, str, str]]
    x_label: str = ""
    y_label: str = ""
    size: int = 240  # square: both axes share one scale, so distances on the page mean the same both ways
    radius: float = 2.0
    axes: bool = True  # ticks and labels (off for the small multiples)


def scatter(sc: Scatter) -> str:
    """An SVG scatter plot with equal scales on both axes; hover a point for its tooltip."""
    pad_l, pad_r, pad_b = (44, 10, 34) if sc.axes else (6, 6, 6)
    top = 24
    w, h = sc.size, sc.size + top - (0 if sc.axes else 28)
    pw = ph = min(w - pad_l - pad_r, h - top - pad_b)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="scatter" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="{esc(sc.title)}">',
             f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
             f'<text x="{pad_l}" y="15" {_FONT} font-weight="bold">{esc(sc.title)}</text>']
    pts = [p for p in sc.points if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        parts.append(f'<text x="{w / 2}" y="{h / 2}" {_FONT} text-anchor="middle">no points</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2 * 1.05 or 1.0

    def px(x: float) -> float:
        return pad_l + (x - cx + half) / (2 * half) * pw

    def py(y: float) -> float:
        return top + (1 - (y - cy + half) / (2 * half)) * ph

    parts.append(f'<rect x="{pad_l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    if sc.axes:
        for t in nice_ticks(cx - half, cx + half, 4):
            parts.append(f'<text x="{px(t):.1f}" y="{top + ph + 13}" {_FONT} text-anchor="middle">{t:.3g}</text>')
        for t in nice_ticks(cy - half, cy + half, 4):
            parts.append(f'<text x="{pad_l - 4}" y="{py(t) + 4:.1f}" {_FONT} text-anchor="end">{t:.3g}</text>')
        parts.append(f'<text x="{pad_l + pw / 2}" y="{h - 4}" {_FONT} text-anchor="middle">{esc(sc.x_label)}</text>')
        parts.append(f'<text transform="translate(11,{top + ph / 2}) rotate(-90)" {_FONT} '
                     f'text-anchor="middle">{esc(sc.y_label)}</text>')
    for x, y, colour, tip in pts:
        title = f"<title>{esc(tip)}</title>" if tip else ""
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{sc.radius}" fill="{colour}" '
                     f'fill-opacity="0.8">{title}</circle>')
    parts.append("</svg>")
    return "".join(parts)
