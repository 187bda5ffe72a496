"""Defects found by the randomized concurrency stress harness
(tests/stress_harness.py), each reduced to a deterministic reproduction."""

from __future__ import annotations

import gc
import os

import _stress_tasks as st
import pytest

import shmrunner
from _util import shm_segments

pytestmark = pytest.mark.timeout(60)


def _memfd_bytes() -> tuple[int, int]:
    """(count, bytes) of the shmrunner memfds this process holds an fd of."""
    count = size = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:shmrunner"):
                count += 1
                size += os.fstat(int(fd)).st_size
        except OSError:
            continue
    return count, size


def test_dropped_results_give_pages_back_with_cache_disabled() -> None:
    """set_shm_cache(0) "disables the cache": array results the program drops
    must give their pages back then, not wait in the cache's intake queue for
    the next shared-memory allocation (none may ever come: the pool is closed)."""
    shmrunner.set_shm_cache(0)
    try:
        with shmrunner.Pool(2) as pool:
            results = pool.starmap(st.amake, [(1 << 17, i) for i in range(8)])  # 1 MiB each
            pool.close()
            pool.join()
        assert [r[0] for r in results] == [float(i) for i in range(8)]
        del results
        gc.collect()
        # No shmrunner call in between: that would take the queue in and hide it.
        assert _memfd_bytes() == (0, 0), shm_segments()
    finally:
        shmrunner.set_shm_cache(None)
