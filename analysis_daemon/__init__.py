"""Analysis daemon for embedding-monitor: the pure analysis functions are importable on their own.

    from analysis_daemon import measure_semantic_drift, analyze_embedding_geometry
    from analysis_daemon import load_results   # results files as a pandas DataFrame

The functions are imported lazily (PEP 562): `python -m analysis_daemon` must set OMP_WAIT_POLICY
before torch (and its OpenMP runtime) loads, and importing this package must not load torch first.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DriftShapeMismatch": "analysis_daemon.metrics.drift",
    "measure_semantic_drift": "analysis_daemon.metrics.drift",
    "analyze_embedding_geometry": "analysis_daemon.metrics.geometry",
    "pairwise_moments": "analysis_daemon.metrics.geometry",
    "load_results": "analysis_daemon.results_frame",  # results as a pandas DataFrame (the pandas extra)
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis_daemon' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value
