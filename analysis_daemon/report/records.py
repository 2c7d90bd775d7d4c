"""What the report reads: the usable records of each run, and safe accessors for their untrusted contents.

Records come from a file a crash may have cut short, a hand edit, or a hostile trainer's strings: every
accessor returns None (or an empty list) for a wrong type, and every string shown goes through `esc`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .svg import esc

MAX_SKIPPED_READ = 10000  # skipped iterations read per run (a hostile file may list millions)
MAX_SKIP_MARKS = 200  # skipped-iteration ticks drawn per run and chart
MAX_VOCAB_CLUSTERS = 200  # galaxy clusters whose member strings feed the token names
MAX_VOCAB_MEMBERS = 100


@dataclass
class Results:
    """The usable records of a results file, one per iteration, in iteration order."""

    path: Path
    records: list[dict[str, Any]]
    skipped_lines: int = 0
    skip_reasons: list[str] = field(default_factory=list)  # the first few, for the page
    duplicates: int = 0
    other_runs: list[str] = field(default_factory=list)


@dataclass
class RunView:
    """One run on the page: its results, its colour and label, and where its lines must break."""

    res: Results
    label: str
    colour: str
    step: float = 0.0  # its usual interval between results (lower median), 0 when unknown
    breaks: list[float] = field(default_factory=list)  # x positions that split its lines (gaps)
    gaps: list[tuple[float, float, str, str]] = field(default_factory=list)
    skips: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.res.records


@dataclass
class Page:
    """Everything the sections share: the runs, whether there are several, the common iteration range."""

    runs: list[RunView]
    x_range: tuple[float, float]
    markers: list[tuple[float, str]]

    @property
    def multi(self) -> bool:
        return len(self.runs) > 1


def get(obj: Any, *keys: str | int) -> Any:
    """obj[k1][k2]... where every step has the right type, else None."""
    for k in keys:
        if isinstance(k, int):
            if not isinstance(obj, list) or not -len(obj) <= k < len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[k] if isinstance(k, int) else obj.get(k)
    return obj


def num(obj: Any, *keys: str | int) -> float | None:
    """A finite number at obj[keys...], else None (wrong type, missing, NaN: all the same to a plot)."""
    v = get(obj, *keys)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def integer(obj: Any, *keys: str | int) -> int | None:
    """An int (not a bool) at obj[keys...], else None."""
    v = get(obj, *keys)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def lst(obj: Any, *keys: str | int) -> list[Any]:
    """The list at obj[keys...], else an empty list."""
    v = get(obj, *keys)
    return v if isinstance(v, list) else []


def vocabulary(records: list[dict[str, Any]]) -> dict[int, str]:
    """Token id -> string from everything the records name (drift lists, probes)."""
    vocab: dict[int, str] = {}
    for r in records:
        for which in ("most", "least"):
            ids = get(r, "drift", f"{which}_drifted_tokens")
            strings = get(r, "drift", f"{which}_drifted_token_strings")
            if isinstance(ids, list) and isinstance(strings, list):
                for pair, s in zip(ids, strings):
                    tid = integer(pair, 0)
                    if tid is not None and isinstance(s, str):
                        vocab[tid] = s
        for p in lst(r, "insight", "probes"):
            if integer(p, "token_id") is not None and isinstance(get(p, "token"), str):
                vocab[p["token_id"]] = p["token"]
            for n in lst(p, "neighbours"):
                if integer(n, 0) is not None and isinstance(get(n, 1), str):
                    vocab[n[0]] = n[1]
    # the latest galaxy map names the tokens of its clusters (the map's hover titles use them)
    latest_map = next((r for r in reversed(records) if lst(r, "galaxy", "clusters")), None)
    for c in lst(latest_map, "galaxy", "clusters")[:MAX_VOCAB_CLUSTERS]:
        for m in lst(c, "members")[:MAX_VOCAB_MEMBERS]:
            if integer(m, 0) is not None and isinstance(get(m, 1), str):
                vocab[m[0]] = m[1]
    return vocab


def token_label(tid: int, vocab: dict[int, str], width: int = 24) -> str:
    """Plain text for a legend or tooltip (escaped later): 'string' #id, the string cut to `width`."""
    s = vocab.get(tid)
    if s is None:
        return f"#{tid}"
    shown = repr(s)
    return f"{shown[:width] + '...' if len(shown) > width else shown} #{tid}"


def lower_median(values: list[float]) -> float:
    """The lower median (an actual element), 0.0 for an empty list."""
    v = sorted(values)
    return v[(len(v) - 1) // 2] if v else 0.0


def run_view(res: Results, label: str, colour: str, prefix: str = "") -> RunView:
    """A run with its gaps: iterations it skipped, and intervals far longer than its usual step."""
    recs = res.records
    iters = [r["iter"] for r in recs]
    seen = set(iters)
    skipped: set[int] = set()
    for r in recs:
        for i in lst(r, "skipped_iters")[:MAX_SKIPPED_READ]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in seen:
                skipped.add(i)
        if len(skipped) >= MAX_SKIPPED_READ:
            break
    view = RunView(res, label, colour, step=lower_median([b - a for a, b in zip(iters, iters[1:])]))
    ordered = sorted(skipped)
    view.breaks = [float(i) for i in ordered]
    pos = 0
    for a, b in zip(iters, iters[1:]):
        while pos < len(ordered) and ordered[pos] <= a:
            pos += 1
        inside = []
        while pos < len(ordered) and ordered[pos] < b:
            inside.append(ordered[pos])
            pos += 1
        if inside:
            shown = ", ".join(map(str, inside[:10])) + (", ..." if len(inside) > 10 else "")
            view.gaps.append((a, b, f"{prefix}iterations {a} to {b}: {len(inside)} skipped, not analysed "
                                    f"({shown})", colour))
        elif len(iters) >= 3 and b - a > 1.5 * view.step:  # with two results, no usual step to compare to
            view.breaks.append((a + b) / 2)
            view.gaps.append((a, b, f"{prefix}no results between iter {a} and iter {b}", colour))
    view.breaks.sort()
    shown = [i for i in ordered if iters[0] <= i <= iters[-1]]  # the others are off every chart
    if len(shown) > MAX_SKIP_MARKS:  # evenly over the run: the hatched gaps show the rest
        shown = [shown[k * (len(shown) - 1) // (MAX_SKIP_MARKS - 1)] for k in range(MAX_SKIP_MARKS)]
    view.skips = [(float(i), f"{prefix}iter {i} skipped (received, not analysed)", colour) for i in shown]
    return view


def with_breaks(view: RunView, xs: list[float], *columns: list[Any]) -> tuple[list[float], ...]:
    """xs and value columns with a None row inserted at each of the run's breaks, so lines split there."""
    lo, hi = min(xs, default=0.0), max(xs, default=0.0)
    rows = [(x, 0, *vals) for x, *vals in zip(xs, *columns)]
    rows += [(b, 1, *([None] * len(columns))) for b in view.breaks if lo < b < hi]
    rows.sort(key=lambda row: (row[0], row[1]))
    return ([row[0] for row in rows],) + tuple([row[2 + k] for row in rows] for k in range(len(columns)))


def token_html(tid: Any, vocab: dict[int, str], string: Any = None) -> str:
    """Escaped display of a token: its string in quotes and its id, or the id alone."""
    s = string if isinstance(string, str) else vocab.get(tid) if isinstance(tid, int) else None
    ident = esc(tid) if isinstance(tid, int) and not isinstance(tid, bool) else "?"
    return f'<span class="tok">{esc(repr(s))}</span> <span class="id">#{ident}</span>' if s is not None \
        else f'<span class="id">#{ident}</span>'


def note(text: str) -> str:
    """A highlighted note saying why something is not shown."""
    return f'<p class="note">{esc(text)}</p>'


