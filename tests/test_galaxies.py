"""The planted groups: a trained model's embeddings form them (galaxies), its initial embeddings do not,
and the daemon's galaxy map, fed by a real train.py run, shows them as separate clusters."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis_daemon.metrics.galaxy import cluster_purity
from corpus import same_group_neighbour_rate, synthetic_vocab
from model import GPT, GPTConfig
from tests.test_daemon import DaemonProc

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


def test_nearest_neighbours_fall_in_their_planted_group_after_training(subprocess_env, tmp_path: Path,
                                                                        tcp_endpoint: str):
    # the daemon analyses the run as it trains: its galaxy maps and alerts are checked below
    daemon = DaemonProc(tmp_path, {**subprocess_env, "OMP_WAIT_POLICY": "PASSIVE"}, tcp_endpoint, "--exit-on-end",
                        "--no-wandb")
    try:
        # the default model and corpus, trained for 300 of the default 500 steps: by then the groups are formed
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--max_iters=300", "--eval_interval=100", "--eval_iters=5",
             "--log_interval=100", f"--analysis_endpoint={tcp_endpoint}", "--run_name=planted", "--wandb_log=False",
             f"--seed={SEED}"],
            # one thread: this small model gains little from two, and a second thread spinning against other
            # busy processes on a 2-core machine can make each step ten times slower
            cwd=tmp_path, env={**subprocess_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert daemon.wait_exit() == 0
    finally:
        daemon.kill()
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

    # The daemon's galaxy map of the trained snapshot: the planted groups are its clusters.
    records = daemon.results("planted")
    assert [r["iter"] for r in records] == [0, 100, 200, 300]
    final = records[-1]["galaxy"]
    assert final["rows"] == len(groups) and final["aligned_to_iter"] == 200
    purity = cluster_purity(final["points"], groups)
    per_group: dict[int, set[int]] = {}
    for token_id, _, _, c in final["points"]:
        if groups[token_id] >= 0:
            per_group.setdefault(groups[token_id], set()).add(c)
    clustered = sum(1 for t, _, _, c in final["points"] if c >= 0 and groups[t] >= 0)
    first = records[0]["galaxy"]
    print(f"galaxy map at iter 300: {final['cluster_count']} clusters, purity {purity:.3f} against the 16 planted "
          f"groups, {clustered} of 128 group tokens clustered, groups spread over "
          f"{sum(len(v) for v in per_group.values()) / 16:.2f} clusters each; at iter 0: {first['cluster_count']} "
          f"clusters of {first['clustered_points']} tokens")
    assert purity >= 0.95  # a cluster holds one planted group, not a merger of several
    assert clustered >= 0.9 * 128  # nearly every group token is in a cluster, not a singleton
    assert all(len(clusters - {-1}) <= 2 for clusters in per_group.values())  # a group is not scattered
    assert final["cluster_count"] >= 14  # the 16 groups stay separate (two may still merge this early)
    assert first["clustered_points"] < 16  # the random initial embedding has no such structure
    # the losses came with the snapshots; no partial collapse is reported once the groups have formed
    assert all(set(r["metrics"]) == {"train/loss", "eval/loss", "train/learning_rate"} for r in records)
    assert records[-1]["metrics"]["eval/loss"] < records[0]["metrics"]["eval/loss"]
    print("partial-collapse clumps by iteration:",
          {r["iter"]: r["clump"] and (r["clump"]["size"], round(r["clump"]["mutual"], 3)) for r in records})
    assert records[0]["clump"] is None and records[-1]["clump"] is None
    assert not any(a["kind"] == "partial_collapse" for a in records[-1]["alerts"] + records[0]["alerts"])
