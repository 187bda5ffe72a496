"""Importable task functions for test_chaining.py (local workers may spawn, and
remote workers import by reference, so they live in a module on the path)."""

from __future__ import annotations

from typing import Any

import numpy as np

import shmrunner


def make(n: int, value: float) -> np.ndarray:
    """A fresh array of ``n`` float64 (returned through shared memory)."""
    return np.full(n, value, dtype=np.float64)


def inc(a: Any) -> Any:
    return a + 1


def poke(a: np.ndarray) -> bool:
    """Write 42 into ``a[0]`` in place; whether ``a`` is a shared array here.
    The caller sees the write only if ``a`` came by handle, not as a copy."""
    a[0] = 42.0
    return shmrunner.is_shared(a)


def total(*arrays: np.ndarray) -> float:
    return float(sum(float(a.sum()) for a in arrays))


def echo(*args: Any, **kwargs: Any) -> Any:
    """The arguments as the task received them."""
    return list(args), kwargs


def fail(message: str) -> None:
    raise ValueError(message)
