"""The three stages of bench_chain.py's chain (a module of its own so every
worker process, agent, Dask and Ray worker imports them by reference)."""

from __future__ import annotations

from typing import Any

import numpy as np

N = 8_388_608  # float64 elements in 64 MiB


def make(i: int) -> np.ndarray:
    """Stage 1: a fresh 64 MiB array."""
    return np.full(N, i, dtype=np.float64)


def plus_one(a: Any) -> Any:
    """Stage 2: a new 64 MiB array (the input is left alone: Ray's is read-only)."""
    return a + 1


def total(a: Any) -> float:
    """Stage 3: a number."""
    return float(a.sum())


def make_shared(i: int) -> Any:
    """Stage 1, writing its output straight into shared memory: returned by handle."""
    import shmrunner

    a = shmrunner.empty(N, dtype=np.float64)
    a.fill(i)
    return a


def plus_one_shared(a: Any) -> Any:
    """Stage 2 into a fresh shared array: no copy on the way back either."""
    import shmrunner

    out = shmrunner.empty(a.shape, dtype=a.dtype)
    np.add(a, 1, out=out)
    return out
