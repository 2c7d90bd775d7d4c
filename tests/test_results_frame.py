"""`analysis_daemon.load_results` and the notebook guide (docs/notebooks.md), on results of a real replay.

Two runs are written once per module by `analysis-daemon replay` (in this interpreter, as test_replay
does) from Hugging Face-style checkpoints whose trainer_state.json carries the loss, with
`--tensorboard` on: so the replay's TensorBoard files are checked here too. The guide's code blocks run
in a fresh interpreter against those files, as a notebook would run them.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pd = pytest.importorskip("pandas", reason="the pandas extra is not installed (pip install -e '.[test]')")
from analysis_daemon import load_results  # noqa: E402
from analysis_daemon.cli import main as cli_main  # noqa: E402
from analysis_daemon.results_frame import ResultsSkipped  # noqa: E402
from analysis_daemon.sinks.scalars import column_name, scalar_metrics  # noqa: E402
from tests.test_replay import hf_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent
RUNS = ("lr-3e-4", "lr-1e-3")
STEPS = (100, 200, 300, 400)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with runs/<run>/analysis.jsonl and tb/<run>/ of two replayed runs."""
    base = tmp_path_factory.mktemp("notebook")
    threads = torch.get_num_threads()
    logger = logging.getLogger("embedding_monitor.daemon")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")  # else the CLI re-executes itself to set it
        mp.setenv("WANDB_MODE", "disabled")
        for k, run in enumerate(RUNS):
            g = torch.Generator().manual_seed(k)
            w = torch.randn(80, 12, generator=g)
            for step in STEPS:
                w = w + (0.1 + 0.2 * k) * torch.randn(80, 12, generator=g)
                hf_checkpoint(base / "ckpt" / run / f"checkpoint-{step}", step, {"model.embed_tokens.weight": w.clone()})
            code = cli_main(["replay", str(base / "ckpt" / run), "--run", run, "--results-dir", str(base / "runs"),
                             "--tensorboard", str(base / "tb"), "--threads", "1", "--nice", "0", "--no-console"])
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            assert code == 0
    torch.set_num_threads(threads)
    return base


def test_one_row_per_record_named_as_the_wandb_keys(tree: Path) -> None:
    path = tree / "runs" / "lr-3e-4"
    recs = records(path / "analysis.jsonl")
    df = load_results(path)
    assert df.index.name == "iter" and list(df.index) == list(STEPS)
    assert set(df.columns) == {column_name(k) for r in recs for k in scalar_metrics(r)}
    assert {"drift_cosine_sim", "geom_avg_neighbors", "geom_mean_similarity", "effective_rank", "train/loss"} <= set(df.columns)
    assert not any(c.startswith("analysis/") for c in df.columns)
    for r in recs:
        row = df.loc[r["iter"]]
        assert row["train/loss"] == r["metrics"]["train/loss"]
        assert row["geom_avg_neighbors"] == r["geometry"]["local_density"]["average_neighborhood_size"]
        if r["drift"] is None:
            assert pd.isna(row["drift_cosine_sim"])
        else:
            assert row["drift_cosine_sim"] == r["drift"]["average_cosine_similarity"]
    assert df.attrs["skipped"] == {}
    assert load_results(path / "analysis.jsonl").equals(df)  # the file itself: the same frame


def test_replay_wrote_tensorboard_at_the_same_iterations(tree: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    df = load_results(tree / "runs" / "lr-1e-3")
    acc = EventAccumulator(str(tree / "tb" / "lr-1e-3"), size_guidance={"scalars": 0})
    acc.Reload()
    for key, column in (("analysis/drift_cosine_sim", "drift_cosine_sim"), ("train/loss", "train/loss")):
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx(df[column].dropna().to_dict(), rel=1e-6)
    assert (tree / "tb" / "lr-1e-3" / "projector_config.pbtxt").is_file()


def test_cut_lines_and_repeated_iterations_are_skipped_and_said(tree: Path, tmp_path: Path) -> None:
    recs = records(tree / "runs" / "lr-3e-4" / "analysis.jsonl")
    again = dict(recs[2], drift=None, seconds=99.0)  # iter 300 analysed again without drift (a restart)
    lines = [json.dumps(r) for r in recs] + [json.dumps(again), "not json", json.dumps(recs[3])[:40]]
    path = tmp_path / "analysis.jsonl"
    path.write_text("\n".join(lines))  # ends in a line cut short by a crash
    with pytest.warns(ResultsSkipped, match=r"2 unusable line\(s\) skipped .*line 6: not valid JSON.*1 repeated"):
        df = load_results(path)
    assert list(df.index) == list(STEPS)
    assert df.loc[300, "drift_cosine_sim"] == recs[2]["drift"]["average_cosine_similarity"]  # the one with drift
    skipped = df.attrs["skipped"][str(path.resolve())]
    assert skipped["lines"] == 2 and skipped["duplicates"] == 1


def test_several_runs_and_several_tensors_get_index_levels(tree: Path, tmp_path: Path) -> None:
    both = load_results([tree / "runs" / r for r in RUNS])
    assert both.index.names == ["run", "iter"] and len(both) == 2 * len(STEPS)
    assert load_results(tree / "runs").equals(both)  # a directory of run directories
    for run in RUNS:
        one = load_results(tree / "runs" / run)
        assert both.xs(run, level="run").equals(one)

    recs = records(tree / "runs" / "lr-3e-4" / "analysis.jsonl")
    head = [dict(r, tensor="lm_head", drift=dict(r["drift"], average_cosine_similarity=0.5) if r["drift"] else None)
            for r in recs]
    path = tmp_path / "analysis.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs + head))
    df = load_results(path)
    assert df.index.names == ["tensor", "iter"] and len(df) == 2 * len(STEPS)
    assert set(df.index.get_level_values("tensor")) == {"model.embed_tokens.weight", "lm_head"}
    assert list(df.xs("lm_head", level="tensor")["drift_cosine_sim"].dropna()) == [0.5] * 3


def test_without_pandas_one_clear_import_error(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "pandas"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'pandas'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", "from analysis_daemon import load_results; load_results('runs')"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "ImportError: load_results needs pandas: pip install 'embedding-monitor[pandas]'"


def test_the_notebook_guide_runs_as_written(tree: Path) -> None:
    text = (ROOT / "docs" / "notebooks.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 5
    plotting = [b for b in blocks if "plt" in b or "matplotlib" in b]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    code = "\n".join(b for b in blocks if has_matplotlib or b not in plotting)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stderr
    assert "iter 4 snapshots" in proc.stdout and "['run', 'iter']" in proc.stdout
    assert "{}" in proc.stdout  # nothing skipped in a clean file
    if not has_matplotlib:
        pytest.skip(f"matplotlib is not installed: {len(plotting)} plotting block(s) not run (the others passed)")
    for png in ("loss_and_drift.png", "drift_by_run.png"):
        assert (tree / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
