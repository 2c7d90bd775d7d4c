"""Analysis daemon for embedding-monitor: the pure analysis functions are importable on their own."""
from analysis_daemon.drift import DriftShapeMismatch, measure_semantic_drift
from analysis_daemon.geometry import analyze_embedding_geometry, pairwise_moments

__all__ = ["DriftShapeMismatch", "analyze_embedding_geometry", "measure_semantic_drift", "pairwise_moments"]
