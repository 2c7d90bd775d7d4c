"""One result record as flat, named numbers: the keys every sink and reader shares.

The W&B sink logs these under their keys (`analysis/drift_cosine_sim`, ...), the TensorBoard sink
writes them as scalars at the training iteration, and `load_results` turns them into DataFrame columns
(without the `analysis/` prefix). One function, so a metric added here shows up in all three with the
same name. The trainer's own metrics keep their names (`train/loss`): one chart can hold loss and drift.

No torch, numpy or wandb here: reading results in a notebook must not load them.
"""
from __future__ import annotations

import math
from typing import Any

PREFIX = "analysis/"
STEP_KEY = PREFIX + "iter"  # the x-axis (W&B's step metric; TensorBoard's step; the DataFrame's index)


def _number(value: Any) -> float | int | None:
    """`value` when it is a finite int/float (not a bool), else None: a record is untrusted input."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def scalar_metrics(result: dict[str, Any]) -> dict[str, float | int]:
    """The flat scalars of one result record, named as in W&B; the trainer's metrics under their own names.

    Keys with no value in this record (no drift on a run's first snapshot, no insight with --no-extras)
    are left out rather than given a placeholder.
    """
    data: dict[str, Any] = {PREFIX + "seconds": result.get("seconds"), PREFIX + "prev_iter": result.get("prev_iter")}
    drift = _dict(result.get("drift"))
    data[PREFIX + "drift_cosine_sim"] = drift.get("average_cosine_similarity")
    data[PREFIX + "drift_euclidean"] = drift.get("average_euclidean_distance")
    common = _dict(drift.get("common_mode"))  # research metrics (docs/research-metrics.md)
    data[PREFIX + "drift_linear_cka"] = drift.get("linear_cka")
    data[PREFIX + "mean_shift"] = common.get("mean_shift")
    data[PREFIX + "mean_shift_relative"] = common.get("mean_shift_relative")
    data[PREFIX + "mean_norm_ratio"] = common.get("mean_norm_ratio")
    since = _dict(result.get("drift_since_init"))
    data[PREFIX + "drift_since_init_cosine_sim"] = since.get("average_cosine_similarity")
    data[PREFIX + "drift_since_init_euclidean"] = since.get("average_euclidean_distance")
    data[PREFIX + "drift_since_init_linear_cka"] = since.get("linear_cka")
    data[PREFIX + "tokens_seen"] = result.get("tokens_seen")
    geom = _dict(result.get("geometry"))
    if geom:
        density, sparsity = _dict(geom.get("local_density")), _dict(geom.get("global_sparsity"))
        data[PREFIX + "geom_avg_neighbors"] = density.get("average_neighborhood_size")
        ci = _dict(geom.get("confidence_95")).get("average_neighborhood_size")
        if geom.get("sampled_rows") and isinstance(ci, list) and len(ci) == 2:
            # sampled geometry: the estimate's 95% interval beside it
            data[PREFIX + "geom_sampled_rows"] = geom["sampled_rows"]
            data[PREFIX + "geom_avg_neighbors_ci_low"], data[PREFIX + "geom_avg_neighbors_ci_high"] = ci
        data[PREFIX + "geom_mean_similarity"] = sparsity.get("mean_similarity")
        data[PREFIX + "geom_std_similarity"] = sparsity.get("std_similarity")
    data[PREFIX + "alerts"] = len(result.get("alerts") or [])
    ins = _dict(result.get("insight"))
    if ins:
        iso, norms = _dict(ins.get("isotropy")), _dict(ins.get("row_norms"))
        data.update({PREFIX + "effective_rank": ins.get("effective_rank"),
                     PREFIX + "isotropy_partition_ratio": iso.get("partition_ratio"),
                     PREFIX + "mean_unit_vector_norm": iso.get("mean_unit_vector_norm"),
                     PREFIX + "knn_mean_overlap": _dict(ins.get("neighbourhood_drift")).get("mean_overlap"),
                     PREFIX + "frozen_tokens": _dict(ins.get("frozen_tokens")).get("count"),
                     PREFIX + "row_norm_min": norms.get("min"), PREFIX + "row_norm_mean": norms.get("mean"),
                     PREFIX + "row_norm_max": norms.get("max"),
                     PREFIX + "undertrained_count": _dict(ins.get("undertrained")).get("count"),
                     PREFIX + "drift_frequency_spearman":
                         _dict(ins.get("drift_by_frequency")).get("spearman_count_vs_drift")})
    if result.get("galaxy") is not None or result.get("insight") is not None:  # not with --no-extras
        clump, galaxy = result.get("clump"), _dict(result.get("galaxy"))
        data[PREFIX + "clump_fraction"] = _dict(clump).get("fraction") if clump else 0.0
        if galaxy:
            data[PREFIX + "galaxy_clusters"] = galaxy.get("cluster_count", len(galaxy.get("clusters") or []))
            rows = _number(galaxy.get("rows"))
            if rows:
                data[PREFIX + "galaxy_clustered_fraction"] = (_number(galaxy.get("clustered_points")) or 0) / rows
    for key, value in _dict(result.get("metrics")).items():
        data.setdefault(str(key), value)  # the trainer's scalars never replace an analysis key
    for key, value in _dict(result.get("counters")).items():
        data[f"{PREFIX}{key}"] = value
    daemon_counters = _dict(result.get("daemon_counters"))
    if "rejected" in daemon_counters:
        data[PREFIX + "rejected_total"] = daemon_counters["rejected"]
    data[PREFIX + "skipped_since_last"] = len(result.get("skipped_iters") or [])
    data[PREFIX + "non_finite_values"] = _dict(result.get("non_finite")).get("values")
    out: dict[str, float | int] = {}
    for key, value in data.items():
        number = _number(value)
        if number is not None:
            out[key] = number
    return out


def histograms(result: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """The record's histograms as (counts, bin edges), named as in W&B: pairwise similarity, row norms.

    A histogram whose lists do not fit together (len(bins) != len(counts) + 1, non-numbers) is left out.
    """
    found = {
        PREFIX + "geom_similarity_hist": _dict(_dict(result.get("geometry")).get("global_sparsity")),
        PREFIX + "row_norm_hist": _dict(_dict(result.get("insight")).get("row_norms")),
    }
    out: dict[str, tuple[list[float], list[float]]] = {}
    for key, section in found.items():
        counts, bins = section.get("histogram_counts"), section.get("histogram_bins")
        if not isinstance(counts, list) or not isinstance(bins, list) or len(bins) != len(counts) + 1 or not counts:
            continue
        if all(_number(c) is not None for c in counts) and all(_number(b) is not None for b in bins):
            out[key] = (counts, bins)
    return out


def column_name(key: str) -> str:
    """A scalar key as a DataFrame column: the W&B key without `analysis/`; trainer metrics unchanged."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else key
