"""The Scheduler's futures behave as concurrent.futures.Future does.

``LightFuture`` (the base of every future ``Scheduler.submit`` returns) makes
its Condition only when a thread waits; each scenario here runs on a plain
``Future`` and on a ``LightFuture`` and must come out the same, including
``concurrent.futures.wait``/``as_completed`` and asyncio, which read the
future's private ``_condition`` and ``_waiters``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from shmrunner import Scheduler
from shmrunner._lightfuture import LightFuture

pytestmark = pytest.mark.timeout(60)

KINDS: list[Callable[[], cf.Future[Any]]] = [cf.Future, LightFuture]


def later(seconds: float, action: Callable[[], object]) -> threading.Thread:
    """Run ``action`` on another thread once ``seconds`` passed (a timer, not a sync)."""
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


@pytest.fixture(params=KINDS, ids=["Future", "LightFuture"])
def make(request: pytest.FixtureRequest) -> Callable[[], cf.Future[Any]]:
    return request.param  # type: ignore[no-any-return]


def test_result_waits_for_a_result_set_on_another_thread(make: Any) -> None:
    future = make()
    assert future.set_running_or_notify_cancel()
    assert future.running() and not future.done()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.01)
    later(0.05, lambda: future.set_result(42))
    assert future.result(timeout=10) == 42
    assert future.done() and not future.running() and not future.cancelled()
    assert future.exception() is None


def test_an_exception_set_on_another_thread_is_raised_to_the_waiter(make: Any) -> None:
    future = make()
    future.set_running_or_notify_cancel()
    later(0.05, lambda: future.set_exception(KeyError("gone")))
    with pytest.raises(KeyError, match="gone"):
        future.result(timeout=10)
    assert isinstance(future.exception(), KeyError)


def test_cancel_only_before_it_runs(make: Any) -> None:
    queued, running = make(), make()
    assert queued.cancel() and queued.cancel()  # cancelling twice is still True
    assert queued.cancelled() and queued.done()
    assert not queued.set_running_or_notify_cancel()  # the executor skips it
    with pytest.raises(cf.CancelledError):
        queued.result(timeout=1)
    with pytest.raises(cf.CancelledError):
        queued.exception(timeout=1)
    with pytest.raises(cf.InvalidStateError):
        queued.set_result(1)
    assert running.set_running_or_notify_cancel()
    assert not running.cancel() and not running.cancelled()
    running.set_result(1)
    assert not running.cancel()


def test_settling_twice_is_refused(make: Any) -> None:
    future = make()
    future.set_result(1)
    with pytest.raises(cf.InvalidStateError):
        future.set_result(2)
    with pytest.raises(cf.InvalidStateError):
        future.set_exception(ValueError())
    assert future.result() == 1
    with pytest.raises(RuntimeError, match="unexpected state"):
        future.set_running_or_notify_cancel()


def test_callbacks_run_once_in_order_and_a_failing_one_is_logged(
        make: Any, caplog: pytest.LogCaptureFixture) -> None:
    future = make()
    seen: list[tuple[str, Any]] = []

    def broken(_: Any) -> None:
        raise ValueError("callback bug")

    future.add_done_callback(lambda f: seen.append(("first", f)))
    future.add_done_callback(broken)
    future.add_done_callback(lambda f: seen.append(("second", f)))
    assert seen == []
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.set_result("x")
        future.add_done_callback(lambda f: seen.append(("after", f)))  # runs at once
        future.add_done_callback(broken)
    assert seen == [("first", future), ("second", future), ("after", future)]
    assert [r.exc_info[1].args for r in caplog.records if r.exc_info] == [("callback bug",)] * 2
    cancelled = make()
    cancelled.add_done_callback(lambda f: seen.append(("cancelled", f.cancelled())))
    cancelled.cancel()
    assert seen[-1] == ("cancelled", True)


def test_wait_and_as_completed_see_futures_settled_on_other_threads(make: Any) -> None:
    slow, fast, never = make(), make(), make()
    for future in (slow, fast, never):
        future.set_running_or_notify_cancel()
    later(0.05, lambda: fast.set_exception(ValueError("fast")))
    done, pending = cf.wait([slow, fast, never], timeout=10,
                            return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and pending == {slow, never}
    done, pending = cf.wait([slow, never], timeout=0.05)  # nothing settles: times out
    assert done == set() and pending == {slow, never}
    order = []
    later(0.05, lambda: slow.set_result("slow"))
    with pytest.raises(cf.TimeoutError):
        for future in cf.as_completed([slow, fast, never], timeout=2):
            order.append(future)
    assert order == [fast, slow]
    done, pending = cf.wait([slow, fast], timeout=10)  # ALL_COMPLETED, already
    assert pending == set()


def test_wait_wakes_for_a_cancelled_future_the_executor_skips(make: Any) -> None:
    future = make()
    future.cancel()
    # wait() counts a cancelled future done once its executor has seen the
    # cancel (set_running_or_notify_cancel), which wakes a waiting wait().
    skipped: list[bool] = []
    later(0.05, lambda: skipped.append(future.set_running_or_notify_cancel()))
    done, _ = cf.wait([future], timeout=10, return_when=cf.FIRST_COMPLETED)
    assert done == {future} and skipped == [False]


def test_asyncio_can_await_it(make: Any) -> None:
    future = make()

    async def main() -> Any:
        asyncio.get_running_loop().call_later(0.05, future.set_result, "awaited")
        return await asyncio.wrap_future(future)

    assert asyncio.run(main()) == "awaited"


def test_many_threads_waiting_on_one_future_all_wake(make: Any) -> None:
    future = make()
    barrier = threading.Barrier(9)
    results: list[Any] = []

    def waiter() -> None:
        barrier.wait()
        results.append(future.result())  # no timeout: only the notify can end it

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    barrier.wait()
    later(0.2, lambda: future.set_result("all"))  # most likely all wait by then
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "a waiter was never woken"
    assert results == ["all"] * 8


def test_waiters_blocked_in_result_and_exception_wake_on_cancel(make: Any) -> None:
    future = make()
    outcomes: list[str] = []
    ready = threading.Barrier(3)

    def wait(call: Callable[[], Any]) -> None:
        ready.wait()
        try:
            call()
        except cf.CancelledError:
            outcomes.append("cancelled")

    threads = [threading.Thread(target=wait, args=(call,), daemon=True)
               for call in (future.result, future.exception)]
    for thread in threads:
        thread.start()
    ready.wait()
    later(0.1, future.cancel)  # no timeout in the waits: only the cancel ends them
    for thread in threads:
        thread.join(10)
    assert outcomes == ["cancelled", "cancelled"]


def test_a_waiter_that_timed_out_does_not_stop_a_later_one(make: Any) -> None:
    future = make()
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.01)
    later(0.05, lambda: future.set_exception(ValueError("late")))
    assert isinstance(future.exception(timeout=10), ValueError)
    with pytest.raises(ValueError, match="late"):
        future.result(timeout=0)


def test_a_scheduler_future_is_a_light_one_and_waits_like_any() -> None:
    with Scheduler(local_workers=1) as sched:
        futures = [sched.submit(pow, 2, n) for n in range(20)]
        assert all(isinstance(f, LightFuture) for f in futures)
        done, pending = cf.wait(futures, timeout=30)
        assert pending == set() and sorted(f.result() for f in done) == [
            2 ** n for n in range(20)]
        assert sorted(f.result() for f in cf.as_completed(
            [sched.submit(pow, 3, n) for n in range(5)], timeout=30)) == [1, 3, 9, 27, 81]
