"""Edges of lazy streams, chained futures and the Executor contract: each
test pins a defect an audit found, now fixed."""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import _chain_tasks as ct
import _sched_tasks as tasks
import shmrunner
from _sched_tasks import Gates
from _util import wait_until
from shmrunner import DependencyError, Pool, Scheduler

RESULT = 30  # seconds: a healthy result arrives in well under one
DEEP = 400  # links: deeper than the recursion limit allows frames per link


def _broken_input(n: int, bad: int) -> Iterator[int]:
    for i in range(n):
        if i == bad:
            raise ValueError(f"input broke at {i}")
        yield i


@pytest.mark.parametrize("method", ["map", "imap_unordered"])
def test_an_input_error_comes_after_the_results_of_the_items_read_before_it(
        sched: Scheduler, method: str) -> None:
    """As multiprocessing's imap: every item read before the input raised is
    computed and yielded, then the input's exception. The stream used to raise
    as soon as it read past the window, dropping (and cancelling) the tasks of
    items 5..9 that had been read and submitted."""
    got = []
    results = getattr(sched, method)(tasks.square, _broken_input(20, 10), buffersize=5,
                                     timeout=RESULT)
    with pytest.raises(ValueError, match="input broke at 10"):
        for value in results:
            got.append(value)
    assert sorted(got) == [i * i for i in range(10)]


def _chain(sched: Scheduler, head: concurrent.futures.Future[object],
           links: int) -> list[concurrent.futures.Future[object]]:
    futures = [head]
    for _ in range(links):
        futures.append(sched.submit(ct.inc, futures[-1]))
    return futures


def test_a_failure_at_the_head_of_a_deep_chain_fails_every_link(sched: Scheduler) -> None:
    """Each link's failure used to settle the next one from inside its own
    done-callback: a few hundred links deep, RecursionError (logged) left the
    rest of the chain pending forever, and shutdown() waited for them."""
    futures = _chain(sched, sched.submit(ct.fail, "stage one broke"), DEEP)
    _, not_done = concurrent.futures.wait(futures, timeout=RESULT)
    assert not not_done, f"{len(not_done)} of {len(futures)} links never settled"
    error = futures[-1].exception()
    assert isinstance(error, DependencyError)
    assert sched.status()["waiting_on_futures"] == 0


def test_a_dependency_error_names_the_root_cause_in_a_bounded_message(
        sched: Scheduler) -> None:
    """Each link's message used to embed the whole message of the link before
    it: quadratic in the chain's depth (tens of MB a thousand links down)."""
    futures = _chain(sched, sched.submit(ct.fail, "stage one broke"), 50)
    _, not_done = concurrent.futures.wait(futures, timeout=RESULT)
    assert not not_done
    last = futures[-1].exception()
    assert isinstance(last, DependencyError)
    assert "ValueError: stage one broke" in str(last)
    assert len(str(last)) < 500


def _hold_workers(sched: Scheduler, gates: Gates) -> None:
    """Hold both workers (and what the local tier sends ahead) with gated
    tasks, so the next submits stay queued."""
    started = []
    for i in range(6):
        s, g = gates.new()
        sched.submit(tasks.gated, s, g, i)
        started.append(s)
    Gates.started(started[0])


def test_cancelling_the_head_of_a_deep_chain_cancels_every_link(
        sched: Scheduler, gates: Gates) -> None:
    _hold_workers(sched, gates)
    head = sched.submit(ct.inc, 1)
    futures = _chain(sched, head, DEEP)
    assert head.cancel(), "the head should still be queued"
    assert all(f.cancelled() for f in futures), (
        f"{sum(not f.cancelled() for f in futures)} links were not cancelled")
    assert sched.status()["waiting_on_futures"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 3])
def test_pool_close_and_join_return_after_an_abandoned_imap_with_buffersize(
        chunksize: int) -> None:
    """Breaking out of an imap(buffersize=N) loop and dropping the iterator
    left its feeder waiting forever for the consumer to take a result, and
    join() waits for feeders: close(); join() hung."""
    pool = Pool(2)
    try:
        results = pool.imap(tasks.square, itertools.count(), chunksize=chunksize, buffersize=3)
        for i, _ in enumerate(results):
            if i == 5:
                break
        del results
        gc.collect()
        pool.close()
        joiner = threading.Thread(target=pool.join, daemon=True)
        joiner.start()
        wait_until(lambda: not joiner.is_alive(), 10, message="pool.join() to return")
    finally:
        pool.terminate()


def test_shutdown_from_a_done_callback_does_not_deadlock_the_scheduler(gates: Gates) -> None:
    """A done-callback runs on the thread that settles futures (a tier's):
    shutdown() (wait=True) there waited for the other running tasks, whose
    results that very thread delivers, so nothing ever settled again, and a
    later shutdown() from the caller hung too. concurrent.futures' executors
    do not hang there (joining the current thread raises, and is logged)."""
    s = Scheduler(local_workers=2)
    started, gate = gates.new()
    try:
        other = s.submit(tasks.gated, started, gate, "other")
        Gates.started(started)
        failing = s.submit(tasks.raise_value_error, "stop everything")
        failing.add_done_callback(lambda _: s.shutdown())
        concurrent.futures.wait([failing], timeout=RESULT)
        gates.open(gate)
        assert other.result(RESULT) == "other"
    finally:
        gates.open_all()
        closer = threading.Thread(target=s.shutdown, daemon=True)
        closer.start()
        wait_until(lambda: not closer.is_alive(), RESULT, message="shutdown() to return")


def test_pool_map_reports_progress_with_out_too() -> None:
    """map(progress=..., out=...) returned the filled array but never called
    progress: the out= path ignored it."""
    seen: list[tuple[int, int | None]] = []
    with Pool(2) as pool:
        out = shmrunner.empty((8,))
        assert pool.map(tasks.square, range(8), chunksize=2, out=out,
                        progress=lambda done, total: seen.append((done, total))) is out
        assert list(out) == [i * i for i in range(8)]
    assert seen == [(2, 8), (4, 8), (6, 8), (8, 8)]


def test_wait_and_as_completed_see_a_dependent_cancelled_with_its_dependency(
        sched: Scheduler, gates: Gates) -> None:
    """A task waiting for a future is never queued; cancelled (by its
    dependency's cancel, or the caller's), it stayed CANCELLED without being
    told to concurrent.futures.wait() and as_completed(), which waited for it
    until their timeout (forever without one)."""
    _hold_workers(sched, gates)
    head = sched.submit(ct.inc, 1)
    child = sched.submit(ct.inc, head)
    other = sched.submit(ct.inc, sched.submit(tasks.gated, *gates.new(), 0))
    assert head.cancel() and child.cancelled()
    assert other.cancel()
    done, _ = concurrent.futures.wait([child, other], timeout=RESULT)
    assert done == {child, other}
    assert set(concurrent.futures.as_completed([child, other], timeout=RESULT)) == {child, other}


def test_wait_sees_queued_tasks_cancelled_by_shutdown(gates: Gates) -> None:
    s = Scheduler(local_workers=1)
    try:
        started, gate = gates.new()
        s.submit(tasks.gated, started, gate, 0)
        Gates.started(started)
        queued = [s.submit(tasks.square, i) for i in range(4)]
        s.shutdown(wait=False, cancel_futures=True)
        cancelled = [f for f in queued if f.cancelled()]
        assert cancelled
        done, _ = concurrent.futures.wait(cancelled, timeout=RESULT)
        assert done == set(cancelled)
    finally:
        gates.open_all()
        s.shutdown()


def test_wait_sees_a_client_future_cancelled_before_the_daemon_accepted_it(
        daemons: Any) -> None:
    """JobFuture.cancel() withdraws the job, so no "accepted" ever told the
    future's waiters: wait() and as_completed() ran to their timeout."""
    client = daemons().start().client()
    futures = [client.submit(tasks.square, i) for i in range(20)]
    cancelled = [f for f in futures if f.cancel()]  # at once: before the daemon's answer
    if not cancelled:
        pytest.skip("the daemon accepted every job before the cancels")
    done, _ = concurrent.futures.wait(cancelled, timeout=10)
    assert done == set(cancelled)


def test_a_future_where_futures_are_not_resolved_fails_with_a_clear_error(
        sched: Scheduler) -> None:
    """It failed the task with "cannot pickle '_thread.RLock' object"."""
    dep = sched.submit(ct.inc, 1)
    deep: Any = dep
    for _ in range(20):  # deeper than the levels searched
        deep = [deep]
    for arg in ({dep: 1}, deep):
        with pytest.raises(TypeError, match="as arguments or inside lists"):
            sched.submit(ct.echo, arg).result(RESULT)


@pytest.mark.timeout(60)
def test_shutdown_from_on_task_log_does_not_deadlock_the_scheduler() -> None:
    """on_task_log runs on the thread that delivers results, as done-callbacks
    do: a shutdown() (wait=True) there must not wait for that very thread."""
    holder: dict[str, Scheduler] = {}

    def on_log(future: Any, records: Any, worker: str, host: str) -> None:
        holder["sched"].shutdown()

    sched = holder["sched"] = Scheduler(local_workers=1, on_task_log=on_log)
    try:
        future = sched.submit(print, "a line")  # its log comes just before its result
        assert future.result(timeout=30) is None
    finally:
        sched.shutdown()
