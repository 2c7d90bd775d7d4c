"""A run's vocabulary held compactly: one UTF-8 blob plus an offset array instead of a list of str.

A list of Python strings costs ~60 bytes per token on top of the text (a 4M-token hello cost +295 MiB);
this costs 8 bytes per token plus the text, and behaves as a read-only sequence of strings.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np


class CompactVocab(Sequence[str]):
    """Token strings by id, stored as one bytes object and int64 offsets."""

    __slots__ = ("_blob", "_offsets")

    def __init__(self, tokens: Sequence[str]) -> None:
        encoded = [t.encode("utf-8", "surrogatepass") for t in tokens]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"token id {index} outside a vocabulary of {n}")
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._blob[lo:hi].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompactVocab):
            return self._blob == other._blob and np.array_equal(self._offsets, other._offsets)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-free but compared by value, like a list

    def nbytes(self) -> int:
        """Bytes held (text plus offsets)."""
        return len(self._blob) + self._offsets.nbytes

    def __repr__(self) -> str:
        return f"CompactVocab({len(self)} tokens, {self.nbytes()} bytes)"
