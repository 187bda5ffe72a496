"""Audit of the Scheduler's remote tier after ``Scheduler.terminate()`` and
the non-daemon ``shutdown(wait=False)``: real ``shmrunner worker`` agents
over 127.0.0.1 (the ``cluster`` helpers of test_remote.py).

Each test here reproduces one defect found in the audit (the report says
which are fixed and which are left xfail, and why).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_remote import RESULT, start_cluster, stop_cluster

import _sched_tasks as tasks
from _sched_tasks import Gates
from shmrunner import TaskCancelledError


@pytest.fixture
def gates(tmp_path: Path) -> Gates:
    d = tmp_path / "gates"
    d.mkdir()
    return Gates(d)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("retries", [0, 2])
def test_terminate_fails_running_remote_tasks_with_task_cancelled(
        tmp_path: Path, gates: Gates, retries: int) -> None:
    """README: terminate() stops now, "running ones fail with
    TaskCancelledError" (the local tier's do). A task running on a remote
    agent, and one prefetched behind it, failed instead with
    WorkerLostError("the scheduler's remote tier stopped") when the task had
    no retries left (and with TaskCancelledError when it had some): a
    caller catching TaskCancelledError, as for the local tier, missed them,
    and one retrying on WorkerLostError would rerun a task it terminated."""
    sched, workers = start_cluster(tmp_path, gates, n=1, retries=retries)
    try:
        started, gate = gates.new()
        running = sched.submit(tasks.gated, started, gate, 1)
        prefetched = sched.submit(tasks.add, 1, 2)  # capacity 1 + prefetch 1: sent too
        Gates.started(started, RESULT)
        sched.terminate()
        for future in (running, prefetched):
            error = future.exception(RESULT)
            assert isinstance(error, TaskCancelledError), repr(error)
    finally:
        stop_cluster(sched, workers, gates)
