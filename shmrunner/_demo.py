"""``shmrunner demo``: the same map over large arrays with shmrunner.Pool and
multiprocessing.Pool, timed side by side."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .pool import Pool


def normalise(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The demo's task: a new array the size of its input (so arrays go both ways)."""
    out: np.ndarray[Any, Any] = (a - a.mean()) / (a.std() + 1e-12)
    return out


def _timed(make_pool: Callable[[int], Any], processes: int,
           arrays: list[np.ndarray[Any, Any]]) -> tuple[float, list[float]]:
    with make_pool(processes) as pool:
        pool.apply(abs, (0,))  # workers up before timing
        start = time.perf_counter()
        results = pool.map(normalise, arrays, chunksize=1)
        checks = [float(r[0]) for r in results]
        elapsed = time.perf_counter() - start
        del results
    return elapsed, checks


def run_demo(arrays: int, mib: int, processes: int | None) -> int:
    processes = processes or os.cpu_count() or 1
    n = mib * (1 << 20) // 8
    print(f"mapping normalise() over {arrays} arrays of {mib} MiB with {processes} processes")
    rng = np.random.default_rng(0)
    data = [rng.random(n) for _ in range(arrays)]
    shm_time, shm_checks = _timed(Pool, processes, data)
    print(f"  shmrunner.Pool        {shm_time:8.3f} s")
    mp_time, mp_checks = _timed(multiprocessing.Pool, processes, data)
    print(f"  multiprocessing.Pool  {mp_time:8.3f} s")
    if not np.allclose(shm_checks, mp_checks):
        print("  results differ between the two pools!")
        return 1
    print(f"  same results; shmrunner.Pool is {mp_time / shm_time:.1f}x faster")
    return 0
