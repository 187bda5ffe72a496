"""The Pool's engine: the task queue, the workers and the manager thread.

Data flow::

    caller threads                         manager thread (one per pool)
    apply_async/map_async --+               selectors loop over:
    imap feeder threads ----+-> pending       worker channels  (results, EOF)
                                  |           process sentinels (deaths)
                  dispatch(): pick a worker   a wake-up socket  (close, terminate,
                  with room, pickle the task      queued output)
                  (arrays -> memfd fds), send      |
                                  |                v
                                  v           results -> AsyncResult._set (callbacks)
                 worker i <--- its own AF_UNIX socketpair ---> worker i

Why this shape rather than ``multiprocessing.pool``'s shared queues: each
worker has its *own* channel, so (1) the pool knows exactly which tasks each
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
  16, so tiny tasks and their results travel many per syscall (the worker
  batches those results too, see ``worker/loop.py``). Tasks are pickled only
  when dispatched, so shared memory in use stays bounded by the workers'
  capacity, not by the length of the input.
* Workers die with the pool's process (``PR_SET_PDEATHSIG``, or a pidfd
  watch under forkserver: ``worker/loop.py``). They are all started by the
  manager thread, which outlives them: the kernel's parent-death signal
  follows the *thread* that forked.
* Caller threads send directly when a worker has room (no thread hop on the
  latency path); the manager thread only ever does non-blocking socket work,
  so it can never deadlock with a worker that is blocked sending to it.
* No user code runs under the engine's lock: tasks are taken from the queue
  under it (no more than the workers have room for, counting those still
  being pickled), pickled without it, then assigned to a worker and sent in
  one locked step. A slow ``__reduce__`` or a large array copy delays only
  the thread pickling that task (the caller's, or the manager thread's when
  it refills a worker), never other callers waiting for the lock.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from .errors import (
    InitializerError,
    ShmrunnerError,
    TaskCancelledError,
    WorkerLostError,
    attach_remote_traceback,
)
from .shm import DEFAULT_THRESHOLD
from .transport.fdchannel import FdChannel, PeerClosed
from .transport.pickling import Encoded, close_fds, dumps, loads
from .worker.lifecycle import Lifecycle, Worker
from .worker.loop import BYE, INIT_FAILED, TASK_ID, worker_main

__all__ = ["Core", "Task", "run_chunk", "RUN", "CLOSE", "TERMINATE", "resolve_threshold",
           "stop_at_exit"]

log = logging.getLogger("shmrunner.pool")

# The states multiprocessing.pool uses (its tests read and write ``_state``).
RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"

_TERMINATE_GRACE = 1.0  # seconds between SIGTERM and SIGKILL in terminate()
_CAPACITY = 2  # tasks a worker holds: one running, one queued behind it
_FAST_CAPACITY = 16  # ... when its tasks take under _FAST_TASK seconds each
_FAST_TASK = 500e-6


class Task:
    __slots__ = ("id", "fn", "args", "kwargs", "result", "index", "kill_reason", "started")

    def __init__(self, task_id: int, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: Mapping[str, Any], result: Any, index: int) -> None:
        self.id = task_id
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result = result
        self.index = index
        # Set when the pool kills this task's worker on purpose (a timeout):
        # reported instead of WorkerLostError.
        self.kill_reason: BaseException | None = None
        # When its worker started it (monotonic), as the engine sees it: the task
        # at the head of a worker's queue is the one running.
        self.started: float | None = None

    def describe(self) -> str:
        fn = self.args[0] if self.fn is run_chunk else self.fn
        name = getattr(fn, "__qualname__", None) or repr(fn)
        return f"{self.id} ({name})"


def run_chunk(fn: Callable[..., Any], chunk: list[Any], star: bool) -> list[Any]:
    if star:
        return list(itertools.starmap(fn, chunk))
    return list(map(fn, chunk))


class _Endpoint:
    __slots__ = ("process", "channel", "stopping", "killed", "last_result")

    def __init__(self, process: BaseProcess, channel: FdChannel) -> None:
        self.process = process
        self.channel = channel
        self.stopping = False
        # Killed on purpose (kill()): only the tasks marked with a kill_reason
        # fail when it is reaped; whatever else it held runs again elsewhere.
        self.killed = False
        self.last_result = 0.0


class Core:
    """The pool's state and its manager thread; the Pool facade only forwards.

    Kept apart from :class:`Pool` so the thread holds no reference to the
    facade, which can then be garbage collected (and warn) like
    ``multiprocessing.Pool``.
    """

    def __init__(self, processes: int, initializer: Callable[..., object] | None,
                 initargs: tuple[Any, ...], maxtasks: int | None, ctx: BaseContext,
                 threshold: int) -> None:
        self.ctx = ctx
        # Workers, sockets and the manager thread belong to this process: a
        # fork() child that used them would send on the parent's sockets.
        self.pid = os.getpid()
        self.initializer = initializer
        self.initargs = initargs
        self.maxtasks = maxtasks
        self.threshold = threshold
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)  # feeders wait here for queue space
        self.pending: collections.deque[Task] = collections.deque()
        self.encoding = 0  # tasks taken from pending, being pickled outside the lock
        self.state = RUN
        self.broken: BaseException | None = None
        self.feeders: set[threading.Thread] = set()
        self.feed_limit = max(8, 4 * processes)
        self.lifecycle: Lifecycle[Task] = Lifecycle(self._spawn, processes, capacity=_CAPACITY,
                                                     max_tasks=maxtasks)
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        self.ids = itertools.count()
        # Called on the manager thread after each batch of results is delivered
        # (the Scheduler refills the pool there, many tasks per syscall).
        self.after_results: Callable[[], None] | None = None
        self.started = threading.Event()
        self.startup_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shmrunner-pool", daemon=True)
        self.thread.start()
        stop_at_exit(self)
        self.started.wait()
        if self.startup_error is not None:
            self.thread.join()
            self._close_resources()
            raise self.startup_error

    # --- called from any thread ------------------------------------------------------

    def new_task(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 result: Any, index: int = 0) -> Task:
        return Task(next(self.ids), fn, args, kwargs, result, index)

    def check_process(self, owner: str = "Pool") -> None:
        """Raise in a fork() child: the workers answer the parent, and only the
        parent's manager thread reads their results (the child would steal
        some from the parent and wait forever for its own)."""
        if os.getpid() != self.pid:
            raise ShmrunnerError(
                f"this {owner} was created in process {self.pid} and cannot be used from "
                f"process {os.getpid()}, a fork() of it; create a new {owner} in the child")

    def in_owner(self) -> bool:
        return os.getpid() == self.pid

    def submit(self, tasks: Iterable[Task]) -> None:
        self.check_process()
        taken: list[Task] = []
        with self.lock:
            if self.broken is not None:
                failed = [(task, self.broken) for task in tasks]
            elif self.state == TERMINATE:
                cancelled = TaskCancelledError("the pool was terminated")
                failed = [(task, cancelled) for task in tasks]
            else:
                self.pending.extend(tasks)
                failed = []
                taken = self._take_locked()
        if taken:
            failed = self._send(taken)
        for task, error in failed:
            self.deliver(task, False, error)

    def wait_for_room(self) -> bool:
        """Block a feeder until the queue has room; False once terminated."""
        with self.room:
            while len(self.pending) >= self.feed_limit and self.state != TERMINATE:
                self.room.wait(0.5)
            return self.state != TERMINATE

    def dispatch(self) -> None:
        with self.lock:
            taken = self._take_locked()
        if taken:
            for task, error in self._send(taken):
                self.deliver(task, False, error)

    def _take_locked(self) -> list[Task]:
        """Take from the queue as many tasks as the workers have room for,
        counting those other threads are still encoding; the caller encodes and
        sends them with :meth:`_send` once it has released the lock."""
        pending = self.pending
        if not pending or self.state == TERMINATE:
            return []
        room = sum(worker.free for worker in self.lifecycle.workers.values()) - self.encoding
        if room <= 0:
            return []
        taken = [pending.popleft() for _ in range(min(room, len(pending)))]
        self.encoding += len(taken)
        if self.feeders:  # the only threads that wait for room
            self.room.notify_all()
        return taken

    def _send(self, tasks: list[Task]) -> list[tuple[Task, BaseException]]:
        """Pickle ``tasks`` without the lock (user ``__reduce__`` code, array
        copies into shared memory), then under it give each to a worker with
        room and send, one syscall per worker. Assigning and sending in one
        locked step keeps each worker's send order its assignment order (the
        lifecycle accounting relies on it), and a worker that died meanwhile
        is simply not picked. Returns the tasks to fail once no lock is held
        (their callbacks must not run under it)."""
        failed: list[tuple[Task, BaseException]] = []
        encoded: list[tuple[Task, Encoded]] = []
        for task in tasks:
            try:
                encoded.append((task, dumps((task.fn, task.args, task.kwargs), self.threshold)))
            except BaseException as exc:  # noqa: BLE001 (user __reduce__ code: the task fails)
                failed.append((task, exc))
        batches: dict[Worker[Task], list[tuple[bytes, list[int], Callable[[], None], int]]]
        batches = {}
        requeue: list[Task] = []
        wake = False
        with self.lock:
            self.encoding -= len(tasks)
            stopped: BaseException | None = self.broken
            if stopped is None and self.state == TERMINATE:
                stopped = TaskCancelledError("the pool was terminated")
            lifecycle = self.lifecycle
            for task, message in encoded:
                worker = lifecycle.pick() if stopped is None else None
                if worker is None:
                    message.release()
                    if stopped is not None:
                        failed.append((task, stopped))
                    else:  # a worker died or shrank its capacity meanwhile
                        requeue.append(task)
                    continue
                lifecycle.assign(worker, task)
                if worker.tasks[0] is task:
                    task.started = time.monotonic()
                batches.setdefault(worker, []).append(
                    (TASK_ID.pack(task.id) + message.data, message.fds, message.release, task.id))
            if requeue:
                self.pending.extendleft(reversed(requeue))
            for worker, messages in batches.items():
                channel: FdChannel = worker.endpoint.channel
                # A worker that is gone drops what it is sent; its sentinel fires
                # and _reap requeues its tasks.
                channel.send_batch_nowait([m[:3] for m in messages], [m[3] for m in messages])
                wake = wake or channel.wants_write
        if wake or requeue:
            self.wake()  # the manager watches writability, or dispatches the requeued
        return failed

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        result, index = task.result, task.index
        task.fn = task.args = task.kwargs = task.result = None  # type: ignore[assignment]
        result._set(index, ok, value)

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
        the signal lands: :meth:`_reap` then delivers that result (the task
        succeeds) and runs every other task the worker held again elsewhere,
        so a kill never fails a task it was not aimed at.
        """
        with self.lock:
            if task in self.pending:
                if ran_for > 0:
                    return False
                self.pending.remove(task)
                queued = True
            else:
                queued = False
                for worker in self.lifecycle:
                    if task in worker.tasks:
                        started = task.started
                        if (worker.tasks[0] is not task or started is None
                                or time.monotonic() - started < ran_for):
                            return False
                        task.kill_reason = reason
                        worker.endpoint.killed = True
                        worker.endpoint.process.kill()
                        break
                else:
                    if task.result is not None:
                        return False  # being pickled (not delivered yet): ask again
        if queued:
            self.deliver(task, False, reason)
        return True

    def close(self) -> None:
        if not self.in_owner():
            return  # a fork() child: the parent's pool is not the child's to stop
        with self.lock:
            if self.state == RUN:
                self.state = CLOSE
        self.wake()

    def terminate(self) -> None:
        if not self.in_owner():
            # A fork() child (its copy of the lock may be held forever by a
            # thread that does not exist there): the pool is the parent's.
            return
        if self.state == TERMINATE and not self.thread.is_alive():
            return  # done already: not even the lock is needed
        with self.lock:
            self.state = TERMINATE
            cancelled = list(self.pending)
            self.pending.clear()
            self.room.notify_all()
        for task in cancelled:
            self.deliver(task, False, TaskCancelledError("the pool was terminated"))
        self.wake()

    def shutdown_at_exit(self) -> None:
        """Terminate and wait (bounded): the interpreter is exiting."""
        if not self.in_owner() or self.state == TERMINATE and not self.thread.is_alive():
            return
        self.terminate()
        if threading.current_thread() is not self.thread:
            self.thread.join(_TERMINATE_GRACE + 5.0)

    def join(self) -> None:
        if not self.in_owner():
            return
        for feeder in list(self.feeders):
            feeder.join()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def wake(self) -> None:
        try:
            self.wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the pool is gone

    # --- manager thread ----------------------------------------------------------------

    def _spawn(self, worker_id: int) -> _Endpoint:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        method = self.ctx.get_start_method()
        inherited: list[int] = []
        if method == "fork":
            inherited = [w.endpoint.channel.fileno() for w in self.lifecycle]
            inherited += [self.wake_r.fileno(), self.wake_w.fileno(), parent_end.fileno()]
        process = self.ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(child_end, os.getpid(), method != "forkserver",
                  self.initializer, self.initargs, self.maxtasks, self.threshold, inherited),
            name=f"shmrunner-worker-{worker_id}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_end.close()
        return _Endpoint(process, FdChannel(parent_end))

    def _populate(self) -> bool:
        """Spawn missing workers; True if any was spawned (new capacity)."""
        new = self.lifecycle.populate()
        for worker in new:
            ep = worker.endpoint
            self.selector.register(ep.channel.sock, selectors.EVENT_READ, ("chan", worker))
            self.selector.register(ep.process.sentinel, selectors.EVENT_READ, ("dead", worker))
        return bool(new)

    def _run(self) -> None:
        try:
            with self.lock:
                self._populate()
        except BaseException as exc:
            self.startup_error = exc
            self.started.set()
            return
        self.started.set()
        try:
            while True:
                chores = False  # results alone need no housekeeping: the hot path
                for key, mask in self.selector.select():
                    kind, worker = key.data
                    if kind == "wake":
                        self._drain_wake()
                        chores = True
                    elif worker.id not in self.lifecycle.workers:
                        continue  # reaped earlier in this batch of events
                    elif kind == "chan":
                        if mask & selectors.EVENT_WRITE:
                            with self.lock:
                                worker.endpoint.channel.flush()
                            chores = True
                        if mask & selectors.EVENT_READ:
                            self._read(worker)
                    elif kind == "dead":
                        self._reap(worker)
                        chores = True
                # Once closed, every round may be the one after the last result.
                if (chores or self.state != RUN) and self._housekeeping():
                    break
        except BaseException as exc:
            log.exception("shmrunner pool manager thread crashed; terminating the pool")
            self._crash(exc)
        finally:
            self._close_resources()

    def _crash(self, cause: BaseException) -> None:
        """The manager thread cannot go on: fail every task rather than leave
        any result pending forever, and stop the workers."""
        error = ShmrunnerError(f"the pool's manager thread crashed: {cause!r}")
        error.__cause__ = cause
        with self.lock:
            self.broken = error
            self.state = TERMINATE
            failed = list(self.pending)
            self.pending.clear()
            self.room.notify_all()
        for task in failed:
            self._deliver_quietly(task, error)
        try:
            self._kill_all()
        except BaseException:  # noqa: BLE001 (the thread is ending either way)
            log.exception("shmrunner pool manager thread: stopping the workers failed too")
        # Whatever _kill_all could not account for (it failed as well): fail
        # those tasks here and make sure no worker outlives the pool.
        with self.lock:
            losses = [self.lifecycle.lose(worker) for worker in self.lifecycle]
        for loss in losses:
            process = loss.worker.endpoint.process
            try:
                process.kill()
                process.join(_TERMINATE_GRACE)
            except (OSError, ValueError, AssertionError):
                pass  # reaped already
            loss.worker.endpoint.channel.close()
            for task in ([loss.running] if loss.running is not None else []) + loss.unstarted:
                self._deliver_quietly(task, error)

    def _deliver_quietly(self, task: Task, error: BaseException) -> None:
        try:
            self.deliver(task, False, error)
        except BaseException:  # noqa: BLE001 (one failing delivery must not strand the rest)
            log.exception("shmrunner pool: failing task %s after a crash raised", task.id)

    def _drain_wake(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _read(self, worker: Worker[Task]) -> None:
        channel: FdChannel = worker.endpoint.channel
        try:
            messages = channel.read_ready()
        except PeerClosed as exc:
            # The process is exiting; its sentinel will fire and _reap accounts for it.
            self.selector.unregister(channel.sock)
            if exc.args:
                # Not an EOF but a frame out of step: the channel cannot be read
                # any more, and a live worker nobody reads would hold its tasks
                # forever. Replace it; _reap accounts for its tasks.
                log.error("worker pid %s: %s; replacing it", worker.endpoint.process.pid, exc)
                worker.endpoint.process.kill()
            return
        self._handle(worker, messages)

    def _handle(self, worker: Worker[Task], messages: list[tuple[bytearray, list[int]]]) -> None:
        """Decode a worker's messages, then under one lock: retire finished
        tasks and refill the worker; callbacks run after the lock is released."""
        outcomes = []
        for payload, fds in messages:
            (task_id,) = TASK_ID.unpack_from(payload)
            if task_id == BYE:
                worker.retiring = True
                close_fds(fds)
                continue
            try:
                ok, value = loads(memoryview(payload)[TASK_ID.size:], fds)
            except BaseException as exc:  # noqa: BLE001 (user code in __setstate__: this task fails)
                ok, value = False, (exc, "")
            if not ok:
                error, tb = value
                value = attach_remote_traceback(error, tb) if tb else error
            if task_id == INIT_FAILED:
                self._break(value)
                return
            outcomes.append((task_id, ok, value))
        self._pace(worker, len(outcomes))
        with self.lock:
            finished = [(self.lifecycle.finish(worker, task_id), ok, value)
                        for task_id, ok, value in outcomes]
            if worker.tasks and worker.tasks[0].started is None:
                worker.tasks[0].started = time.monotonic()  # next in line: running now
            taken = self._take_locked()
        failed = self._send(taken) if taken else []
        for task, ok, value in finished:
            if task is not None:
                self.deliver(task, ok, value)
        for task, error in failed:
            self.deliver(task, False, error)
        if self.after_results is not None:
            self.after_results()

    def _pace(self, worker: Worker[Task], results: int) -> None:
        """Let a worker that turns tasks around fast hold more of them, so tiny
        tasks travel (and their results come back) many per syscall; slow
        tasks keep the default of one running plus one queued, which keeps
        the load balanced."""
        if not results:
            return
        ep: _Endpoint = worker.endpoint
        now = time.monotonic()
        per_task = (now - ep.last_result) / results
        ep.last_result = now
        worker.capacity = _FAST_CAPACITY if per_task < _FAST_TASK else _CAPACITY

    def _break(self, cause: BaseException) -> None:
        name = getattr(self.initializer, "__qualname__", repr(self.initializer))
        error = InitializerError(f"the pool's initializer {name} raised {cause!r}; "
                                 "fix the initializer: no worker can start")
        error.__cause__ = cause
        with self.lock:
            self.broken = error
            failed = list(self.pending)
            self.pending.clear()
            self.room.notify_all()
        for task in failed:
            self.deliver(task, False, error)

    def _reap(self, worker: Worker[Task]) -> None:
        ep: _Endpoint = worker.endpoint
        try:  # results the worker sent before it died still count
            while messages := ep.channel.read_ready():
                self._handle(worker, messages)
        except PeerClosed:
            pass
        ep.process.join()
        for fileobj in (ep.channel.sock, ep.process.sentinel):
            try:
                self.selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        with self.lock:
            undelivered = {tag for tag in ep.channel.undelivered() if isinstance(tag, int)}
            loss = self.lifecycle.lose(worker, undelivered)
            ep.channel.close()
            failed: list[tuple[Task, BaseException]] = []
            if self.state == TERMINATE or self.broken is not None:
                error = self.broken or TaskCancelledError("the pool was terminated")
                failed += [(task, error) for task in loss.unstarted]
                if loss.running is not None:
                    failed.append((loss.running, error))
            else:
                held = ([loss.running] if loss.running is not None else []) + loss.unstarted
                # The tasks a kill() was aimed at fail with its reason, nothing else does.
                failed += [(task, task.kill_reason) for task in held
                           if task.kill_reason is not None]
                # Never started: safe to run elsewhere.
                rerun = [task for task in loss.unstarted if task.kill_reason is None]
                running = loss.running
                if running is not None and running.kill_reason is None:
                    if ep.killed:
                        # Killed for a task it had already finished: this one is innocent.
                        rerun.insert(0, running)
                    else:
                        failed.append((running, WorkerLostError(
                            ep.process.pid, ep.process.exitcode, running.describe())))
                for task in rerun:
                    task.started = None  # its timeout counts from its next start
                # Pickled again at dispatch.
                self.pending.extendleft(reversed(rerun))
        for task, error in failed:
            self.deliver(task, False, error)
        if self.after_results is not None:
            self.after_results()

    def _housekeeping(self) -> bool:
        """Respawn, stop idle workers once closed, watch writability; True to exit."""
        spawned = False
        with self.lock:
            state = self.state
            if state == TERMINATE:
                pass
            else:
                work_left = bool(self.pending or self.encoding or self.lifecycle.busy()
                                 or self.feeders)
                if self.broken is None and (state == RUN or work_left):
                    spawned = self._populate()
                if state == CLOSE and not work_left:
                    for worker in self.lifecycle:
                        ep = worker.endpoint
                        if not ep.stopping:
                            ep.stopping = True
                            ep.channel.send_nowait(b"", [])
                    if not len(self.lifecycle):
                        return True
                for worker in self.lifecycle:
                    channel = worker.endpoint.channel
                    events = selectors.EVENT_READ
                    if channel.wants_write:
                        events |= selectors.EVENT_WRITE
                    try:
                        if self.selector.get_key(channel.sock).events != events:
                            self.selector.modify(channel.sock, events, ("chan", worker))
                    except (KeyError, ValueError):
                        pass
        if state == TERMINATE:
            self._kill_all()
            return True
        self.dispatch()
        if spawned and self.after_results is not None:
            self.after_results()  # a respawn added capacity: the Scheduler may have work
        return False

    def _kill_all(self) -> None:
        workers = list(self.lifecycle)
        for worker in workers:
            if worker.endpoint.process.exitcode is None:
                worker.endpoint.process.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE
        for worker in workers:
            process = worker.endpoint.process
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()
        for worker in workers:
            if worker.id in self.lifecycle.workers:
                self._reap(worker)

    def _close_resources(self) -> None:
        for worker in list(self.lifecycle):
            worker.endpoint.channel.close()
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()


def resolve_threshold(threshold: int | None) -> int:
    if threshold is not None:
        return int(threshold)
    env = os.environ.get("SHMRUNNER_SHM_THRESHOLD")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(
                f"SHMRUNNER_SHM_THRESHOLD={env!r} is not a whole number of bytes; "
                "set it to e.g. 65536 or unset it"
            ) from None
    return DEFAULT_THRESHOLD


_live: weakref.WeakSet[Core] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def stop_at_exit(core: Core) -> None:
    """Stop ``core``'s workers at interpreter exit, before multiprocessing's own
    exit hook kills daemonic children (the manager thread would respawn them)
    and while every thread can still run (later, a daemon thread frozen holding
    the pool's lock would deadlock the Pool's ``__del__``).

    One ``atexit`` hook, registered at the first pool: multiprocessing.util's
    hook was registered when this package imported multiprocessing, and atexit
    runs the last registered first.
    """
    global _exit_hook_registered
    with _exit_hook_lock:
        _live.add(core)
        if not _exit_hook_registered:
            atexit.register(_stop_all)
            _exit_hook_registered = True


def _stop_all() -> None:
    for core in list(_live):
        core.shutdown_at_exit()
