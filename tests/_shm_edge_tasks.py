"""Worker functions for test_shm_edges.py (importable by spawned workers)."""

from __future__ import annotations

import os
import time

import numpy as np


def row(i: int, n: int = 1000) -> np.ndarray:
    return np.full(n, i, dtype=np.float64)


def fail_first_then_straggle(i: int, gate: str) -> float:
    """Item 0 opens ``gate`` and fails; item 1 waits for the gate, then takes
    a while before its result is written into ``out``: a straggler of a map
    that has already failed."""
    if i == 0:
        with open(gate, "w"):
            pass
        raise KeyError("item 0 fails")
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # slow work: the map's failure is known well before it ends
    return float(i)


def full(i: float, n: int = 1 << 17) -> np.ndarray:
    """A 1 MiB result."""
    return np.full(n, float(i))


def total(a: np.ndarray) -> float:
    return float(a.sum())


def pid() -> int:
    return os.getpid()


class Unpicklable:
    """An argument whose pickling fails (as a lock's, or a socket's, does)."""

    def __reduce__(self) -> str:
        raise TypeError("cannot pickle this object")


def add_one_to_each(arrays: list[np.ndarray]) -> int:
    for a in arrays:
        a += 1
    return len(arrays)


def try_write(a: np.ndarray) -> str:
    """Write into ``a``; say whether numpy let it."""
    try:
        a[0] = 99
    except ValueError:
        return "refused"
    return "wrote"
