"""A trainer whose /dev/shm is full, for tests/test_shm_fallback.py (run inside its own mount namespace).

    python tests/shm_full_publisher.py ENDPOINT RUN RESULTS_FILE cpu|cuda N

Publishes N snapshots, each after the daemon wrote the previous one's result, and prints one JSON line
with the publisher's counters. `cuda` takes the CUDA path without a GPU: a copy event (here a CPU
stand-in) makes the publish stage the copy in a pinned-style buffer and the sender thread move it into
shared memory, exactly as after a device-to-host DMA.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer_hook import EmbeddingPublisher  # noqa: E402


class CpuEvent:
    """Stands in for torch.cuda.Event: the copy is synchronous on CPU, so it has landed already."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def main() -> int:
    endpoint, run, results, path, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    pub = EmbeddingPublisher(endpoint, run=run, _event_factory=CpuEvent if path == "cuda" else None)
    assert pub.wait_connected(30), "no daemon"
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(100, 64, generator=g)  # 25.6 kB: more than the 16 kB tmpfs at /dev/shm holds
    for i in range(n):
        weight = weight + 0.05 * torch.randn(100, 64, generator=g)
        dropped = pub.dropped
        pub.publish(weight, 10 * (i + 1))
        deadline = time.monotonic() + 60  # until its result is written, or it is counted as dropped
        while (not results.exists() or results.read_text().count("\n") < i + 1) and pub.dropped == dropped \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    shm = pub._sender.shm_enabled  # noqa: SLF001 - the test checks the fallback switched it off
    pub.close()
    print(json.dumps({"published": pub.published, "dropped": pub.dropped, "shm_enabled_at_end": shm}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
