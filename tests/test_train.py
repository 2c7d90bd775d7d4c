"""train.py for real: short CPU runs on every data source, config errors, resume, wandb offline, DDP, the hook."""
from __future__ import annotations

import json
import queue
import runpy
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from configurator import ConfigError, configure
from corpus import synthetic_vocab
from tests import wandb_history

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train.py")
# Small and quick: no analysis hook, no wandb, two eval batches; the tests that need them turn them on.
FAST = ["--max_iters=3", "--eval_iters=2", "--eval_interval=2", "--analysis=none", "--wandb_log=False"]


def train(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run train.py with args in cwd; fails the test with its output if it does not exit 0."""
    # one torch thread: on a small shared machine a second one mostly spins against other processes
    proc = subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, env={"OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def train_here(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    """Run train.py inside this interpreter (torch is already loaded: much faster than a subprocess); its stdout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [TRAIN, *args])
    threads = torch.get_num_threads()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    torch.set_num_threads(1)  # see train(): steadier on a busy 2-core machine
    try:
        runpy.run_path(TRAIN, run_name="__main__")
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, handlers[0])  # train.py catches Ctrl-C; pytest must get it back
        signal.signal(signal.SIGTERM, handlers[1])
    return capsys.readouterr().out


def train_error(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The message train.py exits with (what a person would see on stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [TRAIN, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(TRAIN, run_name="__main__")
    assert isinstance(exit_info.value.code, str), "train.py must exit with a message"
    return exit_info.value.code


def load_ckpt(path: Path) -> dict:
    """A checkpoint loaded the safe way, as train.py resumes it: tensors and plain values only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def eval_steps(stdout: str) -> list[int]:
    """Iterations at which train.py printed an evaluation line."""
    return [int(line.split()[1].rstrip(":")) for line in stdout.splitlines() if line.startswith("step ")]


# --------------------------------------------------------------------------- configurator


def test_overrides_keep_the_type_of_the_default():
    defaults = {"max_iters": 500, "learning_rate": 3e-3, "compile": False, "run_name": ""}
    got = configure(defaults, ["--max_iters=20", "--learning_rate=1", "--compile", "--run_name=123"])
    assert got == {"max_iters": 20, "learning_rate": 1.0, "compile": True, "run_name": "123"}
    assert type(got["learning_rate"]) is float and type(got["run_name"]) is str
    assert configure(defaults, ["--compile=false"]) == {"compile": False}
    assert configure(defaults, []) == {}


@pytest.mark.parametrize("arg, message", [
    ("--max_iter=3", "Unknown config key: max_iter"),
    ("--max_iters=3.5", "--max_iters expects int, got '3.5'"),
    ("--compile=maybe", "--compile expects bool, got 'maybe'"),
    ("--max_iters", "--max_iters needs a value"),
])
def test_bad_overrides_name_the_key(arg: str, message: str):
    with pytest.raises(ConfigError, match=message):
        configure({"max_iters": 500, "compile": False}, [arg])


def test_config_file_then_flags(tmp_path: Path):
    cfg = tmp_path / "small.py"
    cfg.write_text("import math\nmax_iters = 40\nlearning_rate = 1  # an int is fine for a float\n")
    got = configure({"max_iters": 500, "learning_rate": 3e-3}, [str(cfg), "--max_iters=50"])
    assert got == {"max_iters": 50, "learning_rate": 1.0}  # the later flag wins
    cfg.write_text("max_iter = 40\n")
    with pytest.raises(ConfigError, match=r"Unknown config key: max_iter \(in .*small.py\)"):
        configure({"max_iters": 500}, [str(cfg)])


def test_unknown_key_is_a_one_line_error_from_train_py(subprocess_env, tmp_path: Path):
    proc = subprocess.run([sys.executable, TRAIN, "--max_iter=3"], cwd=tmp_path, env=subprocess_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == "Error: Unknown config key: max_iter (see --help for the list)\n"
    assert proc.stdout == ""


def test_help_lists_every_key_with_its_comment(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [TRAIN, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(TRAIN, run_name="__main__")
    assert exit_info.value.code == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")}
    for key in ("--max_iters", "--dataset", "--analysis", "--analysis_endpoint", "--wandb_log", "--init_from"):
        assert key in lines
    # every option is documented: default and a comment after it
    undocumented = [k for k, line in lines.items() if len(line.split("=", 1)[1].split()) < 2]
    assert not undocumented


# --------------------------------------------------------------------------- data sources


def test_synthetic_run_saves_a_safe_checkpoint_without_hook_or_wandb(subprocess_env, tmp_path: Path):
    # run in one interpreter so we can see what train.py imported
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__');"
            "print('imported:', sorted(m for m in ('trainer_hook', 'wandb', 'zmq') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, TRAIN, *FAST, "--out_dir=out"], cwd=tmp_path,
                          env={**subprocess_env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert eval_steps(proc.stdout) == [0, 2, 3]  # every eval_interval, and always the last iteration
    assert "imported: []" in proc.stdout  # --analysis=none never imports the hook (nor zmq), no wandb
    ckpt = load_ckpt(tmp_path / "out" / "ckpt.pt")
    itos, _ = synthetic_vocab(16, 8)
    assert ckpt["iter_num"] == 3
    assert ckpt["itos"] == itos
    assert ckpt["model_args"]["vocab_size"] == len(itos)
    assert ckpt["model"]["transformer.wte.weight"].shape == (len(itos), 64)
    assert ckpt["config"]["max_iters"] == 3 and ckpt["config"]["dataset"] == "synthetic"
    assert ckpt["run_name"].startswith("synthetic-")
    assert not (tmp_path / "out" / "ckpt.pt.tmp").exists()


def test_text_file_run(tmp_path: Path, monkeypatch, capsys):
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé ☃ too.\n" * 40
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    out = train_here([*FAST, "--dataset=text", "--text_path=input.txt", "--block_size=16"], tmp_path, monkeypatch, capsys)
    assert f"vocab_size {len(set(text))}" in out
    assert eval_steps(out) == [0, 2, 3]
    ckpt = load_ckpt(tmp_path / "out" / "ckpt.pt")
    assert ckpt["itos"] == sorted(set(text))
    assert ckpt["model_args"]["block_size"] == 16
    assert ckpt["run_name"].startswith("text-")


def test_text_too_short_for_the_block_is_a_clear_error(tmp_path: Path, monkeypatch):
    (tmp_path / "tiny.txt").write_text("abcdefghij", encoding="utf-8")
    message = train_error([*FAST, "--dataset=text", "--text_path=tiny.txt"], tmp_path, monkeypatch)
    assert message == ("Error: text data too short: 9 train / 1 val tokens, each split needs more than "
                       "block_size=32; use more data or a smaller --block_size")


def test_bin_directory_run_with_meta_json(tmp_path: Path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(50, size=5000, dtype=np.uint16).tofile(data / "train.bin")
    rng.integers(50, size=600, dtype=np.uint16).tofile(data / "val.bin")
    itos = [f"w{i}" for i in range(50)]
    (data / "meta.json").write_text(json.dumps({"vocab_size": 50, "itos": itos}))
    out = train_here([*FAST, "--dataset=bin", f"--data_dir={data}", "--run_name=bin-run"], tmp_path, monkeypatch, capsys)
    assert "dataset bin: 5,000 train / 600 val tokens, vocab_size 50" in out
    ckpt = load_ckpt(tmp_path / "out" / "ckpt.pt")
    assert ckpt["itos"] == itos and ckpt["model_args"]["vocab_size"] == 50 and ckpt["run_name"] == "bin-run"


# --------------------------------------------------------------------------- resume


def test_resume_continues_the_iteration_count(tmp_path: Path, monkeypatch, capsys):
    first = train_here([*FAST, "--max_iters=4", "--run_name=r1"], tmp_path, monkeypatch, capsys)
    assert eval_steps(first) == [0, 2, 4]
    before = load_ckpt(tmp_path / "out" / "ckpt.pt")
    second = train_here([*FAST, "--max_iters=8", "--init_from=resume", "--n_layer=7"], tmp_path, monkeypatch, capsys)
    assert "resuming from out/ckpt.pt at iteration 4" in second
    assert eval_steps(second) == [4, 6, 8]  # no step 0: the count goes on
    after = load_ckpt(tmp_path / "out" / "ckpt.pt")
    assert after["iter_num"] == 8
    assert after["run_name"] == "r1"  # the same run for the daemon and wandb
    assert after["model_args"]["n_layer"] == before["model_args"]["n_layer"] == 2  # shape from the checkpoint
    # the resumed run trained the checkpointed weights further (Adam state included)
    assert after["optimizer"]["state"][0]["step"].item() == 8
    assert not torch.equal(after["model"]["transformer.wte.weight"], before["model"]["transformer.wte.weight"])


def test_resume_without_a_checkpoint_says_how_to_fix_it(tmp_path: Path, monkeypatch):
    message = train_error([*FAST, "--init_from=resume", "--out_dir=nothing"], tmp_path, monkeypatch)
    assert message == "Error: no checkpoint at nothing/ckpt.pt; train once with --init_from=scratch (or set --out_dir)"


# --------------------------------------------------------------------------- wandb


def test_wandb_goes_offline_without_credentials_and_logs_losses(subprocess_env, tmp_path: Path):
    env = {k: v for k, v in subprocess_env.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc login either
    proc = train([*FAST, "--wandb_log=True", "--max_iters=4", "--run_name=wb"], env, tmp_path, timeout=180)
    assert "wandb: not configured (no WANDB_MODE, WANDB_API_KEY or login), logging offline" in proc.stdout
    files = wandb_history.find_run_files(tmp_path / "wandb")
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-")
    info = wandb_history.run_info(files[0])
    assert (info["project"], info["group"], info["name"]) == ("embedding-monitor", "wb", "wb")
    assert "max_iters" in info["config"] and "analysis_endpoint" in info["config"]
    rows = {row["_step"]: row for row in wandb_history.history(files[0])}
    assert sorted(rows) == [0, 2, 4]  # the iteration is the step
    for row in rows.values():
        assert {"train/loss", "eval/loss", "train/learning_rate"} <= row.keys()
    assert rows[4]["eval/loss"] < rows[0]["eval/loss"]


# --------------------------------------------------------------------------- DDP


def test_ddp_with_torchrun_on_cpu(subprocess_env, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
         *FAST, "--device=cpu", "--backend=gloo", "--gradient_accumulation_steps=2", "--run_name=ddp"],
        cwd=tmp_path, env={**subprocess_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert eval_steps(proc.stdout) == [0, 2, 3]  # rank 0 only evaluates: each step printed once
    assert "tokens per iteration: 2,048" in proc.stdout  # 2 ranks x 1 micro-batch x 32 x 32
    ckpt = load_ckpt(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])


# --------------------------------------------------------------------------- the analysis hook


def test_hook_never_blocks_training_without_a_daemon(tmp_path: Path, tcp_endpoint: str, monkeypatch, capsys):
    out = train_here([*FAST, "--analysis=zmq", f"--analysis_endpoint={tcp_endpoint}"], tmp_path, monkeypatch, capsys)
    assert eval_steps(out) == [0, 2, 3]
    # three evals, three snapshots: none could be delivered, all were counted as dropped
    assert "analysis: 0 snapshots published, 3 dropped" in out


def stdout_lines(proc: subprocess.Popen) -> queue.Queue:
    """proc's stdout lines as they come, then None at EOF (read by a thread, so waits can time out)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, prefix: str, timeout: float, proc: subprocess.Popen) -> list[str]:
    """Lines read until one starts with prefix; kills proc and fails the test on timeout or EOF."""
    seen = []
    try:
        while (line := lines.get(timeout=timeout)) is not None:
            seen.append(line)
            if line.startswith(prefix):
                return seen
    except queue.Empty:
        pass
    proc.kill()
    pytest.fail(f"no line starting with {prefix!r} within {timeout} s; got:\n{''.join(seen)}")


def test_ctrl_c_stops_after_a_final_eval_and_checkpoint(subprocess_env, tmp_path: Path):
    proc = subprocess.Popen([sys.executable, TRAIN, "--max_iters=100000", "--eval_interval=1000", "--eval_iters=2",
                             "--log_interval=1", "--analysis=none", "--wandb_log=False"],
                            cwd=tmp_path, env={**subprocess_env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, text=True)
    lines = stdout_lines(proc)
    seen = wait_for_line(lines, "iter 5:", 120, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    out = "".join(seen)
    last = eval_steps(out)[-1]
    assert last > 5 and eval_steps(out) == [0, last]  # the iteration it stopped at was evaluated
    assert f"stopped by signal at iteration {last}" in out
    assert load_ckpt(tmp_path / "out" / "ckpt.pt")["iter_num"] == last  # and saved, to resume from


def start_daemon(endpoint: str, results: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    """The real analysis daemon, returned once it printed its ready line (or the test fails)."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "analysis_daemon", "--listen", endpoint, "--results-dir", str(results),
         "--exit-on-end", "--no-wandb", "--no-console", "--threads=1", *extra],
        env={**env, "OMP_WAIT_POLICY": "PASSIVE"},  # preset, so the daemon need not re-exec itself for it
        stdout=subprocess.PIPE, text=True)
    wait_for_line(stdout_lines(daemon), "analysis-daemon ready", 60, daemon)
    return daemon


def test_trainer_publishes_every_eval_to_a_real_daemon_over_curve(subprocess_env, tmp_path: Path, tcp_endpoint: str):
    # CurveZMQ keys as for a daemon on another host: the trainer's config options name the key files
    from protocol.security import generate_keypair

    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    _, daemon_secret = generate_keypair(keys, "daemon")
    trainer_public, trainer_secret = generate_keypair(keys, "trainer")
    authorized.mkdir()
    (authorized / "trainer.key").write_bytes(trainer_public.read_bytes())
    daemon = start_daemon(tcp_endpoint, tmp_path / "runs", subprocess_env,
                          f"--curve-secret={daemon_secret}", f"--curve-authorized-dir={authorized}")
    try:
        proc = train(["--max_iters=60", "--eval_interval=20", "--eval_iters=2", "--wandb_log=False",
                      "--analysis=zmq", f"--analysis_endpoint={tcp_endpoint}", "--run_name=e2e",
                      f"--analysis_curve_client_secret={trainer_secret}",
                      f"--analysis_curve_server_public={keys / 'daemon.key'}"],
                     subprocess_env, tmp_path)
        assert daemon.wait(timeout=60) == 0  # --exit-on-end: the trainer's close() sent `end`
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
    published = int(proc.stdout.split("analysis: ")[1].split()[0])
    assert published >= 1  # the handshake may cost the first snapshot, never the last
    results = [json.loads(line) for line in (tmp_path / "runs" / "e2e" / "analysis.jsonl").read_text().splitlines()]
    assert len(results) == published
    assert results[-1]["iter"] == 60  # the final state is always analysed
    assert all(r["run"] == "e2e" for r in results)
    # the ids of every training forward before the last publish (iterations 0..59), even a dropped
    # snapshot's (they join the next one); estimate_loss's eval-mode forwards are not counted
    per_iter = int(proc.stdout.split("tokens per iteration: ")[1].split()[0].replace(",", ""))
    assert sum(r["tokens_seen"] or 0 for r in results) == 60 * per_iter
