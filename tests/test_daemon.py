"""The analysis daemon as a real subprocess: real sockets, real signals, real wandb offline files."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import psutil
import pytest
import torch
import zmq

from analysis_daemon import measure_semantic_drift
from protocol import encode_end, encode_hello, encode_snapshot
from tests import wandb_history
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(120)

WAIT_S = 60.0  # upper bound of every wait below; normally each takes well under a second


def wait_for(what: str, condition: Callable[[], Any], timeout: float = WAIT_S, proc: "DaemonProc | None" = None) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` (and the daemon's log) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"daemon exited with {proc.proc.returncode} while waiting for {what}\n{proc.log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{proc.log() if proc else ''}")
        time.sleep(0.02)


class DaemonProc:
    """A `python -m analysis_daemon` child with its stdout/stderr in files (a full pipe would block it)."""

    def __init__(self, tmp_path: Path, env: dict[str, str], endpoint: str, *args: str, tag: str = "d") -> None:
        self.endpoint = endpoint
        self.results_dir = tmp_path / "runs"
        self.out_path, self.err_path = tmp_path / f"{tag}.out", tmp_path / f"{tag}.err"
        cmd = [sys.executable, "-m", "analysis_daemon", "--listen", endpoint,
               "--results-dir", str(self.results_dir), "--threads", "1", "--nice", "0", *args]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp_path)
        self.ready_line = wait_for("the ready line", self._ready, proc=self)

    def _ready(self) -> str | None:
        for line in self.out_path.read_text().splitlines():
            if "ready" in line:
                return line
        return None

    def log(self) -> str:
        """The daemon's stderr so far."""
        return self.err_path.read_text() if self.err_path.exists() else ""

    def results(self, run: str) -> list[dict[str, Any]]:
        """Complete lines of `run`'s results file."""
        path = self.results_dir / run / "analysis.jsonl"
        if not path.exists():
            return []
        text = path.read_text()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def wait_results(self, run: str, n: int) -> list[dict[str, Any]]:
        """Block until `run` has at least `n` results."""
        wait_for(f"{n} result(s) of run {run}", lambda: len(self.results(run)) >= n, proc=self)
        return self.results(run)

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        """The exit code, failing the test if the daemon does not exit in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not exit within {timeout:.0f} s\n{self.log()}")

    def kill(self) -> None:
        """Make sure the child is gone (teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def env(subprocess_env: dict[str, str]) -> dict[str, str]:
    """Child env; OMP_WAIT_POLICY preset so the daemon does not re-exec itself (one test checks that path)."""
    return dict(subprocess_env, OMP_WAIT_POLICY="PASSIVE")


@pytest.fixture
def start_daemon(tmp_path: Path, env: dict[str, str], tcp_endpoint: str):
    """Factory: start a daemon (default endpoint, env, tmp dir); every one started is killed at teardown."""
    started: list[DaemonProc] = []

    def start(*args: str, endpoint: str = tcp_endpoint, child_env: dict[str, str] | None = None,
              tag: str = "d") -> DaemonProc:
        d = DaemonProc(tmp_path, child_env or env, endpoint, *args, tag=f"{tag}{len(started)}")
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def push(tcp_endpoint: str):
    """A plain PUSH socket connected to the test's endpoint, for hand-made frames."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(tcp_endpoint)
    yield sock
    sock.close()
    ctx.term()


def snapshot(push_sock: zmq.Socket, run: str, it: int, t: torch.Tensor, seq: int | None = None,
             publisher: str = "") -> None:
    """Send `t` inline as run/iter (from `publisher`, an id like the hook's; "" = anonymous)."""
    dtype = str(t.dtype).removeprefix("torch.")
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    push_sock.send_multipart(encode_snapshot(run=run, iter=it, seq=it if seq is None else seq, name="wte",
                                             dtype=dtype, shape=list(t.shape), payload=raw, publisher=publisher))


def matrices(n: int, shape: tuple[int, int] = (500, 32), seed: int = 0) -> list[torch.Tensor]:
    """`n` related embedding matrices: a random walk, so drift is neither 0 nor 1."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    out = []
    for _ in range(n):
        w = w + 0.3 * torch.randn(*shape, generator=g)
        out.append(w.clone())
    return out


_U = 2.0 ** -24  # float32 unit roundoff


def _gamma(k: int, lam: float = 8.0) -> float:
    """A float32 sum of k products is within gamma * sum(|x_i y_i|) of the exact value, with gamma = lam sqrt(k) u:
    Higham & Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019, Thm 3.1), which fails with
    probability below 2k exp(-lam^2 / 2) (5e-11 per sum of 2048 at lam = 8). The worst-case k u is reached
    only by adversarial rounding and would be ~45x looser here."""
    return lam * math.sqrt(k) * _U


def drift_reorder_tolerance(prev: torch.Tensor, curr: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(average cosine, average distance, each row's cosine) tolerances for the daemon's drift against measure_semantic_drift in this process.

    Both run the same float32 arithmetic; only the order of the float32 sums may differ (another thread
    count or BLAS blocking in the daemon). Each result then lies within the forward-error bound of the exact
    value, so the two differ by at most twice it, computed here in float64 from the matrices themselves:
    X_c^T Y_c sums chunks of up to 2048 rows (drift._ROWS) in float32, so it is good to 2 gamma_k |X_c|^T|Y_c|;
    the rotation, its polar factor, moves by at most 2 ||dM|| / (s_{d-1} + s_d) (R.-C. Li's bound); each
    row's x_c R and its distance and dot product with y_c sum d float32 products; centring may round the
    float32 mean one ulp apart. A row's distance moves by at most its error vector's norm e, its cosine by
    2 e / ||x_c||; averaged over rows.
    """
    x, y = prev.double(), curr.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    v, d = x.shape
    m = xc.T @ yc
    s = torch.linalg.svdvals(m)
    u, _, vh = torch.linalg.svd(m)
    rot = u @ vh
    dm = 2 * _gamma(min(v, 2048)) * float((xc.abs().T @ yc.abs()).norm())
    drot = 2 * dm / float(s[-1] + s[-2]) if d > 1 else 0.0
    mean_ulp = _U * float(x.mean(0).abs().max() + y.mean(0).abs().max()) * math.sqrt(d)
    row_x, row_y = xc.norm(dim=1), yc.norm(dim=1)
    err = (row_x * drot + 2 * _gamma(d) * (xc.abs() @ rot.abs()).norm(dim=1) + 2 * _gamma(d) * (row_x + row_y)
           + 2 * mean_ulp)
    row_cos = 2 * err / torch.minimum(row_x, row_y).clamp_min(1e-300)
    return float(row_cos.mean()), float(err.mean()), row_cos


def assert_drift_matches(drift: dict[str, Any], prev: torch.Tensor, curr: torch.Tensor, top_k: int = 50) -> None:
    """The daemon's drift numbers equal measure_semantic_drift on the same tensors, to float32 reordering."""
    ref = measure_semantic_drift(prev, curr, top_k=top_k)
    cos_tol, dist_tol, row_tol = drift_reorder_tolerance(prev, curr)
    assert abs(drift["average_cosine_similarity"] - ref["average_cosine_similarity"]) <= cos_tol
    assert abs(drift["average_euclidean_distance"] - ref["average_euclidean_distance"]) <= dist_tol
    for key in ("most_drifted_tokens", "least_drifted_tokens"):
        ours, theirs = drift[key], ref[key]
        assert len(ours) == len(theirs)
        ref_cos = dict(theirs)
        for (t, c), (rt, rc) in zip(ours, theirs):
            # the same token, or one whose cosine is within both tokens' tolerances of the reference's there
            assert t == rt or abs(c - rc) <= float(row_tol[t] + row_tol[rt])
            assert t not in ref_cos or abs(c - ref_cos[t]) <= float(row_tol[t])


def publisher_for(endpoint: str, run: str, **kw: Any) -> EmbeddingPublisher:
    """A trainer-side publisher, once it is connected (publish() drops while no daemon is connected)."""
    pub = EmbeddingPublisher(endpoint, run=run, **kw)
    wait_for(f"publisher {run} to connect", lambda: pub.connected)
    return pub


# ------------------------------------------------------------------------------------------------ CLI

def test_every_option_has_help_and_keygen_delegates(tmp_path: Path, env: dict[str, str]) -> None:
    from analysis_daemon.cli import build_parser

    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings]
    assert len(options) > 15
    for action in options:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help text"
    out = subprocess.run([sys.executable, "-m", "analysis_daemon", "--help"], env=env, capture_output=True,
                         text=True, timeout=WAIT_S)
    assert out.returncode == 0
    for opt in ("--listen", "--results-dir", "--threshold", "--chunk-size", "--top-k", "--threads",
                "--exit-on-end", "--state-dir", "--log-file", "--curve-secret", "--shutdown-grace", "--no-wandb"):
        assert opt in out.stdout
    keys = subprocess.run([sys.executable, "-m", "analysis_daemon", "keygen", str(tmp_path / "keys"),
                           "--name", "daemon"], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert keys.returncode == 0, keys.stderr
    assert (tmp_path / "keys" / "daemon.key").exists() and (tmp_path / "keys" / "daemon.key_secret").exists()


def test_bad_options_fail_with_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "analysis_daemon", "--listen", "tcp://0.0.0.0:5999",
                          "--no-wandb"], env=env, capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "refusing unencrypted endpoint" in errors[0]


# ------------------------------------------------------------------------- results, wandb, ordering

def test_sequence_gives_one_line_each_and_wandb_history_on_iteration_axis(
        start_daemon, tmp_path: Path, tcp_endpoint: str) -> None:
    d = start_daemon("--exit-on-end")
    assert tcp_endpoint in d.ready_line
    vocab = [f"tok{i}" for i in range(500)]
    pub = publisher_for(tcp_endpoint, "seq-run", vocab=vocab,
                        wandb_info={"project": "emb-test", "group": "grp-1", "run_id": "abc123"})
    mats = matrices(4)
    # 300 is published before 200: its result is logged first, 200's arrives later at a lower iteration.
    iters = [100, 300, 200, 400]
    losses = {100: 4.0, 300: 3.0, 200: 3.5}  # iter 400 publishes no metrics
    for i, (it, w) in enumerate(zip(iters, mats)):
        metrics = {"train/loss": losses[it], "val/loss": losses[it] + 0.25, "tokens": it * 64} if it in losses else None
        assert pub.publish(w, it, metrics=metrics)
        d.wait_results("seq-run", i + 1)
    pub.close()
    assert d.wait_exit() == 0

    results = d.results("seq-run")
    assert [r["iter"] for r in results] == iters
    assert [r["prev_iter"] for r in results] == [None, 100, 300, 200]
    assert results[0]["drift"] is None and results[0]["drift_skipped_reason"] == "first snapshot of this run"
    for r, prev, curr in zip(results[1:], mats, mats[1:]):
        assert r["drift"] is not None and r["drift_skipped_reason"] is None
        assert_drift_matches(r["drift"], prev, curr)
        tokens = [t for t, _ in r["drift"]["most_drifted_tokens"]]
        assert r["drift"]["most_drifted_token_strings"] == [vocab[t] for t in tokens]
    for r in results:
        g = r["geometry"]
        assert g["local_density"]["threshold"] == 0.7
        assert len(g["global_sparsity"]["histogram_counts"]) == 100
        assert len(g["global_sparsity"]["histogram_bins"]) == 101
        assert r["shape"] == [500, 32] and r["dtype"] == "float32" and r["skipped_iters"] == []
        assert r["non_finite"] == {"values": 0, "rows": 0}
    assert [r["metrics"] for r in results] == [
        {"train/loss": losses[it], "val/loss": losses[it] + 0.25, "tokens": it * 64} if it in losses else None
        for it in iters]
    assert "  [Trainer] train/loss 3, val/loss 3.25, tokens 19200" in d.out_path.read_text()
    assert [r["counters"]["analysed"] for r in results] == [1, 2, 3, 4]
    assert results[-1]["counters"] == {"received": 4, "analysed": 4, "skipped": 0, "rejected": 0, "incomplete": 0}

    files = wandb_history.find_run_files(tmp_path)
    assert len(files) == 1
    info = wandb_history.run_info(files[0])
    assert (info["project"], info["group"], info["name"], info["job_type"]) == \
        ("emb-test", "grp-1", "seq-run-embeddings", "embedding-analysis")
    assert info["config"]["trainer_wandb_run_id"] == "abc123" and info["config"]["threshold"] == 0.7
    definitions = wandb_history.metric_definitions(files[0])
    for name, glob in (("", "analysis/*"), ("train/loss", ""), ("val/loss", ""), ("tokens", "")):
        assert {"name": name, "glob_name": glob, "step_metric": "analysis/iter"} in definitions
    rows = wandb_history.history(files[0])
    assert [row["analysis/iter"] for row in rows] == iters  # logged in arrival order, none dropped
    by_iter = {row["analysis/iter"]: row for row in rows}
    for r in results:
        row = by_iter[r["iter"]]
        assert row["analysis/geom_avg_neighbors"] == pytest.approx(
            r["geometry"]["local_density"]["average_neighborhood_size"])
        assert row["analysis/geom_mean_similarity"] == pytest.approx(r["geometry"]["global_sparsity"]["mean_similarity"])
        assert row["analysis/geom_std_similarity"] == pytest.approx(r["geometry"]["global_sparsity"]["std_similarity"])
        assert row["analysis/geom_similarity_hist._type"] == "histogram"
        assert row["analysis/geom_similarity_hist.values"] == r["geometry"]["global_sparsity"]["histogram_counts"]
        assert row["analysis/analysed"] == r["counters"]["analysed"]
        assert row["analysis/seconds"] == pytest.approx(r["seconds"])
        for key in ("train/loss", "val/loss", "tokens"):  # loss and drift in one run, on one axis
            assert row.get(key) == (r["metrics"] or {}).get(key)
        if r["drift"] is None:
            assert "analysis/drift_cosine_sim" not in row
        else:
            assert row["analysis/drift_cosine_sim"] == pytest.approx(r["drift"]["average_cosine_similarity"])
            assert row["analysis/drift_euclidean"] == pytest.approx(r["drift"]["average_euclidean_distance"])
            assert row["analysis/drift_most_drifted_tokens._type"] == "table-file"
            assert row["analysis/drift_least_drifted_tokens.nrows"] == 50
    # The late result (iter 200) was logged after iter 300's and is still on the iteration axis.
    assert rows.index(by_iter[200]) > rows.index(by_iter[300])
    assert "run seq-run: end" in d.log() and "received=4 analysed=4 skipped=0 rejected=0" in d.log()


def test_two_runs_keep_separate_state(start_daemon, tmp_path: Path, tcp_endpoint: str) -> None:
    d = start_daemon("--exit-on-end", "--no-console")
    a = publisher_for(tcp_endpoint, "run-a", wandb_info={"project": "emb-test"})
    b = publisher_for(tcp_endpoint, "run-b", wandb_info={"project": "emb-test"})
    ma, mb = matrices(3, seed=1), matrices(3, (400, 16), seed=2)
    for i in range(3):  # interleaved: a and b alternate on the same socket
        assert a.publish(ma[i], 10 * (i + 1))
        assert b.publish(mb[i], 1000 + i)
        d.wait_results("run-a", i + 1)
        d.wait_results("run-b", i + 1)
    a.close()
    b.close()
    assert d.wait_exit() == 0
    ra, rb = d.results("run-a"), d.results("run-b")
    assert [r["prev_iter"] for r in ra] == [None, 10, 20]
    assert [r["prev_iter"] for r in rb] == [None, 1000, 1001]
    assert {r["run"] for r in ra} == {"run-a"} and {r["run"] for r in rb} == {"run-b"}
    for i in (1, 2):
        assert_drift_matches(ra[i]["drift"], ma[i - 1], ma[i])
        assert_drift_matches(rb[i]["drift"], mb[i - 1], mb[i])
    assert rb[2]["shape"] == [400, 16] and rb[2]["counters"]["received"] == 3
    assert ra[2]["daemon_counters"]["received"] >= 5  # daemon-wide counters cover both runs
    files = wandb_history.find_run_files(tmp_path)
    infos = {wandb_history.run_info(f)["name"]: f for f in files}
    assert set(infos) == {"run-a-embeddings", "run-b-embeddings"}
    assert [row["analysis/iter"] for row in wandb_history.history(infos["run-b-embeddings"])] == [1000, 1001, 1002]
    groups = {wandb_history.run_info(f)["group"] for f in files}
    assert groups == {"run-a", "run-b"}  # no group in the hello: grouped by the trainer run


# ----------------------------------------------------------------------------------------- bad input

def test_malformed_messages_are_rejected_counted_and_survived(start_daemon, push: zmq.Socket, tmp_path: Path) -> None:
    d = start_daemon("--exit-on-end", "--no-wandb", "--max-rows", "100000")
    good = torch.randn(64, 8)
    raw = good.numpy().tobytes()

    def header(**fields: Any) -> bytes:
        base = {"v": 1, "kind": "snapshot", "run": "bad", "seq": 1, "publisher": "", "iter": 5, "name": "wte",
                "dtype": "float32", "shape": [64, 8], "nbytes": len(raw), "sent_at": 0.0, "shm": None}
        base.update(fields)
        return msgpack.packb(base, use_bin_type=True)

    bad_messages = [
        [b"\x00garbage\xff"],                                 # not msgpack
        [msgpack.packb([1, 2, 3])],                           # msgpack, not a map
        [header(v=99), raw],                                  # wrong protocol version
        [header(kind="explode"), raw],                        # unknown kind
        [header(dtype="int64"), raw],                         # dtype not allowed
        [header(), raw[:-4]],                                 # payload shorter than the header says
        [header(nbytes=len(raw) + 4), raw],                   # nbytes does not match shape x dtype
        [header(shape=[64, 8, 1]), raw],                      # not 2-D
        [header(shape=[200000, 8], nbytes=200000 * 32), raw],  # beyond --max-rows
        [header(run="../escape"), raw],                       # run name that would leave the results dir
        [header(), raw, b"extra"],                            # one frame too many
        [header(iter=-1), raw],                               # negative iteration
        [header(shm={"segment": "emon-1-0000abcd0000abcd0000abcd-0-0", "offset": 64, "slot_seq": 2})],  # not our publisher's segment
    ]
    for frames in bad_messages:
        push.send_multipart(frames)
    push.send_multipart(encode_hello(run="bad", seq=0, pid=1, host="h"))
    snapshot(push, "bad", 7, good)
    results = d.wait_results("bad", 1)
    push.send_multipart(encode_end(run="bad", seq=9, final_iter=7, published=1, dropped=0))
    assert d.wait_exit() == 0
    assert len(d.results("bad")) == 1
    (r,) = results
    n = len(bad_messages)
    assert r["iter"] == 7 and r["geometry"] is not None
    assert r["daemon_counters"]["rejected"] == n
    rejected_lines = [line for line in d.log().splitlines() if "rejected message #" in line]
    assert len(rejected_lines) == n
    assert any("is not the supported protocol version" in line for line in rejected_lines)
    assert any("was not created by this snapshot's publisher" in line for line in rejected_lines)
    assert f"rejected={n}" in d.log()
    assert not (tmp_path / "escape").exists()


def test_shape_change_and_non_finite_values_are_reported(start_daemon, push: zmq.Socket) -> None:
    d = start_daemon("--exit-on-end", "--no-wandb")
    w1 = torch.randn(300, 16)
    w2 = torch.randn(320, 16)  # vocabulary grew: no token-by-token drift
    w3 = w2.clone()
    w3[5, 3] = float("nan")
    w3[9, :] = float("inf")
    for i, w in enumerate((w1, w2, w3)):
        snapshot(push, "shapes", i + 1, w)
        d.wait_results("shapes", i + 1)
    push.send_multipart(encode_end(run="shapes", seq=99, final_iter=3, published=3, dropped=0))
    assert d.wait_exit() == 0
    r1, r2, r3 = d.results("shapes")
    assert r2["drift"] is None and "shape changed from [300, 16]" in r2["drift_skipped_reason"]
    assert r2["geometry"]["global_sparsity"]["mean_similarity"] is not None
    assert r3["non_finite"] == {"values": 1 + 16, "rows": 2}
    assert r3["drift"] is not None and r3["drift"]["nonfinite_rows"] == 2
    assert r3["geometry"]["nonfinite_rows"] == 2
    assert math.isfinite(r3["drift"]["average_cosine_similarity"])


def test_wandb_failure_is_logged_once_and_results_still_written(
        start_daemon, push: zmq.Socket, env: dict[str, str], tmp_path: Path) -> None:
    bad_env = {k: v for k, v in env.items() if k != "WANDB_API_KEY"}
    bad_env.update(WANDB_MODE="online", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wbconf"),
                   WANDB_BASE_URL="http://127.0.0.1:9")  # no credentials, nothing listening
    d = start_daemon("--exit-on-end", "--no-console", child_env=bad_env)
    for i, w in enumerate(matrices(3)):
        snapshot(push, "nowandb", i, w)
        d.wait_results("nowandb", i + 1)
    push.send_multipart(encode_end(run="nowandb", seq=99, final_iter=2, published=3, dropped=0))
    assert d.wait_exit() == 0
    assert [r["iter"] for r in d.results("nowandb")] == [0, 1, 2]
    # Logged once; the run then logs offline (for `wandb sync` later), so nothing is lost.
    assert d.log().count("wandb: cannot start an online W&B run for 'nowandb'") == 1
    assert d.log().count("upload it later with `wandb sync ") == 1
    assert "lost=0" in d.log()


# -------------------------------------------------------------------------------- signals, restarts

def _big(seed: int = 3, rows: int = 0) -> torch.Tensor:
    # Big enough that geometry takes seconds on one thread even on a fast CPU (about 2e11
    # multiply-adds at BIG_ROWS), so SIGTERM reliably lands mid-analysis.
    return torch.randn(rows or BIG_ROWS, 256, generator=torch.Generator().manual_seed(seed))


BIG_ROWS = 40000
# The grace test waits for its analysis to finish after SIGTERM: 7e10 multiply-adds are still seconds on one
# thread of a fast CPU (the signal lands at the first progress line, 0.2 s in) and a third of BIG_ROWS' work.
GRACE_ROWS = 24000


def test_sigterm_mid_analysis_abandons_after_grace_and_flushes(start_daemon, push: zmq.Socket, tmp_path: Path) -> None:
    d = start_daemon("--chunk-size", "64", "--progress-interval", "0.2", "--shutdown-grace", "0")
    snapshot(push, "term", 1, torch.randn(200, 64))
    d.wait_results("term", 1)
    snapshot(push, "term", 2, _big())
    wait_for("a progress line", lambda: "run term iter 2: geometry" in d.log(), proc=d)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    log = d.log()
    assert "abandoning it" in log and "analysis abandoned on shutdown" in log
    assert [r["iter"] for r in d.results("term")] == [1]
    (run_file,) = wandb_history.find_run_files(tmp_path)
    assert [row["analysis/iter"] for row in wandb_history.history(run_file)] == [1]
    assert "analysis-daemon stopped: received=2 analysed=1" in log


def test_sigterm_mid_analysis_finishes_within_grace(start_daemon, push: zmq.Socket) -> None:
    d = start_daemon("--chunk-size", "64", "--progress-interval", "0.2", "--shutdown-grace", "60", "--no-wandb")
    snapshot(push, "grace", 2, _big(rows=GRACE_ROWS))
    wait_for("a progress line", lambda: "run grace iter 2: geometry" in d.log(), proc=d)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert "finished the running analysis (run grace iter 2)" in d.log()
    (r,) = d.results("grace")
    assert r["iter"] == 2 and r["geometry"]["pairs"] == GRACE_ROWS * (GRACE_ROWS - 1)


def test_sigkill_then_restart_with_state_dir_continues_drift(start_daemon, push: zmq.Socket, tmp_path: Path) -> None:
    state = tmp_path / "state"
    w1, w2 = (w.to(torch.float16) for w in matrices(2, (256, 32), seed=5))
    d1 = start_daemon("--state-dir", str(state), "--no-wandb")
    push.send_multipart(encode_hello(run="crash", seq=0, pid=1, host="h", vocab=[f"t{i}" for i in range(256)]))
    snapshot(push, "crash", 100, w1)
    d1.wait_results("crash", 1)
    # The baseline is promoted once the record is written (a kill before that re-analyses iter 100).
    sidecar = state / "crash" / "state.json"
    wait_for("iter 100 to become the baseline", lambda: json.loads(sidecar.read_text()).get("snapshot"), proc=d1)
    d1.proc.send_signal(signal.SIGKILL)
    assert d1.wait_exit() == -signal.SIGKILL

    d2 = start_daemon("--state-dir", str(state), "--no-wandb", "--exit-on-end")
    assert "restored run crash" not in d2.log()  # lazily: read back only when the run reappears
    snapshot(push, "crash", 200, w2)
    results = d2.wait_results("crash", 2)
    assert "restored run crash (baseline iter 100)" in d2.log()
    push.send_multipart(encode_end(run="crash", seq=99, final_iter=200, published=2, dropped=0))
    assert d2.wait_exit() == 0
    assert [r["iter"] for r in results] == [100, 200]
    assert results[1]["prev_iter"] == 100 and results[1]["dtype"] == "float16"
    assert_drift_matches(results[1]["drift"], w1, w2)
    # The vocabulary from the hello before the crash is still known after it.
    assert results[1]["drift"]["most_drifted_token_strings"][0].startswith("t")


def test_fast_publisher_past_the_backlog_budget_causes_counted_skips(start_daemon, push: zmq.Socket) -> None:
    # 12 MiB of backlog holds 4 of these 3 MiB snapshots: the rest of the burst is skipped, oldest first.
    d = start_daemon("--exit-on-end", "--no-wandb", "--no-console", "--chunk-size", "32",
                     "--max-pending-bytes", "12M")
    proc = psutil.Process(d.proc.pid)
    n, shape = 80, (6000, 128)  # 3 MB each, 234 MB in all; each analysis takes far longer than a send
    mats = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    snapshot(push, "fast", 0, mats[0])
    wait_for("the first analysis to start", lambda: "run fast iter 0: analysing" in d.log(), proc=d)
    base_rss = proc.memory_info().rss
    peak = base_rss
    for it in range(1, n):
        snapshot(push, "fast", it, mats[it % 4])
        peak = max(peak, proc.memory_info().rss)
    push.send_multipart(encode_end(run="fast", seq=10**6, final_iter=n - 1, published=n, dropped=0))
    while d.proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    assert d.wait_exit() == 0
    results = d.results("fast")
    analysed = [r["iter"] for r in results]
    skipped = [it for r in results for it in r["skipped_iters"]]
    assert analysed[0] == 0 and analysed[-1] == n - 1  # the newest snapshot is always analysed
    assert analysed == sorted(analysed)  # in order
    assert len(skipped) > 0 and sorted(analysed + skipped) == list(range(n))
    for prev, r in zip(results, results[1:]):  # drift against the last analysed one, which has a record
        assert r["prev_iter"] == prev["iter"] and r["skipped_iters"] == list(range(prev["iter"] + 1, r["iter"]))
    last = results[-1]["counters"]
    assert last["received"] == n and last["analysed"] + last["skipped"] == n
    assert d.log().count("the backlog is over --max-pending-bytes 12.0 MiB") == last["skipped"]
    # At most the budget plus a few snapshots are held at once (baseline, the one being analysed), never all 80.
    sent_mb = n * shape[0] * shape[1] * 4 / 2**20
    grew_mb = (peak - base_rss) / 2**20
    print(f"analysed {len(analysed)} of {n}, RSS grew {grew_mb:.0f} MB, {sent_mb:.0f} MB sent")
    assert grew_mb < sent_mb / 3, f"RSS grew {grew_mb:.0f} MB while {sent_mb:.0f} MB were sent"


# ---------------------------------------------------------------------------------- logs, threads

def test_log_file_progress_and_passive_omp_without_env(start_daemon, push: zmq.Socket,
                                                       subprocess_env: dict[str, str], tmp_path: Path) -> None:
    child_env = {k: v for k, v in subprocess_env.items() if k != "OMP_WAIT_POLICY"}
    log_file = tmp_path / "logs" / "daemon.log"
    d = start_daemon("--exit-on-end", "--no-wandb", "--log-file", str(log_file), "--chunk-size", "16",
                     "--progress-interval", "0", child_env=child_env)
    snapshot(push, "logs", 1, torch.randn(400, 16))
    d.wait_results("logs", 1)
    push.send_multipart(encode_end(run="logs", seq=2, final_iter=1, published=1, dropped=0))
    assert d.wait_exit() == 0
    text = log_file.read_text()
    assert "OMP_WAIT_POLICY=PASSIVE" in text and "1 analysis thread(s)" in text
    assert "run logs iter 1: geometry" in text and "% done after" in text
    assert "ready on" in text
    out = d.out_path.read_text()
    assert out.count("ready") == 1
    assert "--- ASYNC ANALYSIS RESULTS FOR ITERATION 1 (run logs) ---" in out


# ------------------------------------------------------------------------------------------ CurveZMQ

def test_curve_daemon_accepts_only_authorised_trainers(start_daemon, tmp_path: Path, tcp_endpoint: str,
                                                       env: dict[str, str]) -> None:
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    for directory, name in ((keys, "daemon"), (clients, "trainer"), (keys, "stranger")):
        subprocess.run([sys.executable, "-m", "analysis_daemon", "keygen", str(directory), "--name", name],
                       env=env, check=True, capture_output=True, timeout=WAIT_S)
    d = start_daemon("--exit-on-end", "--no-wandb", "--curve-secret", str(keys / "daemon.key_secret"),
                     "--curve-authorized-dir", str(clients))
    stranger = EmbeddingPublisher(tcp_endpoint, run="stranger", curve_client_secret=keys / "stranger.key_secret",
                                  curve_server_public=keys / "daemon.key", shared_memory=False)
    trusted = publisher_for(tcp_endpoint, "trusted", curve_client_secret=clients / "trainer.key_secret",
                            curve_server_public=keys / "daemon.key", shared_memory=False)
    assert not stranger.publish(torch.randn(100, 8), 1)  # never admitted: dropped on its side
    assert trusted.publish(torch.randn(100, 8), 1)
    d.wait_results("trusted", 1)
    trusted.close()
    stranger.close(timeout=0.5)
    assert d.wait_exit() == 0
    assert not (d.results_dir / "stranger").exists()
    assert "received=1 analysed=1" in d.log()


def _collapsed(rows: int = 500, dim: int = 32, seed: int = 7) -> torch.Tensor:
    """Every row close to one direction: mean cosine ~0.99 and an effective rank near 1."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.zeros(dim)
    axis[0] = 5.0
    return axis + 0.01 * torch.randn(rows, dim, generator=g)


def test_insight_probes_and_throttled_collapse_alerts(start_daemon, tmp_path: Path, tcp_endpoint: str) -> None:
    d = start_daemon("--exit-on-end", "--probe", "tok3,7", "--probe", "nope,99999", "--knn-k", "5",
                     "--probe-k", "4", "--alert-interval", "3600")
    vocab = [f"tok{i}" for i in range(500)]
    pub = publisher_for(tcp_endpoint, "ins-run", vocab=vocab, wandb_info={"project": "emb-test"})
    partial = matrices(1, seed=3)[0]
    partial[100:250] = _collapsed(150, seed=9)  # 150 of 500 tokens (30%) in one clump: mean cosine stays low
    mats = matrices(2) + [partial, _collapsed(seed=7), _collapsed(seed=8)]
    for i, w in enumerate(mats):
        assert pub.publish(w, 10 * (i + 1))
        d.wait_results("ins-run", i + 1)
    pub.close()
    assert d.wait_exit() == 0
    results = d.results("ins-run")

    for r, w in zip(results, mats):
        ins = r["insight"]
        assert set(ins) >= {"effective_rank", "isotropy", "row_norms", "frozen_tokens", "neighbourhood_drift", "probes"}
        norms = w.norm(dim=1)
        assert ins["row_norms"]["max"] == pytest.approx(float(norms.max()), rel=1e-5)
        assert sum(ins["row_norms"]["histogram_counts"]) == 500
        assert [p["token_id"] for p in ins["probes"]] == [3, 7]
        assert [p["token"] for p in ins["probes"]] == ["tok3", "tok7"]
        assert ins["probes"][0]["neighbours"][0][1] == vocab[ins["probes"][0]["neighbours"][0][0]]
    for r, w in zip(results[:2], mats):  # the collapsed ones have near-ties (cosines ~0.9999)
        u = torch.nn.functional.normalize(w.double(), dim=1)
        sims = u[3] @ u.T
        sims[3] = -2
        assert [n[0] for n in r["insight"]["probes"][0]["neighbours"]] == sims.topk(4).indices.tolist()
    # token_stats: the probes, this drift's listed tokens and those followed before, against float64 cosines
    followed: list[int] = []
    for r, w in zip(results, mats):
        listed = [t for kind in ("most", "least") for t, _ in (r["drift"] or {}).get(f"{kind}_drifted_tokens", [])]
        followed = list(dict.fromkeys([3, 7, *listed, *followed]))[:256]
        stats = r["token_stats"]
        assert stats["threshold"] == 0.7 and [t for t, _, _ in stats["tokens"]] == followed
        u = torch.nn.functional.normalize(w.double(), dim=1)
        for tid, norm, size in stats["tokens"]:
            cos = u[tid] @ u.T
            cos[tid] = -2
            assert norm == pytest.approx(float(w[tid].double().norm()), rel=1e-5)
            if not bool(((cos - 0.7).abs() < 1e-5).any()):  # a cosine at the threshold may go either way
                assert size == int((cos > 0.7).sum()), (r["iter"], tid)
    assert len(results[1]["token_stats"]["tokens"]) == 2 + 100 and len(results[-1]["token_stats"]["tokens"]) == 256
    assert results[0]["insight"]["neighbourhood_drift"] is None and results[0]["insight"]["frozen_tokens"] is None
    nd = results[1]["insight"]["neighbourhood_drift"]
    assert nd["k"] == 5 and nd["prev_iter"] == 10 and 0 <= nd["mean_overlap"] <= 1
    assert results[1]["insight"]["frozen_tokens"]["count"] == 0  # every row of a new random matrix changed
    assert results[3]["insight"]["effective_rank"] < 3 < results[1]["insight"]["effective_rank"]

    assert results[0]["alerts"] == [] and results[1]["alerts"] == [] and results[0]["clump"] is None
    # the partial clump: its own alert, named with its size, share and members; the mean cosine stays low
    assert results[2]["geometry"]["global_sparsity"]["mean_similarity"] < 0.5
    clump = results[2]["clump"]
    assert (clump["size"], clump["fraction"], clump["mutual"]) == (150, 0.3, 1.0)
    assert clump["token_ids"] == list(range(100, 110)) and clump["token_strings"][0] == "tok100"
    (alert,) = results[2]["alerts"]
    assert (alert["kind"], alert["metric"], alert["value"], alert["bound"], alert["notified"]) == \
        ("partial_collapse", "clump.fraction", 0.3, 0.2, True)
    assert "150 tokens, 30% of the vocabulary, in one clump" in alert["message"]
    assert "'tok100', 'tok101', 'tok102', 'tok103', 'tok104', ..." in alert["message"]
    for r, notified in ((results[3], True), (results[4], False)):  # same kind within the interval: throttled
        kinds = {(a["kind"], a["metric"]) for a in r["alerts"]}
        assert kinds == {("collapse", "geometry.global_sparsity.mean_similarity"), ("collapse", "insight.effective_rank"),
                         ("partial_collapse", "clump.fraction")}
        assert r["clump"]["size"] == 500
        assert any(a["notified"] for a in r["alerts"] if a["kind"] == "collapse") is notified
        assert not any(a["notified"] for a in r["alerts"] if a["kind"] == "partial_collapse")
    log = d.log()
    assert log.count("probe token(s) not found") == 1 and "nope, 99999" in log
    assert log.count("ALERT collapse") == 1 and log.count("ALERT partial_collapse") == 1
    out = d.out_path.read_text()
    assert out.count("[Alert] collapse") == 4 and out.count("[Alert] partial_collapse") == 3
    assert "[Insight] Effective rank" in out and "[Insight] Probes (nearest tokens by cosine): 'tok3' -> " in out
    # the galaxy map of every result: all 500 rows (fewer than --galaxy-rows), aligned to the previous map
    for i, r in enumerate(results):
        g = r["galaxy"]
        assert (g["method"], g["rows"], g["seed"], len(g["points"])) == ("pca", 500, 0, 500)
        assert [p[0] for p in g["points"]] == list(range(500)) and g["aligned_to_iter"] == (10 * i or None)
    big = results[2]["galaxy"]["clusters"][0]
    assert big["size"] == 150 and all(100 <= m[0] < 250 and m[1] == f"tok{m[0]}" for m in big["members"])
    assert "[Galaxy] 500 tokens on a 2-D PCA map" in out

    files = wandb_history.find_run_files(tmp_path)
    rows = wandb_history.history(files[0])
    for row, r in zip(rows, results):
        assert row["analysis/effective_rank"] == pytest.approx(r["insight"]["effective_rank"])
        assert row["analysis/row_norm_hist._type"] == "histogram"
        assert row["analysis/probe_neighbours._type"] == "table-file"
        assert row["analysis/probe_neighbours.nrows"] == 8
        assert row["analysis/alerts"] == len(r["alerts"])
        assert row["analysis/galaxy._type"] == "table-file" and row["analysis/galaxy.nrows"] == 500
        assert row["analysis/galaxy_clusters"] == r["galaxy"]["cluster_count"]
        assert row["analysis/clump_fraction"] == (r["clump"]["fraction"] if r["clump"] else 0.0)
    assert rows[1]["analysis/knn_mean_overlap"] == pytest.approx(nd["mean_overlap"])
    alerts = [rec.alert for rec in wandb_history.read_records(files[0]) if rec.WhichOneof("record_type") == "alert"]
    assert [a.title for a in alerts] == ["embedding partial_collapse (ins-run)", "embedding collapse (ins-run)"]
    # the table itself: its columns and the points of the map, token strings from the trainer's vocabulary
    table = wandb_history.table(files[0], rows[2]["analysis/galaxy.path"])
    assert table["columns"] == ["iter", "token_id", "token", "x", "y", "cluster"]
    assert table["data"][:2] == [[30, t, f"tok{t}", x, y, c] for t, x, y, c in results[2]["galaxy"]["points"][:2]]


def test_no_extras_leaves_drift_and_geometry_only(start_daemon, tmp_path: Path, tcp_endpoint: str) -> None:
    d = start_daemon("--exit-on-end", "--no-extras", "--no-wandb")
    pub = publisher_for(tcp_endpoint, "plain-run")
    assert pub.publish(_collapsed(), 1)
    d.wait_results("plain-run", 1)
    pub.close()
    assert d.wait_exit() == 0
    (r,) = d.results("plain-run")
    assert r["insight"] is None and r["insight_error"] is None and r["geometry"] is not None
    assert [a["metric"] for a in r["alerts"]] == ["geometry.global_sparsity.mean_similarity"]  # rank unknown
    assert "[Insight]" not in d.out_path.read_text()


def test_bad_insight_options_fail_with_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    cases = ((["--knn-k", "0"], "--knn-k must be at least 1"),
             (["--drift-window", "3"], "--drift-window must be at least 5"),
             (["--partial-collapse-share", "1.5"], "--partial-collapse-share must be in [0, 1]"),
             (["--galaxy-rows", "-1"], "--galaxy-rows must be >= 0"))
    # started together: each spends its time importing (torch), not waiting on the others
    procs = [subprocess.Popen([sys.executable, "-m", "analysis_daemon", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for args, _ in cases]
    for proc, (_, message) in zip(procs, cases):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith(f"Error: {message}")


def test_a_daemon_started_by_a_wandb_process_logs_after_that_process_ended(
        tmp_path: Path, subprocess_env: dict[str, str], tcp_endpoint: str) -> None:
    # wandb exports WANDB_SERVICE so a process's children share its W&B service; a daemon started from a
    # trainer (or a notebook) inherits it, and once that process has gone every wandb.init in the daemon
    # failed ("Failed to connect to service"): its results were counted lost. The daemon runs its own.
    started_by = subprocess.run(
        [sys.executable, "-c", "import os, wandb; wandb.setup(); print(os.environ['WANDB_SERVICE']); "
                               "wandb.teardown()"],
        env=dict(subprocess_env, WANDB_DIR=str(tmp_path / "parent")), capture_output=True, text=True, timeout=120)
    token = started_by.stdout.strip()
    assert started_by.returncode == 0 and "-unix-" in token, started_by.stderr
    d = DaemonProc(tmp_path, dict(subprocess_env, WANDB_SERVICE=token), tcp_endpoint, "--exit-on-end")
    try:
        pub = publisher_for(tcp_endpoint, "orphan-run", wandb_info={"project": "emb-test"})
        for i, w in enumerate(matrices(2)):
            assert pub.publish(w, 10 * i)
            d.wait_results("orphan-run", i + 1)
        pub.close()
        assert d.wait_exit() == 0, d.log()
    finally:
        d.kill()
    assert "lost=0" in d.log() and "cannot start a run" not in d.log()
    pid = token.split("-")[1]
    assert f"not using the W&B service of the process that started this one (pid {pid})" in d.log()
    files = [f for f in wandb_history.find_run_files(tmp_path) if "parent" not in f.parts]
    assert len(files) == 1
    assert [row["analysis/iter"] for row in wandb_history.history(files[0])] == [0, 10]
