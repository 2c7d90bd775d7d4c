"""Results as a pandas DataFrame, for notebooks.

    from analysis_daemon import load_results
    df = load_results("runs/my-run")                      # indexed by training iteration
    df[["train/loss", "drift_cosine_sim"]].plot(subplots=True)
    both = load_results(["runs/lr-3e-4", "runs/lr-1e-3"])  # a "run" index level

Columns are the W&B keys without `analysis/` (`drift_cosine_sim`, `geom_avg_neighbors`, ...: the same
flattening as the W&B and TensorBoard sinks, scalars.py) and the trainer's metrics under their own names.
The file is read by the report's reader (report/page.py): lines cut by a crash or not JSON are skipped,
a repeated iteration keeps one record; what was skipped is in `df.attrs["skipped"]` and a warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

from .sinks.scalars import column_name, scalar_metrics

PANDAS_HINT = "load_results needs pandas: pip install 'embedding-monitor[pandas]'"
RESULTS_NAME = "analysis.jsonl"


class ResultsSkipped(UserWarning):
    """Some lines of a results file were not usable records (or repeated an iteration)."""


def _files(path: str | Path | Iterable[str | Path]) -> list[Path]:
    """The results files `path` names: a file, a run directory, a directory of run directories, or several."""
    from .report.page import ReportError, resolve_results_path

    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise ValueError("load_results: no path given")
    files: list[Path] = []
    for p in paths:
        runs = sorted(p.glob(f"*/{RESULTS_NAME}")) if p.is_dir() and not (p / RESULTS_NAME).exists() else []
        try:
            files += runs or [resolve_results_path(p)]
        except ReportError as exc:
            raise FileNotFoundError(str(exc)) from None
    return list(dict.fromkeys(f.resolve() for f in files))


def _tensor(rec: dict[str, Any]) -> str:
    """The tensor a record is about: its "tensor", else (the run's default tensor) its snapshot's name."""
    for key in ("tensor", "name"):
        if isinstance(rec.get(key), str) and rec[key]:
            return rec[key]
    return ""


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    trainer = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    for key, value in scalar_metrics(rec).items():
        name = column_name(key)
        if key in trainer and not key.startswith("analysis/") and name in row:
            name = f"trainer/{key}"  # a trainer metric named like one of ours: both kept
        row[name] = value
    return row


def load_results(path: str | Path | Iterable[str | Path]) -> Any:
    """A pandas DataFrame of results: one row per record, indexed by iteration (plus "run" and "tensor"
    levels when there are several), one column per scalar (W&B keys without `analysis/`).

    `path`: a run directory (runs/<run>), a results file (analysis.jsonl), a directory of run
    directories, or a list of those. Unusable lines are skipped: counted in `df.attrs["skipped"]`
    ({file: {"lines", "reasons", "duplicates"}}) and named in one ResultsSkipped warning per file.
    Raises ImportError without pandas, FileNotFoundError for a path with no results.
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError(PANDAS_HINT) from exc
    from .report.page import ReportError, load_results as read_results

    rows: list[dict[str, Any]] = []
    skipped: dict[str, dict[str, Any]] = {}
    for f in _files(path):
        try:
            res = read_results(f, every_run=True, per_tensor=True)
        except ReportError as exc:  # nothing usable in it: say so, as for a skipped line
            skipped[str(f)] = {"lines": None, "reasons": [str(exc)], "duplicates": 0}
            warnings.warn(f"load_results: {exc}", ResultsSkipped, stacklevel=2)
            continue
        if res.skipped_lines or res.duplicates:
            skipped[str(f)] = {"lines": res.skipped_lines, "reasons": list(res.skip_reasons),
                               "duplicates": res.duplicates}
            warnings.warn(f"load_results: {f}: {res.skipped_lines} unusable line(s) skipped"
                          f"{' (' + '; '.join(res.skip_reasons) + ')' if res.skip_reasons else ''}, "
                          f"{res.duplicates} repeated iteration(s) kept once", ResultsSkipped, stacklevel=2)
        for rec in res.records:
            rows.append({"run": str(rec.get("run", f.parent.name)), "tensor": _tensor(rec), "iter": rec["iter"],
                         **_row(rec)})
    if not rows:
        raise FileNotFoundError(f"load_results: no usable results in {path}")
    df = pd.DataFrame(rows)
    levels = [lvl for lvl in ("run", "tensor") if df[lvl].nunique() > 1]
    df = df.drop(columns=[lvl for lvl in ("run", "tensor") if lvl not in levels])
    df = df.set_index([*levels, "iter"]).sort_index()
    df.attrs["skipped"] = skipped
    return df
