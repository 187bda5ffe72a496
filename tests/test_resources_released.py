"""Resources given back when the user lets go: dropped results with the cache
off, an imap left by a task's error. Found by the randomized stress harness
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


def _join_within(pool: shmrunner.Pool, seconds: float) -> bool:
    """close() + join() in a thread; whether join returned in time (else the
    workers are killed so that the test ends)."""
    import threading

    pool.close()
    joiner = threading.Thread(target=pool.join, daemon=True)
    joiner.start()
    joiner.join(seconds)
    if joiner.is_alive():
        pool.terminate()
        return False
    return True


@pytest.mark.parametrize("chunksize", [1, 3])
@pytest.mark.parametrize("bad", [-1, -2], ids=["raises", "dies"])
def test_imap_buffersize_left_by_a_task_error_lets_join_end(chunksize: int, bad: int) -> None:
    """README: drop an imap(buffersize=N) iterator and "reading stops once the
    tasks in flight are done, so close() + join() end". Leaving the loop by the
    exception a task raised (or WorkerLostError) is the commonest way to drop
    it; the raise must not keep the iterator alive in a reference cycle that
    only the garbage collector breaks, else join() waits for the feeder forever."""
    gc.disable()  # the cycle collector must not be what ends the feeder
    try:
        pool = shmrunner.Pool(2)
        results = pool.imap(st.sq_or, [1, bad, *range(50)], chunksize, buffersize=2)
        with pytest.raises((ValueError, shmrunner.WorkerLostError)):
            for _ in results:
                pass
        del results
        assert _join_within(pool, 15), "close() + join() hung on the abandoned imap's feeder"
    finally:
        gc.enable()


def test_imap_error_kept_by_caller_does_not_pin_the_iterator() -> None:
    """As concurrent.futures does (``self = None`` after raising), an exception
    the caller keeps (logged, stored) must not keep the imap iterator, and so
    its feeder, alive through its traceback."""
    gc.disable()
    try:
        pool = shmrunner.Pool(2)
        results = pool.imap(st.sq_or, [1, -1, *range(50)], buffersize=2)
        kept = []
        try:
            for _ in results:
                pass
        except ValueError as exc:
            kept.append(exc)
        del results
        assert _join_within(pool, 15), "the kept exception pins the abandoned imap"
        assert kept
    finally:
        gc.enable()
