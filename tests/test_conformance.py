"""One conformance suite over every executor.

The behaviours that ``shmrunner.Pool``, the Scheduler (local only, remote
only, local and remote mixed) and the daemon's Client share are written once here and run against
each, through public API only: results in order, a task's exception as
itself with the worker's traceback, arrays both ways, a lost worker, timeouts
and retries (Scheduler only: the Pool has neither), cancellation and
shutdown. Remote workers are real ``shmrunner worker`` processes on
127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult, RemoteTraceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _sched_tasks as tasks
from _sched_tasks import Gates
from _util import is_alive, wait_until
from shmrunner import Pool, Scheduler, TaskTimeoutError, WorkerLostError
from shmrunner.errors import TaskCancelledError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
RESULT = 30.0  # seconds: a healthy result arrives in well under one


class _Handle:
    """An AsyncResult seen as much like a Future as the suite needs."""

    def __init__(self, result: AsyncResult[Any]) -> None:
        self._result = result

    def result(self, timeout: float | None = None) -> Any:
        return self._result.get(timeout)


@dataclass
class Subject:
    """An executor under test, and what it can do."""

    name: str
    submit: Callable[..., Any]
    map: Callable[[Callable[..., Any], list[Any]], list[Any]]
    capacity: int
    retries_and_timeouts: bool
    close: Callable[[], None]
    queued: Callable[[], int] | None = None  # tasks waiting for a worker (None: unknown)
    shutdown: Callable[[], None] | None = None  # wait for submitted work, refuse more
    stop: Callable[[Any], bool] | None = None  # cancel a task even while it runs
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _agent(address: str, processes: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, REPO, env.get("PYTHONPATH", "")])
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "shmrunner.cli", "worker", "--connect", address,
             "--processes", str(processes), "--name", log.stem],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _scheduler(name: str, local: int, remote: int, tmp_path: Path) -> Subject:
    listen = "tcp://127.0.0.1:*" if remote else None
    sched = Scheduler(local_workers=local, listen=listen, heartbeat_interval=0.2,
                      heartbeat_timeout=2.0)
    agents: list[subprocess.Popen[bytes]] = []

    def close() -> None:
        try:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                try:
                    agent.wait(20)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
        finally:
            sched.shutdown(wait=True, cancel_futures=True)

    try:
        if remote:
            assert sched.address is not None
            agents.append(_agent(sched.address, remote, tmp_path / "agent.log"))
            wait_until(lambda: sum(w["capacity"] for w in sched.status()["workers"]) == remote,
                       RESULT, message="the agent to join")
    except BaseException:
        close()
        raise
    return Subject(name, sched.submit, lambda fn, xs: list(sched.map(fn, xs, timeout=RESULT)),
                   local + remote, True, close, queued=lambda: sched.status()["queued"],
                   agents=agents, shutdown=sched.shutdown, stop=sched.cancel)


def _pool() -> Subject:
    pool = Pool(2)

    def close() -> None:
        pool.terminate()
        pool.join()

    def shutdown() -> None:
        pool.close()
        pool.join()

    return Subject("pool", lambda fn, *a: _Handle(pool.apply_async(fn, a)),
                   lambda fn, xs: pool.map(fn, xs), 2, False, close, shutdown=shutdown)


def _client(tmp_path: Path) -> Subject:
    from _daemon_tasks import Daemon

    daemon = Daemon(tmp_path, scheduler={"local_workers": 2}).start()
    client = daemon.client()

    def close() -> None:
        client.shutdown(wait=False)
        leftovers = daemon.close()
        assert not leftovers, f"processes outlived the daemon: {leftovers}"

    def shutdown() -> None:
        client.shutdown(wait=True)

    return Subject("client", client.submit,
                   lambda fn, xs: list(client.map(fn, xs, timeout=RESULT)), 2, True, close,
                   shutdown=shutdown, stop=lambda f: client.cancel(f) == "cancelled")


@pytest.fixture(params=["pool", "sched-local", "sched-remote", "sched-mixed", "client"])
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    if request.param == "pool":
        made = _pool()
    elif request.param == "sched-local":
        made = _scheduler(request.param, 2, 0, tmp_path)
    elif request.param == "sched-remote":
        made = _scheduler(request.param, 0, 2, tmp_path)
    elif request.param == "sched-mixed":
        made = _scheduler(request.param, 1, 1, tmp_path)
    else:
        made = _client(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Gates]:
    root = tmp_path / "gates"
    root.mkdir()
    g = Gates(root)
    yield g
    g.open_all()


def test_results_and_map_in_order(subject: Subject) -> None:
    assert subject.submit(tasks.add, 2, 3).result(RESULT) == 5
    assert subject.map(tasks.square, list(range(50))) == [x * x for x in range(50)]


def test_a_task_exception_arrives_as_itself_with_the_workers_traceback(
        subject: Subject) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        subject.submit(tasks.raise_value_error, "boom").result(RESULT)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_value_error" in str(info.value.__cause__)


def test_arrays_travel_both_ways(subject: Subject) -> None:
    a = np.arange(1_000_000, dtype=np.float64)  # 8 MB: through shared memory locally
    doubled = subject.submit(tasks.double, a).result(RESULT)
    assert isinstance(doubled, np.ndarray) and doubled.flags.writeable
    np.testing.assert_array_equal(doubled, a * 2)
    made = subject.submit(tasks.arange, 100_000, "int32").result(RESULT)
    assert made.dtype == np.int32 and int(made[-1]) == 99_999
    assert subject.map(tasks.checksum, [a, a[::2]]) == [float(a.sum()), float(a[::2].sum())]


def test_a_lost_worker_fails_its_task_and_is_replaced(subject: Subject, gates: Gates) -> None:
    marker, attempts = gates.path("marker"), gates.path("attempts")
    with pytest.raises(WorkerLostError):
        subject.submit(tasks.kill_self_first_time, marker, attempts).result(RESULT)
    # Replaced: every slot serves again.
    assert subject.map(tasks.square, list(range(2 * subject.capacity))) == [
        x * x for x in range(2 * subject.capacity)]


def test_a_lost_worker_is_retried_when_retries_allow(subject: Subject, gates: Gates) -> None:
    if not subject.retries_and_timeouts:
        pytest.skip("the Pool has no retries (multiprocessing.Pool's API)")
    marker, attempts = gates.path("marker"), gates.path("attempts")
    fut = subject.submit(tasks.kill_self_first_time, marker, attempts, retries=1)
    assert "pid" in fut.result(RESULT)
    assert len(Path(attempts).read_text().splitlines()) == 2


def test_a_timeout_stops_the_task_and_the_executor_keeps_serving(subject: Subject) -> None:
    if not subject.retries_and_timeouts:
        pytest.skip("the Pool has no task timeouts (multiprocessing.Pool's API)")
    with pytest.raises(TaskTimeoutError):
        subject.submit(tasks.sleep_for, 60, timeout=0.5).result(RESULT)
    assert subject.submit(tasks.add, 1, 1).result(RESULT) == 2


def test_a_queued_task_can_be_cancelled(subject: Subject, gates: Gates) -> None:
    if subject.queued is None:
        pytest.skip("no cancel() before the task runs: AsyncResult has none, and a daemon "
                    "job's future runs once the daemon accepts it (a cancel before that: "
                    "test_job_control.py)")
    queued = subject.queued
    gate = gates.path("gate")
    try:
        # More gated tasks than the workers hold: some wait in the queue, and
        # a task submitted after them is queued behind them.
        held = [subject.submit(tasks.gated, gates.path(f"started-{i}"), gate, i)
                for i in range(4 * subject.capacity)]
        wait_until(lambda: queued() > 0, RESULT, message="tasks to wait in the queue")
        last = subject.submit(tasks.mark_run, gates.path("ran"), "ran")
        assert last.cancel()
        assert last.cancelled()
    finally:
        gates.open(gate)
    assert [f.result(RESULT) for f in held] == list(range(4 * subject.capacity))
    with pytest.raises(concurrent.futures.CancelledError):
        last.result(RESULT)
    assert not os.path.exists(gates.path("ran"))


def test_a_running_task_can_be_stopped(subject: Subject, gates: Gates) -> None:
    if subject.stop is None:
        pytest.skip("no way to stop a running task (multiprocessing.Pool's API)")
    started, gate = gates.new()
    future = subject.submit(tasks.gated, started, gate, "never")
    wait_until(lambda: os.path.exists(started), RESULT, message="the task to start")
    pid = json.loads(Path(started).read_text())["pid"]
    assert subject.stop(future)
    with pytest.raises(TaskCancelledError):
        future.result(RESULT)
    # Stopped by killing the process that ran it, which is replaced.
    wait_until(lambda: not is_alive(pid), RESULT, message="the task's process to be killed")
    assert [subject.submit(tasks.add, i, 1).result(RESULT)
            for i in range(2 * subject.capacity)] == list(range(1, 2 * subject.capacity + 1))


def test_shutdown_waits_for_submitted_work_then_refuses_more(subject: Subject) -> None:
    assert subject.shutdown is not None
    futures = [subject.submit(tasks.sleep_for, 0.05) for _ in range(4 * subject.capacity)]
    subject.shutdown()
    # Done when shutdown returns: no wait needed.
    assert [f.result(0) for f in futures] == ["slept"] * len(futures)
    with pytest.raises((RuntimeError, ValueError)):
        subject.submit(tasks.add, 1, 1)
