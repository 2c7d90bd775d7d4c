"""The trainer side: publish embedding snapshots to the analysis daemon without blocking training."""
from .publisher import EmbeddingPublisher, embedding_weight

__all__ = ["EmbeddingPublisher", "embedding_weight"]
