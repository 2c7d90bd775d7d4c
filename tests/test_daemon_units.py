"""In-process pieces of the daemon: state persistence, run directory names, result formatting, sinks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from analysis_daemon.paths import run_dirname
from analysis_daemon.sinks import Sink, SinkSet
from analysis_daemon.sinks.console import format_result
from analysis_daemon.sinks.jsonl import JsonlSink
from analysis_daemon.sinks.wandb_sink import wandb_run_settings
from analysis_daemon.records import HelloInfo, SnapshotData
from analysis_daemon.service.state_store import StateStore
from analysis_daemon.pipeline import jsonable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_store_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    store = StateStore(tmp_path)
    t = torch.randn(33, 7).to(dtype)
    store.save_hello("r/x", HelloInfo(pid=5, host="h", vocab=["a", "b"], wandb={"project": "p"}, meta={"k": 1}))
    store.save_snapshot("r/x", SnapshotData(iter=10, seq=1, name="wte", tensor=torch.zeros(33, 7, dtype=dtype)))
    store.save_snapshot("r/x", SnapshotData(iter=20, seq=2, name="wte", tensor=t))
    (run, (snap, hello)), = StateStore(tmp_path).load_all().items()
    assert run == "r/x" and snap.iter == 20 and snap.dtype == str(dtype).removeprefix("torch.")
    assert torch.equal(snap.tensor.view(torch.uint8), t.view(torch.uint8))
    assert hello.vocab == ["a", "b"] and hello.wandb == {"project": "p"}
    files = sorted(p.name for p in (tmp_path / run_dirname("r/x")).iterdir())
    assert files == ["snapshot-20-2.bin", "state.json"]  # the replaced snapshot file is gone


def test_state_store_ignores_a_truncated_snapshot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path)
    store.save_snapshot("ok", SnapshotData(iter=1, seq=1, name="wte", tensor=torch.ones(4, 4)))
    store.save_snapshot("cut", SnapshotData(iter=1, seq=1, name="wte", tensor=torch.ones(4, 4)))
    path = tmp_path / "cut" / "snapshot-1-1.bin"
    path.write_bytes(path.read_bytes()[:-3])
    loaded = StateStore(tmp_path).load_all()
    assert set(loaded) == {"ok"}
    assert "expected 64" in caplog.text


@pytest.mark.parametrize("run", ["../up", "/abs", "a/b", ".hidden", "x" * 300, "sp ace"])
def test_run_dirname_never_escapes(run: str) -> None:
    name = run_dirname(run)
    assert "/" not in name and not name.startswith(".") and len(name) < 100
    assert run_dirname("plain-run_1.0") == "plain-run_1.0"


def test_jsonable_turns_non_finite_into_null_and_tensors_into_lists() -> None:
    out = jsonable({"a": float("nan"), "b": torch.tensor([1.5, float("inf")]), "c": (1, "x", None)})
    assert out == {"a": None, "b": [1.5, None], "c": [1, "x", None]}
    json.dumps(out, allow_nan=False)


class _Broken(Sink):
    name = "broken"

    def handle(self, result: dict[str, Any]) -> None:
        raise OSError("disk on fire")


def test_a_failing_sink_is_dropped_and_the_others_go_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    jsonl = JsonlSink(tmp_path)
    sinks = SinkSet([_Broken(), jsonl])
    for i in range(3):
        sinks.handle({"run": "r", "iter": i})
    sinks.close()
    lines = (tmp_path / "r" / "analysis.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [0, 1, 2]
    assert caplog.text.count("sink broken failed") == 1
    assert sinks.counters() == {"lost": 3, "lost_by_sink": {"broken": 3}}  # disabled: the later two count too


def test_console_block_names_tokens_and_handles_missing_numbers() -> None:
    result = {"run": "r", "iter": 5, "prev_iter": 4, "seconds": 0.5, "shape": [3, 2], "dtype": "float32",
              "drift": {"average_cosine_similarity": None, "average_euclidean_distance": 0.25,
                        "most_drifted_tokens": [[2, 0.1]], "least_drifted_tokens": [[0, 0.9]],
                        "most_drifted_token_strings": ["ing"], "least_drifted_token_strings": ["the"]},
              "geometry": None, "geometry_error": "geometry failed: boom", "skipped_iters": [3],
              "non_finite": {"values": 2, "rows": 1},
              "counters": {"received": 3, "analysed": 2, "skipped": 1, "rejected": 0}}
    block = format_result(result)
    assert block.splitlines()[0] == "--- ASYNC ANALYSIS RESULTS FOR ITERATION 5 (run r) ---"
    assert "Average Cosine Similarity n/a" in block and "'ing' (2) 0.1000" in block
    assert "not measured: geometry failed: boom" in block and "skipped iters [3]" in block
    assert "2 non-finite values in 1 rows" in block


def test_wandb_settings_prefer_hello_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    s = wandb_run_settings("r1", {"project": "p", "group": "g", "name": "nice"}, None)
    assert (s["project"], s["group"], s["name"], s["job_type"]) == ("p", "g", "nice-embeddings", "embedding-analysis")
    s = wandb_run_settings("r1", None, None)
    assert (s["project"], s["group"], s["name"]) == ("env-project", "env-group", "r1-embeddings")
    monkeypatch.delenv("WANDB_RUN_GROUP")
    assert wandb_run_settings("r1", {"run_id": "abc"}, "cli-project")["group"] == "abc"
    assert wandb_run_settings("r1", {"run_id": "abc"}, "cli-project")["project"] == "cli-project"


def test_results_file_survives_a_record_it_cannot_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    jsonl = JsonlSink(tmp_path)
    sinks = SinkSet([jsonl])
    sinks.handle({"run": "r", "iter": 1, "value": float("nan")})  # JSON cannot hold NaN: this record is lost
    sinks.handle({"run": "r", "iter": 2, "value": 0.5})
    assert sinks.sinks == [jsonl]  # the error cost one record, not the sink
    sinks.close()
    lines = (tmp_path / "r" / "analysis.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [2]
    assert "run r iter 1 cannot be written as JSON, lost" in caplog.text
    assert sinks.counters() == {"lost": 1, "lost_by_sink": {"jsonl": 1}}


def test_results_file_deleted_while_open_is_recreated(tmp_path: Path) -> None:
    sinks = SinkSet([JsonlSink(tmp_path)])
    sinks.handle({"run": "r", "iter": 1})
    (tmp_path / "r" / "analysis.jsonl").unlink()  # an operator cleaning up, a log rotation
    sinks.handle({"run": "r", "iter": 2})
    sinks.close()
    assert [json.loads(line)["iter"] for line in (tmp_path / "r" / "analysis.jsonl").read_text().splitlines()] == [2]


def test_a_partial_last_line_left_by_a_crash_is_cut_before_appending(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "r" / "analysis.jsonl"
    path.parent.mkdir()
    path.write_text('{"run": "r", "iter": 0}\n{"run": "r", "it')  # a writer killed mid-line
    sinks = SinkSet([JsonlSink(tmp_path)])
    sinks.handle({"run": "r", "iter": 1})
    sinks.close()
    assert [json.loads(line)["iter"] for line in path.read_text().splitlines()] == [0, 1]
    assert "ended in a partial line: 16 byte(s) cut off" in caplog.text
