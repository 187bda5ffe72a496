"""Worker functions for test_shm_cache.py (importable by spawned workers)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from shmrunner.shm import segment_of

_kept: list[Any] = []


def inode(a: np.ndarray) -> int:
    """The inode of the shared segment ``a`` arrived in (0: it was pickled)."""
    seg = segment_of(a)
    return os.fstat(seg.fd).st_ino if seg is not None else 0


def keep(a: np.ndarray) -> tuple[int, int]:
    """Hold ``a`` after the task ends; (pid, inode of its segment)."""
    _kept.append(a)
    return os.getpid(), inode(a)


def kept_sum() -> float:
    return float(sum(float(a.sum()) for a in _kept))


def unkeep() -> int:
    n = len(_kept)
    _kept.clear()
    return n


def fork_keep(a: np.ndarray, pipe_fd_r: int) -> tuple[int, int]:
    """Fork a child that maps ``a`` until ``pipe_fd_r`` closes; (child pid, inode)."""
    ino = inode(a)
    pid = os.fork()
    if pid == 0:
        try:
            os.read(pipe_fd_r, 1)
            os._exit(0 if float(a[0]) == float(a[-1]) else 3)
        finally:
            os._exit(4)
    return pid, ino


def add_one(a: np.ndarray) -> np.ndarray:
    a += 1
    return a


def row(i: int, n: int = 1000) -> np.ndarray:
    return np.full(n, i, dtype=np.float64)


def bad_shape(i: int) -> np.ndarray:
    return np.zeros(3 if i == 2 else 5)


def fail_on(i: int) -> np.ndarray:
    if i == 3:
        raise KeyError("three")
    return np.full(5, i, dtype=np.float64)


def pair(a: int, b: int) -> np.ndarray:
    return np.array([a, b], dtype=np.int64)


def full(i: int, n: int = 131072) -> np.ndarray:
    """A private 1 MiB result (copied into a segment for the reply)."""
    return np.full(n, i, dtype=np.float64)


def keep_and_return(a: np.ndarray) -> np.ndarray:
    """Hold ``a`` after the task ends, and return it (by handle)."""
    _kept.append(a)
    return a


def block() -> None:
    """Never return (the test kills the worker running it)."""
    import threading

    threading.Event().wait()
