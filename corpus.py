"""Training data for train.py: a synthetic corpus with planted groups, a UTF-8 text file, or token .bin files.

    from corpus import synthetic_corpus, load_text, load_bin
    corpus = synthetic_corpus(seed=0)   # corpus.train / corpus.val: 1-D arrays of token ids

Every loader returns a Corpus; `itos` names the tokens when known, so analysis reports can print
words instead of ids. Nothing here reads pickle: a bin directory describes itself in meta.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Function words of the synthetic grammar. They come first in the vocabulary (ids 0..9) and belong to
# no group. 0 ends a sentence, 1-2 are articles, the rest connect one topic to the next.
FUNCTION_WORDS = (".", "the", "a", "of", "and", "in", "with", "to", "from", "near")
SENTENCE_END, ARTICLES, CONNECTORS = 0, (1, 2), tuple(range(3, len(FUNCTION_WORDS)))
# Names for the topic groups; the tokens of group g are f"{TOPICS[g]}_{j}" (j = 0 .. group_size - 1).
TOPICS = (
    "animal", "city", "color", "food", "tool", "planet", "river", "metal",
    "fruit", "tree", "bird", "fish", "gem", "sport", "cloth", "drink",
    "dance", "storm", "spice", "ship", "flower", "mineral", "insect", "game",
)


class CorpusError(ValueError):
    """The data cannot be loaded as asked (missing file, bad meta.json, too short...)."""


@dataclass
class Corpus:
    """Token ids for training and validation, and what is known about the vocabulary."""

    train: np.ndarray  # 1-D token ids (a np.memmap for bin files, so nothing big is read up front)
    val: np.ndarray  # 1-D token ids, never trained on
    vocab_size: int  # number of distinct token ids the model must embed
    itos: list[str] | None  # token strings by id; None when the data does not name its tokens
    groups: list[int] | None = None  # synthetic only: planted group of each token id, -1 for function words


def synthetic_vocab(n_groups: int, group_size: int) -> tuple[list[str], list[int]]:
    """Token strings and their planted group ids (-1 for function words) for the synthetic grammar."""
    itos = list(FUNCTION_WORDS)
    groups = [-1] * len(FUNCTION_WORDS)
    for g in range(n_groups):
        name = TOPICS[g] if g < len(TOPICS) else f"topic{g}"
        itos += [f"{name}_{j}" for j in range(group_size)]
        groups += [g] * group_size
    return itos, groups


def synthetic_corpus(
    n_tokens: int = 200_000,
    n_groups: int = 16,
    group_size: int = 8,
    seed: int = 0,
    n_successors: int = 3,
    end_prob: float = 0.3,
    val_fraction: float = 0.1,
) -> Corpus:
    """A corpus from a small random grammar whose topic groups a trained model should discover.

    Sentences walk a Markov chain over topic groups: each group may be followed by n_successors
    other groups, joined by a connector word fixed per (group, successor) pair, and each topic slot is
    filled by a uniformly random member of its group, sometimes after an article. Members of one group
    therefore occur in exactly the same contexts (they are interchangeable), while different groups
    have different neighbours, so the embeddings of a group should end up close together.
    Same arguments, same tokens: everything comes from one numpy Generator seeded with `seed`.
    """
    if n_groups < n_successors + 1 or group_size < 2 or n_successors > len(CONNECTORS):
        raise CorpusError(
            f"synthetic corpus needs n_groups > {n_successors}, group_size >= 2 and at most "
            f"{len(CONNECTORS)} successors (got {n_groups}, {group_size}, {n_successors})"
        )
    itos, groups = synthetic_vocab(n_groups, group_size)
    if len(itos) > 2**16:
        raise CorpusError(f"synthetic vocabulary of {len(itos)} tokens does not fit uint16; use fewer groups")
    rng = np.random.default_rng(seed)

    # The grammar: successors of each group, how likely each one is, and the connector word before it.
    successors = np.stack([rng.choice([h for h in range(n_groups) if h != g], n_successors, replace=False)
                           for g in range(n_groups)])  # (G, k)
    cum_probs = np.cumsum(rng.dirichlet(np.full(n_successors, 2.0), size=n_groups), axis=1)  # (G, k)
    connectors = np.stack([rng.choice(CONNECTORS, n_successors, replace=False)
                           for _ in range(n_groups)])  # (G, k): distinct per group, so (group, word) fixes the next group

    # Walk the chain one topic slot at a time; a slot yields 2-3 tokens, so this many slots is enough.
    n_slots = n_tokens // 2 + 1
    ends = rng.random(n_slots) < end_prob  # sentence ends after this slot
    starts = rng.integers(n_groups, size=n_slots)  # first group of the next sentence
    u = rng.random(n_slots)
    slot_group = np.empty(n_slots, dtype=np.int64)
    slot_next = np.full(n_slots, -1, dtype=np.int64)  # successor index taken after the slot, -1 at a sentence end
    succ, cum = successors.tolist(), cum_probs.tolist()  # plain lists: this loop is the only sequential part
    g = int(starts[-1])
    for t in range(n_slots):
        slot_group[t] = g
        if ends[t]:
            g = int(starts[t])
        else:
            j = sum(u[t] > c for c in cum[g][:-1])
            slot_next[t] = j
            g = succ[g][j]

    # Lay the slots out as tokens: [article] member (connector | '.'), vectorised.
    has_article = rng.random(n_slots) < 0.5
    article = rng.choice(ARTICLES, size=n_slots)
    member = len(FUNCTION_WORDS) + slot_group * group_size + rng.integers(group_size, size=n_slots)
    follow = np.where(slot_next < 0, SENTENCE_END,
                      connectors[slot_group, np.maximum(slot_next, 0)])
    width = 2 + has_article  # tokens per slot
    first = np.concatenate(([0], np.cumsum(width)[:-1]))  # where each slot's first token goes
    tokens = np.empty(int(width.sum()), dtype=np.uint16)
    tokens[first[has_article]] = article[has_article]
    tokens[first + has_article] = member
    tokens[first + has_article + 1] = follow
    tokens = tokens[:n_tokens]
    n_val = int(len(tokens) * val_fraction)
    return Corpus(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:], len(itos), itos, groups)


def load_text(path: str | Path, val_fraction: float = 0.1) -> Corpus:
    """Character-level corpus from a UTF-8 text file: vocabulary = sorted set of its characters."""
    if not str(path):
        raise CorpusError("dataset 'text' needs a file: pass --text_path=FILE")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusError(f"text file {path} not found; pass --text_path=FILE") from None
    except OSError as e:
        raise CorpusError(f"cannot read text file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(text) < 2:
        raise CorpusError(f"{path} has {len(text)} characters; need a longer text")
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    dtype = np.uint16 if len(itos) <= 2**16 else np.uint32
    ids = np.fromiter((stoi[ch] for ch in text), dtype=dtype, count=len(text))
    n_train = int(len(ids) * (1 - val_fraction))
    return Corpus(ids[:n_train], ids[n_train:], len(itos), itos)


def load_bin(data_dir: str | Path, vocab_size: int = 0) -> Corpus:
    """nanoGPT-style directory: train.bin / val.bin (uint16 token ids) and optionally meta.json.

    meta.json holds {"vocab_size": N, "itos": [token strings...]} (itos optional); a vocab_size
    argument > 0 wins over it. nanoGPT's meta.pkl is deliberately ignored: pickle can run code.
    """
    if not str(data_dir):
        raise CorpusError("dataset 'bin' needs a directory: pass --data_dir=DIR (with train.bin, val.bin, meta.json)")
    data_dir = Path(data_dir)
    splits = {}
    for split in ("train", "val"):
        f = data_dir / f"{split}.bin"
        if not f.is_file():
            raise CorpusError(f"{f} not found; a bin dataset needs train.bin and val.bin (uint16 token ids)")
        if f.stat().st_size < 4 or f.stat().st_size % 2:
            raise CorpusError(f"{f} is not a uint16 token file ({f.stat().st_size} bytes)")
        splits[split] = np.memmap(f, dtype=np.uint16, mode="r")
    itos = None
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorpusError(f"{meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise CorpusError(f"{meta_path} must hold a JSON object with vocab_size")
        itos = meta.get("itos")
        if itos is not None and not (isinstance(itos, list) and all(isinstance(s, str) for s in itos)):
            raise CorpusError(f"{meta_path}: itos must be a list of strings")
        if vocab_size <= 0:
            vocab_size = meta.get("vocab_size", len(itos) if itos else 0)
            if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
                raise CorpusError(f"{meta_path}: vocab_size must be an integer")
    if vocab_size <= 0:
        raise CorpusError(f"no vocab_size for {data_dir}: write meta.json with vocab_size or pass --vocab_size=N")
    if vocab_size > 2**16:
        raise CorpusError(f"vocab_size={vocab_size} cannot be stored in uint16 .bin files")
    if itos is not None and len(itos) != vocab_size:
        raise CorpusError(f"{meta_path}: itos has {len(itos)} strings but vocab_size is {vocab_size}")
    # val is small, so check it fully: an id >= vocab_size would otherwise fail deep inside the embedding
    if int(splits["val"].max()) >= vocab_size:
        raise CorpusError(f"{data_dir / 'val.bin'} holds token id {int(splits['val'].max())} >= vocab_size={vocab_size}")
    return Corpus(splits["train"], splits["val"], vocab_size, itos)


def same_group_neighbour_rate(weight: torch.Tensor, groups: list[int]) -> tuple[float, float]:
    """Share of grouped tokens whose nearest other grouped token (cosine) is in the same group, and its chance level.

    Function words (group -1) are left out on both sides. Chance is what random directions give:
    (group size - 1) / (grouped tokens - 1), averaged over tokens.
    """
    g = torch.tensor(groups)
    keep = g >= 0
    w = torch.nn.functional.normalize(weight.detach().float().cpu()[keep], dim=1)
    g = g[keep]
    sim = w @ w.T
    sim.fill_diagonal_(-float("inf"))  # a token is not its own neighbour
    nearest = sim.argmax(dim=1)
    rate = (g[nearest] == g).float().mean().item()
    same = (g[:, None] == g[None, :]).sum(dim=1) - 1
    chance = (same.float() / (len(g) - 1)).mean().item()
    return rate, chance
