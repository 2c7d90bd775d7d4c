"""The planted groups: a trained model's embeddings form them (galaxies), its initial embeddings do not."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corpus import same_group_neighbour_rate, synthetic_vocab
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
SEED = 1337  # train.py's default seed: the model it builds first is the initial state we compare with


def group_separation(weight: torch.Tensor, groups: list[int]) -> float:
    """Mean cosine between tokens of the same group minus mean cosine between tokens of different groups."""
    g = torch.tensor(groups)
    keep = g >= 0
    w = torch.nn.functional.normalize(weight.detach().float()[keep], dim=1)
    g = g[keep]
    sim = w @ w.T
    same = g[:, None] == g[None, :]
    off_diagonal = ~torch.eye(len(g), dtype=torch.bool)
    return (sim[same & off_diagonal].mean() - sim[~same].mean()).item()


def test_nearest_neighbours_fall_in_their_planted_group_after_training(subprocess_env, tmp_path: Path):
    # the default model and corpus, trained for 300 of the default 500 steps: by then the groups are formed
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--max_iters=300", "--eval_interval=300", "--eval_iters=5",
         "--log_interval=100", "--analysis=none", "--wandb_log=False", f"--seed={SEED}"],
        # one thread: this small model gains little from two, and a second thread spinning against other
        # busy processes on a 2-core machine can make each step ten times slower
        cwd=tmp_path, env={**subprocess_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 300
    itos, groups = synthetic_vocab(16, 8)
    assert ckpt["itos"] == itos
    trained = ckpt["model"]["transformer.wte.weight"]
    trained_rate, chance = same_group_neighbour_rate(trained, groups)

    # the initial state: train.py seeds torch and then builds the model, nothing random comes between
    torch.manual_seed(SEED)
    initial = GPT(GPTConfig(**ckpt["model_args"])).transformer.wte.weight
    initial_rate, _ = same_group_neighbour_rate(initial, groups)
    # one initialisation is a small sample (128 tokens); five seeds pin the chance level down better
    init_rates = [initial_rate]
    for s in range(1, 5):
        torch.manual_seed(SEED + s)
        init_rates.append(same_group_neighbour_rate(GPT(GPTConfig(**ckpt["model_args"])).transformer.wte.weight,
                                                    groups)[0])
    mean_init = sum(init_rates) / len(init_rates)
    print(f"same-group nearest neighbour: trained {trained_rate:.3f}, initial {initial_rate:.3f} "
          f"(5 seeds: {mean_init:.3f}), chance {chance:.3f}; separation trained "
          f"{group_separation(trained, groups):.3f}, initial {group_separation(initial, groups):.3f}")

    assert chance == pytest.approx(7 / 127)  # 7 other members of a group among 127 other grouped tokens
    # at initialisation the geometry knows nothing of the groups: chance level (binomial noise ~0.02)
    assert abs(initial_rate - chance) < 0.1
    assert abs(mean_init - chance) < 0.04
    assert abs(group_separation(initial, groups)) < 0.05
    # trained: nearly every token's nearest neighbour is a member of its own group, far above chance
    assert trained_rate >= 0.9
    assert trained_rate > 10 * chance
    assert group_separation(trained, groups) > 0.3
