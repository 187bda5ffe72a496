"""Scheduler, local tier: a ``concurrent.futures.Executor`` over shared-memory
worker processes (``Scheduler(local_workers=2)``), with per-task retries and
timeouts, cancellation, shutdown and backpressure.

Real processes, real signals. Synchronisation is by handshake only: a task
reports in a file when it starts, a gated task waits for a gate file the test
creates, and the test polls with ``_util.wait_until``. Task functions live in
``_sched_tasks`` so workers can import them under any start method.

Some of these tests found bugs, since fixed; they stay as regression tests.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import sys
import threading
import time
from multiprocessing.pool import RemoteTraceback
from pathlib import Path

import numpy as np
import pytest

import _sched_tasks as tasks
import shmrunner
from _sched_tasks import Gates
from _util import is_alive, wait_until
from shmrunner import Scheduler, TaskTimeoutError, WorkerLostError

RESULT = 30  # seconds: a healthy result arrives in well under one
# Seconds a call that must return "soon" may take on a loaded machine: far less
# than the 60 s a stuck task would hold it (a gated task, a task sleeping 60 s).
PROMPT = 10
MiB = 1 << 20





def fill_workers(sched: Scheduler, gates: Gates,
                 n: int = 6) -> list[tuple[concurrent.futures.Future[object], str]]:
    """Submit ``n`` gated tasks: more than two workers hold (each takes at most
    two), so the scheduler's own queue has work behind them. Returns
    (future, gate) pairs; waits until both workers are running one."""
    held = []
    started = []
    for i in range(n):
        s, g = gates.new()
        held.append((sched.submit(tasks.gated, s, g, i), g))
        started.append(s)
    wait_until(lambda: sum(os.path.exists(s) for s in started) >= 2, RESULT,
               message="both workers to run a gated task")
    return held


# --- the Executor -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_is_an_executor_submit_and_result(sched: Scheduler) -> None:
    assert isinstance(sched, concurrent.futures.Executor)
    fut = sched.submit(tasks.add, 2, 3)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(RESULT) == 5
    assert sched.submit(tasks.add, "a", b="b").result(RESULT) == "ab"
    futures = [sched.submit(tasks.square, i) for i in range(50)]
    assert [f.result(RESULT) for f in futures] == [i * i for i in range(50)]
    # Work really runs in worker processes.
    assert sched.submit(tasks.where).result(RESULT)["pid"] != os.getpid()


@pytest.mark.timeout(30)
def test_context_manager_shuts_down() -> None:
    with Scheduler(local_workers=2) as s:
        fut = s.submit(tasks.square, 7)
    assert fut.done() and fut.result() == 49
    with pytest.raises(RuntimeError):
        s.submit(tasks.square, 1)


@pytest.mark.timeout(30)
def test_map_results_in_order_and_chunksize(sched: Scheduler) -> None:
    assert list(sched.map(tasks.square, range(20))) == [i * i for i in range(20)]
    assert list(sched.map(tasks.add, range(5), range(10, 15))) == [10, 12, 14, 16, 18]
    assert list(sched.map(tasks.square, [])) == []
    first = sched.status()["submitted"]
    got = list(sched.map(tasks.square, range(100), chunksize=7))
    assert got == [i * i for i in range(100)]
    # 100 items in chunks of 7 travel as ceil(100 / 7) tasks.
    assert sched.status()["submitted"] - first == math.ceil(100 / 7)
    assert list(sched.map(tasks.add, range(10), range(10), chunksize=3)) == \
        [2 * i for i in range(10)]
    with pytest.raises(ValueError):
        sched.map(tasks.square, range(3), chunksize=0)


@pytest.mark.timeout(30)
def test_map_timeout_raises_timeout_error(sched: Scheduler, gates: Gates) -> None:
    s, g = gates.new()
    results = sched.map(tasks.gated, [s], [g], timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - t0 < 0.5 + PROMPT
    gates.open(g)
    # The pool keeps working after the caller gave up.
    assert sched.submit(tasks.square, 3).result(RESULT) == 9


@pytest.mark.timeout(30)
@pytest.mark.timeout(60)
def test_a_reference_that_does_not_resolve_fails_only_its_own_task(
        sched: Scheduler, gates: Gates) -> None:
    # Queued behind busy workers, good and bad references are placed together
    # once room comes: each bad one fails alone, and the rest still run (no
    # result is on its way to place them otherwise).
    held = fill_workers(sched, gates)
    mixed = [sched.submit("_sched_tasks:square" if i % 2 else "no_such_module:fn", i)
             for i in range(20)]
    for _, gate in held:
        gates.open(gate)
    for i, future in enumerate(mixed):
        if i % 2:
            assert future.result(RESULT) == i * i
        else:
            with pytest.raises(ImportError, match="no_such_module"):
                future.result(RESULT)
    assert sched.submit(tasks.square, 3).result(RESULT) == 9


def test_task_exception_comes_back_as_itself(sched: Scheduler) -> None:
    fut = sched.submit(tasks.raise_value_error, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        fut.result(RESULT)
    assert type(info.value) is ValueError
    assert info.value.args == ("boom",)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in str(cause)
    # The exception does not break the pool; map re-raises it too.
    assert sched.submit(tasks.square, 4).result(RESULT) == 16
    with pytest.raises(ValueError, match="in map"):
        list(sched.map(tasks.raise_value_error, ["in map"]))


@pytest.mark.timeout(30)
def test_arrays_in_and_out(sched: Scheduler) -> None:
    a = np.random.default_rng(1).random(2 * MiB // 8)  # above the shm threshold
    np.testing.assert_array_equal(sched.submit(tasks.double, a).result(RESULT), a * 2)
    small = np.arange(10, dtype=np.int32)
    np.testing.assert_array_equal(sched.submit(tasks.double, small).result(RESULT), small * 2)
    out = sched.submit(tasks.arange, 3 * MiB // 8).result(RESULT)
    np.testing.assert_array_equal(out, np.arange(3 * MiB // 8, dtype=np.float64))
    # Value semantics for plain arrays: the task's writes do not reach the caller.
    plain = np.zeros(MiB // 8)
    assert sched.submit(tasks.fill, plain, 5.0).result(RESULT) == plain.size
    assert not plain.any()
    del out


@pytest.mark.timeout(30)
def test_shared_array_written_by_task_is_visible(sched: Scheduler) -> None:
    shared = shmrunner.zeros(MiB // 8)
    assert shmrunner.is_shared(shared)
    assert sched.submit(tasks.fill, shared, 7.0).result(RESULT) == shared.size
    assert (shared == 7.0).all()
    del shared


# --- retries and timeouts --------------------------------------------------------------


@pytest.mark.timeout(30)
def test_killed_worker_task_is_retried(sched: Scheduler, gates: Gates) -> None:
    marker, attempts = gates.path("marker"), gates.path("attempts")
    fut = sched.submit(tasks.kill_self_first_time, marker, attempts, retries=1)
    got = fut.result(RESULT)
    runs = [json.loads(line) for line in Path(attempts).read_text().splitlines()]
    assert len(runs) == 2
    assert got == runs[1]
    assert runs[0]["pid"] != runs[1]["pid"]  # the first process died with its attempt


@pytest.mark.timeout(30)
def test_killed_worker_without_retries_fails_with_worker_lost(sched: Scheduler,
                                                              gates: Gates) -> None:
    marker, attempts = gates.path("marker"), gates.path("attempts")
    fut = sched.submit(tasks.kill_self_first_time, marker, attempts, retries=0)
    with pytest.raises(WorkerLostError) as info:
        fut.result(RESULT)
    assert info.value.signal == 9
    assert len(Path(attempts).read_text().splitlines()) == 1
    # The worker was replaced: the pool keeps serving.
    assert list(sched.map(tasks.square, range(10))) == [i * i for i in range(10)]


@pytest.mark.timeout(30)
def test_timeout_stops_the_task_and_the_pool_keeps_working(sched: Scheduler,
                                                            gates: Gates) -> None:
    attempts = gates.path("attempts")
    t0 = time.monotonic()
    fut = sched.submit(tasks.count_and_sleep, attempts, 60, timeout=1.0)
    with pytest.raises(TaskTimeoutError):
        fut.result(RESULT)
    assert time.monotonic() - t0 < 1.0 + PROMPT  # stopped, not slept out
    assert isinstance(fut.exception(), shmrunner.ShmrunnerError)
    (run,) = [json.loads(line) for line in Path(attempts).read_text().splitlines()]
    # The process that ran it was killed (and replaced).
    wait_until(lambda: not is_alive(run["pid"]), 10,
               message="the timed-out task's process to die")
    assert sched.submit(tasks.square, 5).result(RESULT) == 25
    assert list(sched.map(tasks.square, range(8))) == [i * i for i in range(8)]


@pytest.mark.timeout(30)
def test_timed_out_task_is_retried(sched: Scheduler, gates: Gates) -> None:
    attempts = gates.path("attempts")
    t0 = time.monotonic()
    fut = sched.submit(tasks.count_and_sleep, attempts, 60, timeout=0.5, retries=1)
    with pytest.raises(TaskTimeoutError):
        fut.result(RESULT)
    assert time.monotonic() - t0 < 2 * (0.5 + PROMPT)  # both attempts stopped
    runs = [json.loads(line) for line in Path(attempts).read_text().splitlines()]
    assert len(runs) == 2
    assert sched.submit(tasks.square, 6).result(RESULT) == 36


@pytest.mark.timeout(30)
def test_default_timeout_and_retries_from_the_constructor(gates: Gates) -> None:
    attempts = gates.path("attempts")
    with Scheduler(local_workers=2, timeout=0.5, retries=1) as s:
        fut = s.submit(tasks.count_and_sleep, attempts, 60)
        with pytest.raises(TaskTimeoutError):
            fut.result(RESULT)
        assert len(Path(attempts).read_text().splitlines()) == 2
        # A per-task value overrides the default.
        assert s.submit(tasks.sleep_for, 0.01, timeout=30).result(RESULT) == "slept"


@pytest.mark.timeout(30)
def test_retry_runs_on_the_respawned_worker(gates: Gates) -> None:
    marker, attempts = gates.path("marker"), gates.path("attempts")
    s = Scheduler(local_workers=1)
    try:
        fut = s.submit(tasks.kill_self_first_time, marker, attempts, retries=1)
        got = fut.result(RESULT)
        assert len(Path(attempts).read_text().splitlines()) == 2
        assert got["pid"] != json.loads(Path(attempts).read_text().splitlines()[0])["pid"]
    finally:
        s.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(30)
def test_timeout_counts_running_time_not_time_queued_on_the_worker(gates: Gates) -> None:
    timeout = 1.0
    with Scheduler(local_workers=1) as s:
        started, gate = gates.new()
        first = s.submit(tasks.gated, started, gate, "first")
        gates.started(started)
        # Queued behind `first` (on the one worker, or in the scheduler) ...
        second = s.submit(tasks.square, 3, timeout=timeout)
        # ... for longer than its timeout: the gate opens only once that has passed.
        queued_since = time.monotonic()
        wait_until(lambda: time.monotonic() > queued_since + 2 * timeout, RESULT,
                   message="the queued task's timeout to pass")
        gates.open(gate)
        assert first.result(RESULT) == "first"
        assert second.result(RESULT) == 9


# --- cancellation and shutdown --------------------------------------------------------


@pytest.mark.timeout(30)
def test_cancel_queued_tasks(sched: Scheduler, gates: Gates) -> None:
    held = fill_workers(sched, gates)
    ran = [gates.path(f"victim-{i}") for i in range(3)]
    victims = [sched.submit(tasks.mark_run, path) for path in ran]
    assert [v.cancel() for v in victims] == [True, True, True]
    assert all(v.cancelled() for v in victims)
    with pytest.raises(concurrent.futures.CancelledError):
        victims[0].result(0)
    for _, g in held:
        gates.open(g)
    assert [f.result(RESULT) for f, _ in held] == list(range(len(held)))
    # Everything submitted after the victims ran; the victims never did.
    assert sched.submit(tasks.square, 2).result(RESULT) == 4
    sched.shutdown(wait=True)
    assert not any(os.path.exists(p) for p in ran)


@pytest.mark.timeout(30)
def test_cancel_running_task_returns_false(sched: Scheduler, gates: Gates) -> None:
    s, g = gates.new()
    fut = sched.submit(tasks.gated, s, g, "done")
    gates.started(s)
    assert fut.running()
    assert fut.cancel() is False
    gates.open(g)
    assert fut.result(RESULT) == "done"


@pytest.mark.timeout(30)
def test_shutdown_wait_waits_for_running_tasks(sched: Scheduler, gates: Gates) -> None:
    s, g = gates.new()
    fut = sched.submit(tasks.gated, s, g, "finished")
    gates.started(s)
    stopper = threading.Thread(target=sched.shutdown, kwargs={"wait": True})
    stopper.start()
    wait_until(lambda: sched.status()["shutdown"], RESULT, message="shutdown to begin")
    with pytest.raises(RuntimeError):
        sched.submit(tasks.square, 1)
    assert stopper.is_alive() and not fut.done()
    gates.open(g)
    stopper.join(RESULT)
    assert not stopper.is_alive()
    assert fut.done() and fut.result() == "finished"


@pytest.mark.timeout(30)
def test_shutdown_cancel_futures_cancels_queued(sched: Scheduler, gates: Gates) -> None:
    held = fill_workers(sched, gates)
    ran = [gates.path(f"victim-{i}") for i in range(3)]
    victims = [sched.submit(tasks.mark_run, path) for path in ran]
    stopper = threading.Thread(target=sched.shutdown,
                               kwargs={"wait": True, "cancel_futures": True})
    stopper.start()
    wait_until(lambda: all(v.cancelled() for v in victims), RESULT,
               message="queued tasks to be cancelled")
    for _, g in held:
        gates.open(g)
    stopper.join(RESULT)
    assert not stopper.is_alive()
    # Tasks the workers held finished; tasks still in the scheduler's queue were
    # cancelled (the gated ones beyond the workers' room, too).
    for f, _ in held:
        assert f.cancelled() or f.result(0) is not None
    assert any(not f.cancelled() for f, _ in held)
    assert not any(os.path.exists(p) for p in ran)


@pytest.mark.timeout(30)
def test_shutdown_without_cancel_runs_queued_tasks(sched: Scheduler, gates: Gates) -> None:
    held = fill_workers(sched, gates)
    queued = [sched.submit(tasks.square, i) for i in range(5)]
    stopper = threading.Thread(target=sched.shutdown, kwargs={"wait": True})
    stopper.start()
    wait_until(lambda: sched.status()["shutdown"], RESULT, message="shutdown to begin")
    for _, g in held:
        gates.open(g)
    stopper.join(RESULT)
    assert not stopper.is_alive()
    assert [f.result(0) for f, _ in held] == list(range(len(held)))
    assert [f.result(0) for f in queued] == [i * i for i in range(5)]


@pytest.mark.timeout(30)
def test_submit_after_shutdown_raises(gates: Gates) -> None:
    s = Scheduler(local_workers=2)
    s.shutdown()
    with pytest.raises(RuntimeError):
        s.submit(tasks.square, 1)
    with pytest.raises(RuntimeError):
        list(s.map(tasks.square, [1, 2]))
    s.shutdown()  # idempotent


# --- backpressure -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_backpressure_blocks_submit_until_tasks_finish(gates: Gates) -> None:
    gate = gates.path("gate")
    total = 50
    futures: list[concurrent.futures.Future[object]] = []
    submitted = 0
    errors: list[BaseException] = []

    def submitter() -> None:
        nonlocal submitted
        try:
            for i in range(total):
                futures.append(s.submit(tasks.gated, gates.path(f"started-{i}"), gate, i))
                submitted += 1
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    s = Scheduler(local_workers=2, max_pending=4)
    try:
        thread = threading.Thread(target=submitter)
        thread.start()
        # The queue fills up to max_pending behind the tasks the workers hold,
        # then submit() blocks: nothing finishes while the gate is closed.
        wait_until(lambda: s.status()["queued"] == 4
                   and submitted == s.status()["running"] + 4,
                   RESULT, message="the queue to fill up")
        assert thread.is_alive()
        assert submitted < total
        held = s.status()["running"]
        assert 2 <= held <= 2 * 2  # each worker holds at most two tasks
        wait_until(lambda: sum(os.path.exists(gates.path(f"started-{i}"))
                               for i in range(total)) == 2, RESULT,
                   message="both workers to run a task")
        assert submitted == held + 4 and thread.is_alive()
        tasks.report(gate, "")  # let everything finish
        thread.join(RESULT)
        assert not thread.is_alive() and not errors
        assert submitted == total
        assert [f.result(RESULT) for f in futures] == list(range(total))
    finally:
        tasks.report(gate, "")
        s.shutdown(wait=True, cancel_futures=True)



@pytest.mark.timeout(60)
def test_a_done_callback_submits_while_the_queue_is_full(gates: Gates) -> None:
    """The callback runs on the thread that frees the queue's room: its submit
    is queued at once, over max_pending, instead of waiting for itself forever
    (as concurrent.futures executors never wait there either)."""
    (started_a, gate_a), (started_g, gate_g) = gates.new(), gates.new()
    s = Scheduler(local_workers=2, max_pending=2)
    try:
        chained: list[concurrent.futures.Future[object]] = []
        a = s.submit(tasks.gated, started_a, gate_a, 3)
        a.add_done_callback(lambda f: chained.append(s.submit(tasks.square, f.result())))
        g = s.submit(tasks.gated, started_g, gate_g, 10)
        Gates.started(started_a)
        Gates.started(started_g)
        # The budget fills with tasks that wait for g: no worker can take them.
        waiting = []
        with pytest.raises(shmrunner.SchedulerBusyError):
            while len(waiting) < 100:
                waiting.append(s.try_submit(tasks.add, g, len(waiting)))
        assert s.status()["waiting_on_futures"] == 2
        Gates.open(gate_a)
        assert a.result(RESULT) == 3
        wait_until(lambda: len(chained) == 1, RESULT, message="the callback to submit")
        assert chained[0].result(RESULT) == 9
        Gates.open(gate_g)
        assert [f.result(RESULT) for f in waiting] == [10, 11]
        assert s.submit(tasks.add, 1, 1).result(RESULT) == 2
    finally:
        gates.open_all()
        s.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(60)
def test_a_done_callback_calling_sys_exit_is_logged_and_the_scheduler_serves_on(
        caplog: pytest.LogCaptureFixture) -> None:
    with Scheduler(local_workers=1) as s, \
            caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        f = s.submit(tasks.square, 4)
        f.add_done_callback(lambda _: sys.exit(3))
        assert f.result(RESULT) == 16
        assert [x.result(RESULT) for x in [s.submit(tasks.square, i) for i in range(5)]] \
            == [0, 1, 4, 9, 16]
    assert any(r.exc_info and isinstance(r.exc_info[1], SystemExit) for r in caplog.records)


# --- construction --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "sched.yaml"
    cfg.write_text("scheduler:\n  local_workers: 2\n  retries: 2\n  timeout: 30\n"
                   "  max_pending: 10\n")
    with Scheduler.from_config(str(cfg)) as s:
        assert s.settings.local_workers == 2
        assert s.settings.retries == 2
        assert s.settings.timeout == 30
        assert s.settings.max_pending == 10
        assert s.address is None
        assert list(s.map(tasks.square, range(6))) == [0, 1, 4, 9, 16, 25]
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler:\n  retries: many\n")
    with pytest.raises(shmrunner.ConfigError, match="scheduler.retries"):
        Scheduler.from_config(str(bad))


@pytest.mark.timeout(30)
def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="listen"):
        Scheduler(local_workers=0)
    with pytest.raises(shmrunner.ConfigError):
        Scheduler(local_workers=1, no_such_option=1)
    with Scheduler(local_workers=1) as s:
        with pytest.raises(ValueError):
            s.submit(tasks.square, 1, retries=-1)
        with pytest.raises(ValueError):
            s.submit(tasks.square, 1, timeout=0)
        for huge in (1e10, float("inf"), float("nan")):  # 1e10 once killed the timer thread
            with pytest.raises(ValueError, match="at most 1,000,000"):
                s.submit(tasks.square, 1, timeout=huge)
        with pytest.raises(TypeError):
            s.submit(42)  # type: ignore[arg-type]
        assert s.submit(tasks.square, 3).result(RESULT) == 9
