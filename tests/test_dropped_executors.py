"""Resources over create/drop cycles: an executor dropped without ``shutdown()``
must give back its threads, processes and sockets once it is collected, as
``concurrent.futures``' executors do (a ``ThreadPoolExecutor`` dropped with work
queued finishes that work, then its threads exit).

Found by the resource audit (many create/drop cycles, fds and threads counted):
each dropped ``Scheduler(local_workers=2)`` kept its worker processes, its
threads and about ten fds until the interpreter exited; each dropped ``Client``
kept its thread and its sockets, in this process and in the daemon.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

import _daemon_tasks as dt
import _sched_tasks as tasks
import shmrunner
from _util import children, wait_until

RESULT = 30  # seconds: a healthy result arrives in well under one


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.mark.timeout(60)
def test_dropped_scheduler_stops_its_workers_and_threads() -> None:
    before_threads, before_children = _threads(), set(children())
    fds = _fd_count()
    for _ in range(3):
        sched = shmrunner.Scheduler(local_workers=2)
        assert sched.submit(tasks.square, 3).result(RESULT) == 9
        del sched
        gc.collect()

    wait_until(lambda: set(children()) <= before_children, timeout=20,
               message="the dropped Schedulers' worker processes to exit")
    wait_until(lambda: _threads() <= before_threads, timeout=20,
               message="the dropped Schedulers' threads to end")
    wait_until(lambda: _fd_count() <= fds, timeout=10,
               message="the dropped Schedulers' fds to close")


@pytest.mark.timeout(60)
def test_dropped_scheduler_still_settles_its_futures(tmp_path: Path) -> None:
    """As with a dropped ThreadPoolExecutor: the tasks it holds run to their end."""
    gate, started = str(tmp_path / "gate"), str(tmp_path / "started")
    before_children = set(children())
    sched = shmrunner.Scheduler(local_workers=1)
    running = sched.submit(tasks.gated, started, gate, "first")
    queued = sched.submit(tasks.square, 4)
    wait_until(lambda: os.path.exists(started), timeout=RESULT, message="the task to start")
    del sched
    gc.collect()
    Path(gate).touch()
    assert running.result(RESULT) == "first"
    assert queued.result(RESULT) == 16
    wait_until(lambda: set(children()) <= before_children, timeout=20,
               message="the dropped Scheduler's worker to exit")


@pytest.mark.timeout(90)
def test_dropped_client_ends_its_thread_and_sockets(tmp_path: Path) -> None:
    daemon = dt.Daemon(tmp_path).start()
    try:
        before_threads = _threads()
        fds = _fd_count()
        for i in range(3):
            client = shmrunner.connect(daemon.address)
            assert client.submit(dt.inc, i).result(RESULT) == i + 1
            del client
            gc.collect()
        wait_until(lambda: _threads() <= before_threads, timeout=15,
                   message="the dropped Clients' threads to end")
        wait_until(lambda: _fd_count() <= fds, timeout=10,
                   message="the dropped Clients' sockets to close")
    finally:
        assert daemon.close() == []


@pytest.mark.timeout(90)
def test_a_future_of_a_dropped_client_still_settles(tmp_path: Path) -> None:
    """``connect(addr).submit(...)`` with no name for the Client: its futures
    hold it, so their jobs finish before it goes."""
    daemon = dt.Daemon(tmp_path).start()
    try:
        before_threads = _threads()
        future = shmrunner.connect(daemon.address).submit(
            dt.append_id, str(tmp_path / "ran"), "late", 0.5)
        gc.collect()
        assert future.result(RESULT) == "late"
        del future
        gc.collect()
        wait_until(lambda: _threads() <= before_threads, timeout=15,
                   message="the client's thread to end once its future was dropped")
    finally:
        assert daemon.close() == []
