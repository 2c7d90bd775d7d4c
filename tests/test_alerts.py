"""Alert rules: collapse bounds, the drift-spike rule (median/MAD of recent drift), per-run throttling."""
from __future__ import annotations

import statistics

import pytest

from analysis_daemon.metrics.alerts import AlertSettings, RunAlerts, check, drift_spike_bound


def record(it: int, mean: float | None = 0.1, rank: float | None = 30.0, drift: float | None = None,
           shape: tuple[int, int] = (1000, 64)) -> dict:
    """A result record with just the fields the alerts read."""
    return {"iter": it, "shape": list(shape),
            "geometry": {"valid_rows": shape[0], "global_sparsity": {"mean_similarity": mean}},
            "insight": {"effective_rank": rank},
            "drift": None if drift is None else {"average_cosine_similarity": drift}}


def test_collapse_by_mean_similarity_and_by_effective_rank() -> None:
    s = AlertSettings(collapse_mean_sim=0.9, collapse_min_rank_fraction=0.1)
    assert check(record(1), s, RunAlerts(), now=0.0) == []
    found = check(record(2, mean=0.95), s, RunAlerts(), now=0.0)
    assert [(a["kind"], a["metric"], a["value"], a["bound"]) for a in found] == \
        [("collapse", "geometry.global_sparsity.mean_similarity", 0.95, 0.9)]
    found = check(record(3, rank=6.0), s, RunAlerts(), now=0.0)  # bound 0.1 x min(1000, 64) = 6.4
    assert [(a["metric"], a["bound"]) for a in found] == [("insight.effective_rank", pytest.approx(6.4))]
    assert "effective rank 6.0 < 6.4" in found[0]["message"]
    # no insight section (--no-extras) or no pairs: only what is known is checked
    assert check(record(4, mean=None, rank=None), s, RunAlerts(), now=0.0) == []


def test_drift_spike_needs_history_and_uses_median_and_mad() -> None:
    s = AlertSettings(drift_window=6, drift_min_history=5, drift_spike_mads=3.0)
    state = RunAlerts()
    history = [0.990, 0.992, 0.991, 0.989, 0.993]
    # A low value before 5 values are known raises nothing: no trend yet.
    assert check(record(0, drift=0.5), s, RunAlerts(), now=0.0) == []
    for i, v in enumerate(history):
        assert check(record(i, drift=v), s, state, now=0.0) == []
    med = statistics.median(history)
    mad = statistics.median(abs(v - med) for v in history)
    bound = med - 3.0 * 1.4826 * mad
    assert drift_spike_bound(history, 3.0) == pytest.approx(bound)
    assert check(record(10, drift=bound + 1e-4), s, state, now=0.0) == []  # within the trend
    found = check(record(11, drift=0.95), s, state, now=1.0)
    assert [(a["kind"], a["value"]) for a in found] == [("drift_spike", 0.95)]
    assert found[0]["bound"] == pytest.approx(drift_spike_bound(history + [bound + 1e-4], 3.0))
    assert len(state.drift_history) == 6  # the window keeps the last drift_window values


def test_flat_history_uses_the_spread_floor() -> None:
    s = AlertSettings()
    state = RunAlerts()
    for i in range(5):
        check(record(i, drift=0.999), s, state, now=0.0)
    assert drift_spike_bound([0.999] * 5, 3.0) == pytest.approx(0.999 - 3e-4)
    assert check(record(5, drift=0.99985), s, state, now=0.0) == []  # float noise, not a spike
    assert [a["kind"] for a in check(record(6, drift=0.998), s, state, now=0.0)] == ["drift_spike"]


def test_notifications_are_throttled_per_kind_and_per_run() -> None:
    s = AlertSettings(interval=300.0)
    run_a, run_b = RunAlerts(), RunAlerts()
    both = record(1, mean=0.95, rank=1.0)  # two collapse alerts in one result: one notification
    assert [a["notified"] for a in check(both, s, run_a, now=1000.0)] == [True, False]
    assert [a["notified"] for a in check(record(2, mean=0.95), s, run_a, now=1100.0)] == [False]
    assert [a["notified"] for a in check(record(2, mean=0.95), s, run_b, now=1100.0)] == [True]  # other run
    assert [a["notified"] for a in check(record(3, mean=0.95), s, run_a, now=1300.0)] == [True]
