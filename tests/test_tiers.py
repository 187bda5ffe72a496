"""The seams between the Scheduler, its tiers and the process engine: results
reach every owner through one typed sink, and each tier reports back through
the events it was given (run here against real worker processes and a real
socket, without a Scheduler)."""

from __future__ import annotations

import ast
import multiprocessing
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import _sched_tasks as tasks
import shmrunner
from _util import wait_until
from shmrunner import TaskCancelledError, TaskTimeoutError
from shmrunner._job import Job
from shmrunner._results import ApplyResult, IMapIterator, IMapUnorderedIterator, MapResult
from shmrunner._sink import ResultSink
from shmrunner.config import SchedulerSettings
from shmrunner.tiers.base import Tier
from shmrunner.tiers.local import LocalTier

RESULT = 30  # seconds: a healthy result arrives in well under one


def test_every_result_owner_is_a_result_sink() -> None:
    from shmrunner.worker.remote import _Reply

    owners = [ApplyResult(), MapResult(2, 1), IMapIterator(), IMapUnorderedIterator(),
              _Reply(None, ("session", 0))]  # type: ignore[arg-type]
    for owner in owners:
        assert isinstance(owner, ResultSink), type(owner).__name__
    result = ApplyResult()
    result.settle(0, True, 42)
    assert result.get(0) == 42
    failed = MapResult(2, 1)
    failed.settle(1, False, ValueError("item 1"))
    with pytest.raises(ValueError, match="item 1"):
        failed.get(0)
    assert multiprocessing.active_children() == []


# --- each tier reports through the events it was given, never to a Scheduler -------------


class Recorder:
    """TierEvents that remember what a tier reported."""

    def __init__(self) -> None:
        self.done: list[tuple[Job, bool, Any, bool]] = []
        self.room = 0
        self.lock = threading.Lock()

    def on_done(self, job: Job, ok: bool, value: Any, *, batch: bool = False) -> None:
        with self.lock:
            self.done.append((job, ok, value, batch))

    def on_room(self) -> None:
        with self.lock:
            self.room += 1

    def outcome(self, job: Job) -> tuple[bool, Any] | None:
        with self.lock:
            return next(((ok, value) for j, ok, value, _ in self.done if j is job), None)


def job(job_id: int, fn: Any, *args: Any, timeout: float | None = None) -> Job:
    return Job(job_id, Future(), fn, args, {}, 0, timeout)


def started(tier: Tier, *jobs: Job) -> None:
    for j in jobs:
        j.attempts += 1
    tier.start(list(jobs))


@pytest.mark.timeout(60)
def test_local_tier_reports_outcomes_and_room_through_its_events() -> None:
    events = Recorder()
    tier: Tier = LocalTier(events, 1, SchedulerSettings())
    try:
        assert tier.status() == {"workers": 1, "memory_kills": 0, "oom_kills": 0}
        quick = job(0, tasks.square, 7)
        by_ref = job(1, "_sched_tasks:add", 2, 3)
        started(tier, quick, by_ref)
        wait_until(lambda: events.outcome(quick) and events.outcome(by_ref), RESULT,
                   message="both outcomes")
        assert events.outcome(quick) == (True, 49) and events.outcome(by_ref) == (True, 5)
        # Delivered on the engine's thread: placement runs once per batch, after it.
        assert all(batch for _, _, _, batch in events.done)
        wait_until(lambda: events.room >= 1, RESULT, message="the tier to offer room")
        slow = job(2, tasks.sleep_for, 60.0, timeout=0.1)
        started(tier, slow)
        reason = TaskTimeoutError("stopped by the test")
        wait_until(lambda: tier.stop(slow, slow.attempts, reason), RESULT,
                   message="the task to start, to be stopped")
        wait_until(lambda: events.outcome(slow), RESULT, message="the stopped task's outcome")
        assert events.outcome(slow) == (False, reason)
    finally:
        tier.close(wait=True)


@pytest.mark.timeout(60)
def test_remote_tier_reports_outcomes_and_room_through_its_events() -> None:
    from shmrunner.tiers.remote import RemoteTier

    events = Recorder()
    tier = RemoteTier(events, SchedulerSettings(local_workers=0, listen="tcp://127.0.0.1:*"))
    try:
        status = tier.status()
        assert status["alive"] and status["workers"] == [] and tier.room() == 0
        waiting = job(0, tasks.square, 3)
        started(tier, waiting)  # no worker: it waits in the tier
        # A cancel fails it at once; a timeout waits for it to run (its clock
        # starts on a worker), so a job waiting here is not failed by one.
        cancel = TaskCancelledError("cancelled by the test")
        waiting.cancelled = cancel
        assert tier.stop(waiting, waiting.attempts, cancel)
        wait_until(lambda: events.outcome(waiting), RESULT, message="the stopped job's outcome")
        assert events.outcome(waiting) == (False, cancel)
        queued = job(2, tasks.square, 5, timeout=0.1)
        started(tier, queued)
        assert tier.stop(queued, queued.attempts, TaskTimeoutError("timed out in the queue"))
        stale = job(1, tasks.square, 4)
        started(tier, stale)
        tier.stop(stale, stale.attempts - 1, cancel)  # an attempt that is over: nothing
        marker = job(3, tasks.square, 6)  # stops apply in order: once this one's did,
        started(tier, marker)             # the ones before it were applied too
        marker.cancelled = cancel
        tier.stop(marker, marker.attempts, cancel)
        wait_until(lambda: events.outcome(marker), RESULT, message="the marker's outcome")
        assert events.outcome(queued) is None and events.outcome(stale) is None
    finally:
        tier.close(wait=True)
    # Closing fails what it still held, without asking for placement.
    assert events.outcome(stale) is not None and events.outcome(stale)[0] is False
    assert events.outcome(queued) is not None
    assert not isinstance(events.outcome(queued)[1], TaskTimeoutError)
    assert events.room == 0


def test_the_tiers_never_import_the_scheduler() -> None:
    """Tiers know the Scheduler only as the events they are given: no import of
    it, not even for type checking, so there is no cycle to break."""
    tiers = Path(shmrunner.__file__).parent / "tiers"
    for path in sorted(tiers.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(name.split(".")[-1] == "scheduler" for name in names), \
                f"{path.name} imports the scheduler: {ast.unparse(node)}"
