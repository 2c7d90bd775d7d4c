"""The one naming scheme for trainer metrics, shared by the live callbacks, train.py and replay.

Names follow the Hugging Face Trainer's W&B integration, the names most users already see:
`train/loss`, `train/learning_rate`, `train/grad_norm`, and `eval/<name>` for what an evaluation
measured (`eval/loss`, `eval/accuracy`, ...). A live run and its replay from checkpoints therefore
carry the same names, and a report can lay one beside the other (docs/training-metrics.md).
"""
from __future__ import annotations

import math
from typing import Any, Final, Mapping

TRAIN_LOSS: Final = "train/loss"
EVAL_LOSS: Final = "eval/loss"
LEARNING_RATE: Final = "train/learning_rate"
GRAD_NORM: Final = "train/grad_norm"

# Keys of a Hugging Face log entry (TrainerState.log_history, TrainerCallback.on_log) that are training metrics.
HF_TRAIN_KEYS: Final = {"loss": TRAIN_LOSS, "learning_rate": LEARNING_RATE, "grad_norm": GRAD_NORM}
# eval_* keys that time the evaluation instead of measuring the model.
_EVAL_TIMINGS: Final = ("_runtime", "_per_second")


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None  # NaN/inf: the wire refuses them (protocol.check_metrics)


def hf_log_metrics(entry: Mapping[str, Any]) -> dict[str, float | int]:
    """The model metrics of one Hugging Face log entry under the shared names (timings, epoch, step left out)."""
    out: dict[str, float | int] = {}
    for key, value in entry.items():
        if not isinstance(key, str):
            continue
        if key in HF_TRAIN_KEYS:
            name = HF_TRAIN_KEYS[key]
        elif key.startswith("eval_") and len(key) > 5 and not key.endswith(_EVAL_TIMINGS):
            name = "eval/" + key[5:]
        else:
            continue
        number = _number(value)
        if number is not None:
            out[name] = number
    return out
