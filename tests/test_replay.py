"""`analysis-daemon replay`: real checkpoints from train.py, Hugging Face layouts, bad and hostile files."""
from __future__ import annotations

import json
import logging
import os
import pickle
import pickletools
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from protocol import DEFAULT_LIMITS

from analysis_daemon import measure_semantic_drift
from analysis_daemon.replay.checkpoints import CheckpointError, expand, order, read_embedding
from analysis_daemon.cli import main as cli_main
from analysis_daemon.replay.safetensors_file import SafetensorsError, read_header, read_tensor
from tests import wandb_history
from analysis_daemon.report.page import main as report_main
from tests.test_daemon import DaemonProc
from tests.test_train import train_here

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent


def results(path: Path) -> list[dict[str, Any]]:
    """Every record of a results file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def replay_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys):
    """Run `analysis-daemon replay ...` in this interpreter (no torch start-up); (exit status, stdout, stderr)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # else the CLI re-executes itself to set it
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    logger = logging.getLogger("embedding_monitor.daemon")

    def run(*args: str) -> tuple[int, str, str]:
        code = cli_main(["replay", *args, "--results-dir", str(tmp_path / "runs"), "--threads", "1",
                         "--nice", "0"])
        for handler in list(logger.handlers):  # each run adds its own stderr handler
            logger.removeHandler(handler)
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    torch.set_num_threads(threads)


def random_embedding(v: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- train.py, live vs replay


def test_train_py_checkpoints_replay_like_the_live_daemon(tmp_path: Path, subprocess_env: dict[str, str],
                                                          tcp_endpoint: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys) -> None:
    env = dict(subprocess_env, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    daemon = DaemonProc(tmp_path, dict(env, WANDB_MODE="disabled"), tcp_endpoint, "--exit-on-end")
    try:  # train.py in this interpreter (saves a torch start-up), publishing to the live daemon
        train_here(["--max_iters=9", "--eval_interval=3", "--eval_iters=4", "--keep_checkpoints=True",
                    "--wandb_log=False", "--run_name=live", "--out_dir=out", f"--analysis_endpoint={tcp_endpoint}"],
                   tmp_path, monkeypatch, capsys)
        assert daemon.wait_exit() == 0, daemon.log()
    finally:
        daemon.kill()
    kept = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert kept == ["ckpt_000003.pt", "ckpt_000006.pt", "ckpt_000009.pt"]

    proc = subprocess.run([sys.executable, "-m", "analysis_daemon", "replay", "out/checkpoints", "--run", "replayed",
                           "--results-dir", "replay-runs", "--threads", "1", "--nice", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--- ASYNC ANALYSIS RESULTS FOR ITERATION 9 (run replayed) ---" in proc.stdout
    assert "checkpoint 3/3" in proc.stderr and "ETA" in proc.stderr  # the progress bar
    replayed = results(tmp_path / "replay-runs" / "replayed" / "analysis.jsonl")
    assert [(r["iter"], r["prev_iter"]) for r in replayed] == [(3, None), (6, 3), (9, 6)]
    assert [r["iter_source"] for r in replayed] == ["metadata"] * 3  # nanoGPT's iter_num
    assert replayed[0]["drift"] is None and replayed[0]["drift_skipped_reason"] == "first snapshot of this run"
    # the same metric names and values live and in replay (train.py keeps what it published in the checkpoint)
    live_metrics = {r["iter"]: r["metrics"] for r in daemon.results("live")}
    assert [r["metrics"] for r in replayed] == [live_metrics[it] for it in (3, 6, 9)]
    assert set(replayed[0]["metrics"]) == {"train/loss", "eval/loss", "train/learning_rate"}

    live = {r["iter"]: r for r in daemon.results("live")}
    matched = 0
    for r in replayed[1:]:
        mine = live.get(r["iter"])
        if mine is None or mine["prev_iter"] != r["prev_iter"]:
            continue  # the live daemon skipped a snapshot here: not the same pair
        matched += 1
        assert mine["shape"] == r["shape"] == [138, 64] and mine["dtype"] == r["dtype"] == "float32"
        for key in ("average_cosine_similarity", "average_euclidean_distance"):
            assert r["drift"][key] == pytest.approx(mine["drift"][key], rel=1e-6)
        assert [t for t, _ in r["drift"]["most_drifted_tokens"]] == [t for t, _ in mine["drift"]["most_drifted_tokens"]]
        # the vocabulary: from the checkpoint's itos here, from the trainer's hello there
        assert r["drift"]["most_drifted_token_strings"] == mine["drift"]["most_drifted_token_strings"]
        assert r["geometry"]["global_sparsity"]["histogram_counts"] == mine["geometry"]["global_sparsity"]["histogram_counts"]
        assert r["geometry"]["local_density"] == mine["geometry"]["local_density"]
        for key in ("mean_similarity", "std_similarity"):
            assert r["geometry"]["global_sparsity"][key] == pytest.approx(mine["geometry"]["global_sparsity"][key], rel=1e-9)
        assert r["insight"]["effective_rank"] == pytest.approx(mine["insight"]["effective_rank"], rel=1e-9)
        assert set(r) >= set(mine) - {"daemon_counters"}  # the same record, plus where it came from
    assert matched >= 1, f"no iteration analysed against the same previous one: {sorted(live)}"

    # W&B: one offline run on the iteration axis
    files = wandb_history.find_run_files(tmp_path)
    assert len(files) == 1
    assert wandb_history.run_info(files[0])["name"] == "replayed-embeddings"
    rows = wandb_history.history(files[0])
    assert [row["analysis/iter"] for row in rows] == [3, 6, 9]
    assert rows[2]["analysis/drift_cosine_sim"] == pytest.approx(replayed[2]["drift"]["average_cosine_similarity"])

    # and the report reads it like any run
    assert report_main([str(tmp_path / "replay-runs" / "replayed")]) == 0
    assert "replayed" in (tmp_path / "replay-runs" / "replayed" / "report.html").read_text()


# --------------------------------------------------------------------------- Hugging Face layouts


def hf_checkpoint(directory: Path, step: int | None, tensors: dict[str, torch.Tensor], sharded: bool = False,
                  torch_bin: bool = False) -> None:
    """A Hugging Face-style checkpoint directory: safetensors (one file or two shards + index) or .bin."""
    directory.mkdir(parents=True)
    if step is not None:
        history = [{"step": step - 1, "loss": 9.0}, {"step": step, "loss": 3.0 - step / 100, "learning_rate": 1e-4,
                                                      "grad_norm": float("nan")}, {"step": step, "eval_loss": 2.5}]
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0,
                                                                  "log_history": history}))
    (directory / "config.json").write_text("{}")
    (directory / "optimizer.pt").write_bytes(b"not an embedding")  # what a Trainer keeps beside the weights
    if torch_bin:
        torch.save(tensors, directory / "pytorch_model.bin")
    elif not sharded:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
        for shard, keys in half.items():
            save_file({k: tensors[k] for k in keys}, directory / shard)
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in half.items() for k in keys}}))


def llama_like(seed: int, v: int = 60, d: int = 12, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": (torch.randn(v, d, generator=g)).to(dtype),
            "model.layers.0.mlp.up_proj.weight": torch.randn(2 * d, d, generator=g),
            "model.norm.weight": torch.ones(d), "lm_head.weight": torch.randn(v, d, generator=g)}


def test_hugging_face_directories_in_every_layout_ordered_by_step(replay_here, tmp_path: Path) -> None:
    run = tmp_path / "hf-run"
    base = llama_like(0)
    states = {}
    for step, seed, kind in ((100, 1, "single"), (200, 2, "sharded"), (50, 3, "bin"), (150, 4, "bf16")):
        tensors = llama_like(seed)
        tensors["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 0.05 * step / 50 * tensors["model.embed_tokens.weight"]
        if kind == "bf16":
            tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].bfloat16()
        # checkpoint-999's own trainer_state says step 150: the metadata wins over the name
        name = "checkpoint-999" if step == 150 else f"checkpoint-{step}"
        hf_checkpoint(run / name, step, tensors, sharded=kind == "sharded", torch_bin=kind == "bin")
        states[step] = tensors["model.embed_tokens.weight"]
    vocab = {f"w{i}": i for i in range(58)}
    (run / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                    "added_tokens": [{"id": 58, "content": "<s>"},
                                                                     {"id": 59, "content": "</s>"}]}))
    code, out, err = replay_here(str(run), "--top-k", "5")
    assert code == 0, err
    recs = results(tmp_path / "runs" / "hf-run" / "analysis.jsonl")
    assert [(r["iter"], r["prev_iter"]) for r in recs] == [(50, None), (100, 50), (150, 100), (200, 150)]
    assert [r["dtype"] for r in recs] == ["float32", "float32", "bfloat16", "float32"]
    assert {r["name"] for r in recs} == {"model.embed_tokens.weight"}
    for r in recs[1:]:
        expected = measure_semantic_drift(states[r["prev_iter"]], states[r["iter"]], top_k=5)
        assert r["drift"]["average_cosine_similarity"] == pytest.approx(expected["average_cosine_similarity"], rel=1e-6)
        assert [t for t, _ in r["drift"]["most_drifted_tokens"]] == [t for t, _ in expected["most_drifted_tokens"]]
        strings = r["drift"]["most_drifted_token_strings"]
        assert strings == [("<s>" if t == 58 else "</s>" if t == 59 else f"w{t}") for t, _ in expected["most_drifted_tokens"]]
    assert "token strings from" in err and "tokenizer.json" in err
    # the Trainer's own log at that step rides along as the trainer metrics (NaN grad_norm left out)
    assert recs[1]["metrics"] == {"train/loss": 2.0, "train/learning_rate": 1e-4, "eval/loss": 2.5}

    # a Trainer's output_dir: checkpoint-N/ subdirectories plus the final weights at the top
    save_file(llama_like(9), run / "model.safetensors")
    found = order(expand([run]))
    assert [c.iter for c in found] == [50, 100, 150, 200]


def test_a_sharded_model_reads_only_the_embedding_shard(tmp_path: Path) -> None:
    tensors = llama_like(5)
    hf_checkpoint(tmp_path / "m", None, tensors, sharded=True)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    other = next(s for k, s in index["weight_map"].items() if s != index["weight_map"]["model.embed_tokens.weight"])
    (tmp_path / "m" / other).write_bytes(b"\xff" * 16)  # a broken shard the embedding does not live in
    emb = read_embedding(tmp_path / "m")
    assert torch.equal(emb.tensor, tensors["model.embed_tokens.weight"])
    index["weight_map"]["model.embed_tokens.weight"] = "../../etc/passwd"
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file beside the index"):
        read_embedding(tmp_path / "m")


def test_a_tensor_with_an_unusual_name_needs_tensor(replay_here, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    save_file({"encoder.vocab_table": torch.randn(40, 8, generator=g), "decoder.proj": torch.randn(8, 8, generator=g),
               "decoder.bias": torch.zeros(8)}, tmp_path / "odd_step7.safetensors")
    code, out, err = replay_here(str(tmp_path / "odd_step7.safetensors"))
    assert code == 1
    assert "no tensor with a usual embedding name; pass --tensor NAME (2-D tensors: " in err
    assert "encoder.vocab_table [40 x 8]" in err and "decoder.proj [8 x 8]" in err and "decoder.bias" not in err
    code, out, err = replay_here(str(tmp_path / "odd_step7.safetensors"), "--tensor", "encoder.vocab_table")
    assert code == 0, err
    recs = results(next((tmp_path / "runs").glob("*/analysis.jsonl")))
    assert [(r["iter"], r["name"], r["iter_source"]) for r in recs] == [(7, "encoder.vocab_table", "name")]
    code, out, err = replay_here(str(tmp_path / "odd_step7.safetensors"), "--tensor", "decoder.bias")
    assert code == 1 and "tensor 'decoder.bias' is not 2-D" in err


def test_prefixes_of_compiled_and_ddp_models_are_seen_through(tmp_path: Path) -> None:
    w = random_embedding(20, 4, 1)
    torch.save({"model": {"_orig_mod.transformer.wte.weight": w, "_orig_mod.lm_head.weight": w.clone()},
                "iter_num": 42}, tmp_path / "ckpt.pt")
    emb = read_embedding(tmp_path / "ckpt.pt")
    assert (emb.name, emb.iter) == ("_orig_mod.transformer.wte.weight", 42) and torch.equal(emb.tensor, w)
    torch.save({"module.model.embed_tokens.weight": w}, tmp_path / "ddp.bin")
    assert read_embedding(tmp_path / "ddp.bin").name == "module.model.embed_tokens.weight"


# --------------------------------------------------------------------------- bad and hostile files


def test_corrupt_and_truncated_checkpoints_fail_alone(replay_here, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    w = {s: random_embedding(30, 6, s) for s in (100, 200, 300, 400, 500)}
    for s in (100, 200, 300):
        save_file({"wte.weight": w[s]}, ckpts / f"step{s}.safetensors")
    data = (ckpts / "step200.safetensors").read_bytes()
    (ckpts / "step200.safetensors").write_bytes(data[: len(data) - 100])  # cut inside the tensor
    torch.save({"wte.weight": w[400]}, ckpts / "step400.pt")
    data = (ckpts / "step400.pt").read_bytes()
    (ckpts / "step400.pt").write_bytes(data[: len(data) // 2])
    np.save(ckpts / "step500.npy", w[500].numpy())
    code, out, err = replay_here(str(ckpts), "--run", "bad")
    assert code == 1
    recs = results(tmp_path / "runs" / "bad" / "analysis.jsonl")
    assert [(r["iter"], r["prev_iter"]) for r in recs] == [(100, None), (300, 100), (500, 300)]
    expected = measure_semantic_drift(w[100], w[300])
    assert recs[1]["drift"]["average_cosine_similarity"] == pytest.approx(expected["average_cosine_similarity"], rel=1e-6)
    counters = recs[-1]["counters"]
    assert {k: counters[k] for k in ("received", "analysed", "skipped", "rejected")} == \
        {"received": 3, "analysed": 3, "skipped": 0, "rejected": 2}
    assert not any(v for k, v in counters.items() if k not in ("received", "analysed", "rejected"))
    summary = err[err.index("replay: 2 of 5 checkpoint(s) failed, 3 analysed:"):].splitlines()
    assert len(summary) == 3
    assert "step200.safetensors" in summary[1] and "not fully covered" in summary[1] and "truncated" in summary[1]
    assert "step400.pt" in summary[2] and "truncated or corrupt" in summary[2]


def evil_pickle_bytes(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    return pickle.dumps({"wte.weight": Evil()}, protocol=2)


def test_a_hostile_pickle_is_refused_and_nothing_runs(replay_here, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpts = tmp_path / "evil"
    ckpts.mkdir()

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"model": {"transformer.wte.weight": torch.zeros(4, 4)}, "iter_num": 1, "x": Evil()},
               ckpts / "ckpt_000001.pt")  # torch's zip format, with a pickle inside
    (ckpts / "ckpt_000002.bin").write_bytes(evil_pickle_bytes(marker))  # a bare pickle
    np.save(ckpts / "ckpt_000003.npy", np.array([[object()]], dtype=object), allow_pickle=True)
    # the files really would run the command if unpickled: the call is in their opcodes
    ops = [arg for op, arg, _ in pickletools.genops(evil_pickle_bytes(marker)) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    assert any("system" in str(a) for a in ops)
    code, out, err = replay_here(str(ckpts))
    assert code == 1
    assert not marker.exists()
    assert "3 of 3 checkpoint(s) failed" in err
    assert err.count("refused") >= 3
    assert not (tmp_path / "runs" / "evil" / "analysis.jsonl").exists()


def st_file(path: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header, data, length, message", [
    # the reference library's reasons, each in one line that names the file
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, None, "not fully covered"),
    ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, b"\0" * 16, None, "invalid shape"),
    ({"w": {"dtype": "X9", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, None, "unknown variant"),
    ({"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, None, "-2"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}}, b"\0" * 16, None, "invalid offset"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}}, b"\0" * 16, None, "tuple of size 2"),
    (b"{not json", b"", None, "invalid JSON"),
    (b"[1, 2]", b"", None, "invalid JSON"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 1 << 40, "header too large"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"", 4096, "invalid header length"),
    # nesting no real header has: refused by the parser's schema, not a RecursionError
    (b'{"__metadata__": ' + b"[" * 100000 + b"]" * 100000 + b"}", b"", None, "invalid JSON"),
])
def test_safetensors_headers_are_validated(tmp_path: Path, header: Any, data: bytes, length: int | None,
                                           message: str) -> None:
    path = st_file(tmp_path / "x.safetensors", header, data, length)
    with pytest.raises(SafetensorsError, match=message) as caught:
        read_header(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_safetensors_reader_agrees_with_the_library_and_refuses_integer_tensors(tmp_path: Path) -> None:
    tensors = {"a": random_embedding(7, 3, 0), "b": torch.arange(12, dtype=torch.int64).reshape(3, 4),
               "c": random_embedding(5, 2, 1).half(), "d": random_embedding(4, 4, 2).bfloat16()}
    save_file(tensors, tmp_path / "m.safetensors")
    entries, meta = read_header(tmp_path / "m.safetensors")
    for name in ("a", "c", "d"):
        assert torch.equal(read_tensor(tmp_path / "m.safetensors", entries[name]), tensors[name])
    with pytest.raises(SafetensorsError, match="not a float tensor"):
        read_tensor(tmp_path / "m.safetensors", entries["b"])


def test_npy_files_sampled_geometry_and_order_without_numbers(replay_here, tmp_path: Path) -> None:
    d = tmp_path / "arrays"
    d.mkdir()
    w = {n: random_embedding(40, 5, i) for i, n in enumerate(("step10", "step2", "final"))}
    for name, t in w.items():
        np.save(d / f"{name}.npy", t.numpy())
    code, out, err = replay_here(str(d / "step10.npy"), str(d / "step2.npy"), "--run", "npy", "--sample-rows", "10")
    assert code == 0, err
    recs = results(tmp_path / "runs" / "npy" / "analysis.jsonl")
    assert [(r["iter"], r["iter_source"]) for r in recs] == [(2, "name"), (10, "name")]
    geom = recs[0]["geometry"]
    assert geom["sampled_rows"] == 10 and len(geom["confidence_95"]["average_neighborhood_size"]) == 2
    assert "estimated from 10 rows: 95% CI" in out
    # "final" has no number: the order given stands, numbered 0, 1, 2
    found = order(expand([d / "step2.npy", d / "final.npy", d / "step10.npy"]))
    assert [(c.path.stem, c.iter, c.iter_source) for c in found] == [("step2", 0, "order"), ("final", 1, "order"),
                                                                     ("step10", 2, "order")]


def test_usage_errors_are_one_line(replay_here, tmp_path: Path) -> None:
    code, out, err = replay_here(str(tmp_path / "missing"))
    assert code == 2 and err.strip().splitlines()[-1] == f"Error: {tmp_path / 'missing'} does not exist"
    (tmp_path / "empty").mkdir()
    code, out, err = replay_here(str(tmp_path / "empty"))
    assert code == 2 and "holds no checkpoints" in err
    code, out, err = replay_here(str(tmp_path / "empty"), "--sample-rows", "0")
    assert code == 2 and "--sample-rows must be at least 1" in err


def test_only_the_embedding_is_read_not_the_model(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    # A 160 MB "rest of the model" beside a small embedding: reading the embedding must not touch it.
    big = torch.zeros(40_000_000)
    emb = random_embedding(1000, 64, 0)
    save_file({"transformer.wte.weight": emb, "big.weight": big}, tmp_path / "m.safetensors")
    torch.save({"model": {"transformer.wte.weight": emb, "big.weight": big}, "iter_num": 5}, tmp_path / "ckpt.pt")
    del big
    code = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from analysis_daemon.replay.checkpoints import read_embedding\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for name in sys.argv[1:]:\n"
        "    e = read_embedding(Path(name))\n"
        "    assert e.tensor.shape == (1000, 64), e.tensor.shape\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.safetensors"), str(tmp_path / "ckpt.pt")],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) < 60, proc.stdout  # MiB of peak RSS growth; the 160 MB tensor would show


def test_vocabulary_files_beside_the_weights(tmp_path: Path) -> None:
    from analysis_daemon.replay.vocab_files import load_vocab

    (tmp_path / "ck").mkdir()
    (tmp_path / "vocab.txt").write_text("[PAD]\nhello\nworld\n")
    assert load_vocab(tmp_path / "ck", 10) == (["[PAD]", "hello", "world"], tmp_path / "vocab.txt")
    # tokenizer.json wins; a hostile id far beyond the embedding's rows is ignored, not allocated
    (tmp_path / "ck" / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.5]]},
         "added_tokens": [{"id": 10**12, "content": "huge"}, {"id": 3, "content": "<eos>"}, {"id": True, "content": "x"}]}))
    assert load_vocab(tmp_path / "ck", 4)[0] == ["<unk>", "a", None, "<eos>"]
    (tmp_path / "ck" / "tokenizer.json").write_text("{broken")  # skipped (logged): the next source is used
    assert load_vocab(tmp_path / "ck", 4)[1] == tmp_path / "vocab.txt"
    (tmp_path / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="not valid JSON"):  # nothing else: the error says why
        load_vocab(tmp_path / "ck", 4)
    (tmp_path / "ck" / "tokenizer.json").unlink()
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 2, "itos": ["x", "y"]}))  # as corpus.py reads it
    assert load_vocab(tmp_path / "ck", 2)[0] == ["x", "y"]
    (tmp_path / "none" / "ck").mkdir(parents=True)
    assert load_vocab(tmp_path / "none" / "ck", 2) == (None, None)


def test_big_endian_and_half_npy_arrays(tmp_path: Path) -> None:
    w = random_embedding(6, 3, 0).numpy()
    np.save(tmp_path / "be.npy", w.astype(">f4"))
    np.save(tmp_path / "half.npy", w.astype(np.float16))
    assert torch.equal(read_embedding(tmp_path / "be.npy").tensor, torch.from_numpy(w))
    assert read_embedding(tmp_path / "half.npy").tensor.dtype == torch.float16
    np.save(tmp_path / "ints.npy", np.zeros((3, 3), dtype=np.int32))
    with pytest.raises(CheckpointError, match="not a 2-D float embedding"):
        read_embedding(tmp_path / "ints.npy")


# --------------------------------------------------------------------------- replay's bounds (issue 21)

def sparse_safetensors(path: Path, rows: int, cols: int) -> Path:
    """A valid safetensors file whose one F32 tensor of rows x cols is a hole: a few KB on disk."""
    raw = json.dumps({"wte.weight": {"dtype": "F32", "shape": [rows, cols],
                                     "data_offsets": [0, rows * cols * 4]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + rows * cols * 4)
    return path


def test_a_sparse_file_claiming_gigabytes_is_refused_before_a_byte_is_read(replay_here, tmp_path: Path) -> None:
    ckpts = tmp_path / "sparse"
    ckpts.mkdir()
    path = sparse_safetensors(ckpts / "step2.safetensors", 1_200_000, 2000)  # 9.6 GB claimed
    assert path.stat().st_blocks * 512 < 1024 * 1024 < path.stat().st_size
    save_file({"wte.weight": random_embedding(40, 4, 1)}, ckpts / "step1.safetensors")
    code, out, err = replay_here(str(ckpts), "--run", "sparse")
    assert code == 1
    line = next(ln for ln in err.splitlines() if "step2.safetensors" in ln and "--max-bytes" in ln)
    assert "9600000000 bytes" in line and "not read" in line and "raise --max-bytes" in line
    assert [r["iter"] for r in results(tmp_path / "runs" / "sparse" / "analysis.jsonl")] == [1]
    # the same bound reads a legitimate file once it is raised, and --max-rows / --max-cols bound the shape
    with pytest.raises(CheckpointError, match="over --max-rows 100"):
        read_embedding(path, limits=replace(DEFAULT_LIMITS, max_rows=100))
    with pytest.raises(CheckpointError, match="over --max-cols 1000"):
        read_embedding(path, limits=replace(DEFAULT_LIMITS, max_cols=1000))
    np.save(tmp_path / "w.npy", random_embedding(30, 4, 2).numpy())
    with pytest.raises(CheckpointError, match="over --max-bytes 100"):
        read_embedding(tmp_path / "w.npy", limits=replace(DEFAULT_LIMITS, max_payload_bytes=100))
    assert read_embedding(tmp_path / "w.npy", limits=replace(DEFAULT_LIMITS, max_payload_bytes=480)).tensor.shape == (30, 4)


def test_torch_files_are_bounded_before_the_embedding_is_copied(tmp_path: Path) -> None:
    w = random_embedding(50, 8, 3)
    torch.save({"model": {"transformer.wte.weight": w}, "iter_num": 5}, tmp_path / "zip.pt")
    with pytest.raises(CheckpointError, match="over --max-bytes 1000"):
        read_embedding(tmp_path / "zip.pt", limits=replace(DEFAULT_LIMITS, max_payload_bytes=1000))
    # a legacy (pre-zip) file can only be read whole: the whole file is held to the bound
    torch.save({"model": {"transformer.wte.weight": w}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        read_embedding(tmp_path / "legacy.pt", limits=replace(DEFAULT_LIMITS, max_payload_bytes=1000))
    assert torch.equal(read_embedding(tmp_path / "legacy.pt").tensor, w)


def test_over_max_cost_a_checkpoint_is_sampled_or_refused_like_a_live_snapshot(replay_here, tmp_path: Path) -> None:
    from analysis_daemon.cost import CostLimits, plan
    d = tmp_path / "narrow"
    d.mkdir()
    for step in (1, 2):
        np.save(d / f"step{step}.npy", random_embedding(3000, 2, step).numpy())
    max_cost = 1.5e9  # the exact pass of 3000 x 2 is over it, a sample of >= 1000 rows fits
    _, sample = plan(3000, 2, CostLimits(max_cost=max_cost))
    assert sample is not None and 1000 <= sample < 3000
    code, out, err = replay_here(str(d), "--max-cost", str(max_cost))
    assert code == 0, err
    recs = results(tmp_path / "runs" / "narrow" / "analysis.jsonl")
    assert [r["geometry"]["sampled_rows"] for r in recs] == [sample, sample]
    assert recs[1]["drift"] is not None  # drift stays exact
    assert "analysing it sampled from" in err
    # not even 1000 rows fit: refused with the reason, exit 1; a too-narrow matrix too
    code, out, err = replay_here(str(d), "--run", "refused", "--max-cost", "1e8")
    assert code == 1 and err.count("exceeds --max-cost") >= 2
    code, out, err = replay_here(str(d), "--run", "thin", "--min-cols", "3")
    assert code == 1 and "narrower than --min-cols 3" in err
    code, out, err = replay_here(str(d), "--run", "bad", "--max-cost", "-1")
    assert code == 2 and "--max-cost must be positive" in err


def test_deeply_nested_json_costs_that_file_only(replay_here, tmp_path: Path) -> None:
    ck = tmp_path / "run" / "checkpoint-10"
    ck.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": random_embedding(20, 4, 0)}, ck / "model.safetensors")
    deep = "[" * 200000 + "]" * 200000
    (ck / "tokenizer.json").write_text('{"model": {"vocab": ' + deep + "}}")
    (ck / "trainer_state.json").write_text(deep)
    code, out, err = replay_here(str(tmp_path / "run"))
    assert code == 1, err  # the iteration's metadata is unreadable: that checkpoint fails, in one line
    assert "RecursionError" not in err and "Traceback" not in err
    assert err.count("nested too deeply") >= 1
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    code, out, err = replay_here(str(tmp_path / "run"))
    assert code == 0, err  # the tokenizer file is skipped with its reason; the embedding is analysed
    assert "no token strings" in err and "nested too deeply" in err
    assert [r["iter"] for r in results(tmp_path / "runs" / "run" / "analysis.jsonl")] == [10]
    # the report skips such a line of a results file instead of crashing
    from analysis_daemon.report.page import load_results
    results_file = tmp_path / "runs" / "run" / "analysis.jsonl"
    with results_file.open("a") as f:
        f.write(deep + "\n")
    loaded = load_results(results_file)
    assert loaded.skipped_lines == 1 and "nested too deeply" in loaded.skip_reasons[0]
