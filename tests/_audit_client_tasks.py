"""Task functions for tests/test_audit_client.py (imported by reference in the
daemon's workers: the harness puts this directory on their PYTHONPATH)."""

from __future__ import annotations

import os
import time

import numpy as np


def gated_scale(a: np.ndarray, release: str, limit: float = 60.0) -> np.ndarray:
    """``a * 2`` once ``release`` exists (``limit`` seconds at most)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return a * 2
