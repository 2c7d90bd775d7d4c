"""Every field of a hello has a size and depth bound before the daemon keeps it (issue 21, item 6).

A hello's `meta` and `wandb` maps used to be checked only for string keys: 30 hellos of 15 MB of
nested maps added 3.3 GiB to the daemon. protocol/messages.py now bounds them (Limits.max_meta_*,
max_wandb_*), and the host, publisher id and tensor name, like the vocabulary already was.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from protocol import (DEFAULT_LIMITS, Hello, Limits, ProtocolError, check_meta, check_wandb_info, decode, encode_hello,
                      encode_snapshot)
from tests.test_attacks import (ATTACKER_UID, LegitRun, MiB, attack, attacker_script, needs_root, port_of,  # noqa: F401
                                rss)
from tests.test_daemon import env, start_daemon  # noqa: F401
from trainer_hook import EmbeddingPublisher

pytestmark = pytest.mark.timeout(180)
L = DEFAULT_LIMITS


def hello_frame(**fields: object) -> list[bytes]:
    header = {"v": 1, "kind": "hello", "run": "r", "seq": 0, "publisher": "h/1/s", "pid": 1, "host": "h",
              "vocab": None, "wandb": None, "meta": {}}
    header.update(fields)
    return [msgpack.packb(header, use_bin_type=True)]


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def test_an_ordinary_hello_passes_unchanged() -> None:
    meta = {"name": "wte", "endpoint": "ipc:///run/user/1/embedding-monitor/daemon.sock", "shared_memory": True,
            "torch": "2.13.0", "heartbeat_s": 5.0, "framework": "transformers", "tags": ["a", "b"],
            "optim": {"lr": 3e-4, "betas": [0.9, 0.95]}}
    wandb = {"project": "p", "run_id": "abc123", "run_name": "n", "mode": "offline", "group": "g", "entity": "e"}
    msg = decode(encode_hello(run="r", seq=0, pid=1, host="h", meta=meta, wandb=wandb, publisher="h/1/s"))
    assert isinstance(msg, Hello) and msg.meta == meta and msg.wandb == wandb


@pytest.mark.parametrize("meta, what", [
    (nested(L.max_meta_depth + 1), "max_meta_depth"),
    ({"l": [[[[1]]]]}, "max_meta_depth"),  # lists count as levels too
    ({f"k{i}": i for i in range(L.max_meta_items // 2 + 1)}, "max_meta_items"),
    ({"l": list(range(L.max_meta_items + 1))}, "max_meta_items"),
    ({f"k{i}": "x" * 8000 for i in range(9)}, "max_meta_bytes"),  # 72 kB of text, every string under 64 kB
    ({"x": float("nan")}, "finite"),
    ({"x": {1: 2}}, "strict_map_key"),  # msgpack itself refuses it while unpacking
])
def test_hostile_meta_is_refused_by_decode(meta: dict, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        decode(hello_frame(meta=meta))


@pytest.mark.parametrize("wandb, what", [
    ({"project": {"nested": "map"}}, "must be null, a bool, a number or a string"),
    ({"project": "p" * (L.max_wandb_value_chars + 1)}, "max_wandb_value_chars"),
    ({f"k{i}": "v" for i in range(L.max_wandb_entries + 1)}, "max_wandb_entries"),
    ({"k" * 65: "v"}, "key"),
    (["project"], "must be a map"),
])
def test_hostile_wandb_info_is_refused_by_decode(wandb: object, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        decode(hello_frame(wandb=wandb))


def test_host_publisher_and_tensor_name_are_bounded() -> None:
    with pytest.raises(ProtocolError, match="host of 256 characters"):
        decode(hello_frame(host="h" * 256))
    with pytest.raises(ProtocolError, match="publisher of 513 characters"):
        decode(hello_frame(publisher="p" * 513))
    frames = encode_snapshot(run="r", iter=1, seq=0, name="n" * 201, dtype="float32", shape=[2, 2], payload=bytes(16))
    with pytest.raises(ProtocolError, match="name of 201 characters"):
        decode(frames)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
                       | st.text(max_size=50),
                       lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
                       max_leaves=60)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.dictionaries(st.text(max_size=10), JSONISH, max_size=8))
def test_check_meta_accepts_exactly_the_bounded_trees(meta: dict) -> None:
    # An independent measure of the tree: depth, keys + values, UTF-8 bytes of keys and strings.
    def measure(v: object, depth: int) -> tuple[int, int, int]:
        if isinstance(v, dict):
            parts = [measure(x, depth + 1) for x in v.values()]
            return (max([depth] + [p[0] for p in parts]), 2 * len(v) + sum(p[1] for p in parts),
                    sum(len(k.encode("utf-8", "surrogatepass")) for k in v) + sum(p[2] for p in parts))
        if isinstance(v, list):
            parts = [measure(x, depth + 1) for x in v]
            return max([depth] + [p[0] for p in parts]), len(v) + sum(p[1] for p in parts), sum(p[2] for p in parts)
        return 0, 0, len(v.encode("utf-8", "surrogatepass")) if isinstance(v, str) else 0

    small = Limits(max_meta_depth=3, max_meta_items=40, max_meta_bytes=200)
    depth, items, nbytes = measure(meta, 1)
    fits = depth <= small.max_meta_depth and items <= small.max_meta_items and nbytes <= small.max_meta_bytes
    try:
        assert check_meta(meta, small) is meta
        accepted = True
    except ProtocolError:
        accepted = False
    assert accepted == fits, (depth, items, nbytes)


def test_the_publisher_refuses_what_the_daemon_would(tcp_endpoint: str) -> None:
    with pytest.raises(ValueError, match="max_meta_depth"):
        EmbeddingPublisher(tcp_endpoint, run="r", meta=nested(5), enabled=False)
    with pytest.raises(ValueError, match="max_wandb_value_chars"):
        EmbeddingPublisher(tcp_endpoint, run="r", wandb_info={"project": "p" * 300}, enabled=False)
    assert check_wandb_info(None) is None and check_meta(None) == {}


@needs_root
def test_fat_hellos_from_another_user_leave_no_memory_behind(start_daemon, attacker_script: Path,
                                                             tcp_endpoint: str) -> None:
    d = start_daemon("--no-wandb", "--no-console", "--reject-log-interval", "0")
    pid = d.proc.pid
    legit = LegitRun(d, "legit", 3)
    legit.step()
    before, _ = rss(pid)
    out = attack(attacker_script, port_of(tcp_endpoint), "fat-hellos", 8)
    legit.step()  # served after the attack, in order
    after, _ = rss(pid)
    assert out["wire_bytes"] > 60 * MiB  # six of the eight carry ~12 MB each
    # Each hello, had it been kept, holds its ~12 MB maps for the run's lifetime (8 open runs: ~100+ MiB);
    # refused, they cost only the allocator's leftovers of unpacking them (~25 MiB measured).
    assert (after - before) / MiB < 48, f"RSS grew {(after - before) / MiB:.0f} MiB after {out}"
    legit.step()
    legit.finish()
    os.kill(pid, signal.SIGTERM)
    assert d.wait_exit() == 0
    log = d.log()
    for reason in ("max_meta_items", "must be null, a bool, a number or a string", "max_meta_depth",
                   "max_wandb_entries"):
        assert reason in log, reason
    assert not any((d.results_dir / f"fat-{i}").exists() for i in range(8))
    print(f"\n8 fat hellos ({out['wire_bytes'] / MiB:.0f} MiB on the wire): daemon RSS {before / MiB:.0f} -> "
          f"{after / MiB:.0f} MiB")
