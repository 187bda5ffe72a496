"""The process engine: local worker processes fed from a queue, served by one
manager thread. The Pool, the Scheduler's local tier and the remote agent run
their tasks on it.

Data flow::

    caller threads                         manager thread (one per engine)
    submit() -----------+                   selectors loop over:
    imap feeder threads +-> TaskQueue         worker channels  (results, EOF)
                             (_dispatch.py)   process end watches (deaths)
                  pick a worker with room,    a Wakeup          (close, terminate,
                  pickle the task (arrays         |              queued output)
                  -> memfd fds), send             v
                                  |           results -> on_room() (refill first),
                                  v           then the tasks' result objects
                                              (callbacks), then on_results()
                 worker i <--- its own AF_UNIX socketpair ---> worker i
                 (spawned, reaped, replaced, retired: worker/lifecycle.py)

Why this shape rather than ``multiprocessing.pool``'s shared queues: each
worker has its *own* channel, so (1) the engine knows exactly which tasks each
worker holds (``worker/lifecycle.py``), (2) a worker SIGKILLed while reading
or writing corrupts nothing and holds no lock that others need (a shared
SimpleQueue's lock dies with its holder and hangs the whole pool,
python/cpython#96062), and (3) the channel is a Unix socket, which can carry
the memfd file descriptors of arrays (``transport/fdchannel.py``).

Guarantees:

* A dead worker fails exactly the task it was running with
  :class:`~shmrunner.WorkerLostError`; tasks it had been sent but not started
  go back to the queue; a new worker takes its place.
* Each worker is sent at most two tasks at a time (one running, one queued
  behind it, so it never waits on a round trip), and only one while another
  worker is idle; a worker whose tasks take under half a millisecond may hold
  16 (the lifecycle's pacing rule), so tiny tasks and their results travel
  many per syscall (the worker batches those results too, see
  ``worker/loop.py``). A task is queued behind a running one only while
  that has run briefly (under 2 ms, or 4x its worker's last task), once the
  worker has finished a task of the same function, and, if that took 10 ms
  or more, only while more tasks wait than there are workers: so queued work
  does not wait behind a long task while another worker idles, and the last
  array-sized tasks of a map go one at a time to whichever worker is free
  (``Worker.free``, ``Lifecycle.backlog``). Tasks are pickled only when dispatched (slow
  pickling is sent as it goes, ``TaskQueue.send``), so shared memory in use
  stays bounded by the workers' capacity, not by the input.
* Workers die with the engine's process (``PR_SET_PDEATHSIG``, or a pidfd
  watch under forkserver: ``worker/loop.py``). They are all started by the
  manager thread, which outlives them: the kernel's parent-death signal
  follows the *thread* that forked.
* Caller threads send directly when a worker has room (no thread hop on the
  latency path); the manager thread only ever does non-blocking socket work,
  so it can never deadlock with a worker that is blocked sending to it.
* ``call`` (``Pool.apply``) goes one step further: with a worker idle, the
  caller claims it and reads the reply itself (``Manager.read_claimed``),
  so the reply wakes the caller instead of the manager thread, which would
  then wake the caller. The claimed worker gets no other task; it is handed
  back when the result is in, the worker dies, or the caller is interrupted,
  and the manager thread reaps a dead one only once it is handed back.
* No user code runs under the engine's lock (``_dispatch.py``).
"""

from __future__ import annotations

import itertools
import os
import selectors
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from . import _memsize as memsize
from . import _pid
from ._atexit import stop_at_exit
from ._dispatch import CLOSE, RUN, TERMINATE, Budget, TaskQueue
from ._manager import LogsCallback, Manager
from ._sink import AwaitedSink, ResultSink
from ._tasks import Task, deliver
from ._wakeup import Wakeup
from .errors import ShmrunnerError, TaskCancelledError
from .shm import DEFAULT_THRESHOLD
from .worker.lifecycle import TERMINATE_GRACE, ProcessLifecycle, stop_grace

__all__ = ["ProcessEngine", "EngineSettings", "EngineStatus", "Budget", "Task", "RUN", "CLOSE",
           "TERMINATE"]

@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """How the engine's worker processes are started and fed."""

    processes: int
    initializer: Callable[..., object] | None = None
    initargs: tuple[Any, ...] = ()
    maxtasksperchild: int | None = None
    context: BaseContext | None = None  # None: multiprocessing's default context
    shm_threshold: int = DEFAULT_THRESHOLD
    # Private memory per worker before it is killed (bytes, '512MiB', 0.5 or
    # '50%' of the host; _memsize.py), None for no limit.
    memory_limit: int | float | str | None = None
    # (level, limit): workers capture each task's logs and printed text at that
    # level, at most limit characters, and the engine hands them to on_logs.
    task_logs: tuple[int, int] | None = None
    # Seconds per task under which a worker may hold many tasks (the pacing
    # rule, worker/lifecycle.py); None: the default. A remote agent with one
    # process has nothing to balance between processes: it passes inf.
    fast_task: float | None = None

    def __post_init__(self) -> None:
        # multiprocessing.Pool's own checks and messages (its tests expect them).
        if self.processes < 1:
            raise ValueError("Number of processes must be at least 1")
        maxtasks = self.maxtasksperchild
        if maxtasks is not None and (
                not isinstance(maxtasks, int) or isinstance(maxtasks, bool) or maxtasks <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if self.initializer is not None and not callable(self.initializer):
            raise TypeError("initializer must be a callable")
        if memsize.problem(self.memory_limit) is not None:
            raise ValueError(f"memory_limit: expected {memsize.EXPECTED}, "
                             f"got {self.memory_limit!r}")


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot: ``state`` (RUN, CLOSE, TERMINATE), live ``workers``, tasks
    ``running`` or sent to a worker, tasks ``queued`` for one, ``broken``;
    workers killed for exceeding ``memory_limit`` (``memory_kills``) and by the
    kernel's OOM killer (``oom_kills``) since the start."""

    state: str
    workers: int
    running: int
    queued: int
    broken: bool
    memory_kills: int = 0
    oom_kills: int = 0


class ProcessEngine:
    """Worker processes, their queue and the manager thread that serves them.

    Kept apart from :class:`~shmrunner.Pool` so the thread holds no reference
    to the facade, which can then be garbage collected (and warn) like
    ``multiprocessing.Pool``. On the manager thread: ``on_room`` runs as soon
    as a batch of results has freed its workers' slots, before those results
    are delivered, and when respawned workers add room (the Scheduler refills
    the engine there, many tasks per syscall, while the worker still has work);
    ``on_results`` runs after each batch of results is delivered (what the
    deliveries queued, or sends, goes out there).
    """

    def __init__(self, settings: EngineSettings, *,
                 on_results: Callable[[], None] | None = None,
                 on_room: Callable[[], None] | None = None,
                 on_logs: LogsCallback | None = None) -> None:
        self.settings = settings
        # Workers, sockets and the manager thread belong to this process: a
        # fork() child that used them would send on the parent's sockets.
        self._pid = _pid.current()
        self._ids = itertools.count()
        grace = stop_grace()  # checked before anything is opened
        self._selector = selectors.DefaultSelector()
        self._wakeup = Wakeup()
        self._selector.register(self._wakeup.fd, selectors.EVENT_READ, ("wake", None))
        self._lifecycle = ProcessLifecycle(
            size=settings.processes, context=settings.context or get_context(),
            initializer=settings.initializer, initargs=settings.initargs,
            maxtasks=settings.maxtasksperchild, threshold=settings.shm_threshold,
            selector=self._selector, parent_fds=self._wakeup.fds(),
            memory_limit=memsize.resolve(settings.memory_limit), logs=settings.task_logs,
            stop_grace=grace,
            **({} if settings.fast_task is None else {"fast_task": settings.fast_task}))
        self._queue = TaskQueue(self._lifecycle, settings.shm_threshold,
                                max(8, 4 * settings.processes), self._wakeup.wake)
        self._manager = Manager(self._queue, self._lifecycle, self._selector, self._wakeup,
                                settings.initializer, on_results, on_logs, on_room)
        self._thread = threading.Thread(target=self._manager.run, name="shmrunner-pool",
                                        daemon=True)
        self._thread.start()
        self._thread_ident = self._thread.ident  # (read per result: Thread.ident is a property)
        stop_at_exit(self)
        try:
            startup_error = self._manager.wait_started()
        except BaseException:
            # A Ctrl-C while the workers start: nothing will hold this engine,
            # so stop what started now (left, the workers outlived the program's
            # exit, waited for by multiprocessing's exit hook).
            self.terminate(wait=True)
            raise
        if startup_error is not None:
            self._thread.join()
            self._manager.close_resources()
            raise startup_error

    # --- the API, from any thread -----------------------------------------------------------

    def new_task(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 result: ResultSink, index: int = 0, *, report_start: bool = False) -> Task:
        """A task whose outcome settles ``result``. ``report_start``: its worker
        says when it really starts it (one more message), so that a timeout
        (:meth:`kill` with ``ran_for``) counts from then; for tasks with one."""
        return Task(next(self._ids), fn, args, kwargs, result, index, report_start)

    def submit(self, tasks: Iterable[Task]) -> None:
        """Queue ``tasks``, sending at once what the workers have room for;
        fails them (through their results) if the engine is stopped."""
        self.check_process()
        self._queue.submit(tasks)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
             result: AwaitedSink) -> None:
        """Run one task whose outcome the calling thread waits for next
        (``Pool.apply``): sent to an idle worker whose reply this thread reads
        itself (``Manager.read_claimed``), so ``result`` is usually settled
        on return; else (tasks queued, no worker idle, called from a result
        callback) submitted as usual."""
        self.check_process()
        task = self.new_task(fn, args, kwargs, result)
        queue = self._queue
        worker = None if self.is_engine_thread() else queue.claim()
        if worker is None:
            queue.submit([task])
            return
        try:
            if queue.send_claimed(worker, task):
                self._manager.read_claimed(worker, result)
        finally:
            queue.hand_back(worker)

    def room(self) -> int:
        """Tasks the workers could take now beyond those queued (negative when
        more are queued). Read without the lock: a stale answer only delays or
        queues a task."""
        return self._lifecycle.room() - len(self._queue.pending)

    def capacity(self) -> int:
        """Worker processes alive now."""
        return len(self._lifecycle)

    def status(self) -> EngineStatus:
        queue = self._queue
        with queue.lock:
            lifecycle = self._lifecycle
            return EngineStatus(queue.state, len(lifecycle), lifecycle.busy(),
                                len(queue.pending), queue.broken is not None,
                                lifecycle.memory_kills, lifecycle.oom_kills)

    def processes(self) -> list[BaseProcess]:
        with self._queue.lock:
            return self._lifecycle.processes()

    def wait_for_workers(self, timeout: float) -> bool:
        """Wait until every worker slot holds a process again (after deaths)."""
        self._wakeup.wake()
        with self._queue.changed:
            return self._queue.changed.wait_for(
                lambda: len(self._lifecycle) >= self.settings.processes, timeout)

    @property
    def terminated(self) -> bool:
        return self._queue.state == TERMINATE

    @property
    def broken(self) -> BaseException | None:
        """Why the engine can run nothing any more (its initializer failed, its
        thread crashed), or None."""
        return self._queue.broken

    def add_feeder(self, feeder: threading.Thread) -> None:
        """Count ``feeder`` (a thread submitting lazily, waiting for room) as
        work still to come: a closed engine waits for it to finish."""
        with self._queue.lock:
            self._queue.feeders.add(feeder)

    def remove_feeder(self, feeder: threading.Thread) -> None:
        with self._queue.lock:
            self._queue.feeders.discard(feeder)
        self._wakeup.wake()

    def wait_for_room(self, budget: Budget | None = None) -> bool:
        """Block a feeder until the queue has room (and ``budget``, from
        :meth:`new_budget`, a task to spend); False once terminated."""
        return self._queue.wait_for_room(budget)

    @staticmethod
    def new_budget(size: int | None) -> Budget:
        """A feeder's allowance of ``size`` tasks ahead of its consumer (None: no limit)."""
        return Budget(size)

    def abandon(self, budget: Budget) -> None:
        """The consumer of ``budget``'s feeder is gone: the feeder stops. Safe
        from any thread and from a garbage collector's finalizer (takes no
        lock: the manager thread wakes the feeder)."""
        budget.abandoned = True
        self._wakeup.wake()

    def give_back(self, budget: Budget) -> None:
        """The consumer took a result: ``budget``'s feeder may submit one more."""
        self._queue.give_back(budget)

    def kill(self, task: Task, reason: BaseException, ran_for: float = 0.0) -> bool:
        """Stop ``task`` and fail it with ``reason``, once it has run for
        ``ran_for`` seconds (a timeout counts running time, not time queued).

        Queued here: dropped (with ``ran_for`` 0; else False, it has not run
        yet). Running long enough: its worker is SIGKILLed (the only way to
        stop arbitrary code) and replaced. Sent but still waiting behind
        another task, being pickled, or not running long enough yet: False,
        ask again later. Finished already (delivered): True, nothing to do.

        The kill is aimed at ``task`` alone. The worker may already have
        finished it and started the next task (its result not read yet) when
        the signal lands: the reap then delivers that result (the task
        succeeds) and runs every other task the worker held again elsewhere,
        so a kill never fails a task it was not aimed at.
        """
        queue = self._queue
        with queue.lock:
            if task in queue.pending:
                if ran_for > 0:
                    return False
                queue.remove_locked(task)
                queued = True
            else:
                queued = False
                killed = self._lifecycle.kill(task, reason, ran_for)
                if killed is not None:
                    return killed
                if task.result is not None:
                    return False  # being pickled (not delivered yet): ask again
        if queued:
            deliver(task, False, reason)
        return True

    def close(self) -> None:
        """Accept no more work; the workers exit once every task is done."""
        if not self.in_owner():
            return  # a fork() child: the parent's engine is not the child's to stop
        with self._queue.lock:
            if self._queue.state == RUN:
                self._queue.state = CLOSE
        self._wakeup.wake()

    def terminate(self, wait: bool = False) -> None:
        """Stop the workers now; tasks not finished fail with TaskCancelledError.
        ``wait``: return once the manager thread has killed and reaped them
        (bounded; never on the manager thread itself, as from a callback)."""
        if not self.in_owner():
            # A fork() child (its copy of the lock may be held forever by a
            # thread that does not exist there): the engine is the parent's.
            return
        queue = self._queue
        if queue.state == TERMINATE and not self._thread.is_alive():
            return  # done already: not even the lock is needed
        with queue.lock:
            queue.state = TERMINATE
            cancelled = queue.clear_locked()
        for task in cancelled:
            deliver(task, False, TaskCancelledError("the pool was terminated"))
        self._wakeup.wake()
        if wait and not self.is_engine_thread():
            self._thread.join(TERMINATE_GRACE + 5.0)

    def join(self) -> None:
        """Wait for the feeders and the manager thread (close or terminate first)."""
        if not self.in_owner():
            return
        if not self.terminated:
            # (Terminated: a feeder blocked reading its caller's input, a queue
            # nobody feeds any more, may never return; its imap is ended already
            # and the feeder, a daemon thread, ends once the input yields.)
            for feeder in list(self._queue.feeders):
                feeder.join()
        if not self.is_engine_thread():
            self._thread.join()

    def shutdown_at_exit(self) -> None:
        """Terminate and wait (bounded): the interpreter is exiting."""
        if not self.in_owner() or self.terminated and not self._thread.is_alive():
            return
        self.terminate(wait=True)

    def is_engine_thread(self) -> bool:
        """Whether the caller runs on the manager thread (in a result callback)."""
        return threading.get_ident() == self._thread_ident

    def in_owner(self) -> bool:
        return _pid.current() == self._pid

    def check_process(self, owner: str = "Pool") -> None:
        """Raise in a fork() child: the workers answer the parent, and only the
        parent's manager thread reads their results (the child would steal
        some from the parent and wait forever for its own)."""
        if _pid.current() != self._pid:
            raise ShmrunnerError(
                f"this {owner} was created in process {self._pid} and cannot be used from "
                f"process {os.getpid()}, a fork() of it; create a new {owner} in the child")
