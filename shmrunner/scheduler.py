"""Scheduler: one ``concurrent.futures.Executor`` over local shared-memory
workers and remote workers.

Data flow::

    submit()/map() --> queue (bounded: submit blocks when full) --> _pump()
        (a task with futures of this Scheduler among its arguments waits
        aside until they settle, _deps.py, then joins the queue)
                       (_backlog.py: the queue, the running jobs, the budgets)
                                                          |  Tier.start(jobs)
                       +-- local tier (tiers/local.py): the Pool engine
                       |   (_engine.py), arrays by shared-memory handle;
                       |   results come back on the pool's manager thread
                       +-- remote tier (tiers/remote.py): ZeroMQ ROUTER socket,
                           one thread; results come back on that thread
    TierEvents.on_done --> _finish(): retry (worker lost / timed out / raised
                one of retry_on, retries left; after the retry backoff, if any,
                on the timers' thread) or settle the Future; then _pump() again
                (capacity was freed; a tier delivering a batch calls on_room
                once after it)

The tiers know only the :class:`~shmrunner.tiers.base.TierEvents` they are
given (``_Events`` here), never the Scheduler.

Placement is by free capacity: the local tier first (no network, no copy),
then the remote worker with the most room. ``_pump`` runs on whichever thread
freed capacity (a tier's ``on_room``) or queued work that could start now, so
a task never waits for a thread hop when a worker is free; a submit behind a
queue that found every tier full leaves it to the next ``on_room``.
Timeouts are armed when a task is handed to a tier; on expiry the tier
stops the task (the local tier kills the process running it) and the task
fails, or is retried, with :class:`TaskTimeoutError` (the timers are one
thread, ``_timers.py``). No future is left pending: shutdown and tier
failures settle every one.

:meth:`Scheduler.cancel` stops a task even while it runs, through the same
``Tier.stop`` seam as a timeout (aimed at its current attempt, asked again
while the tier says "not running yet"); the job is marked so that it is never
retried and settles with :class:`TaskCancelledError`. :meth:`Scheduler.describe`
reports a task's state, attempts and worker (the tiers name the worker in
``Job.worker``). Both find the job on its future (``TaskFuture.job``); a
settled future keeps only its task's last attempts and worker
(``settled_runs``), so they live as long as it does and the job does not.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from . import _config_checks as checks
from . import _pid, _retry
from ._backlog import Backlog
from ._deps import Dependents, TaskFuture, in_done_callback, running_callbacks
from ._job import Job
from ._lightfuture import notify_cancelled
from ._payload import default_budget, only_scalars
from ._streams import Progress, check_sizes, chunked_calls, stream, total_of
from ._tasklogs import Record, emit, level_of
from ._timers import Timers
from .config import SchedulerSettings, load
from .errors import (
    ConfigError,
    ShmrunnerError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerLostError,
)
from .tiers.base import Tier
from .tiers.local import LocalTier

if TYPE_CHECKING:
    from .tiers.remote import RemoteTier
    from .transport.zmqchannel import CurveKeys

__all__ = ["Scheduler"]


def _resolve(ref: str) -> Callable[..., Any]:
    from .transport.protocol import resolve_function

    return resolve_function(ref)


def _reference(fn: Callable[..., Any] | str) -> Callable[..., Any] | str:
    """``fn`` as an import reference when it has one (so it can travel to a remote
    worker inside the arguments); else ``fn`` itself (pickled, if allowed)."""
    from .transport.protocol import function_ref

    try:
        return function_ref(fn)
    except (TypeError, ValueError):
        return fn


def _run_chunk(fn: Callable[..., Any] | str, chunk: list[tuple[Any, ...]]) -> list[Any]:
    if isinstance(fn, str):  # an import reference: how a function travels as an argument
        fn = _resolve(fn)
    return [fn(*args) for args in chunk]


class _Events:
    """The Scheduler as its tiers see it (:class:`~shmrunner.tiers.base.TierEvents`).

    It holds the Scheduler weakly: the tiers' threads hold it, and a strong
    reference would keep a Scheduler its user dropped without ``shutdown()``
    alive, with its workers, threads and sockets, until the interpreter exits.
    """

    __slots__ = ("_scheduler",)

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = weakref.ref(scheduler)

    def on_done(self, job: Job, ok: bool, value: Any, *, batch: bool = False) -> None:
        scheduler = self._scheduler()
        if scheduler is None:
            # Collected in a reference cycle (weak references are cleared before
            # its __del__ runs): no retry now, but the future still settles.
            Scheduler._settle(job, ok, value)
            return
        scheduler._finish(job, ok, value, pump=not batch)

    def on_room(self) -> None:
        scheduler = self._scheduler()
        if scheduler is not None:
            scheduler._pump()

    def on_log(self, job: Job, records: list[Record], *, worker: str, host: str,
               pid: int | None = None) -> None:
        scheduler = self._scheduler()
        if scheduler is not None:
            scheduler._task_log(job, records, worker, host, pid)


def _weak_method(method: Callable[[], None]) -> Callable[[], None]:
    """``method()`` while its object lives; nothing after (see ``_Events``)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


class Scheduler(Executor):
    """A ``concurrent.futures.Executor`` over local shared-memory workers and
    remote workers that connect over ZeroMQ.

    ``local_workers``: local processes (None: CPU count; 0: remote only).
    ``listen``: the address remote workers connect to (None: local only).
    ``curve``: CURVE keys for that address (workers must then present an
    authorised key; see ``shmrunner keygen``).
    ``on_task_log``: called with (future, records, worker, host) when a task's
    log arrives (records as ``(created, levelno, name, message)``; the runner
    daemon keeps them per job); they are re-emitted on the logger
    ``shmrunner.task`` either way.
    Keyword options are :class:`~shmrunner.config.SchedulerSettings` fields
    (``retries``, ``timeout``, ``retry_on``, ``retry_backoff``,
    ``heartbeat_interval``, ...); ``retries``, ``timeout`` and ``retry_on`` are
    the defaults of every ``submit``.
    """

    def __init__(self, local_workers: int | None = None, listen: str | None = None, *,
                 settings: SchedulerSettings | None = None, curve: CurveKeys | None = None,
                 on_task_log: Callable[[Future[Any], list[Record], str, str], object]
                 | None = None,
                 **options: Any) -> None:
        from .config import with_overrides

        if settings is not None and not isinstance(settings, SchedulerSettings):
            # (dataclasses.replace's own TypeError named no argument)
            raise TypeError(f"settings must be a shmrunner.config.SchedulerSettings "
                            f"(shmrunner.config.load(path).scheduler), not "
                            f"{type(settings).__name__}; give single settings as keyword "
                            "options instead, e.g. Scheduler(retries=2)")
        base = settings if settings is not None else SchedulerSettings()
        if local_workers is not None:
            options["local_workers"] = local_workers
        if listen is not None:
            options["listen"] = listen
        self.settings = with_overrides(base, options, "scheduler") if options else base
        if self.settings.local_workers == 0 and self.settings.listen is None:
            raise ConfigError("a Scheduler with local_workers=0 needs listen= for remote "
                             "workers, or it could run nothing")
        self._backlog = Backlog(self.settings.max_pending,
                                self.settings.max_pending_bytes or default_budget())
        self._ids = itertools.count()
        # Futures of this Scheduler among a task's arguments (_deps.py).
        self._dependents = Dependents(self._backlog, _weak_method(self._pump))
        self._retry_on = _retry.names(self.settings.retry_on)
        self._log_level = level_of(self.settings.task_logs, "scheduler.task_logs")
        self._on_task_log = on_task_log
        self._creator = _pid.current()
        self._timers = Timers()
        self._tiers: list[Tier] = []
        self._local: LocalTier | None = None
        self._remote: RemoteTier | None = None
        events = _Events(self)
        try:
            workers = self.settings.local_workers
            if workers != 0:
                self._local = LocalTier(events, workers or os.cpu_count() or 1, self.settings)
                self._tiers.append(self._local)
            if self.settings.listen is not None:
                from .tiers.remote import RemoteTier

                self._remote = RemoteTier(events, self.settings, curve)
                self._tiers.append(self._remote)
        except BaseException:
            self._shut_down = True  # nothing for __del__ to stop
            self._close_tiers(wait=False)
            raise

    @classmethod
    def from_config(cls, path: str, **options: Any) -> Scheduler:
        """A Scheduler from the ``scheduler:`` section of a YAML file."""
        return cls(settings=load(path).scheduler, **options)

    def queued(self) -> int:
        """Tasks waiting for a worker."""
        return self._backlog.queued()

    def local_capacity(self) -> int:
        """Local worker processes (0 for a remote-only scheduler)."""
        return self._local.status()["workers"] if self._local is not None else 0

    def status(self) -> dict[str, Any]:
        """A snapshot for people and monitoring: ``queued`` (waiting for a
        worker), ``running`` (handed to a worker), ``retry_waiting`` (failed
        tasks sitting out their ``retry_backoff`` before they are queued
        again), ``submitted`` (tasks
        accepted since the start; a chunk of a map counts once),
        ``shutdown`` (``shutdown()`` was called: new tasks are refused),
        ``waiting_on_futures`` (tasks whose argument futures have not all
        settled), ``local_workers``, ``memory_kills`` and ``oom_kills`` (local
        worker processes killed for exceeding ``memory_limit``, and by the
        kernel's OOM killer), ``workers`` (each connected remote worker: id of
        its registration, name, host, pid, capacity, busy, draining, seconds
        since its last heartbeat), ``rejected`` (messages refused from the
        network), ``lost_workers`` (remote workers declared lost),
        ``remote_errors`` (unexpected errors the remote tier's thread
        recovered from), ``remote_alive`` (False once the remote tier gave up;
        None without one), ``session`` (the remote tier's session id, which
        workers log; None without one), and ``pending_bytes`` of array and
        bytes arguments held by queued and running tasks against their budget
        ``max_pending_bytes``."""
        backlog = self._backlog.snapshot()
        remote = self._remote.status() if self._remote is not None else None
        local = self._local.status() if self._local is not None else None
        return {
            **backlog,
            "max_pending_bytes": self._backlog.byte_budget,
            "local_workers": local["workers"] if local is not None else 0,
            "memory_kills": local["memory_kills"] if local is not None else 0,
            "oom_kills": local["oom_kills"] if local is not None else 0,
            "workers": remote["workers"] if remote is not None else [],
            "rejected": remote["rejected"] if remote is not None else 0,
            "lost_workers": remote["lost"] if remote is not None else 0,
            "remote_errors": remote["errors"] if remote is not None else 0,
            "remote_alive": remote["alive"] if remote is not None else None,
            "session": remote["session"] if remote is not None else None,
        }

    @property
    def address(self) -> str | None:
        """The address remote workers connect to (with the real port when
        ``listen`` asked for ``:*`` or port 0)."""
        return self._remote.address if self._remote is not None else None

    # --- Executor API ----------------------------------------------------------------

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any,  # type: ignore[override]
               retries: int | None = None, timeout: float | None = None,
               retry_on: Iterable[type[BaseException] | str] | None = None,
               **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; ``retries``, ``timeout`` and
        ``retry_on`` (exception classes, or their 'module:qualname' names, that
        the task is retried on while its retries allow) override the scheduler's
        defaults for this task (to pass arguments of those names to ``fn``
        itself, wrap it in ``functools.partial``).

        A future this Scheduler returned, passed among the arguments (directly,
        or inside lists, tuples, sets and dict values), is replaced by its
        result before the task runs, without a trip through the caller (an
        array result stays in shared memory); if it fails, this task fails
        with :class:`DependencyError` (its ``__cause__`` is the dependency's
        exception); if it is cancelled, this task is cancelled. A future of
        another executor is refused (TypeError)."""
        return self._submit(fn, args, kwargs, retries, timeout, retry_on, block=True)

    def try_submit(self, fn: Callable[..., Any] | str, /, *args: Any,
                   retries: int | None = None, timeout: float | None = None,
                   retry_on: Iterable[type[BaseException] | str] | None = None,
                   **kwargs: Any) -> Future[Any]:
        """``submit``, but never waits: raises :class:`SchedulerBusyError` when
        ``max_pending`` tasks already wait (for a caller that must not block,
        such as the daemon's front thread)."""
        return self._submit(fn, args, kwargs, retries, timeout, retry_on, block=False)

    def try_submit_call(self, fn: Callable[..., Any] | str, args: Iterable[Any],
                        kwargs: dict[str, Any], *, retries: int | None = None,
                        timeout: float | None = None) -> Future[Any]:
        """:meth:`try_submit` with the call's arguments as values: every key of
        ``kwargs`` reaches ``fn``, ``retries`` and ``retry_on`` included (for a
        caller that holds a call it did not write, such as the daemon)."""
        return self._submit(fn, tuple(args), dict(kwargs), retries, timeout, None, block=False)

    def _submit(self, fn: Callable[..., Any] | str, args: tuple[Any, ...],
                kwargs: dict[str, Any], retries: int | None, timeout: float | None,
                retry_on: Iterable[type[BaseException] | str] | None,
                block: bool) -> Future[Any]:
        if _pid.current() != self._creator:
            # A fork() child would send on its parent's sockets and steal its results.
            raise ShmrunnerError(
                f"this Scheduler was created in process {self._creator} and cannot be used "
                f"from process {os.getpid()}, a fork() of it; create a new Scheduler in the "
                "child")
        if not callable(fn) and not isinstance(fn, str):
            raise TypeError(f"fn must be a callable or a 'module:function' string, got {fn!r}")
        if retries is None:
            retries = self.settings.retries
        elif not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
        if timeout is None:
            timeout = self.settings.timeout
        elif (problem := checks.seconds(timeout)) is not None:
            raise ValueError(f"timeout must be {problem}, got {timeout!r}")
        names = self._retry_on if retry_on is None else _retry.names(retry_on)
        task_id = next(self._ids)
        future = self._dependents.new_future(task_id)
        scalars = only_scalars(args, kwargs)  # the tiny task: nothing to weigh or resolve
        job = Job(task_id, future, fn, args, kwargs, retries, timeout, names,
                  nbytes=0 if scalars else None)
        future.job = job
        # From a done-callback (a tier's thread, maybe the one that frees room):
        # queued now, over the budgets if need be, as an Executor never blocks there.
        over = in_done_callback()
        try:
            # Futures among the arguments: it waits for them (Dependents queues it).
            if scalars or not self._dependents.hold(job, block, over):
                could_start = self._backlog.admit(job, block, over_budget=over)
            else:
                could_start = True
        except BaseException:
            future.job = None  # never admitted: the caller gets the error, not the future
            raise
        if could_start:
            self._pump()
        return future

    def _runs(self, future: Future[Any]) -> tuple[Job | None, tuple[int, str | None] | None]:
        """(the unsettled job of ``future``, (attempts, worker)); (None, None)
        when ``future`` is not this Scheduler's."""
        if isinstance(future, TaskFuture) and future.owner is self._dependents.token:
            return future.runs()
        return None, None

    # --- job control -------------------------------------------------------------------

    def cancel(self, future: Future[Any]) -> bool:
        """Cancel the task of ``future`` (one this Scheduler returned), even
        while it runs, as Dask's ``client.cancel`` or Ray's
        ``ray.cancel(ref, force=True)`` do. A task that has not started is
        cancelled as by ``future.cancel()`` (``CancelledError``); one that runs
        is stopped on its worker (a local worker process is killed and
        replaced; a remote agent kills the process running it) and its future
        fails with :class:`TaskCancelledError`; one waiting for a retry is
        not retried. It is never retried after a cancel. Returns True when the
        future is (or is about to be) cancelled that way, False when the task
        finished already or ``future`` is not this Scheduler's.

        ``future.cancel()`` itself keeps ``concurrent.futures``' meaning:
        False, and nothing stops, once the task runs."""
        if not isinstance(future, Future):
            raise TypeError(f"cancel() takes a future this Scheduler returned, got "
                            f"{type(future).__name__}")
        if future.cancel():
            return True
        job, _ = self._runs(future)
        if job is None:
            return False
        reason = TaskCancelledError(f"task {job.id} was cancelled")
        where = self._backlog.cancel(job, reason)
        if where is False:
            return False
        if where is True:
            if job.cancelled is reason:  # taken out of the queue or its retry backoff
                self._settle(job, False, reason)
                self._pump()
            return True
        self._stop(job, job.attempts, where)
        return True

    def _stop(self, job: Job, attempt: int, tier: Tier) -> None:
        """Stop the running attempt of a cancelled ``job``; while its tier
        says it has not started yet (queued behind another task on its
        worker), ask again shortly (on the timers' thread)."""
        if not self._backlog.is_current(job, attempt, tier):
            return
        assert job.cancelled is not None
        if not tier.stop(job, attempt, job.cancelled):
            self._timers.call_at(time.monotonic() + 0.05,
                                 lambda: self._stop(job, attempt, tier))

    def runs(self, future: Future[Any]) -> tuple[int, str | None] | None:
        """(attempts started, ``name@host`` of the latest one's worker) of the
        task of ``future``, or None if it is not this Scheduler's: what
        :meth:`describe` says of them, without working out the state."""
        return self._runs(future)[1]

    def describe(self, future: Future[Any]) -> dict[str, Any] | None:
        """The task of ``future`` at a glance, or None if it is not this
        Scheduler's (or long gone): ``state`` ("queued", "running", "done",
        "failed" or "cancelled"; a task waiting for a retry is "queued"),
        ``attempts`` (started so far) and ``worker`` (``name@host`` of the
        worker of its latest attempt; ``local@host`` for a local process;
        None before its first)."""
        job, info = self._runs(future)
        if info is None:
            return None
        if future.done():
            exc = None if future.cancelled() else future.exception()
            state = ("cancelled" if future.cancelled() or isinstance(exc, TaskCancelledError)
                     else "done" if exc is None else "failed")
        elif job is not None:
            state = self._backlog.state(job)
        else:
            state = "running"  # settling right now
        return {"state": state, "attempts": info[0], "worker": info[1]}

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1, buffersize: int | None = None,
            progress: Progress = None) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``, but lazy: the input is read
        as results are consumed, at most ``buffersize`` tasks ahead (default:
        max(64, 4 x the workers' slots)), so a generator of large arrays is
        never loaded whole. ``chunksize`` items travel as one task.
        ``progress``: True for a tqdm bar (when tqdm is installed), or a
        callable(done, total)."""
        return self._stream(fn, iterables, True, timeout, chunksize, buffersize, progress)

    def imap(self, fn: Callable[..., Any], *iterables: Iterable[Any],
             timeout: float | None = None, chunksize: int = 1, buffersize: int | None = None,
             progress: Progress = None) -> Iterator[Any]:
        """The same as :meth:`map` (the name ``multiprocessing.Pool`` users know)."""
        return self._stream(fn, iterables, True, timeout, chunksize, buffersize, progress)

    def imap_unordered(self, fn: Callable[..., Any], *iterables: Iterable[Any],
                       timeout: float | None = None, chunksize: int = 1,
                       buffersize: int | None = None,
                       progress: Progress = None) -> Iterator[Any]:
        """As :meth:`imap`, but results come as tasks finish, not in input order."""
        return self._stream(fn, iterables, False, timeout, chunksize, buffersize, progress)

    def _stream(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                ordered: bool, timeout: float | None, chunksize: int,
                buffersize: int | None, progress: Progress) -> Iterator[Any]:
        check_sizes(chunksize, buffersize)
        if buffersize is None:
            buffersize = max(64, 4 * self._slots())
        calls: Iterator[tuple[Any, ...]] = chunked_calls(iterables, chunksize)
        if chunksize > 1:
            ref = _reference(fn) if self._remote is not None else fn
            calls = ((_run_chunk, ref, chunk) for chunk in calls)
        else:
            calls = ((fn, *args) for args in calls)
        return stream(self.submit, calls, ordered=ordered, buffersize=buffersize,
                      timeout=timeout, chunked=chunksize > 1, progress=progress,
                      total=total_of(iterables))

    def _slots(self) -> int:
        """Tasks the workers can run at once (local processes and remote slots)."""
        remote = sum(w["capacity"] for w in self._remote.workers()) if self._remote else 0
        return self.local_capacity() + remote

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``. Called from a done-callback, it returns at
        once, as with ``wait=False``: that thread delivers the results waited for."""
        if _pid.current() != self._creator:
            return  # a fork() child's copy: the workers and sockets are the parent's
        self._shut_down = True
        if wait and in_done_callback():
            # On the thread that settles futures (a tier's, the timers'): waiting
            # here for the running tasks would wait for this very thread to deliver
            # their results. The waiting is done on a thread of its own instead.
            wait = False
        self._refuse_new(cancel_futures)
        if wait:
            self._backlog.wait_idle()
            self._close_tiers(wait=True)
        else:
            # Not a daemon thread: as with concurrent.futures, the program does not
            # exit before the tasks it left run (its exit would kill the workers).
            threading.Thread(target=self.shutdown, kwargs={"wait": True},
                             name="shmrunner-shutdown", daemon=False).start()

    def terminate(self) -> None:
        """Stop now, as ``Pool.terminate``: new tasks are refused, queued ones
        cancelled, running ones fail with TaskCancelledError (the local workers
        are killed, remote workers let go); returns once the local workers are
        gone. Unlike ``shutdown``, which lets the tasks it was given finish
        (before the program exits, too), nothing is waited for."""
        if _pid.current() != self._creator:
            return  # a fork() child's copy: the workers and sockets are the parent's
        self._shut_down = True
        self._refuse_new(cancel_futures=True)
        self._timers.close()
        for tier in self._tiers:
            tier.terminate()
        self._fail_leftovers(TaskCancelledError("the scheduler was terminated"))

    def _refuse_new(self, cancel_futures: bool) -> None:
        """Refuse new jobs; with ``cancel_futures``, cancel the queued ones."""
        cancelled = self._backlog.shut_down(cancel_futures)
        for job in cancelled:
            # Taken out of the queue: no place() will tell wait() and as_completed().
            if job.future.cancel():
                notify_cancelled(job.future)
            # A job waiting for a retry is already RUNNING: cancel() cannot settle it.
            elif not job.future.done():
                job.future.set_exception(TaskCancelledError(
                    f"task {job.id} was waiting for a retry when the scheduler shut down "
                    "with cancel_futures=True"))

    # --- placement ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand queued jobs to the tiers with room: the local tier first (no
        network, arrays stay in shared memory), then the remote one; each tier
        gets its jobs in one call, so they travel together."""
        # Again while a tier failed its batch: the room it was given is unused,
        # and no result will come to place the next queued jobs.
        failed = True
        while failed:
            failed = False
            for tier, jobs in self._backlog.place(self._tiers):
                try:
                    tier.start(jobs)
                except BaseException as exc:  # noqa: BLE001 (the tier is gone: these fail)
                    failed = True
                    for job in jobs:
                        self._finish(job, False, exc, pump=False)
                    continue
                for job in jobs:
                    if job.timeout is not None:
                        self._arm(job, tier)

    def _arm(self, job: Job, tier: Tier) -> None:
        attempt = job.attempts
        if self._backlog.running_on(job) is not tier:
            return  # that attempt is over already
        self._timers.call_at(time.monotonic() + (job.timeout or 0.0),
                             lambda: self._expire(job, attempt, tier))

    def _expire(self, job: Job, attempt: int, tier: Tier) -> None:
        """The timeout of one attempt of ``job`` on ``tier`` is due. The attempt
        may have finished (or been retried) on another thread meanwhile: the
        tier's ``stop`` is aimed at that attempt and does nothing once it is
        over, so a late timer never stops anything else."""
        if not self._backlog.is_current(job, attempt, tier):
            return
        reason = TaskTimeoutError(f"task {job.id} ran longer than its timeout of {job.timeout} s")
        if not tier.stop(job, attempt, reason):
            # Still queued on its worker behind another task: check again shortly.
            self._timers.call_at(time.monotonic() + min(job.timeout or 1.0, 0.1),
                                 lambda: self._expire(job, attempt, tier))

    def _finish(self, job: Job, ok: bool, value: Any, pump: bool = True) -> None:
        """A tier reports one attempt's outcome: retry it (at once, or after
        the backoff, from the timers' thread) or settle the future."""
        retry = (not ok and job.retries > 0 and job.cancelled is None
                 and (isinstance(value, (WorkerLostError, TaskTimeoutError))
                      or (isinstance(value, BaseException)
                          and _retry.matches(value, job.retry_on))))
        wait = _retry.delay(self.settings.retry_backoff, self.settings.retry_backoff_max,
                            job.attempts) if retry else 0.0
        retry = self._backlog.finish(job, retry, wait=wait > 0)  # False if cancelled meanwhile
        if retry and wait > 0:
            self._timers.call_at(time.monotonic() + wait, lambda: self._resume(job))
        if not retry:
            if job.cancelled is not None:  # whatever the stopped attempt reported
                ok, value = False, job.cancelled
            self._settle(job, ok, value)
        if pump:
            self._pump()

    @staticmethod
    def _settle(job: Job, ok: bool, value: Any) -> None:
        try:
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)
        except InvalidStateError:
            pass  # a shutdown cancelled it meanwhile
        job.fn, job.args, job.kwargs = None, (), {}  # free the arguments now
    def _task_log(self, job: Job, records: list[Record], worker: str, host: str,
                  pid: int | None) -> None:
        """A tier hands over what one attempt of ``job`` logged and printed."""
        if self._log_level is None:
            return  # off (a remote agent may still send them: dropped here)
        emit(records, level=self._log_level, worker=worker, host=host, task_id=job.id, pid=pid)
        # A settled future (a straggler of a killed attempt) gets nothing more.
        if self._on_task_log is not None and not job.future.done():
            try:
                with running_callbacks():  # a shutdown() in there must not wait on this thread
                    self._on_task_log(job.future, records, worker, host)
            except Exception:  # noqa: BLE001 (a log must never cost a result)
                logging.getLogger("shmrunner.scheduler").exception(
                    "on_task_log raised for task %s", job.id)

    def _resume(self, job: Job) -> None:
        """``job``'s retry backoff is over (on the timers' thread)."""
        if self._backlog.resume(job):
            self._pump()

    def _close_tiers(self, wait: bool) -> None:
        self._timers.close()
        for tier in self._tiers:
            tier.close(wait)
        self._fail_leftovers(ShmrunnerError("the scheduler shut down"))

    def _fail_leftovers(self, error: BaseException) -> None:
        """Settle the jobs the closed tiers left: the running ones fail with
        ``error``, the queued ones are cancelled."""
        for job in self._backlog.drain():
            if not job.future.done():
                if job.future.running():
                    job.future.set_exception(error)
                elif job.future.cancel():
                    notify_cancelled(job.future)

    _shut_down = False

    def __del__(self) -> None:
        # Dropped without shutdown(): as a concurrent.futures executor, finish
        # the tasks it holds (their futures still settle), then stop the
        # workers. The shutdown thread holds the Scheduler until then.
        if self._shut_down or getattr(self, "_creator", None) != _pid.current():
            return  # shut down, a fork() child's copy, or __init__ failed early
        if sys.is_finalizing():
            # (A Scheduler left in a module global.) No new thread can run now:
            # Thread.start() would wait for it forever. atexit stopped the engines.
            self._shut_down = True
            self._close_tiers(wait=False)
            return
        try:
            self.shutdown(wait=False)
        except RuntimeError:  # interpreter shutdown: no new threads (atexit stops the engines)
            self._close_tiers(wait=False)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)
