"""The training data sources: synthetic corpus with planted groups, UTF-8 text, uint16 .bin files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus import (
    FUNCTION_WORDS,
    CorpusError,
    load_bin,
    load_text,
    same_group_neighbour_rate,
    synthetic_corpus,
    synthetic_vocab,
)


def test_synthetic_corpus_is_deterministic_in_its_seed():
    a = synthetic_corpus(n_tokens=20_000, seed=3)
    b = synthetic_corpus(n_tokens=20_000, seed=3)
    c = synthetic_corpus(n_tokens=20_000, seed=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.itos == b.itos and a.groups == b.groups
    assert not np.array_equal(a.train, c.train)


def test_synthetic_vocabulary_names_tokens_and_their_groups():
    corpus = synthetic_corpus(n_tokens=10_000, n_groups=5, group_size=4, seed=0)
    assert corpus.vocab_size == len(FUNCTION_WORDS) + 5 * 4 == len(corpus.itos) == len(corpus.groups)
    assert len(set(corpus.itos)) == corpus.vocab_size  # every token string names one id
    first = len(FUNCTION_WORDS)
    assert corpus.itos[first:first + 5] == ["animal_0", "animal_1", "animal_2", "animal_3", "city_0"]
    assert corpus.groups[:first] == [-1] * first  # function words belong to no group
    assert corpus.groups[first:] == [g for g in range(5) for _ in range(4)]
    # a group's tokens share their name before the underscore
    for token, group in zip(corpus.itos[first:], corpus.groups[first:]):
        assert token.split("_")[0] == corpus.itos[first + 4 * group].split("_")[0]
    assert len(corpus.train) + len(corpus.val) == 10_000
    assert len(corpus.val) == 1_000
    assert corpus.train.max() < corpus.vocab_size
    assert set(np.unique(corpus.train).tolist()) == set(range(corpus.vocab_size))  # every token occurs


def test_more_groups_than_topic_names_get_generic_names():
    itos, groups = synthetic_vocab(30, 2)
    assert itos[-1] == "topic29_1" and groups[-1] == 29
    assert len(set(itos)) == len(itos)


def context_distributions(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Row t: distribution of (previous token, next token) pairs around each occurrence of token t."""
    prev, mid, nxt = tokens[:-2].astype(np.int64), tokens[1:-1].astype(np.int64), tokens[2:].astype(np.int64)
    counts = np.zeros((vocab_size, vocab_size * vocab_size))
    np.add.at(counts, (mid, prev * vocab_size + nxt), 1)
    return counts / counts.sum(axis=1, keepdims=True)


def test_tokens_of_a_group_share_their_contexts_and_groups_differ():
    """The planted structure: same-group tokens are interchangeable in context, other groups are not."""
    corpus = synthetic_corpus(n_tokens=200_000, n_groups=8, group_size=4, seed=1)
    dist = context_distributions(np.concatenate([corpus.train, corpus.val]), corpus.vocab_size)
    grouped = [t for t, g in enumerate(corpus.groups) if g >= 0]
    within, between = [], []
    for i in grouped:
        for j in grouped:
            if i < j:
                tvd = 0.5 * np.abs(dist[i] - dist[j]).sum()  # total variation distance of the contexts
                (within if corpus.groups[i] == corpus.groups[j] else between).append(tvd)
    # within a group only sampling noise separates the contexts; across groups they differ clearly
    # (function words are shared by all, and two groups may share a predecessor, so not entirely)
    assert max(within) < 0.15, max(within)
    assert min(between) > 3 * max(within), (min(between), max(within))
    assert np.mean(between) > 0.5, np.mean(between)


def test_text_file_is_character_level_with_a_90_10_split(tmp_path: Path):
    text = "Grüße aus Köln, naïve café ☃!\n" * 50
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_text(path)
    assert corpus.itos == sorted(set(text))
    assert corpus.vocab_size == len(set(text))
    assert len(corpus.train) == int(len(text) * 0.9)
    decoded = "".join(corpus.itos[i] for i in np.concatenate([corpus.train, corpus.val]))
    assert decoded == text
    assert corpus.groups is None


def test_text_errors_are_one_clear_line(tmp_path: Path):
    with pytest.raises(CorpusError, match="not found; pass --text_path"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="needs a file"):
        load_text("")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match="is not UTF-8"):
        load_text(bad)


def write_bin(directory: Path, vocab_size: int, n_train: int = 4000, n_val: int = 500, seed: int = 0) -> None:
    """train.bin / val.bin of uniformly random uint16 ids below vocab_size."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rng.integers(vocab_size, size=n_train, dtype=np.uint16).tofile(directory / "train.bin")
    rng.integers(vocab_size, size=n_val, dtype=np.uint16).tofile(directory / "val.bin")


def test_bin_directory_with_meta_json(tmp_path: Path):
    write_bin(tmp_path, 40)
    itos = [f"tok{i}" for i in range(40)]
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 40, "itos": itos}))
    corpus = load_bin(tmp_path)
    assert corpus.vocab_size == 40 and corpus.itos == itos
    assert isinstance(corpus.train, np.memmap)  # not read into memory up front
    assert np.array_equal(corpus.train, np.fromfile(tmp_path / "train.bin", dtype=np.uint16))
    assert len(corpus.val) == 500


def test_bin_vocab_size_from_option_and_meta_pkl_is_never_read(tmp_path: Path):
    write_bin(tmp_path, 30)
    (tmp_path / "meta.pkl").write_bytes(b"\x80\x04not a pickle at all")  # nanoGPT's format: ignored
    with pytest.raises(CorpusError, match=r"meta.json with vocab_size or pass --vocab_size=N"):
        load_bin(tmp_path)
    corpus = load_bin(tmp_path, vocab_size=30)
    assert corpus.vocab_size == 30 and corpus.itos is None


def test_bin_rejects_inconsistent_meta(tmp_path: Path):
    write_bin(tmp_path, 50)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50, "itos": ["a", "b"]}))
    with pytest.raises(CorpusError, match="itos has 2 strings but vocab_size is 50"):
        load_bin(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 20}))
    with pytest.raises(CorpusError, match=r"holds token id \d+ >= vocab_size=20"):
        load_bin(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CorpusError, match="is not valid JSON"):
        load_bin(tmp_path)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(CorpusError, match="val.bin not found"):
        load_bin(tmp_path)


def test_same_group_neighbour_rate_on_known_geometry():
    _, groups = synthetic_vocab(4, 5)
    n_func = len(FUNCTION_WORDS)
    g = torch.tensor(groups)
    centres = torch.eye(8)[:4] * 10  # four orthogonal group directions
    # tight clusters around each centre; function words anywhere (they are ignored)
    w = torch.randn(len(groups), 8, generator=torch.Generator().manual_seed(0))
    w[n_func:] = centres[g[n_func:]] + 0.1 * w[n_func:]
    rate, chance = same_group_neighbour_rate(w, groups)
    assert rate == 1.0
    assert chance == pytest.approx(4 / 19)  # 4 other members among 19 other grouped tokens
    # shuffling which row belongs to which token destroys the clusters' meaning
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1)) + n_func
    shuffled = w.clone()
    shuffled[n_func:] = w[perm]
    assert same_group_neighbour_rate(shuffled, groups)[0] < 0.6
