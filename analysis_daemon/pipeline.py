"""One snapshot pair in, one result record out: the analysis pipeline shared by the daemon and replay.

`analyse(job, settings)` runs drift (against `job.previous`), geometry (exact or sampled) and the
insight extras (spectrum, norms, neighbour lists, probes, galaxy map, clump search, alerts) on
`job.current`, and returns the JSON-ready record the sinks write. The live daemon's worker thread
(service/worker.py) and `analysis-daemon replay` (replay/command.py) both call it, so a replayed
checkpoint and a live snapshot give records of one form.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .metrics.alerts import AlertSettings, RunAlerts, check as check_alerts
from .records import TOKEN_ARRAYS, Job, RunInsight, SnapshotData
from .safetext import first_line

log = logging.getLogger("embedding_monitor.daemon")


@dataclass
class TokenArrays:
    """Every token's figures at one analysed iteration (the explorer's data; V rows each)."""

    knn_ids: torch.Tensor | None  # (V, k) int32 nearest rows by cosine, best first, -1 where none
    knn_cos: torch.Tensor | None  # (V, k) float32 their cosines (of L2-normalised rows, as the geometry)
    drift: torch.Tensor | None  # (V,) float32 drift cosine against the previous snapshot, NaN where none
    norm: torch.Tensor  # (V,) float32 row norm
    xy: torch.Tensor  # (V, 2) float32 map coordinates, aligned with the run's previous ones
    # the (V, d) snapshot itself, not copied: the TensorBoard projector shows it (not in nbytes: not stored)
    weights: torch.Tensor | None = None
    # (V,) int32 neighbourhood size: rows with cosine above the threshold, from the geometry pass; -1 where
    # not known (invalid rows; with sampled geometry, rows outside the sample)
    nbhd: torch.Tensor | None = None
    tokens_seen: torch.Tensor | None = None  # (V,) uint32 tokens fed since the previous analysed snapshot
    tokens_total: torch.Tensor | None = None  # (V,) int64 tokens fed in total since `tokens_total_since`
    tokens_total_since: int | None = None  # the iteration whose counts the total starts with (see RunInsight)

    def stored(self) -> dict[str, torch.Tensor]:
        """The arrays the token data keeps on disk, by file name (without .npy); absent ones left out."""
        arrays = {"norm": self.norm, "xy": self.xy, "drift": self.drift, "knn_ids": self.knn_ids,
                  "knn_cos": self.knn_cos, "nbhd": self.nbhd, "tokens_seen": self.tokens_seen,
                  "tokens_total": self.tokens_total}
        return {name: t for name, t in arrays.items() if t is not None}

    def nbytes(self) -> int:
        """Bytes the arrays hold (what one iteration costs on disk, give or take the file headers)."""
        return sum(t.numel() * t.element_size() for t in self.stored().values())


class AnalysisAbandoned(Exception):
    """Raised from the progress callback to stop a running analysis at shutdown."""


@dataclass(frozen=True)
class AnalysisSettings:
    """Parameters of every analysis (from the command line)."""

    threshold: float = 0.7
    chunk_size: int = 512
    top_k: int = 50
    progress_interval: float = 5.0  # seconds between progress lines of one long analysis
    extras: bool = True  # the "insight" section (insight.py): rank, isotropy, norms, neighbours, probes
    knn_k: int = 10  # neighbours per token for the neighbourhood drift
    probes: tuple[str, ...] = ()  # probe tokens: ids or strings looked up in the trainer's vocabulary
    probe_k: int = 10  # neighbours listed per probe
    galaxy_rows: int = 2000  # points of the galaxy map (a fixed random subset beyond this); 0: no map
    galaxy_seed: int = 0  # seed of that subset, the same at every iteration
    alerts: AlertSettings = AlertSettings()
    sample_rows: int | None = None  # sampled geometry from this many rows (None: the exact pass)
    sample_seed: int = 0  # the sample's seed: the same rows for every snapshot of the same size
    since_init: bool = True  # keep each run's first snapshot: drift since it, and a sharper under-trained search
    undertrained: bool = True  # the under-trained token search (metrics/undertrained.py; part of the extras)
    token_data: bool = True  # per-token arrays for the explorer (TOKEN_ARRAYS): neighbours, drift, norm, map
    device: str = "cpu"  # where the math runs: "cpu", "cuda" or "cuda:N" (resolved from --device by the CLI)


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: tensors/arrays to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _non_finite(t: torch.Tensor) -> dict[str, int]:
    bad = ~torch.isfinite(t)
    return {"values": int(bad.sum()), "rows": int(bad.any(dim=1).sum()) if t.dim() == 2 else 0}


def _token_strings(pairs: Any, vocab: list[str] | None) -> list[str | None] | None:
    if not vocab:
        return None
    out: list[str | None] = []
    for pair in pairs:
        token_id = int(pair[0])
        out.append(vocab[token_id] if 0 <= token_id < len(vocab) else None)
    return out


def warm_up(settings: AnalysisSettings) -> None:
    """Run both analyses once on a tiny matrix, before the ready line.

    The first SVD and the first blocked matmul load LAPACK and start torch's thread pool (a few
    hundred ms on a loaded machine); paid here, they do not delay the first real snapshot, which would
    make the next one arrive while the worker is still busy and be skipped.
    """
    from .metrics.drift import measure_semantic_drift
    from .metrics.geometry import analyze_embedding_geometry

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen)
    measure_semantic_drift(a, b, top_k=settings.top_k)
    analyze_embedding_geometry(b, threshold=settings.threshold, chunk_size=min(settings.chunk_size, 32))
    if settings.extras:
        from .metrics.insight import compute_insight
        compute_insight(b, prev=a, probe_ids=[0])  # eigh's first call loads LAPACK too


def _sample_rows(configured: int | None, planned: int | None) -> int | None:
    # `planned`: the daemon's cost bound asked for a sample (cost.plan); the smaller of the two wins.
    return min((n for n in (configured, planned) if n is not None), default=None)


def analyse(job: Job, settings: AnalysisSettings, progress: Callable[[float], None] | None = None,
            insight_state: RunInsight | None = None) -> dict[str, Any]:
    """Run drift (vs `job.previous`), geometry and the extras on `job.current`; the result record minus counters.

    `insight_state` is the run's state between results (previous neighbour lists, alert history); a
    fresh one (no neighbourhood drift, no drift history) when None.
    """
    from .metrics.device import chunk_rows
    from .metrics.drift import measure_semantic_drift
    from .metrics.geometry import geometry_neighbours_and_sizes

    state = insight_state if insight_state is not None else RunInsight()
    cur: SnapshotData = job.current
    prev = job.previous
    started = time.monotonic()
    device = torch.device(settings.device)
    # Moved to the device once; every metric below reads these (no copy on the CPU).
    cur_t = cur.tensor.to(device)
    prev_t = prev.tensor.to(device) if prev is not None and prev.shape == cur.shape else None
    chunk = chunk_rows(device, int(cur.shape[0]), settings.chunk_size)
    # Rows with non-finite values are left out by the math itself (and counted there); the daemon
    # reports the totals so a diverging run is visible in every result.
    non_finite = _non_finite(cur.tensor)
    vocab = job.hello.vocab if job.hello else None

    drift: dict[str, Any] | None = None
    reason: str | None = None
    drift_seconds = 0.0
    if prev is None:
        reason = "first snapshot of this run"
    elif prev.shape != cur.shape:
        reason = f"shape changed from {prev.shape} (iter {prev.iter}) to {cur.shape}"
    else:
        t0 = time.monotonic()
        try:
            grams = {"x": state.grams.get(_gram_key(prev))}
            drift = measure_semantic_drift(prev_t, cur_t, top_k=settings.top_k, grams=grams,
                                           per_token=settings.token_data or cur.token_counts is not None,
                                           device=device)
            for snap, key in ((prev, "x"), (cur, "y")):  # kept only while in use (pruned below)
                if grams.get(key) is not None:
                    state.grams[_gram_key(snap)] = grams[key]
        except Exception as exc:  # a math failure costs this drift, never the daemon
            reason = f"drift failed: {first_line(exc)}"
            log.error("run %s iter %d: %s", job.run, cur.iter, reason)
        drift_seconds = time.monotonic() - t0
    token_drift = drift.pop("per_token_cosine", None) if drift is not None else None
    counts = cur.token_counts if cur.token_counts is not None and cur.token_counts.numel() == cur.shape[0] else None
    if drift is not None:
        drift = jsonable(drift)
        _add_token_strings(drift, vocab)
    t0 = time.monotonic()
    since_init, since_init_reason = _drift_since_init(job, settings, drift, vocab, state.grams)
    drift_seconds += time.monotonic() - t0
    keep = {_gram_key(s) for s in (cur, job.first) if s is not None}  # the next drift's previous, the first
    state.grams = {k: g for k, g in state.grams.items() if k in keep}

    geometry: dict[str, Any] | None = None
    geometry_error: str | None = None
    knn_ids = knn_kth = knn_cos = nbhd = None
    t0 = time.monotonic()
    try:
        geom, neighbours, nbhd = geometry_neighbours_and_sizes(
            cur_t, threshold=settings.threshold, chunk_size=chunk,
            knn_k=settings.knn_k if settings.extras else 0, progress=progress,
            sample_rows=_sample_rows(settings.sample_rows, cur.sample_rows), seed=settings.sample_seed,
            device=device, sizes=settings.token_data)
        geometry = jsonable(geom)
        knn_ids = neighbours[0] if neighbours is not None else None
        if neighbours is not None and not geom.get("sampled_rows"):  # sampled: lists for a sample only
            knn_cos = neighbours[1]
        # each row's k-th nearest cosine: the clump search's candidates (sampled geometry has lists for
        # the sampled rows only, which would hide a clump among the others: then every row is a candidate)
        if neighbours is not None and neighbours[1].shape[1] and not geom.get("sampled_rows"):
            knn_kth = neighbours[1][:, -1]
    except AnalysisAbandoned:
        raise
    except Exception as exc:
        geometry_error = f"geometry failed: {first_line(exc)}"
        log.error("run %s iter %d: %s", job.run, cur.iter, geometry_error)
    geometry_seconds = time.monotonic() - t0

    insight, insight_error, insight_seconds, token_stats = None, None, 0.0, None
    if settings.extras:
        t0 = time.monotonic()
        try:
            insight = _insight(job, settings, state, knn_ids, vocab, cur_t, prev_t)
            if counts is not None:
                insight["drift_by_frequency"] = _by_frequency(token_drift, counts)
        except Exception as exc:  # like geometry: costs this section, never the daemon
            insight_error = f"insight failed: {first_line(exc)}"
            log.error("run %s iter %d: %s", job.run, cur.iter, insight_error)
        try:
            token_stats = _token_stats(job, settings, state, drift, insight, cur_t)
        except Exception as exc:  # costs the per-token figures, never the record
            error = f"token stats failed: {first_line(exc)}"
            insight_error = f"{insight_error}; {error}" if insight_error else error
            log.error("run %s iter %d: %s", job.run, cur.iter, error)
        insight_seconds = time.monotonic() - t0
        # The next neighbourhood drift compares against this snapshot's lists (None: nothing to compare).
        state.knn_iter, state.knn_ids = cur.iter, knn_ids
    galaxy, clump, galaxy_error, galaxy_seconds = None, None, None, 0.0
    if settings.extras:
        t0 = time.monotonic()
        galaxy, clump, galaxy_error = _galaxy_and_clump(job, settings, state, knn_kth, vocab, cur_t)
        galaxy_seconds = time.monotonic() - t0

    token_arrays, token_error = None, None
    if settings.token_data:
        try:
            token_arrays = _token_arrays(cur_t, state, knn_ids if knn_cos is not None else None, knn_cos,
                                         token_drift, snapshot=cur.tensor, nbhd=nbhd)
            _add_token_counts(token_arrays, state, counts, cur.iter)
        except Exception as exc:  # costs the explorer's data of this iteration, never the record
            token_error = f"token data failed: {first_line(exc)}"
            log.error("run %s iter %d: %s", job.run, cur.iter, token_error)

    record = {
        "run": job.run,
        "tensor": cur.name,  # which of the run's tensors (state, drift and insight are per tensor)
        "default_tensor": job.default_tensor,  # the run's main tensor: its W&B keys have no tensor prefix
        "iter": cur.iter,
        "prev_iter": prev.iter if prev is not None else None,
        "seconds": None,  # set last, once the alerts are in
        "metrics": dict(cur.metrics) if cur.metrics else None,  # the trainer's scalars (loss, ...)
        "drift": drift,
        "geometry": geometry,
        "drift_skipped_reason": reason,
        # fed since the previous analysed snapshot (a snapshot skipped from the backlog hands its counts on)
        "tokens_seen": int(counts.sum()) if counts is not None else None,
        "drift_since_init": since_init,  # drift from the run's first snapshot (iter `first_iter`) to this one
        "drift_since_init_skipped_reason": since_init_reason,
        "geometry_error": geometry_error,
        "skipped_iters": list(job.skipped_iters),
        "name": cur.name,
        "seq": cur.seq,
        "shape": cur.shape,
        "dtype": cur.dtype,
        "non_finite": non_finite,
        "drift_seconds": round(drift_seconds, 6),
        "geometry_seconds": round(geometry_seconds, 6),
        "insight": insight,
        "insight_error": insight_error,
        "token_stats": token_stats,  # norm and neighbourhood size of the followed tokens; null with --no-extras
        "insight_seconds": round(insight_seconds, 6),
        "galaxy": galaxy,  # the 2-D map (galaxy.py); null with --no-extras or --galaxy-rows 0
        "clump": clump,  # the partial-collapse clump (clump.py), null when there is none
        "galaxy_error": galaxy_error,
        "galaxy_seconds": round(galaxy_seconds, 6),
        "device": str(device),  # where the math ran (--device)
        "chunk_size": chunk,  # rows per block of the pairwise pass there (a GPU's fits its free memory)
        "waited_seconds": round(started - cur.received_mono, 6),
        "sent_at": cur.sent_at,
        "received_at": cur.received_at,
    }
    if state.alerts is None:
        state.alerts = RunAlerts()
    record["alerts"] = check_alerts(record, settings.alerts, state.alerts, time.monotonic())
    for alert in record["alerts"]:
        if alert.get("notified"):
            log.warning("run %s ALERT %s: %s", job.run, alert["kind"], alert["message"])
    if token_error:
        record["token_data_error"] = token_error
    record["seconds"] = round(time.monotonic() - started, 6)
    record["finished_at"] = time.time()
    if token_arrays is not None:
        record[TOKEN_ARRAYS] = token_arrays
    return record


def _by_frequency(token_drift: Any, counts: torch.Tensor) -> dict[str, Any] | None:
    """insight.drift_by_frequency (metrics/frequency.py); None without a per-token drift (first snapshot)."""
    from .metrics.frequency import drift_by_frequency

    if token_drift is None or token_drift.numel() != counts.numel():
        return None
    return jsonable(drift_by_frequency(token_drift, counts))


def _gram_key(snap: SnapshotData) -> tuple[int, int, int]:
    # The object's identity: the cache only holds snapshots still alive (the run's previous and first).
    return id(snap), snap.iter, snap.seq


def _add_token_strings(drift: dict[str, Any], vocab: list[str] | None) -> None:
    for kind in ("most", "least"):
        strings = _token_strings(drift.get(f"{kind}_drifted_tokens") or [], vocab)
        if strings is not None:
            drift[f"{kind}_drifted_token_strings"] = strings


def _initial(job: Job) -> SnapshotData | None:
    """The run's first snapshot when it is an earlier one of the same shape (the since-init baseline)."""
    first = job.first
    if first is None or first is job.current or first.shape != job.current.shape:
        return None
    return first


def _drift_since_init(job: Job, settings: AnalysisSettings, drift: dict[str, Any] | None,
                      vocab: list[str] | None, cache: dict[tuple[int, int, int], torch.Tensor]
                      ) -> tuple[dict[str, Any] | None, str | None]:
    """The record's "drift_since_init" (the drift section's form plus `first_iter`) and why it is null."""
    if not settings.since_init:
        return None, "off (--no-since-init)"
    first = job.first
    if first is None:
        return None, "the run's first snapshot is not known (the daemon restarted after it)"
    if first is job.current:
        return None, "first snapshot of this run"
    if first.shape != job.current.shape:
        return None, f"shape changed from {first.shape} (iter {first.iter}) to {job.current.shape}"
    if first is job.previous and drift is not None:
        out = dict(drift)  # the previous snapshot is the first one: the same numbers, not computed twice
    else:
        from .metrics.drift import measure_semantic_drift
        cur = job.current
        grams = {"x": cache.get(_gram_key(first)), "y": cache.get(_gram_key(cur))}
        try:
            out = jsonable(measure_semantic_drift(first.tensor, cur.tensor, top_k=settings.top_k, grams=grams,
                                                  device=torch.device(settings.device)))
            for snap, key in ((first, "x"), (cur, "y")):
                if grams.get(key) is not None:
                    cache[_gram_key(snap)] = grams[key]
        except Exception as exc:  # costs this section, never the record
            reason = f"drift since init failed: {first_line(exc)}"
            log.error("run %s iter %d: %s", job.run, job.current.iter, reason)
            return None, reason
        _add_token_strings(out, vocab)
    out["first_iter"] = first.iter
    return out, None


def _undertrained(job: Job, vocab: list[str] | None) -> dict[str, Any]:
    """The insight section's under-trained entries: {"undertrained": {...}, "undertrained_tokens": [[id, score]]}."""
    from .metrics.undertrained import find_undertrained

    first = _initial(job)
    found = find_undertrained(job.current.tensor, initial=first.tensor if first is not None else None)
    tokens = found.pop("tokens")
    if first is not None:
        found["first_iter"] = first.iter
    if vocab:
        found["token_strings"] = _token_strings(tokens, vocab)
    return {"undertrained": found, "undertrained_tokens": tokens}


def _add_token_counts(arrays: TokenArrays, state: RunInsight, counts: torch.Tensor | None, iteration: int) -> None:
    """This snapshot's token counts and the run's running total into `arrays`; updates the total.

    The total lives in the run's insight state (this worker's, in memory): it starts with the first
    snapshot that carries counts (`tokens_total_since`), starts over when the vocabulary size changes,
    and after a daemon restart starts over from the first counted snapshot the new daemon analyses.
    A snapshot without counts carries the total on unchanged (nothing was counted for it).
    """
    rows = int(arrays.norm.shape[0])
    if counts is not None:
        counts = counts.detach().to("cpu", torch.int64)
        if state.tokens_total is None or int(state.tokens_total.numel()) != rows:
            state.tokens_total, state.tokens_total_since = torch.zeros(rows, dtype=torch.int64), iteration
        state.tokens_total = state.tokens_total + counts  # a new tensor: the last arrays keep theirs
        arrays.tokens_seen = _as_uint32(counts)
    if state.tokens_total is not None and int(state.tokens_total.numel()) == rows:
        arrays.tokens_total, arrays.tokens_total_since = state.tokens_total, state.tokens_total_since


def _as_uint32(counts: torch.Tensor) -> torch.Tensor:
    """int64 counts (< 2^32: the wire sends uint32) as a uint32 tensor."""
    return counts.clamp(0, 2**32 - 1).to(torch.uint32)


def _token_arrays(weights: torch.Tensor, state: RunInsight, knn_ids: Any, knn_cos: Any,
                  drift: Any, snapshot: torch.Tensor | None = None, nbhd: torch.Tensor | None = None) -> TokenArrays:
    """The per-token arrays of this snapshot; the map is aligned with (and becomes) the run's previous one."""
    from .metrics.token_map import token_coordinates

    xy = token_coordinates(weights, state.token_xy, device=weights.device)
    state.token_xy = xy
    norm = torch.linalg.vector_norm(weights.detach().float(), dim=1).cpu()
    return TokenArrays(knn_ids=knn_ids.to(torch.int32) if knn_ids is not None else None,
                       knn_cos=knn_cos.float() if knn_cos is not None else None,
                       drift=drift, norm=norm, xy=xy,
                       weights=snapshot if snapshot is not None else weights,  # the received one, on the CPU
                       nbhd=nbhd if nbhd is not None and int(nbhd.numel()) == int(norm.numel()) else None)


def _insight(job: Job, settings: AnalysisSettings, state: RunInsight, knn_ids: Any,
             vocab: list[str] | None, cur_t: torch.Tensor, prev_t: torch.Tensor | None) -> dict[str, Any]:
    from .metrics.insight import compute_insight, resolve_probes

    cur = job.current
    probe_ids, unknown = resolve_probes(settings.probes, vocab, cur.tensor.shape[0])
    if unknown and not state.probes_logged:
        log.warning("run %s: probe token(s) not found (%s): %s", job.run,
                    "no vocabulary from the trainer" if not vocab else "not in its vocabulary",
                    ", ".join(unknown))
    state.probes_logged = True
    prev_knn = state.knn_ids
    if prev_knn is not None and knn_ids is not None and prev_knn.shape != knn_ids.shape:
        prev_knn = None
    insight = jsonable(compute_insight(
        cur_t, prev=prev_t, knn_ids=knn_ids, prev_knn_ids=prev_knn,
        probe_ids=probe_ids, vocab=vocab, top_k=settings.top_k, probe_k=settings.probe_k, device=cur_t.device))
    if insight.get("neighbourhood_drift") is not None:
        insight["neighbourhood_drift"]["prev_iter"] = state.knn_iter  # last analysed, not job.previous
    if settings.undertrained:
        try:
            insight.update(jsonable(_undertrained(job, vocab)))
        except Exception as exc:  # costs these entries, never the rest of the section
            insight["undertrained"], insight["undertrained_tokens"] = None, None
            insight["undertrained_error"] = f"under-trained search failed: {first_line(exc)}"
            log.error("run %s iter %d: %s", job.run, job.current.iter, insight["undertrained_error"])
    return insight


MAX_FOLLOWED = 256  # tokens whose norm and neighbourhood size a record gives (bounds the O(n V d) pass)


def followed_tokens(previous: list[int], probes: list[int], drifted: list[int], rows: int,
                    limit: int = MAX_FOLLOWED) -> list[int]:
    """This record's followed tokens: probes, then this drift's listed tokens, then those followed before.

    Earlier ones stay (so a token keeps its line over time) until the bound pushes the oldest out.
    """
    ids = [t for t in (*probes, *drifted, *previous) if 0 <= t < rows]
    return list(dict.fromkeys(ids))[:limit]


def _token_stats(job: Job, settings: AnalysisSettings, state: RunInsight, drift: dict[str, Any] | None,
                 insight: dict[str, Any] | None, cur: torch.Tensor) -> dict[str, Any]:
    """The record's "token_stats" for the run's followed tokens; updates the run's followed set."""
    from .metrics.insight import token_stats

    drifted: list[int] = []
    for kind in ("most", "least"):
        drifted += [int(p[0]) for p in ((drift or {}).get(f"{kind}_drifted_tokens") or [])[: settings.top_k]]
    probes = [int(p["token_id"]) for p in ((insight or {}).get("probes") or [])]
    state.followed = followed_tokens(state.followed, probes, drifted, int(cur.shape[0]))
    return token_stats(cur, state.followed, settings.threshold, device=cur.device)


def _galaxy_and_clump(job: Job, settings: AnalysisSettings, state: RunInsight, knn_kth: Any,
                      vocab: list[str] | None, cur_t: torch.Tensor) -> tuple[dict | None, dict | None, str | None]:
    """The galaxy map (aligned to the run's previous one) and the partial-collapse clump; errors as text."""
    from .metrics.clump import find_clump
    from .metrics.galaxy import galaxy_map

    cur, errors = job.current, []
    galaxy = clump = None
    if settings.galaxy_rows > 0:
        try:
            galaxy = jsonable(galaxy_map(cur_t, rows=settings.galaxy_rows, seed=settings.galaxy_seed,
                                         threshold=settings.threshold, previous=state.galaxy_prev, vocab=vocab,
                                         device=cur_t.device))
            state.galaxy_prev = {"iter": cur.iter, "points": galaxy["points"]}
        except Exception as exc:  # costs the map, never the record
            errors.append(f"galaxy failed: {first_line(exc)}")
    if settings.alerts.partial_collapse_share > 0:
        try:
            clump = find_clump(cur_t, threshold=settings.threshold,
                               share=settings.alerts.partial_collapse_share, kth_cosine=knn_kth,
                               knn_k=settings.knn_k if knn_kth is not None else 0, vocab=vocab,
                               device=cur_t.device)
        except Exception as exc:
            errors.append(f"clump search failed: {first_line(exc)}")
    for error in errors:
        log.error("run %s iter %d: %s", job.run, cur.iter, error)
    return galaxy, clump, "; ".join(errors) or None
