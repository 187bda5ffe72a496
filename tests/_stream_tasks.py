"""Task functions for test_streams.py (importable by spawned and remote workers)."""

from __future__ import annotations

import time

import numpy as np


def slow_checksum(arr: np.ndarray, seconds: float) -> float:
    """A consumer slower than its producer: without backpressure, the input
    would pile up in the caller."""
    time.sleep(seconds)
    return float(arr.sum(dtype=np.float64))
