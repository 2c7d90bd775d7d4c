"""--device: the analysis on a chosen device gives the CPU's record, and a missing CUDA device is one error line.

No test here can put a tensor on a GPU without one, so the CPU tests make a missing `device=` visible
instead: they run the whole pipeline with torch's default device set to "meta" (tensors without data)
while passing device="cpu" explicitly. Any tensor a metric makes without naming its device then lands
on "meta" and fails as soon as it meets real data; a pipeline that passes there puts every temporary
on the device it was given, which is what a GPU run needs. The GPU tests compare CUDA with CPU for real
and are skipped where there is no CUDA device.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from analysis_daemon.metrics.device import DeviceUnavailable, chunk_rows, resolve_device
from analysis_daemon.metrics.sampled import row_bincounts
from analysis_daemon.pipeline import TOKEN_ARRAYS, AnalysisSettings, analyse
from analysis_daemon.records import HelloInfo, Job, RunInsight, SnapshotData

HAS_CUDA = torch.cuda.is_available()
# Keys that differ between two runs of the same analysis: clocks, and where it ran.
TIMING = {"seconds", "drift_seconds", "geometry_seconds", "insight_seconds", "galaxy_seconds",
          "waited_seconds", "sent_at", "received_at", "finished_at", "device", "chunk_size"}


def clustered(v: int, d: int, seed: int) -> torch.Tensor:
    """Rows in a few tight clusters plus noise, with a non-finite and a zero row (exercise every branch)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=g)
    w = centres[torch.arange(v) % 6] + 0.3 * torch.randn(v, d, generator=g)
    w[5] = math.nan
    w[9] = 0.0
    return w


def jobs(v: int = 300, d: int = 24, iters: int = 3) -> list[Job]:
    """A run's jobs: each snapshot a small step from the previous one, drift against it."""
    hello = HelloInfo(vocab=[f"tok{i}" for i in range(v)])
    out, prev = [], None
    w = clustered(v, d, 0)
    for it in range(iters):
        w = w + 0.05 * clustered(v, d, it + 1).nan_to_num(0.0)
        snap = SnapshotData(iter=100 * it, seq=it, name="wte", tensor=w.clone())
        out.append(Job(run="r", current=snap, previous=prev, skipped_iters=[], hello=hello))
        prev = snap
    return out


def strip(record: dict) -> dict:
    """The record without the fields that differ between two runs of one analysis (clocks, device)."""
    return {k: v for k, v in record.items() if k not in TIMING and k != TOKEN_ARRAYS and k != "alerts"}


def run_all(settings: AnalysisSettings, job_list: list[Job]) -> list[dict]:
    state = RunInsight()
    return [analyse(job, settings, insight_state=state) for job in job_list]


SETTINGS = dict(probes=("tok3", "7"), galaxy_rows=150, chunk_size=64, knn_k=5)
PARTIAL = {"partial_collapse_share": 0.2}


def settings_for(device: str, **kw) -> AnalysisSettings:
    from analysis_daemon.metrics.alerts import AlertSettings
    return AnalysisSettings(device=device, alerts=AlertSettings(**PARTIAL), **{**SETTINGS, **kw})


@pytest.mark.parametrize("sample_rows", [None, 40])
def test_every_temporary_is_made_on_the_device_given(sample_rows: int | None) -> None:
    # Default device "meta": a tensor made without device= has no data and fails when it meets the
    # real CPU tensors, so a record identical to the plain run proves every allocation names its device.
    job_list = jobs()
    plain = run_all(settings_for("cpu", sample_rows=sample_rows), job_list)
    with torch.device("meta"):
        assert torch.zeros(1).device.type == "meta"  # the trap is set
        explicit = run_all(settings_for("cpu", sample_rows=sample_rows), job_list)
    for a, b in zip(plain, explicit):
        for key in ("geometry_error", "insight_error", "galaxy_error"):
            assert b[key] is None, b[key]
        assert "token_data_error" not in b
        assert b["drift_skipped_reason"] in (None, "first snapshot of this run")
        assert strip(a) == strip(b)
        for name in ("norm", "xy", "knn_ids", "knn_cos", "drift"):
            x, y = getattr(a[TOKEN_ARRAYS], name), getattr(b[TOKEN_ARRAYS], name)
            if x is None:
                assert y is None
            else:
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        assert b[TOKEN_ARRAYS].norm.device.type == "cpu"
        assert b[TOKEN_ARRAYS].weights is job_list[a["iter"] // 100].current.tensor  # the received one, not a copy
        assert b["device"] == "cpu" and b["chunk_size"] == 64
    assert plain[-1]["drift"]["average_cosine_similarity"] is not None
    assert plain[-1]["insight"]["neighbourhood_drift"] is not None
    assert plain[-1]["galaxy"]["cluster_count"] >= 1


def test_row_bincounts_batched_matches_one_bincount_per_row() -> None:
    # The GPU's single bincount over (row, bin) pairs, run here on the CPU against the per-row loop.
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (17, 301), generator=g, dtype=torch.uint8)
    assert torch.equal(row_bincounts(q, batched=True), row_bincounts(q, batched=False))
    assert int(row_bincounts(q, batched=True).sum()) == q.numel()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(DeviceUnavailable, match="cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    if not HAS_CUDA:
        with pytest.raises(DeviceUnavailable, match="no CUDA device on this host"):
            resolve_device("cuda")
    assert chunk_rows("cpu", 50304, 512) == 512  # the CPU keeps the chunk it was given


def test_device_cuda_without_cuda_is_one_error_line_and_exit_2(tmp_path) -> None:
    if HAS_CUDA:
        pytest.skip("this host has a CUDA device")
    for argv in (["--device", "cuda", "--listen", "tcp://127.0.0.1:0", "--no-wandb"],
                 ["replay", str(tmp_path), "--device", "cuda", "--no-wandb"]):
        proc = subprocess.run([sys.executable, "-m", "analysis_daemon", *argv], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("Error: --device cuda: no CUDA device on this host"), proc.stderr
        assert "Traceback" not in proc.stderr
        assert "ready" not in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("sample_rows", [None, 40])
def test_cuda_records_equal_the_cpu_within_float32(sample_rows: int | None) -> None:
    job_list = jobs(v=2000, d=64)
    cpu = run_all(settings_for("cpu", sample_rows=sample_rows), job_list)
    gpu = run_all(settings_for("cuda", sample_rows=sample_rows), job_list)
    for a, b in zip(cpu, gpu):
        assert b["device"].startswith("cuda") and b["geometry_error"] is None and b["insight_error"] is None
        ga, gb = a["geometry"], b["geometry"]
        assert gb["global_sparsity"]["mean_similarity"] == pytest.approx(ga["global_sparsity"]["mean_similarity"],
                                                                         abs=1e-9)
        # float32 products differ in their last bits between devices: a cosine within ~1e-6 of a bin
        # edge may change bins, so the counts agree to a few pairs in a million
        pairs = ga["pairs"]
        diff = sum(abs(x - y) for x, y in zip(ga["global_sparsity"]["histogram_counts"],
                                              gb["global_sparsity"]["histogram_counts"]))
        assert diff <= max(4, pairs * 1e-5)
        if a["drift"] is not None:
            assert b["drift"]["average_cosine_similarity"] == pytest.approx(
                a["drift"]["average_cosine_similarity"], abs=1e-6)
        assert b["insight"]["effective_rank"] == pytest.approx(a["insight"]["effective_rank"], rel=1e-5)


def test_executor_ray_without_ray_is_one_error_line(tmp_path) -> None:
    # A `ray` module that cannot be imported, first on the path: what a host without the [ray] extra sees.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "ray.py").write_text("raise ImportError('No module named ray')\n")
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
               OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "analysis_daemon", "--executor", "ray", "--listen",
                           "tcp://127.0.0.1:0", "--no-wandb"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "Error: --executor ray needs Ray: pip install 'embedding-monitor[ray]' (or pip install ray)"
    assert "Traceback" not in proc.stderr
