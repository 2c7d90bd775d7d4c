"""Per-token figures of one analysed snapshot: one value per vocabulary row, for the embedding projector.

The results file keeps summaries (top-k lists, histograms); a projector needs every token: its drift
cosine, row norm, galaxy cluster, under-trained flag and frequency. The pipeline builds them once per
snapshot from what the analysis already computed, and only when a sink asks for them (`Sink.wants_tokens`);
they travel beside the record to the sinks, never into the JSONL (V values each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NOT_IN_MAP = -2  # `cluster` of a token outside the galaxy map's subset (-1 is the map's own "no cluster")
_NORM_ROWS = 8192  # rows per block of the norm pass: a bfloat16 snapshot is not copied to float32 whole


@dataclass
class TokenValues:
    """One value per token (row) of the snapshot a record describes; None: not known for this snapshot."""

    run: str
    tensor: str | None  # the record's tensor when not the run's default one (named_tensor), else None
    iter: int
    embedding: torch.Tensor  # (V, d) the snapshot as analysed, in the dtype it came in
    vocab: list[str] | None  # the trainer's token strings (may be shorter than V)
    row_norm: torch.Tensor  # (V,) float32 L2 norm of each row, NaN for a row with a non-finite value
    drift_cosine: torch.Tensor | None  # (V,) float32 Procrustes-aligned cosine to the previous snapshot, NaN where not measured
    cluster: torch.Tensor | None  # (V,) int64 galaxy cluster id, -1 no cluster, NOT_IN_MAP outside the map
    undertrained: torch.Tensor | None  # (V,) bool, the insight's under-trained tokens
    frequency: torch.Tensor | None  # (V,) int64 times the token was seen in training batches

    @property
    def rows(self) -> int:
        """V, the number of tokens."""
        return int(self.embedding.shape[0])


def named_tensor(record: dict[str, Any]) -> str | None:
    """The record's tensor when it is not its run's default one (which keeps the run's own names), else None."""
    tensor = record.get("tensor")
    if record.get("default_tensor", True) is not False or not isinstance(tensor, str) or not tensor:
        return None
    return tensor


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every row of `w` as float32 (NaN for a row holding a non-finite value)."""
    out = torch.empty(w.shape[0], dtype=torch.float32)
    for a in range(0, w.shape[0], _NORM_ROWS):
        block = w[a:a + _NORM_ROWS].float()
        norms = torch.linalg.vector_norm(block, dim=1)
        norms[~torch.isfinite(block).all(dim=1)] = float("nan")
        out[a:a + block.shape[0]] = norms
    return out


def _ids(pairs: Any, rows: int) -> list[int]:
    """The in-range integer ids of a record's [[id, ...], ...] list (a record is untrusted input)."""
    out = []
    for pair in pairs if isinstance(pairs, list) else []:
        tid = pair[0] if isinstance(pair, list) and pair else pair
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < rows:
            out.append(tid)
    return out


def token_values(run: str, iter_: int, embedding: torch.Tensor, record: dict[str, Any],
                 vocab: list[str] | None, drift_cosine: torch.Tensor | None,
                 counts: Any = None) -> TokenValues:
    """The per-token values of `record`'s snapshot `embedding`, from what its analysis computed.

    `drift_cosine`: measure_semantic_drift's token_cosines (None: no drift this time); `counts`: the
    trainer's per-token counts sent with the snapshot, when there are any (a (V,) tensor or list).
    """
    rows = int(embedding.shape[0])
    cluster = None
    galaxy = record.get("galaxy")
    if isinstance(galaxy, dict) and isinstance(galaxy.get("points"), list):
        cluster = torch.full((rows,), NOT_IN_MAP, dtype=torch.int64)
        for point in galaxy["points"]:
            if isinstance(point, list) and len(point) == 4 and _ids([point], rows) and isinstance(point[3], int):
                cluster[point[0]] = point[3]
    undertrained = None
    insight = record.get("insight")
    if isinstance(insight, dict) and insight.get("undertrained_tokens") is not None:
        undertrained = torch.zeros(rows, dtype=torch.bool)
        undertrained[_ids(insight["undertrained_tokens"], rows)] = True
    frequency = None
    if counts is not None:
        frequency = torch.as_tensor(counts, dtype=torch.int64).flatten()
        if frequency.numel() != rows:  # counts of another vocabulary size: not this matrix's tokens
            frequency = None
    return TokenValues(run=run, tensor=named_tensor(record), iter=iter_,
                       embedding=embedding, vocab=vocab, row_norm=row_norms(embedding),
                       drift_cosine=drift_cosine, cluster=cluster, undertrained=undertrained, frequency=frequency)
