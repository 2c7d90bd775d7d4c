"""Shared-host pieces on their own: run directory names, log sanitising and rate limiting, the compact
vocabulary, the cost bounds, and CurveZMQ key reload on SIGHUP with refusals logged on both sides."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from analysis_daemon.cost import CostLimits, check, estimate_cost, estimate_memory, plan
from analysis_daemon.safetext import RateLimiter, SafeFormatter, reason_key, safe
from analysis_daemon.paths import run_dirname, run_from_dirname
from analysis_daemon.service.vocab import CompactVocab
from tests.test_daemon import WAIT_S, env, start_daemon, wait_for  # noqa: F401
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ run directory names

def test_simple_names_keep_their_directory() -> None:
    for run in ("my-run", "gpt2_124M", "plain-run_1.0", "a.b", "x" * 150):
        assert run_dirname(run) == run


def test_distinct_names_never_share_a_directory() -> None:
    names = ["a b", "a_b", "a%20b", "a/b", "a\\b", ".hidden", "%2Ehidden", "é", "e\u0301", "a" * 300, "a" * 301]
    dirs = [run_dirname(n) for n in names]
    assert len(set(dirs)) == len(names)
    assert run_dirname("a b") == "a%20b" and run_dirname("a%20b") == "a%2520b"
    assert run_dirname(".hidden") == "%2Ehidden" and run_dirname("..") == "%2E."


@given(st.text(min_size=1, max_size=200))
def test_run_dirname_is_safe_and_reversible(run: str) -> None:
    name = run_dirname(run)
    assert "/" not in name and "\x00" not in name and not name.startswith(".") and len(name.encode()) <= 255
    assert run_from_dirname(name) in (run, None)  # None only for a shortened (hashed) long name
    if run_from_dirname(name) is None:
        assert "~" in name


def test_jsonl_sink_and_state_store_use_the_same_injective_names(tmp_path: Path) -> None:
    from analysis_daemon.sinks.jsonl import JsonlSink
    sink = JsonlSink(tmp_path)
    for run in ("a b", "a_b"):
        sink.handle({"run": run, "iter": 1})
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a%20b", "a_b"]


# ------------------------------------------------------------------ logs

def test_safe_escapes_control_and_format_characters_and_bounds_length() -> None:
    assert safe("evil\n2026 forged\x1b[31m\u202e\r") == "evil\\x0a2026 forged\\x1b[31m\\u202e\\x0d"
    long = safe("x" * 500, 100)
    assert long.startswith("x" * 100) and long.endswith("...(+400 chars)")
    assert safe("ok run-1 é") == "ok run-1 é"
    assert safe("\udcff") .isprintable()  # lone surrogates cannot crash a log handler


def test_safe_formatter_and_rate_limiter(caplog: pytest.LogCaptureFixture) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "host %s", ("a\nb",), None)
    assert "\n" not in SafeFormatter("%(message)s").format(record)
    logger = logging.getLogger("test.ratelimit")
    limiter = RateLimiter(logger, interval=0.3)
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        for i in range(100):
            limiter.log(logging.WARNING, reason_key(f"header: seq={i} bad 'x{i}'"), "rejected %d", i)
        time.sleep(0.35)
        limiter.log(logging.WARNING, reason_key("header: seq=7 bad 'y'"), "rejected again")
        limiter.log(logging.WARNING, reason_key("another reason"), "other")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["rejected 0", "rejected again [99 similar suppressed in the last 0.3 s]", "other"]


# ------------------------------------------------------------------ vocabulary and cost

def test_compact_vocab_behaves_like_the_list_and_is_small() -> None:
    tokens = [f"tok{i}" for i in range(10000)] + ["é", "", "\udcff", "Ġthe"]
    v = CompactVocab(tokens)
    assert len(v) == len(tokens) and list(v) == tokens and v == tokens
    assert v[5] == "tok5" and v[-1] == "Ġthe" and v[10:12] == ["tok10", "tok11"]
    with pytest.raises(IndexError):
        v[len(tokens)]
    assert v.nbytes() < 12 * len(tokens) + sum(len(t.encode("utf-8", "surrogatepass")) for t in tokens)


def test_cost_bounds_refuse_cheap_messages_with_expensive_analyses() -> None:
    limits = CostLimits()
    assert check(50304, 768, limits) is None  # GPT-2 is analysed at the defaults
    assert "--max-cost" in check(128256, 4096, limits)  # Llama-3-size needs a raised bound
    assert "--max-cost" in check(16, 65536, limits)  # tiny in pairs, a 65536^2 decomposition
    assert "--min-cols 2" in check(131072, 1, limits)
    assert "--max-analysis-memory" in check(100000, 3000, CostLimits(max_cost=1e20))
    # The model follows the dense definition: pairs x (d + overhead) + Gram terms + the extras' row passes.
    assert estimate_cost(1000, 10) == pytest.approx(1000 * 999 / 2 * 410 + 3 * 1000 * 100 + 20 * 1000
                                                    + 320 * 1000 * 10)
    # Narrow matrices are costed by their pairs: 175000 x 2 held the worker 4.8x as long as GPT-2 when the
    # model called it 1.7x (issue 21): it must not pass the default bound unsampled.
    assert estimate_cost(175000, 2) > 3 * estimate_cost(50304, 768)
    assert plan(175000, 2, limits)[1] is not None
    assert estimate_memory(1000, 10) > 4 * 1000 * 10 * 4
    # Over --max-cost but a sample of >= 1000 rows fits: analysed sampled; the sample's cost is in the bound.
    reason, sample = plan(131072, 2, CostLimits(max_cost=6e10))
    assert reason is None and 1000 <= sample < 131072 and estimate_cost(131072, 2, sample) <= 6e10
    assert estimate_cost(131072, 2, sample + 1) > 6e10  # the largest sample that fits
    assert plan(131072, 2, CostLimits(max_cost=6e10), can_sample=False)[0] is not None
    assert "--max-cost" in plan(131072, 2, CostLimits(max_cost=1e9))[0]  # not even 1000 rows fit
    assert plan(50304, 768, CostLimits()) == (None, None)


# ------------------------------------------------------------------ keys

def _keygen(directory: Path, name: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "analysis_daemon", "keygen", str(directory), "--name", name],
                   env=env, check=True, capture_output=True, timeout=WAIT_S)


def test_keygen_secret_is_0600_even_with_umask_0_and_overwrites_safely(tmp_path: Path) -> None:
    from protocol import generate_keypair
    old = os.umask(0)
    try:
        public, secret = generate_keypair(tmp_path / "k", "a")
        secret.chmod(0o644)  # an old, too-open file in the way
        public2, secret2 = generate_keypair(tmp_path / "k", "a")
    finally:
        os.umask(old)
    assert (secret2.stat().st_mode & 0o777) == 0o600 and (public2.stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "k").stat().st_mode & 0o777) == 0o700
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["a.key", "a.key_secret"]  # no temp left


def test_sighup_reloads_keys_and_refusals_are_logged_on_both_sides(start_daemon, tmp_path: Path, tcp_endpoint: str,
                                                                   env: dict[str, str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    for name in ("daemon", "trainer"):
        _keygen(keys, name, env)
    authorized.mkdir()
    d = start_daemon("--no-wandb", "--no-console", "--curve-secret", str(keys / "daemon.key_secret"),
                     "--curve-authorized-dir", str(authorized))
    common = dict(curve_client_secret=keys / "trainer.key_secret", curve_server_public=keys / "daemon.key",
                  shared_memory=False)
    with caplog.at_level(logging.WARNING, "embedding_monitor.hook"):
        pub = EmbeddingPublisher(tcp_endpoint, run="late-key", **common)
        wait_for("the trainer to be refused", lambda: pub._sender.refused, proc=d)
        assert not pub.publish(torch.randn(50, 8), 1)
    assert "the daemon refused our key" in caplog.text and "no analysis daemon" not in caplog.text
    from protocol import key_fingerprint
    from protocol.security import _load
    import zmq.utils.z85
    fingerprint = key_fingerprint(zmq.utils.z85.decode(_load(keys / "trainer.key", need_secret=False)[0]))
    wait_for("the refusal in the daemon's log", lambda: f"client key {fingerprint} is not authorised" in d.log(), proc=d)
    assert "refused a CurveZMQ handshake from 127.0.0.1" in d.log()

    (authorized / "trainer.key").write_bytes((keys / "trainer.key").read_bytes())
    d.proc.send_signal(signal.SIGHUP)
    wait_for("the reload line", lambda: "SIGHUP: reloaded the authorised client keys" in d.log(), proc=d)
    assert "1 keys (+1, -0)" in d.log()
    wait_for("the trainer to be admitted (libzmq retries by itself)", lambda: pub.connected, proc=d)
    assert pub.publish(torch.randn(50, 8), 2)
    d.wait_results("late-key", 1)
    pub.close()

    (authorized / "trainer.key").unlink()
    d.proc.send_signal(signal.SIGHUP)
    wait_for("the second reload", lambda: "0 keys (+0, -1)" in d.log(), proc=d)
    again = EmbeddingPublisher(tcp_endpoint, run="removed-key", **common)
    try:
        wait_for("a removed key to be refused", lambda: again._sender.refused, proc=d)
    finally:
        again.close(timeout=0.5)
    assert d.proc.poll() is None
