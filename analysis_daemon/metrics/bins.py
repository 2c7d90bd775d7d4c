"""The cosine histogram's bins, shared by the exact pass (geometry.py) and the sampled one (sampled.py)."""
from __future__ import annotations

from typing import Final

HIST_BINS: Final = 100
HIST_RANGE: Final = (-0.5, 1.0)
