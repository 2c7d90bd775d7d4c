"""W&B sink: one wandb run per trainer run, the training iteration as x-axis.

wandb is imported and initialised on a thread of this sink's own, so a slow `wandb.init` (network,
service start-up) delays neither the receive loop nor the other sinks. Runs are created with
`reinit="create_new"` and used through their Run objects (never the global `wandb.log`), so one
daemon process can feed several trainer runs at once. Every metric is tied to `analysis/iter` with
`define_metric(step_metric=...)`: wandb's own step only counts calls, so a result that arrives late
or out of order is still plotted at its training iteration instead of being dropped.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from typing import Any

from ..safetext import first_line
from . import Sink
from .scalars import STEP_KEY, histograms, scalar_metrics

log = logging.getLogger("embedding_monitor.daemon")

STEP_METRIC = STEP_KEY
JOB_TYPE = "embedding-analysis"
_QUEUE_MAX = 256  # results waiting for wandb; beyond that wandb is hopelessly behind and we drop


def wandb_run_settings(run: str, hello_wandb: dict[str, Any] | None,
                       default_project: str | None) -> dict[str, Any]:
    """The wandb.init keyword arguments for trainer run `run` (hello info first, then WANDB_* env)."""
    info = hello_wandb or {}
    trainer_id = info.get("run_id") or info.get("id")
    project = info.get("project") or default_project or os.environ.get("WANDB_PROJECT")
    group = info.get("group") or os.environ.get("WANDB_RUN_GROUP") or trainer_id or run
    kwargs: dict[str, Any] = {
        "project": project or "embedding-monitor",
        "group": group,
        "name": f"{info.get('name') or info.get('run_name') or run}-embeddings",
        "job_type": JOB_TYPE,
        "config": {"trainer_run": run, "trainer_wandb_run_id": trainer_id,
                   "trainer_wandb_run_name": info.get("name") or info.get("run_name")},
    }
    entity = info.get("entity") or os.environ.get("WANDB_ENTITY")
    if entity:
        kwargs["entity"] = entity
    return kwargs


def metrics_for(result: dict[str, Any], wandb: Any, vocab: list[str] | None = None) -> dict[str, Any]:
    """The wandb log dict of one result (scalars, histograms, token tables, counters); `vocab` names the
    galaxy map's points. The scalars and histograms are the shared ones (scalars.py), as in TensorBoard."""
    import numpy as np  # numpy arrays are what wandb.Histogram expects

    data: dict[str, Any] = {STEP_METRIC: result["iter"], **scalar_metrics(result)}
    for key, (counts, bins) in histograms(result).items():
        data[key] = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(bins)))
    drift = result.get("drift")
    if drift:
        for kind in ("most", "least"):
            pairs = drift.get(f"{kind}_drifted_tokens") or []
            strings = drift.get(f"{kind}_drifted_token_strings")
            rows = [[rank, int(tid), strings[rank] if strings and rank < len(strings) else None, cos]
                    for rank, (tid, cos) in enumerate(pairs)]
            data[f"analysis/drift_{kind}_drifted_tokens"] = wandb.Table(
                columns=["rank", "token_id", "token", "cosine_similarity"], data=rows)
    data.update(insight_metrics(result, wandb))
    if result.get("galaxy") is not None or result.get("insight") is not None:  # not with --no-extras
        data.update(galaxy_metrics(result, wandb, vocab))
    return tensor_keys(data, result)


def tensor_keys(data: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A non-default tensor's entries under analysis/<tensor>/...; the trainer's scalars only once (default tensor)."""
    if result.get("default_tensor", True) or not result.get("tensor"):
        return data
    prefix = f"analysis/{result['tensor']}/"
    return {(key if key == STEP_METRIC else prefix + key.removeprefix("analysis/")): value
            for key, value in data.items() if key.startswith("analysis/")}


def insight_metrics(result: dict[str, Any], wandb: Any) -> dict[str, Any]:
    """The wandb table of a result's "insight" section (the probes' neighbours); its scalars are scalar_metrics'."""
    data: dict[str, Any] = {}
    rows = [[p["token_id"], p["token"], rank, n[0], n[1], n[2]]
            for p in (result.get("insight") or {}).get("probes") or [] for rank, n in enumerate(p["neighbours"])]
    if rows:
        data["analysis/probe_neighbours"] = wandb.Table(
            columns=["probe_id", "probe", "rank", "neighbour_id", "neighbour", "cosine_similarity"], data=rows)
    ins = result.get("insight") or {}
    under = ins.get("undertrained")
    if under:
        strings = under.get("token_strings")
        data["analysis/undertrained_tokens"] = wandb.Table(
            columns=["rank", "token_id", "token", "score"],
            data=[[rank, int(tid), strings[rank] if strings and rank < len(strings) else None, score]
                  for rank, (tid, score) in enumerate(ins.get("undertrained_tokens") or [])])
    return data


GALAXY_COLUMNS = ["iter", "token_id", "token", "x", "y", "cluster"]


def galaxy_metrics(result: dict[str, Any], wandb: Any, vocab: list[str] | None = None) -> dict[str, Any]:
    """The galaxy map as a wandb.Table (one row per point: W&B's scatter panels plot x against y,
    coloured by cluster); its counts are scalar_metrics'."""
    galaxy = result.get("galaxy")
    if not galaxy:
        return {}
    from ..metrics.galaxy import token_label
    rows = [[result["iter"], int(t), token_label(vocab, int(t)), x, y, c] for t, x, y, c in galaxy["points"]]
    return {"analysis/galaxy": wandb.Table(columns=GALAXY_COLUMNS, data=rows)}


def own_wandb_service() -> str | None:
    """Forget a W&B service inherited from the process that started us; returns the line said, if any.

    wandb exports WANDB_SERVICE (its token names the owner's pid) so a trainer's child processes share the
    trainer's service. The daemon must not: it outlives the trainer, and once that service is gone every
    wandb.init here fails ("Failed to connect to service"), losing the results it should log. A token of
    this very process (the sink running in-process, e.g. replay from a notebook) is kept.
    """
    token = os.environ.get("WANDB_SERVICE")
    if not token:
        return None
    owner = re.match(r"\d+-(\d+)-", token)
    if owner is not None and int(owner.group(1)) == os.getpid():
        return None
    os.environ.pop("WANDB_SERVICE", None)
    line = (f"wandb: not using the W&B service of the process that started this one (pid "
            f"{owner.group(1) if owner else 'unknown'}); starting our own, so logging outlives that process")
    log.info("%s", line)
    return line


class WandbSink(Sink):
    """Logs results to W&B from a background thread; trouble is logged once and never stops analysis."""

    name = "wandb"

    def __init__(self, default_project: str | None = None, close_timeout: float | None = None,
                 config: dict[str, Any] | None = None, init_timeout: float = 20.0,
                 finish_timeout: float = 20.0) -> None:
        own_wandb_service()
        self.default_project = default_project
        self.config = dict(config or {})  # the daemon's analysis settings, stored in every wandb run
        # An unreachable W&B must not hold the daemon: wandb.init gives up after init_timeout (the run
        # then logs offline), finish after finish_timeout (the data stays on disk for `wandb sync`).
        self.init_timeout = init_timeout
        self.finish_timeout = finish_timeout
        self.close_timeout = (close_timeout if close_timeout is not None
                              else 2 * init_timeout + finish_timeout + 10.0)
        self._hello: dict[str, dict[str, Any] | None] = {}
        self._vocab: dict[str, list[str] | None] = {}  # token strings of each run's galaxy table
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=_QUEUE_MAX)
        self._runs: dict[str, Any] = {}  # trainer run -> wandb Run
        self._defined: dict[str, set[str]] = {}  # trainer run -> trainer metric names given step_metric
        self._failed: set[str] = set()  # trainer runs whose wandb run could not be used
        self._dropped = 0
        self._thread = threading.Thread(target=self._loop, name="wandb-sink", daemon=True)
        self._thread.start()

    # --- called from the daemon's threads -------------------------------------------------------
    def run_hello(self, run: str, hello: Any) -> None:
        """Remember the trainer's wandb info for `run` (used when its wandb run is created)."""
        self._put(("hello", run, getattr(hello, "wandb", None), getattr(hello, "vocab", None)))

    def handle(self, result: dict[str, Any]) -> None:
        """Queue `result` for logging (dropped, and counted, if wandb is far behind)."""
        self._put(("result", result))

    def run_ended(self, run: str, summary: dict[str, Any]) -> None:
        """Finish `run`'s wandb run once its queued results are logged."""
        self._put(("end", run, summary))

    def close(self) -> None:
        """Log what is queued, finish every wandb run, within `close_timeout` seconds."""
        deadline = time.monotonic() + self.close_timeout
        try:
            self._queue.put(("close",), timeout=self.close_timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            unsent = 0
            while True:  # what the stuck thread will never get to
                try:
                    unsent += self._queue.get_nowait()[0] == "result"
                except queue.Empty:
                    break
            self.count_lost(unsent)
            log.error("wandb: did not finish within %.0f s; giving up on its remaining data "
                      "(%d queued result(s) lost)", self.close_timeout, unsent)

    def held_runs(self) -> set[str]:
        """Runs with a hello, vocabulary, wandb run or failure remembered (read from any thread)."""
        for _ in range(10):  # the sink's thread may change a map while it is read: read again
            try:
                return {*self._hello, *self._vocab, *self._runs, *self._defined, *self._failed}
            except RuntimeError:
                continue
        return {*self._hello.copy(), *self._vocab.copy(), *self._runs.copy(), *self._defined.copy(),
                *self._failed.copy()}

    def _put(self, item: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped += 1
            if item[0] == "result":
                self.count_lost(1)
            if self._dropped == 1 or self._dropped % 100 == 0:
                log.warning("wandb: %d item(s) dropped, wandb is not keeping up", self._dropped)

    # --- the sink's own thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            kind = item[0]
            try:
                if kind == "close":
                    self._finish_all()
                    return
                if kind == "hello":
                    self._hello[item[1]] = item[2]
                    self._vocab[item[1]] = item[3]
                elif kind == "result":
                    self._log(item[1])
                elif kind == "end":
                    self._finish(item[1], item[2])
            except Exception as exc:  # keep the thread alive whatever wandb does
                log.error("wandb: unexpected %s: %s", type(exc).__name__, exc)

    def _wandb_run(self, run: str) -> Any | None:
        if run in self._failed:
            return None
        wb_run = self._runs.get(run)
        if wb_run is not None:
            return wb_run
        kwargs = wandb_run_settings(run, self._hello.get(run), self.default_project)
        kwargs["config"] = {**self.config, **kwargs["config"]}
        try:
            wb_run = self._init(kwargs, offline=False)
        except BaseException as exc:  # wandb raises UsageError, CommError, timeouts, even SystemExit
            if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):
                wb_run = None
            else:
                # W&B unreachable (network down, server gone): keep this run's results on disk instead.
                # (no network, server gone, no credentials: wandb says which)
                log.error("wandb: cannot start an online W&B run for %r (%s); logging it offline instead",
                          run, first_line(exc))
                try:
                    wb_run = self._init(kwargs, offline=True)
                except BaseException as exc2:
                    exc, wb_run = exc2, None
                else:
                    log.warning("wandb: run %r logs offline to %s; upload it later with `wandb sync %s`",
                                run, sync_dir(wb_run), sync_dir(wb_run))
            if wb_run is None:
                self._failed.add(run)
                log.error("wandb: cannot start a run for %r, its results are not logged to W&B (counted "
                          "as lost): %s", run, first_line(exc))
                return None
        log.info("wandb: run %s (%s) logs trainer run %r, project %r, group %r", wb_run.name,
                 wb_run.id, run, kwargs["project"], kwargs["group"])
        self._runs[run] = wb_run
        return wb_run

    def _init(self, kwargs: dict[str, Any], offline: bool) -> Any:
        import wandb

        # console="off": wandb must not wrap the daemon's stdout (ready line, summary blocks).
        base: dict[str, Any] = {"console": "off", "init_timeout": self.init_timeout}
        if offline:
            base["mode"] = "offline"
        try:
            settings = wandb.Settings(**base, finish_timeout=self.finish_timeout, finish_timeout_raises=True)
        except Exception:  # wandb < 0.19 has no finish_timeout: close()'s own bound still holds
            settings = wandb.Settings(**base)
        wb_run = wandb.init(reinit="create_new", settings=settings, **kwargs)
        wb_run.define_metric(STEP_METRIC)
        wb_run.define_metric("analysis/*", step_metric=STEP_METRIC)
        return wb_run

    def _log(self, result: dict[str, Any]) -> None:
        run = result["run"]
        wb_run = self._wandb_run(run)
        if wb_run is None:
            self.count_lost(1)
            return
        try:
            import wandb

            data = metrics_for(result, wandb, self._vocab.get(run))
            defined = self._defined.setdefault(run, set())
            for key in result.get("metrics") or {}:
                if key not in defined and not key.startswith("analysis/"):
                    wb_run.define_metric(key, step_metric=STEP_METRIC)  # trainer metrics: iteration axis too
                    defined.add(key)
            wb_run.log(data)
        except Exception as exc:
            self.count_lost(1)
            self._failed.add(run)
            self._runs.pop(run, None)
            log.error("wandb: logging for %r failed, stopped for this run: %s: %s",
                      run, type(exc).__name__, exc)
            return
        for alert in result.get("alerts") or []:
            if not alert.get("notified"):  # throttled by alerts.check: one per kind per run per interval
                continue
            try:
                wb_run.alert(title=f"embedding {alert['kind']} ({run})", text=alert["message"],
                             level=wandb.AlertLevel.WARN)
            except Exception as exc:  # an alert that cannot be sent must not stop the metrics
                log.error("wandb: alert for %r failed: %s: %s", run, type(exc).__name__, exc)

    def _finish_all(self) -> None:
        # In parallel: N runs against an unreachable server cost one finish_timeout, not N.
        threads = [threading.Thread(target=self._finish, args=(run, None), daemon=True,
                                    name=f"wandb-finish-{run}") for run in list(self._runs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.finish_timeout + 10.0  # wandb's own timeout, plus slack
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _finish(self, run: str, summary: dict[str, Any] | None) -> None:
        wb_run = self._runs.pop(run, None)
        # Everything kept for the run goes with it (a resumed run says hello again): a daemon serving
        # many runs kept every hello's map here, 2.3 GiB more per 20 runs (issue 21).
        for per_run in (self._defined, self._vocab, self._hello):
            per_run.pop(run, None)
        self._failed.discard(run)
        if wb_run is None:
            return
        where = sync_dir(wb_run)
        try:
            if summary:
                wb_run.summary.update({f"daemon/{k}": v for k, v in summary.items()
                                       if isinstance(v, (int, float, str))})
            wb_run.finish()
        except TimeoutError:
            log.error("wandb: run for %r did not finish uploading within %.0f s (W&B unreachable?); its "
                      "data stays in %s: upload it with `wandb sync %s`", run, self.finish_timeout, where, where)
        except Exception as exc:
            log.error("wandb: finishing the run for %r failed: %s; its data stays in %s: upload it with "
                      "`wandb sync %s`", run, first_line(exc), where, where)


def sync_dir(wb_run: Any) -> str:
    """The directory `wandb sync` uploads a run from (the run's folder under wandb/)."""
    try:
        return str(wb_run.settings.sync_dir)
    except Exception:  # an older or odd wandb: its files dir's parent is the same folder
        return os.path.dirname(str(getattr(wb_run, "dir", ""))) or "wandb/"
