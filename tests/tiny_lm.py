"""The tiny language model the training tests share: CPU, a few steps, the layout of a real one."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    """A residual MLP block (pre-norm), as in a transformer without attention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class TinyLM(nn.Module):
    """Embedding, two residual blocks, a final norm and an untied head (`vocab` x `dim`).

    `checkpointed` recomputes the embedding and the blocks in backward (activation checkpointing).
    """

    def __init__(self, vocab: int, dim: int, checkpointed: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim), Block(dim)])
        self.norm, self.output = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.checkpointed = checkpointed

    def body(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.body, ids, use_reentrant=False) if self.checkpointed else self.body(ids)
        return self.output(self.norm(h))
