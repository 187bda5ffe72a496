"""Races around Pool.apply's claimed read (the
caller thread reads its worker's reply), the task-log flusher thread, imap
abandonment. Real processes, real kills, threads raced with deadlines."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import _apply_race_tasks as tasks
import pytest
from test_apply_direct import Call

import shmrunner

TIMEOUT = 30.0


def joined_within(pool: shmrunner.Pool, timeout: float) -> bool:
    joiner = threading.Thread(target=pool.join, daemon=True)
    joiner.start()
    joiner.join(timeout)
    return not joiner.is_alive()


@pytest.mark.timeout(60)
def test_close_then_join_ends_after_an_apply_that_was_running(tmp_path: Path) -> None:
    # multiprocessing: close() lets the running apply finish, then join() returns.
    pool = shmrunner.Pool(1)
    try:
        started, gate = tmp_path / "started", tmp_path / "gate"
        call = Call(pool, tasks.started_then_wait, (str(started), str(gate)))
        call.start()
        tasks.wait_for_file(str(started))
        pool.close()
        gate.write_text("go")
        ok, _ = call.result()
        assert ok
        assert joined_within(pool, 15.0), "join() hangs after close() (the manager never wakes)"
    finally:
        pool.terminate()


@pytest.mark.timeout(60)
def test_close_while_an_apply_pickles_its_arguments_still_runs_it(tmp_path: Path) -> None:
    # The caller had claimed the idle worker and was pickling the task's
    # arguments (a large array, a slow __reduce__) when another thread called
    # close(): the apply was made first, so it must run, as multiprocessing's does.
    # The other worker, told to stop by close(), says when it exits; the
    # claimed one was told to stop in the same breath and exited, task unrun.
    exiting = tmp_path / "exiting"
    pool = shmrunner.Pool(2, initializer=tasks.exit_slowly, initargs=(str(exiting), 2.0))
    try:
        started = tmp_path / "pickling"
        call = Call(pool, tasks.identity, (tasks.PicklesAfter(str(exiting), str(started)),))
        call.start()
        tasks.wait_for_file(str(started))
        pool.close()
        assert call.result() == (True, "pickled")
        assert joined_within(pool, 15.0)
    finally:
        pool.terminate()


@pytest.mark.timeout(120)
def test_a_task_ending_on_an_open_line_near_a_log_flush_does_not_hang_its_worker() -> None:
    # The worker closes a task's open line (printed without its newline) while
    # it holds its send lock; that record, arriving past the flush time, made
    # it send early, taking the same lock: the worker hung for good. Tasks
    # ending around FLUSH_EVERY (1 s) race the flusher thread; a few of these
    # hung each run before the fix.
    durations = [0.999 + 0.0005 * i for i in range(10)] * 2
    with shmrunner.Pool(2, task_logs="INFO") as pool:
        result = pool.map_async(tasks.partial_line_after, durations, chunksize=1)
        assert result.get(30) == durations


@pytest.mark.timeout(120)
def test_apply_from_many_threads_while_workers_are_sigkilled_then_close_and_join() -> None:
    # Every call returns its own value or WorkerLostError (never another's,
    # never a hang), and close() + join() end with the calls still going.
    import os
    import random
    import signal
    import time

    from shmrunner import WorkerLostError

    pool = shmrunner.Pool(3)
    stop = threading.Event()
    wrong: list[Any] = []
    done = [0] * 5

    def call(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                value = pool.apply(tasks.identity, ((k, i),))
            except WorkerLostError:
                continue
            except ValueError:  # "Pool not running": closed meanwhile
                return
            if value != (k, i):
                wrong.append(value)
            done[k] += 1

    callers = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(5)]
    try:
        for caller in callers:
            caller.start()
        kills, deadline = 0, time.monotonic() + 4.0
        while time.monotonic() < deadline:
            pids = [process.pid for process in pool._pool]
            try:
                os.kill(random.choice(pids), signal.SIGKILL)
                kills += 1
            except (ProcessLookupError, IndexError):
                pass
            stop.wait(0.005)
        pool.close()
        stop.set()
        for caller in callers:
            caller.join(TIMEOUT)
        assert not any(caller.is_alive() for caller in callers), "an apply() still waits"
        assert joined_within(pool, 15.0), "join() hangs"
        assert not wrong and min(done) > 0 and kills > 50
    finally:
        stop.set()
        pool.terminate()


@pytest.mark.timeout(120)
def test_tasks_that_fork_while_a_thread_logs_neither_hang_nor_lose_their_result() -> None:
    # The worker's log flusher thread and the task's logging thread hold their
    # locks at random moments of each fork: the children must still log, print
    # and exit, and the task's records and result arrive.
    with shmrunner.Pool(2, task_logs="INFO", task_log_bytes=10_000) as pool:
        results = [pool.apply_async(tasks.fork_while_logging, (60, 1.5)) for _ in range(4)]
        assert [result.get(60) for result in results] == [60] * 4
