"""The Scheduler's local tier: jobs run on the Pool engine's worker processes.

Data flow::

    Scheduler._pump (any thread) --start(jobs)--> engine.submit (arrays by
                                                  shared-memory handle)
    Scheduler timer --stop(job, attempt)--------> engine.kill (the process running
    or Scheduler.cancel                           the task is killed: a timed-out task
                                                  once it has run for its timeout, a
                                                  cancelled one at once)
    engine's manager thread --on_room-----------> events.on_room() once a batch of
                                                 results has freed room, before they
                                                 settle (the worker is refilled first)
    engine's manager thread --_Outcome.settle--> events.on_done(batch=True) per
                                                 task, then events.on_room() once
                                                 after a batch with a failure in it
                                                 (_Batch: places the retries those
                                                 queued)
    engine's manager thread --on_logs-----------> events.on_log (a task's log
                                                 records, before its result)

The engine does the work (spawn, reap, respawn, shared memory); this module
only translates between a :class:`~shmrunner._job.Job` and an engine task.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict

from .._job import Job
from .._tasklogs import HOST, Record, engine_setting, local_worker
from .._tasks import Task
from ..config import SchedulerSettings
from .base import TierEvents

if TYPE_CHECKING:
    from .._engine import ProcessEngine

__all__ = ["LocalTier", "LocalStatus"]


class LocalStatus(TypedDict):
    workers: int  # the engine's worker processes
    memory_kills: int  # ... killed for exceeding memory_limit
    oom_kills: int  # ... killed by the kernel's OOM killer


class LocalTier:
    """Jobs run on the Pool engine's worker processes."""

    def __init__(self, events: TierEvents, processes: int, settings: SchedulerSettings) -> None:
        import multiprocessing

        from .. import _segcache
        from .._engine import EngineSettings, ProcessEngine

        _segcache.check_env()
        self._events = events
        self._batch = _Batch(events)
        self.name = f"local@{socket.gethostname()}"  # what Job.worker says of these workers
        logs = engine_setting(settings.task_logs, settings.task_log_bytes, "scheduler.task_logs")
        self.engine = ProcessEngine(EngineSettings(
            processes=processes, context=multiprocessing.get_context(settings.start_method),
            shm_threshold=settings.shm_threshold, memory_limit=settings.memory_limit,
            task_logs=logs), on_room=events.on_room, on_results=self._batch.delivered,
            on_logs=None if logs is None else self._logs)

    def room(self) -> int:
        # The engine's own view (it lets workers with tiny tasks hold more).
        return self.engine.room()

    def _logs(self, task: Task, pid: int | None, records: list[Record], final: bool) -> None:
        # On the engine's thread, while the task runs or just before its result.
        outcome = task.result
        if isinstance(outcome, _Outcome):
            self._events.on_log(outcome.job, records, worker=local_worker(pid), host=HOST,
                                pid=pid)

    def start(self, jobs: list[Job]) -> None:
        tasks = []
        unresolved = False
        for job in jobs:
            job.worker = self.name
            try:
                fn = _resolve(job.fn) if isinstance(job.fn, str) else job.fn
            except Exception as exc:  # noqa: BLE001 (its own failure, not the batch's)
                unresolved = True
                self._events.on_done(job, False, exc, batch=True)
                continue
            job.handle = (job.attempts, self.engine.new_task(
                fn, job.args, job.kwargs, _Outcome(self._batch, self.engine, job),
                report_start=job.timeout is not None))
            tasks.append(job.handle[1])
        self.engine.submit(tasks)
        if unresolved:
            self._events.on_room()  # their room was not used: place what waits

    def stop(self, job: Job, attempt: int, reason: BaseException) -> bool:
        handle = job.handle
        if not isinstance(handle, tuple) or handle[0] < attempt:
            # Placed, but start() (another thread) has not handed this attempt
            # to the engine yet: no handle, or an earlier attempt's (this
            # tier's, or the remote tier's slot place). Ask again later.
            return False
        handle_attempt, task = handle
        if handle_attempt != attempt:
            return True  # that attempt is over; the engine's task is another one's
        # A timeout counts running time; a cancelled job stops at once.
        ran_for = 0.0 if job.cancelled is not None else job.timeout or 0.0
        return self.engine.kill(task, reason, ran_for=ran_for)

    def close(self, wait: bool) -> None:
        self.engine.close()
        if wait:
            self.engine.join()

    def terminate(self) -> None:
        self.engine.terminate(wait=True)

    def status(self) -> LocalStatus:
        status = self.engine.status()
        return {"workers": status.workers, "memory_kills": status.memory_kills,
                "oom_kills": status.oom_kills}


def _resolve(ref: str) -> Callable[..., Any]:
    from ..transport.protocol import resolve_function

    return resolve_function(ref)


class _Batch:
    """Whether the outcomes the engine's thread delivered since its last
    ``on_results`` held a failure.

    The engine offers the room a batch of results freed (``on_room``) before
    they settle, so the Scheduler pumps again afterwards only if one of them
    failed: a failure may have queued a retry that no later result would
    place. (Settled futures' callbacks that submit pump for themselves.) In
    a stream of tiny tasks that second pump found nothing to place, once per
    batch."""

    __slots__ = ("events", "failed")

    def __init__(self, events: TierEvents) -> None:
        self.events = events
        self.failed = False

    def delivered(self) -> None:
        if self.failed:
            self.failed = False
            self.events.on_room()


class _Outcome:
    """The engine's :class:`~shmrunner._sink.ResultSink` for one job's attempt."""

    __slots__ = ("batch", "engine", "job")

    def __init__(self, batch: _Batch, engine: ProcessEngine, job: Job) -> None:
        self.batch = batch
        self.engine = engine
        self.job = job

    def settle(self, index: int, ok: bool, value: Any) -> None:
        # On the engine's thread, the batch's end follows (_Batch.delivered).
        batch = self.engine.is_engine_thread()
        if batch and not ok:
            self.batch.failed = True
        self.batch.events.on_done(self.job, ok, value, batch=batch)
