"""Console sink: the readable summary block per result, on stdout."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, Any

from ..safetext import safe
from . import Sink

log = logging.getLogger("embedding_monitor.daemon")
_SHOW_TOKENS = 5  # tokens listed per direction; the full lists are in the JSONL file


def _num(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _tokens(pairs: list[list[Any]], strings: list[str] | None) -> str:
    shown = []
    for i, (token_id, cos) in enumerate(pairs[:_SHOW_TOKENS]):
        label = f"{strings[i]!r} ({token_id})" if strings and i < len(strings) else f"#{token_id}"
        shown.append(f"{label} {cos:.4f}" if cos is not None else f"{label} n/a")
    return ", ".join(shown)


def _label(token_id: int, token: str | None) -> str:
    return repr(token) if token is not None else f"#{token_id}"


def research_drift_lines(drift: dict[str, Any]) -> list[str]:
    """The [Drift] line of linear CKA and the common mode (the mean row's shift, apart from Procrustes)."""
    common = drift.get("common_mode") or {}
    if drift.get("linear_cka") is None and not common:
        return []
    return [f"  [Drift] Linear CKA {_num(drift.get('linear_cka'), '.4f')} (1 = same geometry up to rotation, "
            f"scale and shift); mean row moved {_num(common.get('mean_shift'), '.4g')} "
            f"({_num(common.get('mean_shift_relative'), '.3f')} of the average row norm; the Procrustes drift "
            f"ignores it), mean row / average row norm {_num(common.get('mean_norm_ratio'), '.3f')} "
            f"(0 = no common direction)"]


def undertrained_line(ins: dict[str, Any]) -> list[str]:
    """One [Insight] line: how many tokens look under-trained, by which evidence, and the most certain ones."""
    under = ins.get("undertrained")
    if not under:
        return [f"  [Insight] under-trained search failed: {ins['undertrained_error']}"] if ins.get(
            "undertrained_error") else []
    how = ("change since the first snapshot" if under.get("method") == "since_init" else "weights alone")
    text = f"  [Insight] Under-trained tokens {under['count']} (a tight group training has not moved; {how}"
    if under["count"]:
        text += (f", {under.get('separation'):.3g}x apart from the rest): "
                 + _tokens(ins.get("undertrained_tokens") or [], under.get("token_strings")))
    return [text + (")" if not under["count"] else "")]


def frequency_line(result: dict[str, Any], by_freq: dict[str, Any] | None) -> list[str]:
    """One [Insight] line: drift by token frequency (Spearman's rho and the bins' mean drift cosine)."""
    if not by_freq:
        return []
    bins = ", ".join(("never seen" if b["min_count"] == 0 else f"{b['min_count']}+")
                     + f" ({b['tokens']}) {_num(b['mean_drift_cosine'], '.3f')}" for b in by_freq["bins"][:6])
    return [f"  [Insight] Drift by frequency ({result.get('tokens_seen')} tokens fed since the previous snapshot): "
            f"Spearman count vs drift {_num(by_freq.get('spearman_count_vs_drift'), '+.3f')} (< 0: frequent "
            f"tokens drift less); mean drift cosine by count: {bins}"]


def insight_lines(result: dict[str, Any]) -> list[str]:
    """Up to three [Insight] lines (spectrum, neighbourhoods, probes) and one [Alert] line per alert."""
    lines: list[str] = []
    ins = result.get("insight")
    if ins:
        iso, norms = ins.get("isotropy") or {}, ins.get("row_norms")
        text = (f"  [Insight] Effective rank {_num(ins.get('effective_rank'), '.1f')} of {result['shape'][1]} "
                f"(RankMe: entropy of the singular values; low = dimensional collapse), isotropy "
                f"{_num(iso.get('partition_ratio'), '.3f')} (partition ratio: 1 = isotropic), mean unit vector "
                f"{_num(iso.get('mean_unit_vector_norm'), '.3f')} (0 = no shared direction, 1 = one cone)")
        if norms:
            text += f", row norms {norms['min']:.3g}..{norms['max']:.3g} (mean {norms['mean']:.3g})"
        lines.append(text)
        nd, frozen = ins.get("neighbourhood_drift"), ins.get("frozen_tokens")
        parts = []
        if nd:
            parts.append(f"Neighbourhood overlap {_num(nd.get('mean_overlap'), '.3f')} (share of each token's "
                         f"{nd['k']} nearest neighbours kept since iter {nd.get('prev_iter')}; 1 = unchanged)")
        if frozen:
            parts.append(f"frozen tokens {frozen['count']} (rows bit-identical to the previous snapshot)")
        if parts:
            lines.append("  [Insight] " + ", ".join(parts))
        probes = []
        for p in (ins.get("probes") or [])[:3]:
            near = ", ".join(f"{_label(n[0], n[1])} {n[2]:.2f}" for n in p["neighbours"][:3])
            probes.append(f"{_label(p['token_id'], p['token'])} -> {near or 'none'}")
        if probes:
            lines.append("  [Insight] Probes (nearest tokens by cosine): " + "; ".join(probes))
        lines.extend(undertrained_line(ins))
        lines.extend(frequency_line(result, ins.get("drift_by_frequency")))
    elif result.get("insight_error"):
        lines.append(f"  [Insight] not measured: {result['insight_error']}")
    lines.extend(galaxy_lines(result))
    for alert in result.get("alerts") or []:
        lines.append(f"  [Alert] {alert['kind']}: {alert['message']}")
    return lines


def galaxy_lines(result: dict[str, Any]) -> list[str]:
    """One [Galaxy] line: the map's size and axes, the clusters and the largest ones' biggest members."""
    galaxy = result.get("galaxy")
    if not galaxy:
        return [f"  [Galaxy] not drawn: {result['galaxy_error']}"] if result.get("galaxy_error") else []
    ev = galaxy.get("explained_variance") or [0.0, 0.0]
    named = []
    for c in (galaxy.get("clusters") or [])[:3]:
        names = ", ".join(_label(t, s) for t, s in c["members"][:3])
        named.append(f"#{c['id']} ({c['size']}) {names}")
    text = (f"  [Galaxy] {galaxy['rows']} tokens on a 2-D PCA map (axes explain {ev[0]:.0%} + {ev[1]:.0%} of the "
            f"variance): {galaxy.get('cluster_count', len(galaxy.get('clusters') or []))} clusters of neighbours "
            f"(centred cosine > {galaxy.get('threshold')}) holding {galaxy.get('clustered_points', 0)} tokens")
    return [text + ("; largest: " + "; ".join(named) if named else "")]


def format_result(result: dict[str, Any]) -> str:
    """The summary block for one result: the spec's names, each with what it measures beside it."""
    tensor = "" if result.get("default_tensor", True) else f", tensor {safe(str(result.get('tensor')))}"
    lines = [f"--- ASYNC ANALYSIS RESULTS FOR ITERATION {result['iter']} (run {safe(result['run'])}{tensor}) ---"]
    if result.get("metrics"):  # what the trainer sent with the snapshot: loss beside the drift
        lines.append("  [Trainer] " + ", ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in result["metrics"].items()))
    drift = result.get("drift")
    if drift:
        lines.append(f"  [Drift] vs iter {result['prev_iter']}: Average Cosine Similarity "
                     f"{_num(drift['average_cosine_similarity'], '.4f')} (each token's old vs new vector after "
                     f"the best rotation; 1 = unchanged), Average Euclidean Distance "
                     f"{_num(drift['average_euclidean_distance'], '.4f')} (same aligned, centred vectors)")
        lines.append("  [Drift] Most drifted (lowest cosine): " + _tokens(drift.get("most_drifted_tokens") or [],
                                                                         drift.get("most_drifted_token_strings")))
        lines.append("  [Drift] Least drifted (highest cosine): " + _tokens(
            drift.get("least_drifted_tokens") or [], drift.get("least_drifted_token_strings")))
        lines.extend(research_drift_lines(drift))
    else:
        lines.append(f"  [Drift] not measured: {result.get('drift_skipped_reason')}")
    since = result.get("drift_since_init")
    if since:
        lines.append(f"  [Drift] since iter {since.get('first_iter')} (the run's first snapshot): Average Cosine "
                     f"Similarity {_num(since.get('average_cosine_similarity'), '.4f')}, Linear CKA "
                     f"{_num(since.get('linear_cka'), '.4f')}, mean row moved "
                     f"{_num((since.get('common_mode') or {}).get('mean_shift'), '.4g')}")
    geom = result.get("geometry")
    if geom:
        density, sparsity = geom["local_density"], geom["global_sparsity"]
        mean, std = sparsity.get("mean_similarity"), sparsity.get("std_similarity")
        sampled = ""
        if geom.get("sampled_rows"):  # an estimate: say from how many rows, and how sure it is
            lo, hi = (geom.get("confidence_95") or {}).get("average_neighborhood_size") or (None, None)
            sampled = f", estimated from {geom['sampled_rows']} rows: 95% CI {_num(lo, '.2f')}..{_num(hi, '.2f')}"
        lines.append(f"  [Geometry] Avg Neighbors (Galaxy Size): "
                     f"{_num(density['average_neighborhood_size'], '.2f')} (other tokens with cosine > "
                     f"{density['threshold']}, per token{sampled})")
        lines.append(f"  [Geometry] Mean Similarity (Universe Sparsity): {_num(mean, '.4f')} "
                     f"(std {_num(std, '.4f')}; mean pairwise cosine: higher = less sparse, near 1 = collapse)")
    else:
        lines.append(f"  [Geometry] not measured: {result.get('geometry_error')}")
    lines.extend(insight_lines(result))
    if result.get("non_finite", {}).get("values"):
        nf = result["non_finite"]
        lines.append(f"  [Input] {nf['values']} non-finite values in {nf['rows']} rows")
    c = result["counters"]
    skipped = result.get("skipped_iters") or []
    lines.append(f"  [Daemon] {result['shape'][0]}x{result['shape'][1]} {result['dtype']} analysed in "
                 f"{result['seconds']:.2f} s; run counters: received {c['received']}, analysed "
                 f"{c['analysed']}, skipped {c['skipped']}, rejected {c['rejected']}"
                 + (f"; skipped iters {skipped}" if skipped else ""))
    lines.append("--- END OF ASYNC ANALYSIS RESULTS ---")
    return "\n".join(lines)


class ConsoleSink(Sink):
    """Prints the summary block of each result on stdout, and copies it into the log file if asked."""

    name = "console"

    def __init__(self, stream: IO[str] | None = None, to_stdout: bool = True,
                 copy_to: str | Path | None = None) -> None:
        self.stream = stream
        self.to_stdout = to_stdout
        self.copy_to = Path(copy_to) if copy_to is not None else None
        self._copy_failed = False

    def handle(self, result: dict[str, Any]) -> None:
        """Print `result`'s block and flush (launch.sh and tests read it live)."""
        # Token strings and names come from the trainer: each line is made terminal-safe and bounded.
        block = "\n".join(safe(line, 2000) for line in format_result(result).split("\n"))
        if self.copy_to is not None:
            self._copy(block)
        if self.to_stdout:
            stream = self.stream or sys.stdout
            stream.write("\n" + block + "\n\n")
            stream.flush()

    def _copy(self, block: str) -> None:
        # One append per block (the log handler appends to the same file); the log is a view, so a
        # full disk costs this copy only, never the terminal output or the sink.
        try:
            with open(self.copy_to, "a", encoding="utf-8") as f:  # type: ignore[arg-type]
                f.write(block + "\n")
            self._copy_failed = False
        except OSError as exc:
            if not self._copy_failed:
                log.warning("console: cannot copy a summary block into %s: %s", self.copy_to, exc)
            self._copy_failed = True

    def close(self) -> None:
        """Flush the stream."""
        if self.to_stdout:
            (self.stream or sys.stdout).flush()
