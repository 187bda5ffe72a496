"""The Pool's ``callback`` and ``error_callback`` run on a thread of their own,
as under ``multiprocessing`` (its result-handler thread): one at a time, in
the order the results arrive, before the result's waiters wake; ``join()``
and ``terminate()`` return once the callbacks due have run, also when called
from a callback; the thread ends with its pool.

(That a slow callback no longer leaves the workers idle is
``test_pool_corners.py::test_a_slow_callback_does_not_leave_the_workers_idle``.)
"""

from __future__ import annotations

import gc
import multiprocessing
import threading

import pytest

import shmrunner
from _util import running_pool, wait_until

pytestmark = pytest.mark.timeout(60)

RESULT_TIMEOUT = 20
FORK = multiprocessing.get_context("fork")
THREAD_NAME = "shmrunner-pool-callbacks"


def square(x: int) -> int:
    return x * x


def fail(x: int) -> int:
    raise ValueError(x)


def callback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_callbacks_run_one_at_a_time_in_the_order_results_arrive() -> None:
    seen: list[int] = []
    running = 0
    most = 0
    lock = threading.Lock()

    def on_value(value: int) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        seen.append(value)
        with lock:
            running -= 1

    # One worker: results arrive in the order the tasks were submitted.
    with running_pool(1, context=FORK) as pool:
        results = [pool.apply_async(square, (i,), callback=on_value) for i in range(200)]
        errors = [pool.apply_async(fail, (i,), error_callback=lambda e: on_value(-e.args[0]))
                  for i in range(1, 4)]
        for result in results:
            result.get(timeout=RESULT_TIMEOUT)
        for error in errors:
            with pytest.raises(ValueError):
                error.get(timeout=RESULT_TIMEOUT)
    assert seen == [i * i for i in range(200)] + [-1, -2, -3]
    assert most == 1


def test_join_returns_once_the_callbacks_due_have_run() -> None:
    release = threading.Event()
    seen: list[int] = []

    def on_value(value: int) -> None:
        release.wait(RESULT_TIMEOUT)
        seen.append(value)

    before = callback_threads()
    pool = shmrunner.Pool(2, context=FORK)
    try:
        results = [pool.apply_async(square, (i,), callback=on_value) for i in range(6)]
        [ours] = set(callback_threads()) - set(before)
        pool.map_async(square, range(3), callback=lambda values: seen.append(sum(values)))
        pool.close()
        joined = threading.Event()
        joiner = threading.Thread(target=lambda: (pool.join(), joined.set()))
        joiner.start()
        assert not joined.wait(0.3)  # the first callback holds the rest
        release.set()
        assert joined.wait(RESULT_TIMEOUT)
        joiner.join()
        assert sorted(seen) == sorted([i * i for i in range(6)] + [5])
        assert all(r.ready() for r in results)
        assert not ours.is_alive()
    finally:
        release.set()
        pool.terminate()


@pytest.mark.parametrize("how", ["terminate", "close+join"])
def test_a_callback_may_stop_its_pool(how: str) -> None:
    """multiprocessing lets a callback call terminate(); here join() too: the
    callback thread does not wait for itself."""
    stopped = threading.Event()
    pool = shmrunner.Pool(2, context=FORK)

    def stop(_: object) -> None:
        if how == "terminate":
            pool.terminate()
        else:
            pool.close()
            pool.join()
        stopped.set()

    before = callback_threads()
    try:
        result = pool.apply_async(square, (3,), callback=stop)
        [ours] = set(callback_threads()) - set(before)
        assert stopped.wait(RESULT_TIMEOUT)
        assert result.get(timeout=RESULT_TIMEOUT) == 9
        pool.join()
        wait_until(lambda: not ours.is_alive(), RESULT_TIMEOUT,
                   message="the callback thread to end")
    finally:
        pool.terminate()


def test_a_callback_may_run_more_tasks_on_its_pool() -> None:
    """apply() from a callback: the callback thread waits for that result while
    the pool goes on serving (it would have waited on the thread that reads
    the results, had the callback run there)."""
    got: list[int] = []
    done = threading.Event()

    def chain(value: int) -> None:
        got.append(pool.apply(square, (value,)))
        got.extend(pool.map(square, [value, value + 1]))
        done.set()

    with running_pool(2, context=FORK) as pool:
        pool.apply_async(square, (2,), callback=chain)
        assert done.wait(RESULT_TIMEOUT)
    assert got == [16, 16, 25]


def test_the_callback_thread_ends_with_a_pool_that_is_dropped() -> None:
    before = callback_threads()
    pool = shmrunner.Pool(1, context=FORK)
    assert pool.apply_async(square, (2,), callback=lambda _: None).get(RESULT_TIMEOUT) == 4
    [ours] = set(callback_threads()) - set(before)
    with pytest.warns(ResourceWarning):
        del pool
        gc.collect()
    wait_until(lambda: not ours.is_alive(), RESULT_TIMEOUT,
               message="the callback thread of a dropped pool to end")


def test_a_pool_without_callbacks_starts_no_callback_thread() -> None:
    before = callback_threads()
    with running_pool(2, context=FORK) as pool:
        pool.apply_async(square, (2,)).get(RESULT_TIMEOUT)
        pool.map_async(square, range(4)).get(RESULT_TIMEOUT)
        assert callback_threads() == before
