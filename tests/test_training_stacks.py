"""The training stacks people combine, publishing to one real daemon: tiny models, CPU, a few steps each.

torch.compile (no graph break, no recompilation caused by publishing), bf16 weights, autocast,
activation checkpointing, gradient accumulation, LoRA (peft) and resize_token_embeddings in the
middle of a run. Each publishes mid-step where it matters, and each checks that the daemon's records
arrive with sane numbers and that training with publishing ends with exactly the weights of the same
training without it (publishing never touches the user's tensors). See docs/training-stacks.md.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Callable

import pytest
import torch
from torch import nn

from tests.conftest import child_env, free_tcp_port
from tests.test_daemon import DaemonProc
from tests.test_publish_untouched import state
from tests.tiny_lm import TinyLM
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(180)

VOCAB, DIM, SEQ, BATCH = 61, 16, 12, 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """One real daemon for the whole file (each stack is its own run)."""
    tmp = tmp_path_factory.mktemp("stacks")
    d = DaemonProc(tmp, dict(child_env(tmp), OMP_WAIT_POLICY="PASSIVE"), f"tcp://127.0.0.1:{free_tcp_port()}")
    yield d
    d.kill()


Tiny = partial(TinyLM, VOCAB, DIM)  # Tiny(checkpointed=True) recomputes the embedding and blocks in backward


def batch(step: int) -> torch.Tensor:
    """Sequences that count upwards mod VOCAB (learnable in a few steps)."""
    g = torch.Generator().manual_seed(step)
    return (torch.randint(0, VOCAB, (BATCH, 1), generator=g) + torch.arange(SEQ + 1)) % VOCAB


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class Monitor:
    """One publisher per run; each publish waits for the daemon's record, so no iteration is skipped."""

    def __init__(self, daemon: DaemonProc, run: str, **options) -> None:
        self.daemon, self.run, self.n = daemon, run, 0
        self.pub = EmbeddingPublisher(daemon.endpoint, run=run, **options)
        assert self.pub.wait_connected(30), f"{run}: no daemon"

    def __call__(self, what, it: int, metrics: dict | None = None) -> None:
        weight = what if isinstance(what, torch.Tensor) else what.weight
        before = state(weight)
        assert self.pub.publish(what, it, metrics=metrics), f"{self.run}: iter {it} dropped"
        self.n += 1
        self.daemon.wait_results(self.run, self.n)
        assert state(weight) == before, f"{self.run}: publish changed the weight's storage, flags or version"

    def records(self) -> list[dict]:
        self.pub.close()
        return self.daemon.results(self.run)


def sane(records: list[dict], iters: list[int], shape: list[int], dtype: str, moved: list[bool] | None = None) -> None:
    """Every published iteration analysed once, in order, finite; drift from the second on.

    `moved[i]`: whether the optimizer stepped between snapshots i-1 and i. Where it did not (mid-step
    after the previous step's end, between micro-batches) the matrices are equal: cosine 1.
    """
    assert [r["iter"] for r in records] == iters
    for i, r in enumerate(records):
        assert r["shape"] == shape and r["dtype"] == dtype and r["non_finite"] == {"values": 0, "rows": 0}, r
        g = r["geometry"]  # an HF model's padding row is zero: left out of the geometry, counted
        assert g is not None and g["rows"] == shape[0] and g["valid_rows"] == shape[0] - g["zero_rows"] >= shape[0] - 1, r
        if i == 0:
            assert r["drift"] is None and r["drift_skipped_reason"] == "first snapshot of this run"
            continue
        cosine = r["drift"]["average_cosine_similarity"]
        if moved is None:
            assert -1 <= cosine <= 1 + 1e-6, r
        elif moved[i]:
            assert 0.5 < cosine < 1 - 1e-6, (i, cosine)  # a small optimizer step: close, not equal
        else:
            assert cosine == pytest.approx(1.0, abs=1e-5), (i, cosine)
    assert records[-1]["counters"]["rejected"] == 0 and records[-1]["counters"]["skipped"] == 0


def mid_post(steps: int) -> list[bool]:
    """moved[] of a run that publishes mid-step, then after each step: only the post-step snapshots moved."""
    return [i % 2 == 1 for i in range(2 * steps)]


def train(model: nn.Module, steps: int, publish: Callable[[str, int, float], None] | None, *, accumulate: int = 1,
          autocast: bool = False, step_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """A plain loop; `publish(where, step, loss)` is called mid-step ("mid", "micro") and after the step ("post")."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    forward = step_fn if step_fn is not None else model
    losses = []
    for step in range(steps):
        for micro in range(accumulate):
            ids = batch(step * accumulate + micro)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = lm_loss(forward(ids[:, :-1]), ids) / accumulate
            if publish and micro == 0:
                publish("mid", step, loss.item())  # between forward and backward
            loss.backward()
            if publish and micro < accumulate - 1:
                publish("micro", step, loss.item())  # between micro-batches: gradients half accumulated
        opt.step()
        opt.zero_grad(set_to_none=True)
        if publish:
            publish("post", step, loss.item())
        losses.append(loss.item() * accumulate)
    return losses


def same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs between training with and without publishing"


def run_stack(daemon: DaemonProc, run: str, make: Callable[[], nn.Module], steps: int = 3, **train_kw) -> list[dict]:
    """Train `make()` without publishing, then again publishing mid-step and after each step; both must end equal."""
    torch.manual_seed(0)
    plain = make()
    losses = train(plain, steps, None, **train_kw)
    assert losses[-1] < losses[0], losses  # it learns
    torch.manual_seed(0)
    model = make()
    monitor, it = Monitor(daemon, run), iter(range(1000))
    train(model, steps, lambda where, step, loss: monitor(model.tok_embeddings, next(it), {"train/loss": loss}),
          **train_kw)
    same_weights(plain, model)
    return monitor.records()


def test_torch_compile_no_graph_break_and_no_recompile(daemon):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Tiny()
    # aot_eager: dynamo and AOTAutograd as in production, without inductor's C++ build (tens of seconds here).
    compiled = torch.compile(model, backend="aot_eager")
    train(model, 1, None, step_fn=compiled)  # compiles forward and backward
    frames, breaks = dict(counters["frames"]), sum(counters["graph_break"].values())
    assert frames.get("ok", 0) >= 1 and breaks == 0, (frames, dict(counters["graph_break"]))
    monitor, it = Monitor(daemon, "compile"), iter(range(1000))
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation from here on raises
        train(model, 3, lambda where, step, loss: monitor(model.tok_embeddings, next(it), {"train/loss": loss}),
              step_fn=compiled)
    assert dict(counters["frames"]) == frames and sum(counters["graph_break"].values()) == 0
    assert not counters["recompiles"], dict(counters["recompiles"])
    sane(monitor.records(), list(range(6)), [VOCAB, DIM], "float32", mid_post(3))


def test_bf16_weights(daemon):
    records = run_stack(daemon, "bf16", lambda: Tiny().to(torch.bfloat16))
    sane(records, list(range(6)), [VOCAB, DIM], "bfloat16", mid_post(3))


def test_autocast_publishes_the_float32_weights(daemon):
    records = run_stack(daemon, "autocast", Tiny, autocast=True)
    sane(records, list(range(6)), [VOCAB, DIM], "float32", mid_post(3))


def test_activation_checkpointing_recomputes_with_the_weights_untouched(daemon):
    # The embedding is inside the checkpointed region: backward re-runs it; a version bump by publish
    # between forward and backward would make the recomputation fail its checks.
    records = run_stack(daemon, "checkpoint", lambda: Tiny(checkpointed=True))
    sane(records, list(range(6)), [VOCAB, DIM], "float32", mid_post(3))


def test_gradient_accumulation_publishing_between_micro_batches(daemon):
    records = run_stack(daemon, "accumulate", Tiny, accumulate=3)
    # Per step: mid (before the first backward), after micro-batches 1 and 2 (gradients partly accumulated),
    # post. Only optimizer.step() moves the weights, so only the post snapshots differ from the one before.
    sane(records, list(range(12)), [VOCAB, DIM], "float32", [i % 4 == 3 for i in range(12)])


# --- Hugging Face models: LoRA (peft) and resize_token_embeddings -------------------------------------------------

def llama(vocab: int = VOCAB):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=SEQ + 1, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0, pad_token_id=1))


def hf_step(model, opt, step: int, publish: Callable[[int, float], None] | None = None) -> float:
    ids = batch(step) % model.get_input_embeddings().weight.shape[0]
    loss = model(input_ids=ids, labels=ids).loss
    if publish:
        publish(step, loss.item())  # between forward and backward
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_lora_base_embedding_is_frozen_and_the_adapted_one_moves(daemon, caplog):
    peft = pytest.importorskip("peft", reason="peft is not installed (the test extra)")
    from trainer_hook.callbacks import effective_weight

    def make():
        return peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                                            target_modules=["embed_tokens", "q_proj", "v_proj"]))

    plain, model = make(), make()
    base = Monitor(daemon, "lora-base")
    adapted = Monitor(daemon, "lora-adapted")
    emb = model.get_input_embeddings()  # peft's lora.Embedding: .weight is the frozen base weight
    before = (emb.weight.requires_grad, emb.weight.is_leaf, emb.weight._version)
    for opt_model, publish in ((plain, None), (model, True)):
        opt = torch.optim.AdamW([p for p in opt_model.parameters() if p.requires_grad], lr=2e-2)
        for step in range(3):
            def both(it: int, loss: float) -> None:
                base(emb, it, {"train/loss": loss})  # the base weight, as it is
                adapted(effective_weight(emb), it)  # base + the LoRA delta: what the model computes with
            hf_step(opt_model, opt, step, both if publish else None)
    assert (emb.weight.requires_grad, emb.weight.is_leaf, emb.weight._version) == before and before[:2] == (False, True)
    same_weights(plain, model)
    base_records, adapted_records = base.records(), adapted.records()
    sane(base_records, [0, 1, 2], [VOCAB, DIM], "float32", [False] * 3)  # frozen: it never moves
    sane(adapted_records, [0, 1, 2], [VOCAB, DIM], "float32", [False, True, True])  # the adapter learns
    # What cannot be published as adapted: a DoRA embedding says so in one line and sends its base weight.
    dora = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True))
    caplog.set_level(logging.WARNING, logger="embedding_monitor")
    assert torch.equal(effective_weight(dora.get_input_embeddings()), dora.get_input_embeddings().weight)
    assert "DoRA-adapted embedding; publishing its base weight only" in caplog.text


def test_resize_token_embeddings_mid_run_drift_is_null_with_the_reason_then_resumes(daemon):
    model = llama()
    monitor = Monitor(daemon, "resize")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for step in range(2):
        hf_step(model, opt, step, lambda it, loss: monitor(model.get_input_embeddings(), it, {"train/loss": loss}))
    model.resize_token_embeddings(VOCAB + 8)  # new tokens added: a new embedding module, new rows
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)  # the old one holds the replaced parameters
    for step in range(2, 4):
        # Fetch the embedding each time: a reference kept from before the resize is the old, dead weight.
        hf_step(model, opt, step, lambda it, loss: monitor(model.get_input_embeddings(), it, {"train/loss": loss}))
    records = monitor.records()
    assert [r["iter"] for r in records] == [0, 1, 2, 3]
    assert [r["shape"] for r in records] == [[VOCAB, DIM]] * 2 + [[VOCAB + 8, DIM]] * 2
    assert records[1]["drift"] is not None and records[3]["drift"] is not None  # resumes at the next snapshot
    assert records[2]["drift"] is None
    assert records[2]["drift_skipped_reason"] == f"shape changed from [{VOCAB}, {DIM}] (iter 1) to [{VOCAB + 8}, {DIM}]"
    assert all(r["geometry"] is not None for r in records) and records[-1]["counters"]["rejected"] == 0
