"""trainer_hook.lightning.EmbeddingMonitorCallback in a real Lightning Trainer, against a real daemon subprocess.

A tiny next-token model on CPU. As in test_hf_callback.py, a pacing callback after ours waits at each
step we expect a snapshot until the daemon has analysed it (newest-wins skipping cannot hide a step) and
keeps an independent reference (the embedding's forward pass over every token id) for the drift check.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

from tests import wandb_history  # noqa: E402
from tests.test_daemon import DaemonProc, assert_drift_matches, env, start_daemon  # noqa: E402,F401 - fixtures used by name
from trainer_hook.lightning import EmbeddingMonitorCallback  # noqa: E402

pytestmark = pytest.mark.timeout(180)

V, D = 48, 16


class Vocab:
    """Anything with get_vocab() names the tokens (a transformers tokenizer is one)."""

    def get_vocab(self) -> dict[str, int]:
        return {f"tok{i}": i for i in range(V)}


class TinyLM(pl.LightningModule):
    """Embedding -> linear next-token head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.ModuleDict({"tok": nn.Embedding(V, D), "head": nn.Linear(D, V)})

    def get_input_embeddings(self) -> nn.Module:
        return self.net["tok"]

    def _loss(self, batch: Any) -> torch.Tensor:
        x = batch[0]
        logits = self.net["head"](self.net["tok"](x[:, :-1]))
        return nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=5e-2)


class Hidden(TinyLM):
    """The same model without get_input_embeddings(): the callback needs embedding='net.tok'."""

    get_input_embeddings = None  # type: ignore[assignment]


def loader() -> torch.utils.data.DataLoader:
    data = torch.randint(0, V, (64, 8), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)


def reference(module: TinyLM) -> torch.Tensor:
    with torch.no_grad():
        return module.net["tok"](torch.arange(V)).clone()


class Pacer(pl.Callback):
    """After ours: keeps a reference of the weights at each expected step; where the next batch begins (our
    callback has sent the previous step by then) waits until the daemon analysed every snapshot so far."""

    def __init__(self, daemon: DaemonProc, run: str, expected: list[int], every_n: int | None) -> None:
        self.daemon, self.run, self.expected, self.every_n = daemon, run, expected, every_n
        self.refs: dict[int, torch.Tensor] = {}

    def _at(self, trainer: Any, module: Any) -> None:
        step = trainer.global_step
        if step in self.expected and step not in self.refs:
            self.refs[step] = reference(module)  # the weights stay these until the next optimizer step

    def _wait(self) -> None:
        if self.refs:
            self.daemon.wait_results(self.run, len(self.refs))

    def on_train_start(self, trainer, module):
        self._at(trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._wait()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._at(trainer, module)

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self._at(trainer, module)

    def on_train_end(self, trainer, module):
        self._wait()


def csv_logged(log_dir: Path) -> dict[int, dict[str, float]]:
    """Lightning's own log (CSVLogger's metrics.csv) by trainer.global_step: Lightning's logger step counts the
    batches that stepped *before* the one being logged, so a value logged at logger step k was measured
    when global_step was k + 1 (after that batch's optimizer step)."""
    out: dict[int, dict[str, float]] = {}
    with open(log_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v != "" and k not in ("step", "epoch")}
            out.setdefault(int(row["step"]) + 1, {}).update(values)
    return out


def trainer(tmp_path: Path, callbacks: list, **kw: Any) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, max_steps=6, val_check_interval=3, limit_val_batches=1,
                num_sanity_val_steps=1, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, default_root_dir=str(tmp_path), logger=False)
    return pl.Trainer(callbacks=callbacks, **{**base, **kw})


def check_results(results: list[dict], refs: dict[int, torch.Tensor], expected: list[int]) -> None:
    """Results at exactly `expected`; each drift equals the reference drift between consecutive snapshots."""
    assert [r["iter"] for r in results] == expected
    assert [r["prev_iter"] for r in results] == [None, *expected[:-1]]
    for r, prev, curr in zip(results[1:], expected, expected[1:]):
        assert_drift_matches(r["drift"], refs[prev], refs[curr])  # the same float32 arithmetic, perhaps reordered
        assert r["drift"]["average_cosine_similarity"] < 0.9999
        assert r["drift"]["most_drifted_token_strings"] == [f"tok{t}" for t, _ in r["drift"]["most_drifted_tokens"]]
    assert all(r["shape"] == [V, D] for r in results)


def test_every_n_validation_and_end_once_each_with_wandb_logger(start_daemon, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    d = start_daemon("--exit-on-end")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # every 2 steps + validation every 3 batches + end at 6: 0, 2, 3, 4, 6 (the sanity check publishes nothing)
    expected = [0, 2, 3, 4, 6]
    pacer = Pacer(d, "pl-run", expected, every_n=2)
    logger = WandbLogger(name="pl-run", project="pl-emb-test", group="grp-pl", save_dir=str(tmp_path), offline=True)
    csv_log = CSVLogger(str(tmp_path), name="csv")
    module = TinyLM()
    try:
        trainer(tmp_path, [EmbeddingMonitorCallback(d.endpoint, every_n_steps=2, tokenizer=Vocab()), pacer],
                logger=[logger, csv_log], log_every_n_steps=1).fit(module, loader(), loader())
        trainer_run = logger.experiment.id
    finally:
        import wandb
        wandb.finish()
    assert d.wait_exit() == 0
    results = d.results("pl-run")
    check_results(results, pacer.refs, expected)
    files = {wandb_history.run_info(f)["job_type"]: f for f in wandb_history.find_run_files(tmp_path)}
    ours = wandb_history.run_info(files["embedding-analysis"])
    assert (ours["project"], ours["group"], ours["name"]) == ("pl-emb-test", "grp-pl", "pl-run-embeddings")
    assert ours["config"]["trainer_wandb_run_id"] == trainer_run
    rows = wandb_history.history(files["embedding-analysis"])
    assert [row["analysis/iter"] for row in rows] == expected
    # What the module logged (self.log) at a step travels with that step's snapshot, with Lightning's values:
    # train_loss at every published step, val_loss at the validated ones (3 and 6), nothing at the start.
    logged = csv_logged(Path(csv_log.log_dir))
    metrics = {r["iter"]: r["metrics"] for r in results}
    assert metrics == {0: None, **{it: logged[it] for it in expected[1:]}}
    assert {it for it, m in metrics.items() if m and "val_loss" in m} == {3, 6}
    for r, row in zip(results, rows):
        for key, value in (r["metrics"] or {}).items():
            assert row[key] == value  # on the iteration axis of our W&B run


def test_embedding_by_attribute_path_and_run_named_after_the_logger(start_daemon, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger
    d = start_daemon("--exit-on-end", "--no-wandb")
    expected = [0, 3, 6]  # validation at 3 and 6; the end (6) is not sent twice
    pacer = Pacer(d, "csvrun-version_0", expected, every_n=None)
    module = Hidden()
    module.tokenizer = Vocab()  # found on the module, as with a LightningModule that keeps its tokenizer
    trainer(tmp_path, [EmbeddingMonitorCallback(d.endpoint, embedding="net.tok"), pacer],
            logger=CSVLogger(str(tmp_path), name="csvrun")).fit(module, loader(), loader())
    assert d.wait_exit() == 0
    check_results(d.results("csvrun-version_0"), pacer.refs, expected)


def test_missing_embedding_fails_before_training_with_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Hidden has no get_input_embeddings\(\); pass .*embedding='model.embed_tokens'"):
        trainer(tmp_path, [EmbeddingMonitorCallback("tcp://127.0.0.1:5555")]).fit(Hidden(), loader())
    with pytest.raises(ValueError, match="embedding='net.nope': ModuleDict has no attribute 'nope'"):
        trainer(tmp_path, [EmbeddingMonitorCallback("tcp://127.0.0.1:5555", embedding="net.nope")]).fit(
            TinyLM(), loader())
