"""Alerts on a run's results: representation collapse and drift spikes, throttled per run and kind.

- collapse: mean pairwise cosine above `collapse_mean_sim`, or effective rank below
  `collapse_min_rank_fraction` x min(valid rows, d) (dimensional collapse, which the mean cosine misses).
- drift_spike: the drift cosine (average cosine similarity to the previous snapshot) more than
  `drift_spike_mads` robust standard deviations below the median of the run's last `drift_window`
  drift values, once at least `drift_min_history` are known (so only after the run's trend is set).
  Robust std = 1.4826 x MAD (median absolute deviation), floored at `_MIN_SPREAD` so a flat history
  does not turn float noise into alerts.
- partial_collapse: a clump (clump.py) of at least `partial_collapse_share` of the valid rows whose
  members are each other's neighbours, named with its size, share and first members.
- undertrained_jump: the count of under-trained tokens (undertrained.py) rose by at least
  max(`_MIN_UNDERTRAINED_JUMP`, `undertrained_jump` x rows) since the run's previous result: a part of the
  vocabulary stopped being trained (a data pipeline change, a tokenizer mismatch) or the group first formed.
Every alert goes into its result's "alerts" list; `notified` says whether it also went to the log
and wandb.alert, which happens at most once per kind per run every `interval` seconds.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

_MIN_SPREAD = 1e-4  # cosine units
_MIN_UNDERTRAINED_JUMP = 8  # tokens: a rise smaller than this is not worth a notification


@dataclass(frozen=True)
class AlertSettings:
    """Bounds and throttling of the alerts (from the command line)."""

    collapse_mean_sim: float = 0.9
    collapse_min_rank_fraction: float = 0.1
    drift_window: int = 20
    drift_min_history: int = 5
    drift_spike_mads: float = 3.0
    partial_collapse_share: float = 0.2  # clump of at least this share of the vocabulary; 0 turns it off
    interval: float = 300.0  # seconds between notifications of one kind for one run
    undertrained_jump: float = 0.001  # share of the rows the under-trained count must rise by; 0 turns it off


@dataclass
class RunAlerts:
    """One run's alert state: its recent drift values and when each kind was last notified."""

    drift_history: deque[float] = field(default_factory=deque)
    last_notified: dict[str, float] = field(default_factory=dict)
    undertrained_count: int | None = None  # the previous result's under-trained count


def _alert(kind: str, metric: str, value: float, bound: float, message: str) -> dict[str, Any]:
    return {"kind": kind, "message": message, "metric": metric, "value": value, "bound": bound}


def drift_spike_bound(history: list[float], mads: float) -> float:
    """median(history) - mads x max(1.4826 x MAD, _MIN_SPREAD): drift cosines below it are spikes."""
    med = statistics.median(history)
    mad = statistics.median(abs(v - med) for v in history)
    return med - mads * max(1.4826 * mad, _MIN_SPREAD)


def check(result: dict[str, Any], settings: AlertSettings, state: RunAlerts, now: float) -> list[dict[str, Any]]:
    """The alerts raised by `result` (the record being built); updates `state` (history, throttle)."""
    found: list[dict[str, Any]] = []
    it = result.get("iter")
    sparsity = (result.get("geometry") or {}).get("global_sparsity") or {}
    mean = sparsity.get("mean_similarity")
    if mean is not None and mean > settings.collapse_mean_sim:
        found.append(_alert("collapse", "geometry.global_sparsity.mean_similarity", mean,
                            settings.collapse_mean_sim,
                            f"iter {it}: mean cosine similarity {mean:.4f} > {settings.collapse_mean_sim} "
                            "(representation collapse?)"))
    rank = (result.get("insight") or {}).get("effective_rank")
    geometry = result.get("geometry") or {}
    shape = result.get("shape") or [0, 0]
    full = min(geometry.get("valid_rows", shape[0]), shape[1])
    if rank is not None and full > 0 and rank < settings.collapse_min_rank_fraction * full:
        bound = settings.collapse_min_rank_fraction * full
        found.append(_alert("collapse", "insight.effective_rank", rank, bound,
                            f"iter {it}: effective rank {rank:.1f} < {bound:.1f} "
                            f"({settings.collapse_min_rank_fraction} x {full}; dimensional collapse?)"))
    clump = result.get("clump")
    if clump:
        names = ", ".join(repr(t) if t is not None else f"#{i}"
                          for i, t in zip(clump["token_ids"][:5], clump.get("token_strings") or [None] * 5))
        found.append(_alert("partial_collapse", "clump.fraction", clump["fraction"], clump["share"],
                            f"iter {it}: {clump['size']:,} tokens, {clump['fraction']:.0%} of the vocabulary, "
                            f"in one clump (cosine > {clump['threshold']} between {clump['mutual']:.0%} of "
                            f"its members' pairs, checked on {clump['sampled_members']} of them): {names}, ..."))
    under = (result.get("insight") or {}).get("undertrained") or {}
    count = under.get("count")
    if count is not None:
        before = state.undertrained_count
        bound = max(_MIN_UNDERTRAINED_JUMP, settings.undertrained_jump * shape[0])
        if settings.undertrained_jump > 0 and before is not None and count - before >= bound:
            found.append(_alert("undertrained_jump", "insight.undertrained.count", count, before + bound,
                                f"iter {it}: {count:,} tokens look under-trained, {count - before:,} more than "
                                f"at the previous result ({under.get('method')}; see insight.undertrained_tokens)"))
        state.undertrained_count = count
    cos = (result.get("drift") or {}).get("average_cosine_similarity")
    if cos is not None:
        history = list(state.drift_history)
        if len(history) >= settings.drift_min_history:
            bound = drift_spike_bound(history, settings.drift_spike_mads)
            if cos < bound:
                found.append(_alert("drift_spike", "drift.average_cosine_similarity", cos, bound,
                                    f"iter {it}: drift cosine {cos:.4f} far below its recent trend "
                                    f"(median {statistics.median(history):.4f} of the last {len(history)}, "
                                    f"bound {bound:.4f})"))
        state.drift_history.append(cos)
        while len(state.drift_history) > settings.drift_window:
            state.drift_history.popleft()
    for kind in {a["kind"] for a in found}:
        notify = now - state.last_notified.get(kind, -float("inf")) >= settings.interval
        if notify:
            state.last_notified[kind] = now
        for a in found:
            if a["kind"] == kind:
                a["notified"] = notify
                notify = False  # one notification per kind per result
    return found
