"""Worker lifecycle: spawn, account, pace, reap, respawn, retire -- for any tier.

Data flow::

    tier (the process engine's manager thread; the remote tier's hub thread)
        |  local:  ProcessLifecycle.spawn_missing()  starts processes, watches
        |          their channels and end watches (pidfds) in the engine's selector
        |  remote: Lifecycle.add(peer, capacity)     an agent said hello
        v
    Lifecycle ---- workers: {id -> Worker(endpoint, tasks deque, sent count)}
        |  pick() -> worker with room;  assign(worker, task)  (in send order)
        |  finish(worker, task_id);  pace(worker, results)
        |  lose(worker) -> Loss(running task, tasks never started)
        v
    a lost worker's first outstanding task is the one it was running (a worker
    runs its tasks in the order received); every later one was never started
    and is safe to run elsewhere.

What "reap" and "respawn" mean per tier:

* local processes (:class:`ProcessLifecycle`): its end watch fires (a
  pidfd, ``_ended.py``); the process is joined, and
  :meth:`ProcessLifecycle.reap` says which of its tasks fail (the one
  running, with :class:`~shmrunner.WorkerLostError`, or the reason it was
  killed for) and which run again; ``spawn_missing`` starts a
  replacement. A worker that has run ``maxtasksperchild`` tasks says ``BYE``
  (:meth:`Lifecycle.retire`) and exits; it is never sent more meanwhile.
  With a ``memory_limit``, the manager thread reads each worker's private
  memory every ``_memwatch.WATCH_INTERVAL`` (:meth:`ProcessLifecycle.over_memory`)
  and SIGKILLs one over the limit: its running task fails with
  :class:`~shmrunner.MemoryLimitError`. A worker the kernel's OOM killer
  killed is told from an anonymous SIGKILL by its memory cgroup's OOM-kill
  counter (``_memwatch.py``) and reported with the same error.
  ``Pool.apply`` may :meth:`ProcessLifecycle.claim` an idle worker: its
  caller sends the task and reads the reply itself, the manager thread
  leaves the channel alone (``Process.reader``) until the worker is handed
  back, and reaps it only then if it died meanwhile.
* remote agents (``_hub.py``): the heartbeat verdict is the reap (the hub calls
  :meth:`Lifecycle.lose`), and the agent reconnecting is the respawn (a new
  hello, :meth:`Lifecycle.add`).

Pacing is one rule for every tier (:meth:`Lifecycle.pace`): a worker whose
results come back less than ``fast_task`` seconds apart per task holds its
``fast_capacity``, so tiny tasks travel many per message; any other holds its
base capacity, which keeps slow tasks balanced across workers. Local
processes add a head-of-line rule (``Worker.prefetch_window``): nothing is
queued behind a task that has run long (longer than the window, or 4x the
worker's last task), behind one whose function last took ``_LONG_TASK`` or
more unless more tasks wait than there are workers (:meth:`Lifecycle.backlog`;
near the end of a map each array-sized task goes to whichever worker is free
next, so the last ones never wait behind one another while a worker idles),
behind one of a function this worker has not run yet (the last task's time
of each function predicts that function's only), nor on a worker that has
finished no task yet. What was
queued behind a task before it turned out long stays there: taking it back
would need the worker's word that it has not started it, and the worker
only reads its channel between tasks (a reader thread in every worker
would be the price).

Not thread-safe by itself: the tier serialises calls (the engine holds its
lock), except where a method says it runs on the tier's own thread.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import multiprocessing.process
import os
import selectors
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Generic, Protocol, TypeVar

from .._memsize import describe as describe_size
from .._tasks import Task, run_chunk, run_chunk_into
from ..errors import ConfigError, MemoryLimitError, WorkerLostError
from ..transport.fdchannel import FdChannel, PeerClosed
from . import _memwatch
from ._ended import EndWatch
from .loop import prepare_fork, sigterm_blocked, worker_main

__all__ = ["Lifecycle", "Loss", "Worker", "TaskLike", "ProcessLifecycle", "Process",
           "TERMINATE_GRACE", "stop_grace"]

log = logging.getLogger("shmrunner.pool")

# The worker processes this process started. A fork() child of it is not
# their parent, yet multiprocessing still lists them among its children
# there, and its exit hook in the child SIGTERMs them, then fails to join
# them ("Exception ignored in atexit callback ... can only join a child
# process"). So a fork child forgets them (multiprocessing does the same for
# the processes it starts: Process._bootstrap empties that set).
_started: weakref.WeakSet[BaseProcess] = weakref.WeakSet()


def _forget_parents_workers() -> None:
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        children.difference_update(_started)
    _started.clear()


os.register_at_fork(after_in_child=_forget_parents_workers)

TERMINATE_GRACE = 1.0  # seconds to wait for a killed process to be reaped
# Seconds an idle worker has to exit once told to stop (a close), unless the
# SHMRUNNER_STOP_GRACE environment variable says otherwise: one still alive
# then is killed, so that close() and join() always end. A worker exits in
# milliseconds, or as long as the finalizers a user's initializer registered
# take; one that never does is wedged (e.g. forked while another thread held
# a lock it takes on its way out, such as a std stream's).
STOP_GRACE = 30.0
_MAX_STOP_GRACE = 86400.0
_CAPACITY = 2  # tasks a local worker holds: one running, one queued behind it
_FAST_CAPACITY = 16  # ... when its tasks take under _FAST_TASK seconds each
_FAST_TASK = 500e-6
# A task joins a worker's queue only while the task running there has run under
# this long (or 4x the worker's last task time): see Worker.prefetch_window.
_PREFETCH_WINDOW = 2e-3
# ... and only behind a task whose function last took under this: a queued task saves
# its worker one round trip (~0.1 ms) but can leave the other workers idle at the
# end of a map while it waits, up to a whole task; past this, balance wins.
_LONG_TASK = 10e-3
_KINDS = 64  # functions whose last task time a worker remembers


class TaskLike(Protocol):
    id: int


T = TypeVar("T", bound=TaskLike)


@dataclass(eq=False)
class Worker(Generic[T]):
    """One worker slot: its endpoint (a process, a remote peer) and what it holds."""

    id: int
    endpoint: Any
    capacity: int
    max_tasks: int | None = None
    tasks: collections.deque[T] = field(default_factory=collections.deque)
    sent: int = 0
    retiring: bool = False
    # A caller thread reads this worker's replies itself (Pool.apply on an idle
    # worker, ProcessLifecycle.claim): it is given no other task meanwhile.
    claimed: bool = False
    # Pacing (Lifecycle.pace): ``capacity`` moves between these two.
    base_capacity: int = 0
    fast_capacity: int | None = None
    last_result: float = 0.0
    # Head-of-line rule (local processes; None: off): a task is queued behind
    # the running one only while that has run under this window, or under 4x
    # the last time of its function here (under _LONG_TASK), and never before
    # the worker has run its function; else a task could wait behind a long
    # one while another worker idles.
    prefetch_window: float | None = None
    head_since: float = 0.0  # when the running task (the head of ``tasks``) started
    last_task: float | None = None  # how long the last task that finished ran
    # Whether a task may wait behind a long one: only while the engine's queue
    # holds more tasks than there are workers (Lifecycle.backlog), so that
    # the other workers cannot run dry meanwhile (a map's last tasks go one
    # at a time to whichever worker is free).
    queue_long: bool = False
    # How long the last task of each function (``id(task_kind(task))``) ran
    # here: a task's time predicts the next of its function only.
    kind_times: dict[int, float] = field(default_factory=dict)
    # kind_times of the running task's function, noted when it became the head
    # (Lifecycle.assign, finish): free() is read per submit, the lookup is not.
    head_took: float | None = None

    def __post_init__(self) -> None:
        if not self.base_capacity:
            self.base_capacity = self.capacity

    @property
    def free(self) -> int:
        """How many more tasks this worker may be sent now."""
        if self.retiring or self.claimed:
            return 0
        free = self.capacity - len(self.tasks)
        window = self.prefetch_window
        if window is not None and free > 0:
            last = self.last_task
            if not self.tasks:
                # Idle: what it takes in one burst, so the queue takes (and
                # pickles) no more tasks than the workers will accept.
                if last is None or (last >= _LONG_TASK and not self.queue_long):
                    free = 1
            else:
                took = self.head_took
                if (took is None or (took >= _LONG_TASK and not self.queue_long)
                        or time.monotonic() - self.head_since > max(window, 4 * took)):
                    return 0
        if self.max_tasks is not None:
            free = min(free, self.max_tasks - self.sent)
        return max(free, 0)


def task_kind(task: object) -> object:
    """What a task's duration is predicted by: the function it runs (a map
    chunk's function, a partial's function), keyed by identity (an id reused
    after the function is gone only misleads one prediction)."""
    fn = getattr(task, "fn", None)
    if fn is run_chunk or fn is run_chunk_into:
        fn = task.args[0]  # type: ignore[attr-defined]
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


@dataclass
class Loss(Generic[T]):
    """What a lost worker held: the task it was running (lost with it) and the
    tasks it had been sent but never started (safe to run elsewhere)."""

    worker: Worker[T]
    running: T | None
    unstarted: list[T]


class Lifecycle(Generic[T]):
    """The workers of one tier and the tasks each holds."""

    def __init__(self, spawn: Callable[[int], Any] | None, size: int, capacity: int = 1,
                 max_tasks: int | None = None, *, fast_capacity: int | None = None,
                 fast_task: float = 0.0, prefetch_window: float | None = None) -> None:
        self._spawn = spawn
        self.prefetch_window = prefetch_window
        self.size = size
        self.capacity = capacity
        self.max_tasks = max_tasks
        self.fast_capacity = fast_capacity
        self.fast_task = fast_task
        self.workers: dict[int, Worker[T]] = {}
        self._next_id = 0
        self._deep = False  # the last backlog(): more tasks waiting than workers

    def __iter__(self) -> Iterator[Worker[T]]:
        return iter(list(self.workers.values()))

    def __len__(self) -> int:
        return len(self.workers)

    def populate(self) -> list[Worker[T]]:
        """Spawn workers until there are ``size``; return the new ones."""
        new = []
        while self._spawn is not None and len(self.workers) < self.size:
            worker_id = self._next_id
            self._next_id += 1
            endpoint = self._spawn(worker_id)
            worker: Worker[T] = Worker(worker_id, endpoint, self.capacity, self.max_tasks,
                                       fast_capacity=self.fast_capacity,
                                       prefetch_window=self.prefetch_window,
                                       queue_long=self._deep)
            self.workers[worker_id] = worker
            new.append(worker)
        return new

    def add(self, endpoint: Any, capacity: int, fast_capacity: int | None = None) -> Worker[T]:
        """Register a worker that arrived by itself (a remote agent's hello)."""
        worker_id = self._next_id
        self._next_id += 1
        worker: Worker[T] = Worker(worker_id, endpoint, capacity, fast_capacity=fast_capacity)
        self.workers[worker_id] = worker
        return worker

    def backlog(self, waiting: int) -> None:
        """``waiting`` tasks wait for a worker (under the tier's lock): while
        they outnumber the workers, long tasks may be queued behind one
        another too (each worker's next task is ready when it finishes);
        near the end, they go one at a time to whichever worker is free."""
        deep = waiting > len(self.workers)
        if deep is not self._deep:
            self._deep = deep
            for worker in self.workers.values():
                worker.queue_long = deep

    def pick(self) -> Worker[T] | None:
        """The worker that should take the next task: an idle one if any, else
        the one with the most room; None when every worker is full."""
        best: Worker[T] | None = None
        for worker in self.workers.values():
            free = worker.free
            if free and not worker.tasks:
                return worker
            if free and (best is None or free > best.free):
                best = worker
        return best

    def assign(self, worker: Worker[T], task: T) -> None:
        if not worker.tasks:
            worker.head_since = time.monotonic()
            if worker.prefetch_window is not None:
                worker.head_took = worker.kind_times.get(id(task_kind(task)))
        worker.tasks.append(task)
        worker.sent += 1

    def finish(self, worker: Worker[T], task_id: int) -> T | None:
        """Remove and return the task ``task_id`` that ``worker`` completed."""
        tasks = worker.tasks
        if tasks and tasks[0].id == task_id:
            now = time.monotonic()
            worker.last_task = now - worker.head_since
            worker.head_since = now  # the next one starts now
            task = tasks.popleft()
            if worker.prefetch_window is not None:
                times = worker.kind_times
                times[id(task_kind(task))] = worker.last_task
                if len(times) > _KINDS:
                    del times[next(iter(times))]  # the oldest
                worker.head_took = times.get(id(task_kind(tasks[0]))) if tasks else None
            return task
        for task in tasks:
            if task.id == task_id:
                tasks.remove(task)
                return task
        return None

    def pace(self, worker: Worker[T], results: int, now: float | None = None,
             stretch: float = 1.0) -> None:
        """The pacing rule: ``results`` arrived together from ``worker``. Fast
        (under ``fast_task`` seconds per task since its last results): it may
        hold its ``fast_capacity``, so tiny tasks and their results travel
        many per syscall or message; otherwise its base capacity, which keeps
        the load balanced when tasks take longer. ``stretch``: how much longer
        than its tasks' own time the worker's turnaround is expected to be (a
        host running more worker processes than it has cores)."""
        if not results:
            return
        now = time.monotonic() if now is None else now
        per_task = (now - worker.last_result) / results / stretch
        worker.last_result = now
        if worker.fast_capacity is not None:
            fast = per_task < self.fast_task
            worker.capacity = worker.fast_capacity if fast else worker.base_capacity

    def retire(self, worker: Worker[T]) -> None:
        """``worker`` said it is leaving on purpose (``maxtasksperchild`` reached,
        an agent draining): it gets no more tasks, and is not lost when it goes."""
        worker.retiring = True

    def lose(self, worker: Worker[T], undelivered: Collection[int] = ()) -> Loss[T]:
        """Forget a worker that is gone and account for what it held.

        ``undelivered`` names tasks the tier knows never reached the worker
        (still queued for it, or dropped): those cannot have been running.
        """
        self.workers.pop(worker.id, None)
        tasks = list(worker.tasks)
        worker.tasks.clear()
        running = next((task for task in tasks if task.id not in undelivered), None)
        return Loss(worker, running, [task for task in tasks if task is not running])

    def busy(self) -> int:
        return sum(len(w.tasks) for w in self.workers.values())

    def room(self) -> int:
        """Tasks the workers may be sent now, all together; safe without the
        tier's lock (a snapshot of the workers), though then at once stale."""
        room = 0
        for worker in list(self.workers.values()):  # (a loop: read per submit)
            room += worker.free
        return room


# --- local processes ------------------------------------------------------------------


def stop_grace() -> float:
    """:data:`STOP_GRACE`, or the seconds ``SHMRUNNER_STOP_GRACE`` names."""
    env = os.environ.get("SHMRUNNER_STOP_GRACE")
    if not env:
        return STOP_GRACE
    try:
        grace = float(env)
    except ValueError:
        grace = math.nan
    if not 0 < grace <= _MAX_STOP_GRACE:  # (nan fails too)
        raise ConfigError(f"SHMRUNNER_STOP_GRACE={env!r} is not a number of seconds in "
                          f"(0, {_MAX_STOP_GRACE:.0f}]; set it to e.g. 30 or unset it")
    return grace


class Process:
    """A local worker process and the parent's end of its channel."""

    __slots__ = ("process", "channel", "ended", "stop_deadline", "killed", "over_limit",
                 "blamed", "oom", "measured", "reader", "channel_ended", "initializing")

    def __init__(self, process: BaseProcess, channel: FdChannel,
                 oom: _memwatch.OomSnapshot | None, initializing: bool = False) -> None:
        self.process = process
        self.channel = channel
        # Running the pool's initializer (until its READY): nothing sent has started.
        self.initializing = initializing
        self.ended = EndWatch(process)  # readable once it exits (grandchildren or not)
        # Held by the one thread reading the channel: the manager thread for a
        # round of its loop, or a caller that claimed the worker (claim()).
        self.reader = threading.Lock()
        self.channel_ended = False  # EOF or out of step (unreadable): never read again
        self.stop_deadline: float | None = None  # told to stop: killed if alive after this
        # Killed on purpose (kill()): only the tasks marked with a kill_reason
        # fail when it is reaped; whatever else it held runs again elsewhere.
        self.killed = False
        # Killed for its memory (kill_over_limit): the bytes it used then; the
        # task it was running fails with MemoryLimitError.
        self.over_limit: int | None = None
        self.blamed: Task | None = None  # the task it held first then (None: idle)
        # The last exact reading of its private memory: (when, the cheap bound
        # then, the exact figure), so that over_memory reads smaps rarely.
        self.measured: tuple[float, int, int] | None = None
        # The OOM-kill counter to read should it die of a SIGKILL nobody sent.
        self.oom = oom


class ProcessLifecycle(Lifecycle[Task]):
    """The process engine's workers: processes started from its manager thread
    (the kernel's parent-death signal follows the thread that forked), each
    with its own AF_UNIX channel; channel and end watch are watched in the
    engine's selector with the data ``("chan", worker)`` and ``("dead", worker)``.

    Spawning and reaping run on the manager thread; the rest under the
    engine's lock, like :class:`Lifecycle`.
    """

    def __init__(self, *, size: int, context: BaseContext,
                 initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
                 maxtasks: int | None, threshold: int, selector: selectors.BaseSelector,
                 parent_fds: tuple[int, ...], memory_limit: int | None = None,
                 logs: tuple[int, int] | None = None, fast_task: float = _FAST_TASK,
                 stop_grace: float = STOP_GRACE) -> None:
        super().__init__(self._start, size, capacity=_CAPACITY, max_tasks=maxtasks,
                         fast_capacity=_FAST_CAPACITY, fast_task=fast_task,
                         # with one process no other worker could take the task
                         prefetch_window=_PREFETCH_WINDOW if size > 1 else None)
        self._context = context
        self._initializer = initializer
        self._initargs = initargs
        self._maxtasks = maxtasks
        self._threshold = threshold
        self._selector = selector
        self._parent_fds = parent_fds  # fds a fork() child must close (the engine's own)
        self.memory_limit = memory_limit  # bytes of private memory per worker, or None
        self.stop_grace = stop_grace  # seconds a worker told to stop has to exit
        self.memory_kills = 0  # workers killed for exceeding memory_limit
        self.oom_kills = 0  # workers the kernel's OOM killer killed
        # Workers that died in the initializer since one last finished it: the
        # engine breaks at INIT_DEATHS_LIMIT (one that always dies would make
        # the tasks it is sent run again for ever).
        self.init_deaths = 0
        self._oom_claimed: dict[str, int] = {}  # OOM-kill counts already put down to a death
        self._logs = logs  # (level, limit) of the task logs the workers capture, or None
        self._spawn_oom: _memwatch.OomSnapshot | None = None  # taken before a batch's forks

    def _start(self, worker_id: int) -> Process:
        oom = self._spawn_oom
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        method = self._context.get_start_method()
        inherited: list[int] = []
        if method == "fork":
            inherited = [w.endpoint.channel.fileno() for w in self]
            inherited += [fd for w in self if (fd := w.endpoint.ended.pidfd) is not None]
            inherited += [*self._parent_fds, parent_end.fileno()]
        process = self._context.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(child_end, os.getpid(), method != "forkserver", self._initializer,
                  self._initargs, self._maxtasks, self._threshold, inherited, self._logs),
            name=f"shmrunner-worker-{worker_id}",
            daemon=True,
        )
        try:
            with sigterm_blocked():  # until worker_main has its own handler
                process.start()
        finally:
            child_end.close()
        _started.add(process)
        return Process(process, FdChannel(parent_end), oom,
                       initializing=self._initializer is not None)

    def spawn_missing(self) -> bool:
        """Start (or replace) processes until there are ``size``, and watch
        them; True if any was started (new capacity). Manager thread, locked."""
        if len(self.workers) >= self.size:
            return False
        # Read once for the batch, before its first fork, from this process: a
        # child starts in its parent's memory cgroup, and reading the child's
        # /proc files while it starts up costs ~0.9 ms per worker against
        # ~0.25 ms here (per batch, not per worker: a pool's start pays it once).
        self._spawn_oom = _memwatch.oom_snapshot(os.getpid())
        prepare_fork()
        new = self.populate()
        for worker in new:
            ep: Process = worker.endpoint
            self._selector.register(ep.channel.sock, selectors.EVENT_READ, ("chan", worker))
            self._selector.register(ep.ended.fd, selectors.EVENT_READ, ("dead", worker))
        return bool(new)

    def processes(self) -> list[BaseProcess]:
        return [worker.endpoint.process for worker in self]

    def stop_idle(self) -> float | None:
        """Ask every worker to exit once it has nothing left (the engine is
        closed and its work done): the empty message means "stop". A worker
        still alive ``stop_grace`` seconds later is killed (it is reaped
        when its sentinel fires). Returns the seconds until the next such
        deadline (None: no worker left to wait for)."""
        now = time.monotonic()
        deadlines = []
        for worker in self:
            ep: Process = worker.endpoint
            if ep.killed:
                continue  # dying already: its sentinel will fire
            if worker.claimed:
                # A Pool.apply caller claimed it and is about to send it a task:
                # told to stop now, it would exit with that task unrun. Once
                # handed back, the manager thread looks again (TaskQueue.hand_back).
                continue
            if ep.stop_deadline is None:
                ep.stop_deadline = now + self.stop_grace
                ep.channel.send_nowait(b"", [])
            elif now >= ep.stop_deadline:
                log.warning("worker pid %s did not exit within %g s of being told to stop; "
                            "killed it (SHMRUNNER_STOP_GRACE sets how long it may take)",
                            ep.process.pid, self.stop_grace)
                ep.killed = True
                ep.process.kill()
                continue
            deadlines.append(ep.stop_deadline)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def watch_writes(self) -> None:
        """Watch for writability exactly the channels with output queued."""
        for worker in self:
            channel = worker.endpoint.channel
            events = selectors.EVENT_READ
            if channel.wants_write:
                events |= selectors.EVENT_WRITE
            try:
                if self._selector.get_key(channel.sock).events != events:
                    self._selector.modify(channel.sock, events, ("chan", worker))
            except (KeyError, ValueError):
                pass

    def claim(self) -> Worker[Task] | None:
        """An idle worker whose channel the calling thread will read itself
        (locked): it gets no other task and the manager thread leaves its
        channel alone until :meth:`hand_back`; its death is still watched
        (the manager thread reaps it once it is handed back). None if no
        worker is idle, or the manager thread is reading the idle one."""
        for worker in self.workers.values():
            ep: Process = worker.endpoint
            if (worker.tasks or not worker.free or ep.channel.wants_write or ep.killed
                    or ep.stop_deadline is not None or ep.channel_ended
                    or not ep.reader.acquire(False)):
                continue
            self._selector.unregister(ep.channel.sock)
            worker.claimed = True
            return worker
        return None

    def hand_back(self, worker: Worker[Task]) -> None:
        """The claiming thread is done with ``worker`` (locked): the manager
        thread watches its channel again (reading what came after)."""
        ep: Process = worker.endpoint
        worker.claimed = False
        try:
            if not ep.channel_ended:
                events = selectors.EVENT_READ
                if ep.channel.wants_write:
                    events |= selectors.EVENT_WRITE
                self._selector.register(ep.channel.sock, events, ("chan", worker))
        finally:
            ep.reader.release()

    def unreadable(self, worker: Worker[Task], error: PeerClosed) -> None:
        """``worker``'s channel reached EOF (its sentinel will fire: it is
        reaped then) or went out of step. The thread reading it."""
        ep: Process = worker.endpoint
        ep.channel_ended = True
        try:
            self._selector.unregister(ep.channel.sock)
        except KeyError:
            pass  # claimed: hand_back leaves it unwatched
        if error.args:
            # Not an EOF but a frame out of step: the channel cannot be read any
            # more, and a live worker nobody reads would hold its tasks forever.
            # Replace it; reap accounts for its tasks.
            ep.process.kill()

    def kill(self, task: Task, reason: BaseException, ran_for: float) -> bool | None:
        """SIGKILL the worker running ``task`` once it has run ``ran_for``
        seconds (True); False if it is queued behind another task or has not
        run long enough yet; None if no worker holds it."""
        for worker in self:
            if task in worker.tasks:
                started = task.started
                if (worker.tasks[0] is not task or started is None
                        or time.monotonic() - started < ran_for):
                    return False
                task.kill_reason = reason
                worker.endpoint.killed = True
                worker.endpoint.process.kill()
                return True
        return None

    def abandon(self, worker: Worker[Task], reason: BaseException) -> None:
        """SIGKILL ``worker`` (locked): messages read from its channel were lost
        before they were handled (the reading thread was interrupted), so only
        its reap can account for what it held. Its tasks fail with ``reason``."""
        for task in worker.tasks:
            task.kill_reason = reason
        worker.endpoint.killed = True
        worker.endpoint.process.kill()

    def over_memory(self) -> list[tuple[Worker[Task], int]]:
        """The workers whose private memory is over ``memory_limit``, with the
        bytes each uses (manager thread, every ``_memwatch.WATCH_INTERVAL``;
        unlocked: it only reads /proc). A worker never sent a task is left
        alone (else one whose initializer alone is over the limit would be
        replaced forever); it is checked from its first task on, which then
        fails if it is still over. :meth:`kill_over_limit` acts on them."""
        limit = self.memory_limit
        if limit is None:
            return []
        over = []
        now = time.monotonic()
        for worker in self:
            ep: Process = worker.endpoint
            pid = ep.process.pid
            if ep.over_limit is not None or not worker.sent or pid is None:
                continue
            bound = _memwatch.anonymous_memory(pid)
            if bound is None or bound <= limit:
                continue
            # The bound counts pages shared with the parent since fork: read
            # the exact figure, unless one read lately has room for the growth.
            last = ep.measured
            if (last is not None and now - last[0] < _memwatch.EXACT_INTERVAL
                    and last[2] + bound - last[1] <= limit):
                continue
            size = _memwatch.private_memory(pid)
            if size is None:
                continue
            ep.measured = (now, bound, size)
            if size > limit:
                over.append((worker, size))
        return over

    def kill_over_limit(self, worker: Worker[Task], size: int) -> None:
        """SIGKILL ``worker``, found using ``size`` bytes by :meth:`over_memory`
        (under the tier's lock, so that no task is sent to it meanwhile). The
        task it holds first fails with MemoryLimitError when it is reaped;
        one sent after the kill is innocent and runs again elsewhere."""
        ep: Process = worker.endpoint
        if ep.over_limit is not None or worker.id not in self.workers:
            return
        ep.over_limit = size
        ep.blamed = worker.tasks[0] if worker.tasks else None
        worker.retiring = True  # nothing more is sent to it
        self.memory_kills += 1
        ep.process.kill()
        held = ep.blamed.describe() if ep.blamed is not None else None
        # With a task, its MemoryLimitError tells the caller; idle, only this does.
        log.log(logging.INFO if held else logging.WARNING,
                "worker pid %s uses %s of private memory, over its memory_limit of "
                "%s: killed (task running: %s); a new worker replaces it",
                ep.process.pid, describe_size(size), describe_size(self.memory_limit or 0),
                held or "none")

    def leftovers(self, worker: Worker[Task]) -> Iterator[list[tuple[bytearray, list[int]]]]:
        """The batches of messages a dead worker sent before it died (they
        still count); then its process is joined and unwatched. Manager thread."""
        ep: Process = worker.endpoint
        try:
            while messages := ep.channel.read_ready():
                yield messages
        except PeerClosed:
            pass
        ep.process.join()
        for fileobj in (ep.channel.sock, ep.ended.fd):
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        ep.ended.close()

    def initialized(self, worker: Worker[Task]) -> None:
        """``worker`` finished the pool's initializer (its READY)."""
        ep: Process = worker.endpoint
        ep.initializing = False
        self.init_deaths = 0

    def reap(self, worker: Worker[Task], stopped: BaseException | None,
             ) -> tuple[list[tuple[Task, BaseException]], list[Task]]:
        """Account for a dead worker after :meth:`leftovers`: the tasks that
        fail (with their error) and those to run again elsewhere, in order.

        ``stopped``: the engine's error when it is terminated or broken (every
        task fails with it). Otherwise the tasks a kill was aimed at fail with
        its reason; the running one fails with WorkerLostError unless the kill
        was aimed elsewhere (then it is innocent and runs again, as does every
        task never started).
        """
        ep: Process = worker.endpoint
        undelivered = {tag for tag in ep.channel.undelivered() if isinstance(tag, int)}
        loss = self.lose(worker, undelivered)
        ep.channel.close()
        if stopped is not None:
            lost = loss.unstarted + ([loss.running] if loss.running is not None else [])
            return [(task, stopped) for task in lost], []
        held = ([loss.running] if loss.running is not None else []) + loss.unstarted
        failed: list[tuple[Task, BaseException]] = [
            (task, task.kill_reason) for task in held if task.kill_reason is not None]
        rerun = [task for task in loss.unstarted if task.kill_reason is None]
        running = loss.running
        if ep.initializing and not ep.killed:
            self.init_deaths += 1
        if running is not None and running.kill_reason is None:
            if ep.initializing:
                rerun.insert(0, running)  # it died in the initializer: never started
            elif ep.over_limit is not None and running is ep.blamed:
                # the task it ran when it held too much memory
                failed.append((running, MemoryLimitError(
                    ep.process.pid, ep.process.exitcode, running.describe(),
                    limit=self.memory_limit, size=ep.over_limit)))
            elif ep.killed or ep.over_limit is not None:
                # killed for a task it had already finished, or sent after the kill
                rerun.insert(0, running)
            else:
                failed.append((running, self._lost(ep, running)))
        for task in rerun:
            task.started = None  # its timeout counts from its next start
        return failed, rerun

    def _lost(self, ep: Process, running: Task) -> WorkerLostError:
        """The error for a worker that died by itself while running ``running``:
        a SIGKILL nobody here sent, with the kernel's OOM-kill counter risen
        since it started, is the OOM killer's (MemoryLimitError); else lost."""
        pid, exitcode = ep.process.pid, ep.process.exitcode
        if exitcode == -signal.SIGKILL:
            evidence = _memwatch.oom_evidence(ep.oom, self._oom_claimed)
            if evidence is not None:
                self.oom_kills += 1
                log.info("worker pid %s was killed by the kernel's OOM killer (%s) while "
                         "running task %s", pid, evidence, running.describe())
                return MemoryLimitError(pid, exitcode, running.describe(),
                                        limit=self.memory_limit, oom_killer=True,
                                        evidence=evidence)
        return WorkerLostError(pid, exitcode, running.describe())

    def terminate_all(self) -> list[Worker[Task]]:
        """SIGKILL every process (``terminate()``: "stops the worker processes
        immediately"; a worker does not act on SIGTERM, see worker_main) and
        join them all; the caller then reaps them. Manager thread, unlocked."""
        workers = list(self)
        for worker in workers:
            if worker.endpoint.process.exitcode is None:
                worker.endpoint.process.kill()
        for worker in workers:
            worker.endpoint.process.join()
        return workers

    def lose_all(self) -> tuple[list[Process], list[Task]]:
        """Forget every worker (the engine crashed); return their processes,
        for :meth:`destroy`, and every task they held."""
        ends: list[Process] = []
        tasks: list[Task] = []
        for worker in self:
            loss = self.lose(worker)
            ends.append(worker.endpoint)
            tasks += ([loss.running] if loss.running is not None else []) + loss.unstarted
        return ends, tasks

    @staticmethod
    def destroy(ends: list[Process]) -> None:
        """Kill and join processes nobody accounts for any more (unlocked):
        the last resort, relying on nothing else."""
        for ep in ends:
            try:
                ep.process.kill()
                ep.process.join(TERMINATE_GRACE)
            except (OSError, ValueError, AssertionError):
                pass  # reaped already
            ep.channel.close()
            ep.ended.close()

    def close(self) -> None:
        for worker in self:
            worker.endpoint.channel.close()
            worker.endpoint.ended.close()
