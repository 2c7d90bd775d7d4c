"""EmbeddingPublisher: hand embedding snapshots to the analysis daemon without ever blocking training.

    publisher = EmbeddingPublisher(run="my-run")   # the daemon's default endpoint: a private ipc socket
    publisher.publish(raw_model.transformer.wte.weight, iter_num)  # True: handed off, False: dropped
    publisher.publish(wte, iter_num, metrics={"train/loss": 2.31, "val/loss": 2.40})  # optional scalars
    publisher.close()                                               # also runs at interpreter exit

On the training thread publish() only copies: CPU weights straight into a shared-memory slot (same
host) or a reusable buffer (tcp); CUDA weights with a non-blocking DMA into a pinned buffer plus an
event. Everything else (waiting for the event, sending, recycling buffers) is the sender thread's.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import zmq

from protocol import (DEFAULT_LIMITS, CurveClient, ProtocolError, ShmWriter, check_endpoint, check_meta, check_metrics,
                      check_run_name, check_tensor_name, check_wandb_info, connect_publisher, encode_hello,
                      is_local_endpoint, shm_available, wire_dtype)
from protocol.endpoints import default_endpoint
from protocol.runsecret import RUN_TOKEN_KEY, job_secret, run_token
from protocol.shm import publisher_id as make_publisher_id

from . import signals
from .sender import EndJob, PrepareJob, Sender, SnapshotJob
from .sharding import Part, dist_rank_and_world, find_weight, locate, vocab_rows
from .staging import EventFactory, StagingPool, cuda_event
from .tokens import TokenCounts, module_device, watch

log = logging.getLogger("embedding_monitor.hook")

# Below this, fresh memory on the training thread costs a few ms at most (faulting in 16 MB): such
# snapshots take slots and buffers as they come. Larger ones use what the sender thread prepared.
_SMALL_BYTES = 16 * 1024 * 1024
# Above this a first publish without prepare() is dropped instead of copied into fresh memory: 2 GB of new
# pages took 11 s on the training thread of a loaded host (bench_hook.py --stall, 128256 x 4096).
_FRESH_MAX_BYTES = 256 * 1024 * 1024
_REWARN_AFTER_S = 300.0  # a new episode of drops is logged again only after this long


def embedding_weight(obj: Any) -> torch.Tensor:
    """The (V, d) weight of a tensor, an nn.Embedding / module with .weight, or a module with main_weight.weight."""
    return find_weight(obj)


def _copy_into(dst: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int], *,
               non_blocking: bool = False) -> None:
    """Copy `weight` into the uint8 buffer `dst` as a C-order (V, d) array of `dtype`; `weight` is only read.

    Never a numpy view of `weight`: `Tensor.numpy()` marks the storage not resizable for good, and
    FSDP (1 and 2) frees parameter storage with `untyped_storage().resize_(0)` right after. Nor any
    in-place op, flag or autograd change on it: the version counter is what torch.compile's guards
    and autograd's saved-tensor checks read.
    """
    nbytes = dst.numel()
    if (weight.device.type == "cpu" and weight.layout == torch.strided and weight.dtype == dtype
            and weight.is_contiguous()):
        if nbytes:
            # memcpy between the two addresses on this thread (ctypes drops the GIL while it runs): as
            # fast as numpy's copy, and torch's intra-op thread pool (busy with training work) stays
            # out of it. data_ptr() already includes the storage offset of a view or shard.
            if weight.numel() * weight.element_size() != nbytes:  # never write past the buffer
                raise RuntimeError(f"internal: {nbytes}-byte buffer for a {tuple(weight.shape)} {weight.dtype} copy")
            ctypes.memmove(dst.data_ptr(), weight.data_ptr(), nbytes)
    else:  # conversion (e.g. to float16), strided weights, device-to-host DMA: reads `weight`, writes `dst`
        with torch.no_grad():
            dst.view(dtype).view(shape).copy_(weight, non_blocking=non_blocking)


def clean_metrics(metrics: Any) -> tuple[dict[str, float | int] | None, list[str]]:
    """The valid entries of a publish's `metrics` as plain numbers, and one line per entry left out.

    Numbers, numpy scalars and one-element CPU tensors are accepted; a CUDA tensor is refused (reading
    it would wait for the GPU: pass `loss.item()` from your own logging instead). The protocol's
    limits apply (count, name length and characters, finite values).
    """
    if metrics is None:
        return None, []
    if not isinstance(metrics, dict):
        return None, [f"metrics must be a dict of name -> number, got {type(metrics).__name__}"]
    clean: dict[str, float | int] = {}
    problems: list[str] = []
    for key, value in metrics.items():
        if len(clean) >= DEFAULT_LIMITS.max_metrics:
            problems.append(f"more than {DEFAULT_LIMITS.max_metrics} metrics: {key!r} and the rest left out")
            break
        if isinstance(value, torch.Tensor):
            if value.is_cuda or value.numel() != 1:
                problems.append(f"{key!r} is a {'CUDA' if value.is_cuda else 'multi-element'} tensor; pass a "
                                "Python number (e.g. loss.item())")
                continue
            value = value.item()
        elif hasattr(value, "item") and not isinstance(value, (bool, int, float)):  # numpy scalars
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = int(value) if isinstance(value, int) else float(value)
        try:
            clean.update(check_metrics({key: value}) or {})
        except ProtocolError as exc:
            problems.append(str(exc))
    return clean or None, problems


class EmbeddingPublisher:
    """Sends embedding snapshots to an analysis daemon; never blocks, drops and counts instead."""

    def __init__(self, endpoint: str | None = None, run: str | None = None, *,
                 vocab: Sequence[str] | None = None, wandb_info: dict | None = None,
                 send_dtype: torch.dtype | None = None, max_in_flight: int = 2,
                 shared_memory: bool | None = None, curve_client_secret: str | os.PathLike | None = None,
                 curve_server_public: str | os.PathLike | None = None, allow_insecure: bool = False,
                 enabled: bool | None = None, name: str = "wte", meta: dict | None = None,
                 shm_reclaim_s: float = 120.0, connect_grace_s: float = 2.0, heartbeat_s: float = 5.0,
                 run_secret: str | None = None, _event_factory: EventFactory | None = None) -> None:
        # Default: the private same-host socket (protocol.endpoints), the daemon's default --listen too.
        self.endpoint = endpoint or default_endpoint()
        endpoint = self.endpoint
        self.run = check_run_name(run or (wandb_info or {}).get("run_name") or (wandb_info or {}).get("name")
                                  or f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.name = check_tensor_name(name)
        # The daemon refuses a hello whose meta or wandb map is over the protocol's bounds: say so here.
        check_meta(meta)
        check_wandb_info(wandb_info)
        self.send_dtype = send_dtype
        if send_dtype is not None:
            wire_dtype(send_dtype)  # fail now, not at the first publish
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        # Every rank may hold a publisher. `enabled` (rank 0 by default) sends plain tensors and connects
        # at once; a DTensor is sent by every rank that holds a shard of it (unless enabled=False), and
        # such a rank connects at its first sharded publish.
        self.rank, self.world_size = dist_rank_and_world()
        self.enabled = self.rank == 0 if enabled is None else bool(enabled)
        self._shards_allowed = enabled is not False
        # Ranks of one job prove they belong to one run with a token derived from a secret they share
        # (protocol/runsecret.py: run_secret=, EMBEDDING_MONITOR_RUN_SECRET, or the job's rendezvous).
        self._run_token = run_token(self.run, job_secret(self.world_size, run_secret)[0])
        self._lock = threading.Lock()
        self._published = self._dropped = 0
        self._last_iter: int | None = None
        self._dropping = False
        self._last_warning = -_REWARN_AFTER_S
        self._metric_problems_logged: set[str] = set()
        self._tokens = TokenCounts()  # fed since the last snapshot of the main tensor (tokens.py)
        self._count_rows: int | None = None  # rows of the main tensor (known from the first publish or vocab)
        self._counts_warned = False
        self._token_hooks: list[Any] = []  # watch_tokens' handles, removed at close
        self._vocab_rows = len(vocab) if vocab is not None else None
        self.metrics_rejected = 0  # metric entries left out of publishes (bad name, value or type)
        self._closed = False
        self._pid = os.getpid()
        self._sender: Sender | None = None
        self._writer: ShmWriter | None = None
        self._event_factory = _event_factory
        self._prepared_nbytes: int | None = None
        self._prepared: PrepareJob | None = None  # the last prepare (its done event: slots exist)
        self._connect_grace_s = connect_grace_s
        # Until this moment a publish with no daemon connected yet is still copied and handed to the
        # sender thread, which waits for the first handshake: a trainer that publishes at iteration 0,
        # milliseconds after start-up, must not lose its first snapshot to the connection set-up.
        self._connect_deadline = time.monotonic() + max(0.0, connect_grace_s)
        self._start_args = dict(vocab=vocab, wandb_info=wandb_info, shared_memory=shared_memory,
                                curve_client_secret=curve_client_secret, curve_server_public=curve_server_public,
                                allow_insecure=allow_insecure, meta=meta, max_in_flight=max_in_flight,
                                shm_reclaim_s=shm_reclaim_s, heartbeat_s=heartbeat_s)
        if self._shards_allowed:
            check_endpoint(endpoint, secured=bool(curve_client_secret or curve_server_public),
                           allow_insecure=allow_insecure)
        if self.enabled:
            self._start(**self._start_args)

    def _start(self, *, vocab: Sequence[str] | None, wandb_info: dict | None, shared_memory: bool | None,
               curve_client_secret: Any, curve_server_public: Any, allow_insecure: bool, meta: dict | None,
               max_in_flight: int, shm_reclaim_s: float, heartbeat_s: float) -> None:
        """Connect: socket, shared-memory writer, staging pool, sender thread (rank 0 at once, others lazily)."""
        endpoint, name = self.endpoint, self.name
        self._connect_deadline = time.monotonic() + max(0.0, self._connect_grace_s)
        curve = None
        if curve_client_secret or curve_server_public:
            if not (curve_client_secret and curve_server_public):
                raise ValueError("CurveZMQ needs both curve_client_secret and curve_server_public")
            curve = CurveClient(Path(curve_client_secret), Path(curve_server_public))
        check_endpoint(endpoint, secured=curve is not None, allow_insecure=allow_insecure)
        if shared_memory is None:
            shared_memory = is_local_endpoint(endpoint) and shm_available()
        elif shared_memory and not shm_available():
            raise ValueError("shared_memory=True but /dev/shm is not available here; pass shared_memory=False")
        hello_meta = check_meta({"name": name, "endpoint": endpoint, "shared_memory": bool(shared_memory),
                                 "torch": torch.__version__, "heartbeat_s": heartbeat_s, **(meta or {})})
        self._writer = ShmWriter(max_in_flight, reclaim_after_s=shm_reclaim_s) if shared_memory else None
        self._pool = StagingPool(max_in_flight)
        host, vocab_list = socket.gethostname(), list(vocab) if vocab is not None else None
        hello_meta[RUN_TOKEN_KEY] = self._run_token  # taken out by the daemon before the hello is kept
        # The id carries the secret whose hash names our shared-memory segments: the daemon accepts a
        # segment only from the publisher that created it (protocol.shm.segment_belongs_to).
        publisher_id = make_publisher_id(host, self._pid, self._writer.secret if self._writer else secrets.token_hex(16))

        def hello_frames(seq: int) -> list[bytes]:
            return encode_hello(run=self.run, seq=seq, pid=self._pid, host=host, vocab=vocab_list,
                                wandb=wandb_info, meta=hello_meta, publisher=publisher_id,
                                rank=self.rank if 0 <= self.rank < self.world_size else 0,
                                world_size=max(1, self.world_size))

        ctx = zmq.Context()
        try:
            sock = connect_publisher(ctx, endpoint, curve, allow_insecure, connect=False)
            sender = Sender(sock, ctx, run=self.run, publisher_id=publisher_id, hello_frames=hello_frames,
                            pool=self._pool, writer=self._writer, on_sent=self._on_sent, on_drop=self._drop,
                            counters=lambda: (self._published, self._dropped, self._last_iter),
                            heartbeat_s=heartbeat_s)
            sender.endpoint = endpoint  # for its reconnect after a refused handshake
            # Same host without a CurveZMQ key to prove the daemon: the listener's owner must be us (or root).
            sender.verify_listener = curve is None and not allow_insecure and is_local_endpoint(endpoint)
            sock.connect(endpoint)  # only now: the sender's monitor is attached and sees the handshake
        except zmq.ZMQError as exc:  # e.g. "tcp://host:port" with a bad port or an unknown transport
            ctx.destroy(linger=0)
            if self._writer is not None:
                self._writer.close()
            raise ValueError(f"cannot connect the embedding publisher to {endpoint!r}: {exc}") from None
        self._sender = sender
        self._sender.start()
        atexit.register(self.close)
        if self._writer is not None:
            signals.unlink_on_signal(self._writer)  # SIGTERM/SIGHUP skip atexit

    # ------------------------------------------------------------ counters

    @property
    def published(self) -> int:
        """Snapshots handed to ZeroMQ for a connected daemon."""
        return self._published

    @property
    def dropped(self) -> int:
        """Snapshots not sent (no daemon, daemon busy, buffers in flight)."""
        return self._dropped

    @property
    def connected(self) -> bool:
        """Whether a daemon has completed the handshake and not disconnected since."""
        return self._sender is not None and self._sender.connected

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a daemon to connect (at start-up, never in the loop); True if connected."""
        deadline = time.monotonic() + timeout
        while not self.connected and self._sender is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.connected

    def _on_sent(self, iter_num: int) -> None:
        with self._lock:
            self._published += 1
            self._last_iter = iter_num
            self._dropping = False

    def _drop(self, reason: str) -> bool:
        with self._lock:
            self._dropped += 1
            warn = not self._dropping and time.monotonic() - self._last_warning > _REWARN_AFTER_S
            self._dropping = True
            if warn:
                self._last_warning = time.monotonic()
        if warn:
            log.warning("embedding snapshots are being dropped (%s, endpoint %s); training is not slowed, "
                        "further drops are counted silently", reason, self.endpoint)
        return False

    # ------------------------------------------------------------ publishing

    def prepare(self, weight_or_module: Any, timeout: float = 60.0, *, embedding: str | None = None) -> bool:
        """Before the training loop: connect, and allocate and fault in every buffer the weight's snapshots need.

        The work runs on the sender thread; this waits up to `timeout` s for it (0: do not wait) and
        returns whether it finished. From then on every publish costs one copy, the first included.
        Raises the same one-line error publish() would for a weight that cannot be sent.
        """
        part = self._part(weight_or_module, embedding)
        if part is None:
            return True  # nothing to send from this rank
        job = self._prepare_for(part, *self._wire_shape(part.local))
        return job is None or job.done.wait(max(0.0, timeout))

    def _part(self, weight_or_module: Any, embedding: str | None = None) -> Part | None:
        if not self._shards_allowed or self._closed:
            return None
        part = locate(weight_or_module, self.enabled, embedding)
        if part is not None and self._sender is None and not self._closed:
            self._start(**self._start_args)  # a rank other than 0 holding a shard: connect now
        return part

    def _wire_shape(self, weight: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], int]:
        dtype = self.send_dtype or (weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                    else torch.float32)
        shape = tuple(int(n) for n in weight.shape)  # (V, d), a block's (rows, cols), an element range's (numel,)
        return dtype, shape, weight.numel() * dtype.itemsize

    def _prepare_for(self, part: Part, dtype: torch.dtype, shape: tuple[int, int], nbytes: int) -> PrepareJob | None:
        # Once per size: the sender thread creates and faults in the shm slots / staging buffers, so
        # no later publish pays for fresh pages on the training thread.
        if self._sender is None or self._prepared_nbytes == nbytes:
            return None
        self._prepared_nbytes = nbytes
        job = self._prepared = PrepareJob(nbytes=nbytes, pin=part.local.is_cuda)
        self._sender.jobs.put(job)
        return job

    def publish(self, weight_or_module: Any, iter_num: int, metrics: dict[str, Any] | None = None, *,
                embedding: str | None = None, name: str | None = None) -> bool:
        """Copy the embedding weight (this rank's shard of it) and hand it off; True if handed off. Never blocks.

        Sharded stacks (FSDP2/DTensor, FSDP1, DeepSpeed ZeRO-3, Megatron tensor parallel): call it on every
        rank; each sends its own piece. FSDP1 with the embedding inside a larger unit: pass the FSDP model
        and `embedding=` the embedding's path ("transformer.wte"), since its bare weight is a flat view.

        `metrics`: optional trainer scalars at this iteration (e.g. {"train/loss": 2.31}); the daemon
        keeps them in the result and logs them on the same iteration axis. Invalid entries are left
        out, counted in `metrics_rejected` and logged once per distinct problem; the snapshot still goes.
        `name`: which of the run's tensors this is (e.g. "lm_head"; None: the publisher's own `name`); the
        daemon keeps a baseline per tensor, so each drifts against its own previous snapshot.
        """
        if name is not None:
            try:
                check_tensor_name(name)
            except ProtocolError as exc:
                return self._drop(f"tensor name refused: {exc}")
        part = self._part(weight_or_module, embedding)
        if part is None or self._sender is None:
            return False  # disabled, closed, or another rank sends this matrix (or this part of it)
        weight = part.local
        clean, problems = clean_metrics(metrics)
        if problems:
            self._metric_problems(problems)
        sender = self._sender
        connect_deadline = None
        if not sender.connected:
            if sender.settled or time.monotonic() >= self._connect_deadline:
                return self._drop(sender.absent_reason())  # skip the copy: nobody could receive it
            connect_deadline = self._connect_deadline
        dtype, shape, nbytes = self._wire_shape(weight)
        self._shm_fallback_check()
        main = name is None or name == self.name
        if main:  # the counts follow the main tensor's rows (a padded vocabulary may differ from vocab_size=)
            self._count_rows = int(part.global_shape[0]) if part.global_shape is not None else int(shape[0])
        job = SnapshotJob(iter=int(iter_num), name=self.name if name is None else name, dtype=wire_dtype(dtype), shape=shape,
                          connect_deadline=connect_deadline, metrics=clean, global_shape=part.global_shape,
                          offset=part.offset, start=part.start)
        # The counts go with the main tensor's snapshot, and are taken only once it is committed: every drop
        # below leaves them in place for the next one (a job the sender drops later hands them back).
        take_counts = main and self._tokens.counts is not None
        try:
            # A large snapshot uses the slots/buffers the sender thread prepared (prepare(), or queued by the
            # first publish): fresh pages here would stall this thread (shm slot: ~10 copies), and faulting
            # them in while the sender thread prepares contends with it for seconds. Only the very first
            # publish without prepare() takes fresh (huge-page) memory, about 2x a copy, up to _FRESH_MAX_BYTES.
            big = nbytes > _SMALL_BYTES
            prep = self._prepared if self._prepared is not None and self._prepared.nbytes == nbytes else None
            ready = prep is not None and prep.done.is_set()
            use_shm = sender.shm_enabled and not weight.is_cuda and self._event_factory is None and (ready or not big)
            if use_shm:
                job.slot = sender.shm_slot(nbytes)
                if job.slot is None and sender.shm_enabled:
                    return self._drop("every shared-memory slot is still held by the daemon")
                use_shm = job.slot is not None  # None here: /dev/shm failed, this one goes over the socket
            if use_shm:
                view = torch.frombuffer(job.slot.payload(), dtype=torch.uint8)
                _copy_into(view, weight, dtype, shape)
                del view  # the slot's mapping must not stay exported
                job.ref = self._writer.commit(job.slot)
                if take_counts:
                    job.token_counts = self._take_counts(part, pin=False)
            else:
                fresh_ok = not big or ready or (prep is None and nbytes <= _FRESH_MAX_BYTES)
                job.staged = self._pool.acquire(nbytes, pin=weight.is_cuda, allocate=fresh_ok)
                if job.staged is None:
                    if prep is None:
                        self._prepare_for(part, dtype, shape, nbytes)
                        return self._drop(f"first snapshot of {nbytes / 1e6:.0f} MB skipped while its buffers are "
                                          "prepared off the training thread; call publisher.prepare(weight) before "
                                          "the loop to keep it")
                    return self._drop("snapshots still in flight (daemon slow or unreachable), or buffers "
                                      "still being prepared (call publisher.prepare(weight) before the loop)")
                _copy_into(job.staged.data, weight, dtype, shape, non_blocking=weight.is_cuda)
                if take_counts:  # a CUDA count's copy is queued before the event: it lands before the event fires
                    job.token_counts = self._take_counts(part, pin=weight.is_cuda, like=weight.device)
                if weight.is_cuda or self._event_factory is not None:
                    job.event = (self._event_factory or cuda_event)()
                    job.event.record()  # fires after the DMA; the sender thread waits on it, not us
        except OSError as exc:  # a slot that failed after it was taken: go inline over the socket from now on
            if job.slot is not None:
                self._writer.release(job.slot)
            self._disable_shm(f"shared memory failed ({exc.strerror or exc}); sending payloads over the socket")
            return self._drop("shared memory failed")
        sender.jobs.put(job)
        self._prepare_for(part, dtype, shape, nbytes)  # after the job: the other buffers, off this thread
        return True

    def count_tokens(self, input_ids: torch.Tensor, vocab_size: int | None = None) -> None:
        """Count the tokens of `input_ids` for the next snapshot of the main tensor (then reset). Never syncs.

        One scatter-add on the ids' own device (no host sync: ids outside [0, rows) go to a spare bin
        instead of being checked). The rows are the main tensor's, known after the first publish, or
        `vocab_size` / the hello's vocabulary before it; counts before any of these are left out (logged once).
        `watch_tokens(embedding)` does this for every training forward instead.
        """
        if self._closed or not self._shards_allowed:
            return
        rows = self._count_rows or vocab_size or self._vocab_rows
        if not rows:
            if not self._counts_warned:
                self._counts_warned = True
                log.warning("embedding publisher: count_tokens() before the first publish and without "
                            "vocab_size=: these counts are left out")
            return
        self._count_rows = rows
        self._tokens.add(input_ids, rows)

    def watch_tokens(self, embedding: torch.nn.Module, rows: int | None = None) -> Any:
        """Count the token ids `embedding` sees in every training-mode forward; returns a handle (`.remove()`).

        A forward pre-hook on the input embedding module (the one the publisher publishes): one
        scatter-add on the ids' device per forward, no host sync, no graph break under torch.compile;
        evaluation forwards (eval mode) are not counted, every micro-batch of gradient accumulation is.
        Call it once the model is on its device (the counts are allocated there now). `rows`: the full
        vocabulary's rows (default: the module's `num_embeddings`, else its weight's global rows).
        Removed at close(). Limits: docs/research-metrics.md (inputs_embeds, recomputed forwards).
        """
        if not isinstance(embedding, torch.nn.Module):
            raise TypeError(f"watch_tokens needs the embedding module (its forward sees the ids), got "
                            f"{type(embedding).__name__}")
        if rows is None:
            rows = getattr(embedding, "num_embeddings", None)
            rows = int(rows) if isinstance(rows, int) else vocab_rows(find_weight(embedding))
        if self._closed or not self._shards_allowed:
            return torch.utils.hooks.RemovableHandle({})  # this rank never sends: nothing to count for
        if self._count_rows is not None and self._count_rows != rows:
            log.warning("embedding publisher: watch_tokens on %d rows, the main tensor has %d; counting %d", rows,
                        self._count_rows, rows)
        self._count_rows = rows
        handle = watch(embedding, self._tokens, rows, module_device(embedding))
        self._token_hooks.append(handle)
        return handle

    def _take_counts(self, part: Part, pin: bool, like: torch.device | None = None) -> torch.Tensor | None:
        """The counts since the last snapshot as a CPU tensor (non-blocking from a GPU), and reset them.

        None for a part whose rank shares its batch with another rank that sends the counts (Megatron: the
        other tensor-parallel ranks of a group); its counts are reset all the same.
        """
        if not part.counts:
            self._tokens.reset()
            return None
        return self._tokens.take(self._count_rows or 0, pin=pin, like=like)

    def _metric_problems(self, problems: list[str]) -> None:
        self.metrics_rejected += len(problems)
        for line in problems:
            if line not in self._metric_problems_logged and len(self._metric_problems_logged) < 100:
                self._metric_problems_logged.add(line)
                log.warning("embedding publisher: metric left out of the snapshot: %s", line)

    def _shm_fallback_check(self) -> None:
        # Slots that were only ever reclaimed, never released: the daemon cannot see our /dev/shm
        # (e.g. a loopback port forwarded into another container). Send payloads inline instead.
        writer = self._writer
        if writer is not None and writer.timed_out >= 2 and writer.released == 0:
            self._disable_shm("the daemon never released a shared-memory slot; sending payloads over the socket")

    def _disable_shm(self, why: str) -> None:
        if self._sender is not None:
            self._sender.disable_shm(why)

    # ------------------------------------------------------------ shutdown

    def close(self, timeout: float = 5.0) -> None:
        """Send `end`, wait up to `timeout` s for in-flight snapshots, free everything; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:  # a forked child (DataLoader worker) must not tear down the parent's
            return
        atexit.unregister(self.close)
        for handle in self._token_hooks:
            handle.remove()
        self._token_hooks.clear()
        if self._sender is not None:
            end = EndJob(deadline=time.monotonic() + timeout)
            self._sender.jobs.put(end)
            end.done.wait(timeout + 1.0)
            self._sender.join(1.0)
            self._pool.clear()
        if self._writer is not None:
            signals.forget(self._writer)
            self._writer.close()
        if self._sender is not None:
            log.info("embedding publisher closed: %d snapshots published, %d dropped", self._published, self._dropped)

    def __enter__(self) -> "EmbeddingPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
