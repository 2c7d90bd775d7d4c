"""trainer_hook.hf.EmbeddingMonitorCallback in a real transformers Trainer, against a real daemon subprocess.

Tiny randomly initialised models on CPU (GPT-2 with tied embeddings, Llama with untied ones, a LoRA-wrapped
Llama), a WordLevel tokenizer built in memory: nothing is downloaded. A pacing callback placed after ours
waits, at each step we expect a snapshot, until the daemon has analysed it, so the daemon's newest-wins
skipping can never hide a step, and it keeps an independent reference of the embedding the model computes
with at that step (its forward pass over every token id), against which the daemon's drift is checked.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments)

from analysis_daemon import measure_semantic_drift  # noqa: E402
from tests import wandb_history  # noqa: E402
from tests.test_daemon import DaemonProc, assert_drift_matches, env, start_daemon  # noqa: E402,F401 - fixtures used by name
from trainer_hook.hf import EmbeddingMonitorCallback  # noqa: E402

pytestmark = pytest.mark.timeout(180)

V, SEQ = 64, 16


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over w0..w63, built in memory."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1")


class Tokens(torch.utils.data.Dataset):
    """Deterministic random token sequences (language modelling: labels = inputs)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, V, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1))


def reference(model: Any) -> torch.Tensor:
    """What the model's embedding layer outputs for every token id: the matrix it computes with."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(V)).detach().clone().float()


class Pacer(TrainerCallback):
    """After ours: keeps a reference of the weights at each expected step; where the next step begins (our
    callback has sent the previous one by then) waits until the daemon analysed every snapshot so far."""

    def __init__(self, daemon: DaemonProc | None, run: str, expected: list[int], every_n: int | None = None,
                 tensors: int = 1) -> None:
        self.daemon, self.run, self.expected, self.every_n = daemon, run, expected, every_n
        self.tensors = tensors  # records per step (2: an untied output embedding is published as lm_head too)
        self.refs: dict[int, torch.Tensor] = {}

    def _at(self, state: Any, model: Any) -> None:
        step = state.global_step
        if step in self.expected and step not in self.refs:
            self.refs[step] = reference(model)  # the weights stay these until the next optimizer step

    def _wait(self) -> None:
        if self.daemon is not None and self.refs:
            self.daemon.wait_results(self.run, self.tensors * len(self.refs))

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._at(state, model)

    def on_step_begin(self, args, state, control, **kw):
        self._wait()

    def on_step_end(self, args, state, control, model=None, **kw):
        self._at(state, model)

    def on_evaluate(self, args, state, control, model=None, **kw):
        self._at(state, model)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._wait()


def logged_at(log_history: list[dict], step: int) -> dict[str, float] | None:
    """What the Trainer logged at `step`, under the names the Trainer's W&B integration gives it."""
    out: dict[str, float] = {}
    for e in log_history:
        if e["step"] != step:
            continue
        if "loss" in e:
            out.update({"train/loss": e["loss"], "train/learning_rate": e["learning_rate"],
                        "train/grad_norm": e["grad_norm"]})
        if "eval_loss" in e:
            out["eval/loss"] = e["eval_loss"]
    return out or None


def training_args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=5e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_steps=1, dataloader_num_workers=0, seed=0)
    return TrainingArguments(**{**base, **kw})


def check_results(results: list[dict], refs: dict[int, torch.Tensor], expected: list[int], *, exact: bool) -> None:
    """Results at exactly `expected`, each drift equal to the reference drift between consecutive snapshots."""
    assert [r["iter"] for r in results] == expected
    assert [r["prev_iter"] for r in results] == [None, *expected[:-1]]
    assert results[0]["drift"] is None
    for r, prev, curr in zip(results[1:], expected, expected[1:]):
        if exact:  # the same float32 arithmetic, perhaps summed in another order
            assert_drift_matches(r["drift"], refs[prev], refs[curr])
        else:  # the reference adds the LoRA delta in another order than the model's forward pass
            ref = measure_semantic_drift(refs[prev], refs[curr], top_k=50)
            for key in ("average_cosine_similarity", "average_euclidean_distance"):
                assert r["drift"][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6)
        assert r["drift"]["average_cosine_similarity"] < 0.9999  # lr 5e-2: the published matrix really moved
    assert all(r["shape"] == [V, 32] for r in results)


def test_gpt2_tied_every_n_eval_and_end_once_each_with_vocab_and_wandb(
        start_daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = start_daemon("--exit-on-end")
    # Set only now, in this process: the daemon can learn project and group from the hello alone.
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "hf-emb-test")
    monkeypatch.setenv("WANDB_RUN_GROUP", "grp-hf")
    import wandb
    wandb.teardown()  # wandb reads WANDB_DIR and WANDB_RUN_GROUP once per process: drop an earlier test's setup
    # every 2 steps + eval every 3 + end at 6: 0 (start), 2, 3 (eval), 4, 6 (every-n, eval and end: once)
    expected = [0, 2, 3, 4, 6]
    pacer = Pacer(d, "hf-gpt2", expected, every_n=2)
    args = training_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3, report_to=["wandb"],
                         run_name="hf-gpt2", logging_steps=2)
    model = gpt2()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(),
                      processing_class=tokenizer(),
                      callbacks=[EmbeddingMonitorCallback(d.endpoint, every_n_steps=2), pacer])
    try:
        trainer.train()
        import wandb
        trainer_run = wandb.run.id
    finally:
        import wandb
        wandb.finish()
    assert d.wait_exit() == 0
    results = d.results("hf-gpt2")
    check_results(results, pacer.refs, expected, exact=True)
    drifted = results[-1]["drift"]
    assert drifted["most_drifted_token_strings"] == [f"w{t}" for t, _ in drifted["most_drifted_tokens"]]
    assert "run hf-gpt2: end" in d.log()
    # Each snapshot carries exactly what the Trainer logged at its step, with the Trainer's values.
    metrics = {r["iter"]: r["metrics"] for r in results}
    assert metrics == {it: logged_at(trainer.state.log_history, it) for it in expected}
    assert metrics[0] is None and metrics[3]["eval/loss"] and metrics[6]["eval/loss"]  # the last eval is carried
    assert "eval/runtime" not in metrics[3]

    files = {wandb_history.run_info(f)["job_type"]: f for f in wandb_history.find_run_files(tmp_path)}
    ours = wandb_history.run_info(files["embedding-analysis"])
    assert (ours["project"], ours["group"], ours["name"]) == ("hf-emb-test", "grp-hf", "hf-gpt2-embeddings")
    assert ours["config"]["trainer_wandb_run_id"] == trainer_run
    rows = wandb_history.history(files["embedding-analysis"])
    assert [row["analysis/iter"] for row in rows] == expected
    for row, r in zip(rows[1:], results[1:]):
        assert row["analysis/drift_cosine_sim"] == pytest.approx(r["drift"]["average_cosine_similarity"])
    assert rows[2]["eval/loss"] == metrics[3]["eval/loss"]  # loss beside drift, in our W&B run


def test_llama_untied_publishes_the_input_embedding_not_the_head(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("--exit-on-end", "--no-wandb")
    expected = [0, 2, 4]  # start, evals at 2 and 4; the end (4) is not sent twice
    pacer = Pacer(d, "llama-untied", expected, tensors=2)
    model = llama()
    head0 = model.get_output_embeddings().weight.detach().clone()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
                      train_dataset=Tokens(), eval_dataset=Tokens(),
                      callbacks=[EmbeddingMonitorCallback(d.endpoint, run="llama-untied", tokenizer=tokenizer()),
                                 pacer])
    trainer.train()
    assert d.wait_exit() == 0
    records = d.results("llama-untied")
    results = [r for r in records if r["tensor"] != "lm_head"]
    head = [r for r in records if r["tensor"] == "lm_head"]  # the untied head: its own tensor, its own drift chain
    assert [r["iter"] for r in head] == expected and [r["prev_iter"] for r in head] == [None, *expected[:-1]]
    assert not any(r["default_tensor"] for r in head)
    check_results(results, pacer.refs, expected, exact=True)
    assert not torch.equal(model.get_output_embeddings().weight, head0)  # the head trained too, separately
    assert results[-1]["drift"]["least_drifted_token_strings"][0].startswith("w")


def test_lora_wrapped_model_publishes_the_adapted_embedding(start_daemon, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed")
    d = start_daemon("--exit-on-end", "--no-wandb")
    base = llama()
    frozen = base.get_input_embeddings().weight.detach().clone()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                      init_lora_weights="gaussian"))
    expected = [0, 3, 6]
    pacer = Pacer(d, "lora", expected, every_n=3, tensors=2)  # llama is untied: its head goes too
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6, label_names=["labels"]),
                      train_dataset=Tokens(), processing_class=tokenizer(),
                      callbacks=[EmbeddingMonitorCallback(d.endpoint, run="lora", every_n_steps=3), pacer])
    trainer.train()
    assert d.wait_exit() == 0
    # The base weight never moves; what the model computes with (base + LoRA delta) does, and that is published.
    assert torch.equal(base.get_input_embeddings().base_layer.weight, frozen)
    check_results([r for r in d.results("lora") if r["tensor"] != "lm_head"], pacer.refs, expected, exact=False)


def test_ddp_two_processes_one_run_name_each_step_once(start_daemon, env: dict[str, str], tmp_path: Path) -> None:
    d = start_daemon("--exit-on-end", "--no-wandb")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("hf_ddp_trainer.py")), d.endpoint, str(tmp_path / "out"), str(d.results_dir)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the two ranks print concurrently: their lines may interleave, so match the fields, not whole lines
    names = dict(re.findall(r"RANK (\d) run=(\S+) published=", proc.stdout))
    assert set(names) == {"0", "1"}, proc.stdout
    assert names["0"] == names["1"] and names["0"].startswith("hf-")  # generated once, broadcast from rank 0
    assert d.wait_exit() == 0
    assert [r["iter"] for r in d.results(names["0"])] == [0, 2, 4]  # a replicated weight: sent once per step


def test_no_daemon_trains_on_and_logs_one_line(tcp_endpoint: str, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embedding_monitor")
    cb = EmbeddingMonitorCallback(tcp_endpoint, run="nobody-listens", every_n_steps=1)
    expected = [0, 1, 2, 3, 4, 5, 6]
    pacer = Pacer(None, "nobody-listens", expected, every_n=1)
    trainer = Trainer(model=gpt2(), args=training_args(tmp_path, max_steps=6), train_dataset=Tokens(),
                      callbacks=[cb, pacer])
    publisher = None

    class Grab(TrainerCallback):  # the publisher is closed at the end; keep it to read its counters
        def on_step_end(self, *a, **kw):
            nonlocal publisher
            publisher = cb.publisher

    trainer.add_callback(Grab())
    trainer.train()
    assert trainer.state.global_step == 6 and sorted(pacer.refs) == expected
    assert publisher is not None and publisher.published == 0 and publisher.dropped == len(expected)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("embedding_monitor")]
    assert len(warnings) == 1, warnings
    assert "no analysis daemon connected" in warnings[0] and tcp_endpoint in warnings[0]
    assert cb.publisher is None  # closed at the end of training


def test_bad_arguments_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer or None, got 0"):
        EmbeddingMonitorCallback("tcp://127.0.0.1:5555", every_n_steps=0)

    class NoEmbedding(torch.nn.Module):
        def forward(self, input_ids=None, labels=None):
            return {"loss": torch.zeros((), requires_grad=True)}

    trainer = Trainer(model=NoEmbedding(), args=training_args(tmp_path, max_steps=1), train_dataset=Tokens(),
                      callbacks=[EmbeddingMonitorCallback("tcp://127.0.0.1:5555")])
    with pytest.raises(ValueError, match="NoEmbedding has no input embedding"):
        trainer.train()


def test_evaluations_land_at_their_own_step_and_the_last_one_is_carried(start_daemon, env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    # The report that found it, scaled down: eval_steps=100, every_n_steps=25, max_steps=300 gave eval/loss at
    # 125 and 225 and no 300. Here eval every 4, publish every 2, log every 3, and the best checkpoint is
    # loaded at the end (the last snapshot must still be the last step's weights, not the best ones).
    d = start_daemon("--exit-on-end", "--no-wandb")
    expected = [0, 2, 4, 6, 8, 10, 12]
    pacer = Pacer(d, "evals", expected)
    args = training_args(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=4, logging_steps=3,
                         save_strategy="steps", save_steps=4, load_best_model_at_end=True,
                         metric_for_best_model="eval_loss", greater_is_better=False)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=Tokens(), eval_dataset=Tokens(),
                      callbacks=[EmbeddingMonitorCallback(d.endpoint, run="evals", every_n_steps=2), pacer])
    trainer.train()
    assert d.wait_exit() == 0
    results = d.results("evals")
    check_results(results, pacer.refs, expected, exact=True)
    history = trainer.state.log_history
    evals = sorted(e["step"] for e in history if "eval_loss" in e)
    assert evals == [4, 8, 12]
    metrics = {r["iter"]: r["metrics"] for r in results}
    assert metrics == {it: logged_at(history, it) for it in expected}
    assert {it for it, m in metrics.items() if m and "eval/loss" in m} == set(evals)  # every eval, at its step
    assert {it for it, m in metrics.items() if m and "train/loss" in m} == {6, 12}  # logged at 3, 6, 9, 12
    # Its replay from the checkpoints (trainer_state.json) names and values the metrics the same way.
    proc = subprocess.run([sys.executable, "-m", "analysis_daemon", "replay", *sorted((tmp_path / "out").glob("checkpoint-*")),
                           "--run", "replayed", "--results-dir", str(tmp_path / "replay"), "--no-wandb", "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replayed = [json.loads(line) for line in (tmp_path / "replay" / "replayed" / "analysis.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["metrics"]) for r in replayed] == [(it, metrics[it]) for it in (4, 8, 12)]
