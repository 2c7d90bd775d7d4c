"""`--tensorboard DIR`: event files and the projector read back with tensorboard's own readers.

A real daemon (subprocess, real sockets, a real publisher) writes both the results file and the
TensorBoard files; the test checks the event files' values and steps against the records of that same
run, the projector config with tensorboard's proto, the raw matrix and the metadata TSV against an
independent float64 reference. A full disk is a real small tmpfs (root only, else skipped).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e '.[test]')")
from google.protobuf import text_format  # noqa: E402  (tensorboard brings protobuf)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.projector import projector_config_pb2  # noqa: E402

from analysis_daemon.pipeline import TOKEN_ARRAYS, AnalysisSettings, TokenArrays, analyse  # noqa: E402
from analysis_daemon.records import HelloInfo, Job, RunInsight, SnapshotData  # noqa: E402
from analysis_daemon.sinks import SinkSet  # noqa: E402
from analysis_daemon.sinks.scalars import histograms, scalar_metrics  # noqa: E402
from analysis_daemon.sinks.projector import CONFIG_NAME, MAX_TOKEN_CHARS, tsv_cell  # noqa: E402
from analysis_daemon.sinks.tensorboard_sink import TensorBoardSink  # noqa: E402
from tests.test_daemon import env, matrices, publisher_for, start_daemon  # noqa: E402,F401
from tests.test_full_disk import _mount_problem, fill, small_fs  # noqa: E402

pytestmark = pytest.mark.timeout(120)

HOSTILE = {5: "tab\there", 6: "line\nbreak\r\n", 7: "nul\x00byte", 8: "\u2028sep\x85next\x0b", 9: "x" * 10000,
           10: "back\\slash\\t", 11: ""}


def accumulator(directory: Path) -> EventAccumulator:
    """Every scalar and histogram event of a TensorBoard run directory (no sampling)."""
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def procrustes_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of X_c R against Y_c in float64 (the drift definition, written independently)."""
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    u, _, vh = torch.linalg.svd(xc.T @ yc)
    return torch.nn.functional.cosine_similarity(xc @ (u @ vh), yc, dim=1)


def read_config(directory: Path) -> Any:
    config = projector_config_pb2.ProjectorConfig()
    text_format.Parse((directory / CONFIG_NAME).read_text(), config)
    return config


def tsv_rows(path: Path) -> list[list[str]]:
    """The metadata TSV as rows of cells; any character that splits a line anywhere would show here."""
    text = path.read_bytes().decode("utf-8")
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert lines == text.splitlines(), "a cell holds a character some reader takes for a line break"
    return [line.split("\t") for line in lines]


def test_daemon_writes_scalars_histograms_and_projector_at_the_training_iteration(
        start_daemon, tmp_path: Path, tcp_endpoint: str) -> None:
    tb = tmp_path / "tb"
    d = start_daemon("--exit-on-end", "--no-wandb", "--no-console", "--tensorboard", str(tb),
                     "--tensorboard-projector-keep", "2")
    vocab = [f"tok{i}" for i in range(500)]
    for i, s in HOSTILE.items():
        vocab[i] = s
    pub = publisher_for(tcp_endpoint, "tb-run", vocab=vocab)
    mats = matrices(3)
    iters = [100, 300, 200]  # 200 arrives last: its points must still sit at step 200
    for k, (it, w) in enumerate(zip(iters, mats)):
        assert pub.publish(w, it, metrics={"train/loss": 4.0 - k, "tokens": it * 64})
        d.wait_results("tb-run", k + 1)
    pub.close()
    assert d.wait_exit() == 0
    records = d.results("tb-run")
    assert [r["iter"] for r in records] == iters

    # Scalars: the W&B keys, the trainer's metrics under their own names, the iteration as the step.
    acc = accumulator(tb / "tb-run")
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in scalar_metrics(r).items():
            expected.setdefault(key, {})[r["iter"]] = value
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx(points, rel=1e-6, abs=1e-30), key  # float32 in the event file
    drift = {e.step: e.value for e in acc.Scalars("analysis/drift_cosine_sim")}
    assert drift == pytest.approx({r["iter"]: r["drift"]["average_cosine_similarity"] for r in records[1:]}, rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == {100: 4.0, 300: 3.0, 200: 2.0}
    assert {e.step: e.value for e in acc.Scalars("analysis/geom_avg_neighbors")} == pytest.approx(
        {r["iter"]: r["geometry"]["local_density"]["average_neighborhood_size"] for r in records}, rel=1e-6)

    # Histograms: the record's counts and bin edges.
    for key in ("analysis/geom_similarity_hist", "analysis/row_norm_hist"):
        events = {e.step: e.histogram_value for e in acc.Histograms(key)}
        assert set(events) == set(iters)
        for r in records:
            counts, bins = histograms(r)[key]
            h = events[r["iter"]]
            assert list(h.bucket) == counts and list(h.bucket_limit) == pytest.approx(bins[1:], rel=1e-12)
            assert (h.min, h.max, h.num) == (pytest.approx(bins[0]), pytest.approx(bins[-1]), sum(counts))
    geom = records[0]["geometry"]["global_sparsity"]
    assert sum(geom["histogram_counts"]) > 0

    # Projector: the latest two snapshots analysed, by tensorboard's own config message.
    run_dir = tb / "tb-run"
    config = read_config(run_dir)
    assert [e.tensor_name for e in config.embeddings] == ["wte @ iter 300", "wte @ iter 200"]
    assert not (run_dir / "projector~" / "iter_000000100").exists()  # past the two kept: removed
    assert list(run_dir.rglob("*.tmp")) == []
    by_iter = {r["iter"]: (r, w) for r, w in zip(records, mats)}
    for entry, it in zip(config.embeddings, (300, 200)):
        r, w = by_iter[it]
        assert list(entry.tensor_shape) == [500, 32]
        matrix = np.fromfile(run_dir / entry.tensor_path, dtype=np.float32).reshape(500, 32)
        assert np.array_equal(matrix, w.numpy())
        rows = tsv_rows(run_dir / entry.metadata_path)
        header, body = rows[0], rows[1:]
        # the record lists its under-trained tokens (issue 22), so that column is known too
        assert header == ["token", "id", "drift_cosine", "row_norm", "galaxy_cluster", "undertrained"]
        assert len(body) == 500 and all(len(row) == len(header) for row in body)
        col = {name: [row[k] for row in body] for k, name in enumerate(header)}
        flagged = {int(t[0]) for t in (r["insight"] or {}).get("undertrained_tokens") or []}
        assert col["undertrained"] == ["1" if i in flagged else "0" for i in range(500)]
        assert col["id"] == [str(i) for i in range(500)]
        assert col["token"][0] == "tok0" and col["token"][5] == "tab\\there" and col["token"][7] == "nul\\x00byte"
        assert col["token"][6] == "line\\nbreak\\r\\n" and col["token"][10] == "back\\\\slash\\\\t"
        assert col["token"][8] == "\\u2028sep\\x85next\\x0b" and col["token"][11] == ""
        assert len(col["token"][9]) == MAX_TOKEN_CHARS + 1 and col["token"][9].endswith("\u2026")
        norms = torch.linalg.vector_norm(w.double(), dim=1)
        assert np.allclose([float(v) for v in col["row_norm"]], norms.numpy(), rtol=1e-5, atol=0)
        prev_w = by_iter[r["prev_iter"]][1]
        cosines = procrustes_cosines(prev_w, w)
        # float32 products with float64 sums, then 6 significant digits in the file
        assert np.allclose([float(v) for v in col["drift_cosine"]], cosines.numpy(), rtol=0, atol=2e-5)
        lowest = min(range(500), key=lambda t: float(col["drift_cosine"][t]))
        assert lowest == r["drift"]["most_drifted_tokens"][0][0]
        clusters = {p[0]: str(p[3]) for p in r["galaxy"]["points"]}
        assert col["galaxy_cluster"] == [clusters.get(t, "") for t in range(500)]


def sink_results(n: int, shape: tuple[int, int] = (300, 16), tensor: str | None = None) -> list[dict[str, Any]]:
    """`n` records of the real pipeline on a random walk, as the daemon makes them (the per-token arrays
    under TOKEN_ARRAYS, which SinkSet hands to handle_arrays)."""
    state, prev, out = RunInsight(), None, []
    for k, w in enumerate(matrices(n, shape=shape)):
        snap = SnapshotData(iter=k + 1, seq=k, name="wte", tensor=w, metrics={"train/loss": 5.0 - k})
        rec = analyse(Job("disk", snap, prev, [], HelloInfo(vocab=None)), AnalysisSettings(), None, state)
        assert rec[TOKEN_ARRAYS].weights is w  # the snapshot itself, not a copy
        rec.update(counters={"analysed": k + 1}, daemon_counters={"rejected": 0})
        rec["tensor"], rec["default_tensor"] = tensor or "wte", tensor is None  # as the tensor-names records say
        out.append(rec)
        prev = snap
    return out


@pytest.mark.skipif(_mount_problem() is not None, reason=str(_mount_problem()))
def test_full_disk_counts_lost_and_never_leaves_a_half_written_projector(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results = sink_results(4)
    with small_fs(tmp_path / "fs", "1m") as fs:
        sinks = SinkSet([TensorBoardSink(fs / "tb", projector_keep=2)])
        run_dir = fs / "tb" / "disk"
        for rec in results[:2]:
            sinks.handle(rec)
        assert sinks.counters()["lost"] == 0
        before = (run_dir / CONFIG_NAME).read_bytes()

        filler = fill(fs)
        sinks.handle(results[2])
        assert sinks.counters() == {"lost": 1, "lost_by_sink": {"tensorboard": 1}}  # once, not per file
        assert (run_dir / CONFIG_NAME).read_bytes() == before  # the old config, whole
        assert list(run_dir.rglob("*.tmp")) == [] and not (run_dir / "projector~" / "iter_000000003").exists()
        for entry in read_config(run_dir).embeddings:  # everything it names is there, whole
            assert (run_dir / entry.tensor_path).stat().st_size == 300 * 16 * 4
            assert len(tsv_rows(run_dir / entry.metadata_path)) == 301
        assert "tensorboard: cannot write run disk iter 3" in caplog.text

        filler.unlink()
        sinks.handle(results[3])
        sinks.close()
        assert sinks.counters()["lost"] == 1
        assert "tensorboard: writable again; 1 result(s) lost meanwhile" in caplog.text
        config = read_config(run_dir)
        assert [e.tensor_name for e in config.embeddings] == ["wte @ iter 2", "wte @ iter 4"]
        steps = {e.step for e in accumulator(run_dir).Scalars("analysis/drift_cosine_sim")}
        assert {2, 4} <= steps  # iter 3's points may be partly there: it was counted as lost all the same


def test_a_named_tensor_gets_its_own_subfolder_and_projector(tmp_path: Path) -> None:
    sinks = SinkSet([TensorBoardSink(tmp_path / "tb", projector_keep=1)])
    for rec in sink_results(2, shape=(40, 8)) + sink_results(2, shape=(40, 8), tensor="lm_head"):
        sinks.handle(rec)
    sinks.close()
    default, named = tmp_path / "tb" / "disk", tmp_path / "tb" / "disk" / "lm_head"
    assert [e.tensor_name for e in read_config(default).embeddings] == ["wte @ iter 2"]
    assert [e.tensor_name for e in read_config(named).embeddings] == ["lm_head @ iter 2"]
    assert not (default / "wte").exists()  # the default tensor keeps the run's own folder
    for directory in (default, named):
        assert sorted(e.step for e in accumulator(directory).Scalars("train/loss")) == [1, 2]


def unescape(cell: str) -> str:
    """The inverse of tsv_cell's escaping (written here from its documented rules, not from its code)."""
    out, i = [], 0
    simple = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    while i < len(cell):
        if cell[i] != "\\":
            out.append(cell[i])
            i += 1
            continue
        kind = cell[i + 1]
        if kind in simple:
            out.append(simple[kind])
            i += 2
        else:
            width = {"x": 2, "u": 4, "U": 8}[kind]
            out.append(chr(int(cell[i + 2:i + 2 + width], 16)))
            i += 2 + width
    return "".join(out)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=200) | st.text(alphabet="\t\n\r\\\x00\x85\u2028\ud800a\u2026"))
def test_no_token_string_can_add_a_row_or_a_column(text: str) -> None:
    cell = tsv_cell(text)
    assert "\t" not in cell and len(cell.splitlines()) <= 1 and len(cell) <= MAX_TOKEN_CHARS + 1
    cell.encode("utf-8")  # always encodable: lone surrogates are escaped too
    whole = tsv_cell(text, limit=10 * len(text))  # never cut
    if len(whole) <= MAX_TOKEN_CHARS:
        assert cell == whole and unescape(cell) == text  # the escaping loses nothing: it is reversible
    else:  # cut: a marked prefix of the whole
        assert cell.endswith("\u2026") and text.startswith(unescape(cell[:-1]))


def _hidden_package(tmp_path: Path, name: str) -> dict[str, str]:
    """An environment in which `import name` fails as it does where the package is not installed."""
    shadow = tmp_path / "shadow"
    (shadow / name).mkdir(parents=True)
    (shadow / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
    child = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled")
    child["PYTHONPATH"] = os.pathsep.join([str(shadow), str(Path(__file__).resolve().parent.parent)])
    return child


def test_missing_tensorboard_is_one_error_line_for_the_daemon_and_replay(tmp_path: Path) -> None:
    child = _hidden_package(tmp_path, "tensorboard")
    np.save(tmp_path / "step1.npy", np.ones((4, 3), dtype=np.float32))
    for args in (["--listen", "tcp://127.0.0.1:1", "--tensorboard", str(tmp_path / "tb")],
                 ["replay", str(tmp_path / "step1.npy"), "--tensorboard", str(tmp_path / "tb"),
                  "--results-dir", str(tmp_path / "runs")]):
        proc = subprocess.run([sys.executable, "-m", "analysis_daemon", *args], env=child, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert errors == ["Error: --tensorboard needs the tensorboard package (ImportError: No module named 'tensorboard'): "
                          "pip install 'embedding-monitor[tensorboard]'"], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "tb").exists() and not (tmp_path / "runs").exists()


def test_negative_projector_keep_is_refused_before_any_sink_starts() -> None:
    from analysis_daemon.cli import build_parser
    from analysis_daemon.options import make_sinks

    args = build_parser().parse_args(["--tensorboard", "tb", "--tensorboard-projector-keep", "-1"])
    with pytest.raises(ValueError, match=r"^--tensorboard-projector-keep must be >= 0 \(0: no projector\), got -1$"):
        make_sinks(args, AnalysisSettings(), 1, None)  # main() prints it as one `Error:` line, as above


def test_undertrained_flags_and_clusters_become_columns_where_known() -> None:
    from analysis_daemon.sinks.projector import metadata_tsv

    w = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    arrays = TokenArrays(knn_ids=None, knn_cos=None, drift=None, norm=torch.linalg.vector_norm(w, dim=1),
                         xy=torch.zeros(10, 2), weights=w)
    # the insight's list as a record carries it, hostile entries included (out of range, not an id)
    record = {"iter": 5, "insight": {"undertrained_tokens": [[3, 0.9], [7, 0.8], [999, 1.0], ["x", 1], True]},
              "galaxy": {"points": [[2, 0.1, 0.2, 5], [4, 0.0, 0.0, -1], [99, 0, 0, 1], [6, 0, 0, True]]}}
    rows = [line.split("\t") for line in metadata_tsv(record, arrays, ["a", "b"]).decode().splitlines()]
    assert rows[0] == ["token", "id", "row_norm", "galaxy_cluster", "undertrained"]  # no drift: first snapshot
    col = {name: [row[k] for row in rows[1:]] for k, name in enumerate(rows[0])}
    assert col["token"] == ["a", "b"] + [f"#{i}" for i in range(2, 10)]  # beyond the vocabulary: the id
    assert col["undertrained"] == ["1" if i in (3, 7) else "0" for i in range(10)]
    assert col["galaxy_cluster"] == ["", "", "5", "", "-1", "", "", "", "", ""]
    # a record without the sections (--no-extras): only what the arrays know
    header = metadata_tsv({"iter": 5}, arrays, None).decode().splitlines()[0]
    assert header.split("\t") == ["token", "id", "row_norm"]


def test_a_repeated_iteration_replaces_its_projector_snapshot_whole(tmp_path: Path) -> None:
    first, again = sink_results(1, shape=(30, 4)), sink_results(2, shape=(30, 4))[1:]
    again[0]["iter"] = 1  # a resumed trainer analyses iteration 1 again, with other weights
    weights = again[0][TOKEN_ARRAYS].weights.clone()
    sinks = SinkSet([TensorBoardSink(tmp_path / "tb", projector_keep=3)])
    for rec in first + again:
        sinks.handle(rec)
    sinks.close()
    run_dir = tmp_path / "tb" / "disk"
    (entry,) = read_config(run_dir).embeddings
    assert entry.tensor_name == "wte @ iter 1" and entry.tensor_path == "projector~/iter_000000001~1/tensor.bytes"
    assert np.array_equal(np.fromfile(run_dir / entry.tensor_path, dtype=np.float32).reshape(30, 4), weights.numpy())
    assert [p.name for p in (run_dir / "projector~").iterdir()] == ["iter_000000001~1"]  # the old one removed
