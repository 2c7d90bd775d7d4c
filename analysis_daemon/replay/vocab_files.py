"""Token strings for replayed checkpoints: tokenizer.json, vocab.txt or our meta.json beside the weights.

Each file is bounded (checkpoints.MAX_JSON_BYTES) and parsed as plain data: tokenizer.json's `model.vocab`
({token: id} for BPE/WordPiece/WordLevel, [[token, score], ...] for Unigram) plus `added_tokens`, no
tokenizers library; vocab.txt one token per line; meta.json as corpus.py writes it ({"itos": [...]}).
Only ids below the embedding's row count are kept, so a hostile id cannot make the list huge.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .checkpoints import MAX_JSON_BYTES, CheckpointError, read_json

log = logging.getLogger("embedding_monitor.daemon")

def _tokenizer_json(path: Path, rows: int) -> list[str | None]:
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    raw = model.get("vocab") if isinstance(model, dict) else None
    pairs: list[tuple[Any, Any]] = []
    if isinstance(raw, dict):  # BPE, WordPiece, WordLevel: {token: id}
        pairs = [(tid, tok) for tok, tid in raw.items()]
    elif isinstance(raw, list):  # Unigram: [[token, score], ...], the id is the position
        pairs = [(i, e[0]) for i, e in enumerate(raw) if isinstance(e, list) and e]
    else:
        raise CheckpointError(f"{path}: no model.vocab map or list")
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict):
            pairs.append((added.get("id"), added.get("content")))
    return _vocab_list(pairs, path, rows)


def _vocab_list(pairs: list[tuple[Any, Any]], path: Path, rows: int) -> list[str | None]:
    # ids beyond the embedding's rows name nothing we show; a hostile id cannot make the list huge
    good = [(tid, tok) for tid, tok in pairs if isinstance(tid, int) and not isinstance(tid, bool)
            and 0 <= tid < rows and isinstance(tok, str)]
    if not good:
        raise CheckpointError(f"{path}: no usable token entries")
    vocab: list[str | None] = [None] * (max(tid for tid, _ in good) + 1)
    for tid, tok in good:
        vocab[tid] = tok
    return vocab


def load_vocab(near: Path, rows: int) -> tuple[list[str | None] | None, Path | None]:
    """Token strings of ids < `rows` from tokenizer.json, vocab.txt or our meta.json in `near` (a
    checkpoint's directory) or its parent; (None, None) when there is none. A bad file is skipped with
    its error."""
    errors = []
    for directory in (near, near.parent):
        for name in ("tokenizer.json", "vocab.txt", "meta.json"):
            path = directory / name
            if not path.is_file():
                continue
            try:
                if name == "tokenizer.json":
                    return _tokenizer_json(path, rows), path
                if name == "vocab.txt":
                    if path.stat().st_size > MAX_JSON_BYTES:
                        raise CheckpointError(f"{path}: too large")
                    lines = path.read_text(encoding="utf-8").split("\n")
                    if lines and lines[-1] == "":
                        lines.pop()
                    return _vocab_list(list(enumerate(lines)), path, rows), path
                meta = read_json(path)
                itos = meta.get("itos") if isinstance(meta, dict) else None
                if isinstance(itos, list):
                    return _vocab_list(list(enumerate(itos)), path, rows), path
            except (CheckpointError, OSError, UnicodeDecodeError) as exc:
                errors.append(str(exc))
                log.warning("replay: vocabulary file skipped: %s", exc)
    if errors:
        raise CheckpointError("; ".join(errors))
    return None, None
