"""The process engine's manager thread: one ``selectors`` loop over the
workers' channels (results), their processes' end watches (deaths) and a
:class:`~shmrunner._wakeup.Wakeup` (close, terminate, queued output).

It delivers results and refills workers (``_dispatch.py``), reaps dead
workers and respawns them (``worker/lifecycle.py``), stops idle workers once
the engine is closed (and kills one still alive its stop grace later, so that
a close always ends), and, should it crash, fails every task rather than
leave one pending forever. With a ``memory_limit`` its wait has a timeout, so
it reads the workers' memory every ``_memwatch.WATCH_INTERVAL``; it also has
one while a stopped worker's grace runs out (otherwise it waits on events
only). It only ever does non-blocking socket work, so it can never deadlock
with a worker blocked sending to it.

A ``Pool.apply`` caller may claim an idle worker (``ProcessLifecycle.claim``)
and read its reply on its own thread (:meth:`Manager.read_claimed`, the same
handling as here); meanwhile this thread leaves that channel alone
(``Process.reader``), and a dead claimed worker is reaped once its claimer,
which watches the same end, has handed it back.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import selectors
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _segcache
from ._dispatch import CLOSE, RUN, TERMINATE, TaskQueue
from ._sink import AwaitedSink
from ._tasks import Task, decode_outcome, deliver
from ._wakeup import Wakeup
from .errors import InitializerError, ShmrunnerError, TaskCancelledError
from .transport.fdchannel import FdChannel, PeerClosed
from .transport.pickling import close_fds
from .worker._memwatch import WATCH_INTERVAL
from .worker.lifecycle import ProcessLifecycle, Worker
from .worker.loop import BYE, INIT_FAILED, LOGS, READY, RELEASED, STARTED, TASK_ID

__all__ = ["Manager", "LogsCallback"]

# Told, on the manager thread, a task's log records (``_tasklogs.py``), the pid
# of the worker that ran it, and whether its result follows at once (``final``;
# else the task runs on: a long task's early records).
LogsCallback = Callable[[Task, int | None, list[Any], bool], None]

# Seconds Pool.apply polls for the reply of a task whose worker's last task
# took under as long, before it sleeps (read_claimed).
SPIN_FOR = 100e-6
# Workers in a row that die in the pool's initializer before the pool breaks
# with InitializerError (multiprocessing respawns them for ever; the tasks
# they were sent, never started, would run again for ever here).
INIT_DEATHS_LIMIT = 10

log = logging.getLogger("shmrunner.pool")


class Manager:
    def __init__(self, queue: TaskQueue, lifecycle: ProcessLifecycle,
                 selector: selectors.BaseSelector, wakeup: Wakeup,
                 initializer: Callable[..., object] | None,
                 on_results: Callable[[], None] | None,
                 on_logs: LogsCallback | None = None,
                 on_room: Callable[[], None] | None = None) -> None:
        self._queue = queue
        self._lifecycle = lifecycle
        self._selector = selector
        self._wakeup = wakeup
        self._initializer = initializer
        self._on_results = on_results
        self._on_room = on_room
        self._on_logs = on_logs
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._memory_errors = 0  # unexpected errors reading the workers' memory
        # Once closed and idle: seconds until a worker told to stop is killed
        # for not exiting (the select wakes then); None otherwise.
        self._stop_wait: float | None = None

    def wait_started(self) -> BaseException | None:
        """Wait until the first workers are spawned; the error if they could not be."""
        self._started.wait()
        return self._startup_error

    def run(self) -> None:
        try:
            # Every worker is forked here, never on the caller's thread: a fork
            # copies the forking thread's OpenMP team, and a child forked from a
            # thread that had run torch (libgomp) deadlocks in its first parallel
            # region (tests/test_foreign_types.py, with torch installed).
            with self._queue.lock:
                self._lifecycle.spawn_missing()
        except BaseException as exc:
            self._startup_error = exc
            self._started.set()
            return
        self._started.set()
        workers = self._lifecycle.workers
        watch = self._lifecycle.memory_limit is not None
        next_watch = time.monotonic()
        timeout = WATCH_INTERVAL if watch else None
        try:
            while True:
                chores = False  # results alone need no housekeeping: the hot path
                for key, mask in self._selector.select(timeout):
                    kind, worker = key.data
                    if kind == "wake":
                        self._wakeup.drain()
                        chores = True
                    elif worker.id not in workers:
                        continue  # reaped earlier in this batch of events
                    elif kind == "chan":
                        if mask & selectors.EVENT_WRITE:
                            with self._queue.lock:
                                worker.endpoint.channel.flush()
                            chores = True
                        if mask & selectors.EVENT_READ:
                            reader = worker.endpoint.reader
                            if reader.acquire(False):  # else a caller claimed it just now
                                try:
                                    self._read(worker)
                                finally:
                                    reader.release()
                    elif kind == "dead":
                        self._reap(worker)
                        chores = True
                # Once closed, every round may be the one after the last result.
                if (chores or self._queue.state != RUN) and self._housekeeping():
                    break
                timeout = self._stop_wait  # a stopped worker's grace runs out
                if watch:  # a killed worker's sentinel fires: it is reaped in a later round
                    now = time.monotonic()
                    if now >= next_watch:
                        self._check_memory()
                        next_watch = now + WATCH_INTERVAL
                    until_watch = max(0.0, next_watch - now)
                    timeout = until_watch if timeout is None else min(timeout, until_watch)
        except BaseException as exc:
            log.exception("shmrunner pool manager thread crashed; terminating the pool")
            self._crash(exc)
        finally:
            self.close_resources()

    def _check_memory(self) -> None:
        try:
            over = self._lifecycle.over_memory()
        except Exception:  # a /proc surprise must not break the pool: read again next time
            self._memory_errors += 1
            if self._memory_errors <= 3:
                log.exception("shmrunner pool: reading the workers' memory failed")
            return
        if over:
            with self._queue.lock:
                for worker, size in over:
                    self._lifecycle.kill_over_limit(worker, size)

    def read_claimed(self, worker: Worker[Task], result: AwaitedSink) -> None:
        """On a caller's thread that claimed ``worker`` and sent it one task
        (``TaskQueue.claim``): read and handle the worker's messages as this
        thread would, until ``result`` is settled, the channel ends or the
        worker dies (this thread then reaps it, once the caller hands it back).

        Why: the reply wakes the waiting caller directly, instead of waking
        this thread, which then wakes the caller (a thread hand-off and an
        interpreter-lock hand-off less per ``Pool.apply``)."""
        ep = worker.endpoint
        channel: FdChannel = ep.channel
        sock = channel.sock.fileno()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(ep.ended.fd, select.POLLIN)
        writing = False
        # A tiny task's reply comes back within tens of microseconds: then poll
        # for it a while before sleeping. A sleeping thread costs its waker a
        # wake-up, dearer than the whole round trip on a virtual machine.
        last = worker.last_task
        spin_until = (time.monotonic() + SPIN_FOR
                      if last is not None and last < SPIN_FOR else 0.0)
        while not result.ready():
            if channel.wants_write is not writing:  # a large task not sent whole yet
                writing = channel.wants_write
                poller.modify(sock, select.POLLIN | (select.POLLOUT if writing else 0))
            ready = poller.poll(0)
            while not ready and time.monotonic() < spin_until:
                os.sched_yield()  # (a runnable worker on this CPU goes first)
                ready = poller.poll(0)
            for fd, events in ready or poller.poll():
                if fd != sock:
                    return  # the worker died: the manager thread reaps it
                if events & select.POLLOUT:
                    with self._queue.lock:
                        channel.flush()
                if events & ~select.POLLOUT and not self._read_or_abandon(worker):
                    return

    def _read_or_abandon(self, worker: Worker[Task]) -> bool:
        """:meth:`_read` on a claiming caller's thread, where KeyboardInterrupt
        (or an exception a signal handler raises) can strike between reading
        messages and handling them: then the worker is killed, and its reap
        settles what it held, instead of a result being lost for good."""
        try:
            return self._read(worker)
        except BaseException as exc:
            with self._queue.lock:
                self._lifecycle.abandon(worker, TaskCancelledError(
                    f"the call was interrupted ({type(exc).__name__}) while it read the "
                    "worker's reply; the worker was replaced"))
            raise

    def _read(self, worker: Worker[Task]) -> bool:
        """Handle what the worker sent; False once its channel has ended."""
        channel: FdChannel = worker.endpoint.channel
        try:
            messages = channel.read_ready()
        except PeerClosed as exc:
            if exc.args:
                log.error("worker pid %s: %s; replacing it", worker.endpoint.process.pid, exc)
            self._lifecycle.unreadable(worker, exc)
            return False
        self._handle(worker, messages)
        return True

    def _handle(self, worker: Worker[Task], messages: list[tuple[bytearray, list[int]]]) -> None:
        """Decode a worker's messages, then under one lock: retire finished
        tasks and refill the worker; callbacks run after the lock is released."""
        outcomes = []
        started: list[int] = []  # tasks the worker says it starts (those with a timeout)
        logs: list[tuple[int, bytearray]] = []  # (task id, pickled records)
        lifecycle = self._lifecycle
        for payload, fds in messages:
            (task_id,) = TASK_ID.unpack_from(payload)
            if task_id == BYE:
                lifecycle.retire(worker)
                close_fds(fds)
                continue
            if task_id == STARTED:
                started.append(TASK_ID.unpack_from(payload, TASK_ID.size)[0])
                continue
            if task_id == READY:
                with self._queue.lock:
                    lifecycle.initialized(worker)
                close_fds(fds)
                continue
            if task_id == RELEASED:
                self._released(worker, payload, fds)
                continue
            if task_id == LOGS:
                logs.append((TASK_ID.unpack_from(payload, TASK_ID.size)[0], payload))
                close_fds(fds)
                continue
            task_id, ok, value = decode_outcome(payload, fds)
            if task_id == INIT_FAILED:
                self._break(value)
                return
            outcomes.append((task_id, ok, value))
        lifecycle.pace(worker, len(outcomes))
        queue = self._queue
        if logs:
            self._logs(worker, logs, {task_id for task_id, _, _ in outcomes})
        with queue.lock:
            finished = [(lifecycle.finish(worker, task_id), ok, value)
                        for task_id, ok, value in outcomes]
            now = time.monotonic()
            if started:
                for held in worker.tasks:
                    if held.id in started:
                        held.started = now
            head = worker.tasks[0] if worker.tasks else None
            if head is not None and head.started is None and not head.report_start:
                head.started = now  # next in line: running now
            taken = queue.take_locked()
        failed = queue.send(taken) if taken else []
        if finished and self._on_room is not None:
            # Before the results settle: a queue kept above the engine (the
            # Scheduler's) refills the worker now, so it does not sit idle
            # while its results are delivered.
            self._on_room()
        for task, ok, value in finished:
            if task is not None:
                deliver(task, ok, value)
        for task, error in failed:
            deliver(task, False, error)
        if self._on_results is not None:
            self._on_results()

    def _released(self, worker: Worker[Task], payload: bytearray, fds: list[int]) -> None:
        """The worker no longer maps these recycled segments (or passed them on)."""
        close_fds(fds)
        try:
            free, gone = _segcache.decode_report(payload, TASK_ID.size)
        except (ValueError, struct.error):
            log.error("worker pid %s sent a malformed release report; ignored",
                      worker.endpoint.process.pid)
            return
        _segcache.dropped(worker, gone)
        _segcache.released(worker, free)
    def _logs(self, worker: Worker[Task], logs: list[tuple[int, bytearray]],
              finishing: set[int]) -> None:
        """Hand each task's log records to ``on_logs`` (before its result, which
        follows at once for the tasks in ``finishing``)."""
        if self._on_logs is None:
            return
        with self._queue.lock:
            held = {task.id: task for task in worker.tasks}
        pid = worker.endpoint.process.pid
        for task_id, payload in logs:
            task = held.get(task_id)
            if task is None:
                continue  # not a task of this worker's (it was lost meanwhile)
            try:
                records = pickle.loads(memoryview(payload)[2 * TASK_ID.size:])
                self._on_logs(task, pid, records, task_id in finishing)
            except Exception:  # noqa: BLE001 (a log must never cost a result)
                log.exception("shmrunner pool: forwarding the log of task %s failed", task_id)

    def _break(self, cause: BaseException | None, deaths: str = "") -> None:
        """No worker can start: the initializer raised ``cause``, or (None) it
        killed the workers that ran it, as ``deaths`` says."""
        name = getattr(self._initializer, "__qualname__", repr(self._initializer))
        happened = f"raised {cause!r}" if cause is not None else f"killed its workers: {deaths}"
        error = InitializerError(f"the pool's initializer {name} {happened}; "
                                 "fix the initializer: no worker can start")
        error.__cause__ = cause
        with self._queue.lock:
            self._queue.broken = error
            failed = self._queue.clear_locked()
        for task in failed:
            deliver(task, False, error)

    def _reap(self, worker: Worker[Task]) -> None:
        # A caller that claimed the worker (read_claimed) sees its end too and
        # hands it back at once: wait for that, no lock held (it may need one).
        with worker.endpoint.reader:
            self._reap_unclaimed(worker)

    def _reap_unclaimed(self, worker: Worker[Task]) -> None:
        for messages in self._lifecycle.leftovers(worker):
            self._handle(worker, messages)
        queue = self._queue
        with queue.lock:
            failed, rerun = self._lifecycle.reap(worker, queue.stopped_locked())
            queue.requeue_locked(rerun)
        _segcache.forget(worker)
        for task, error in failed:
            deliver(task, False, error)
        if self._lifecycle.init_deaths >= INIT_DEATHS_LIMIT and self._queue.broken is None:
            self._break(None, f"{self._lifecycle.init_deaths} in a row died in it (the last "
                        f"exited with code {worker.endpoint.process.exitcode})")
        if self._on_results is not None:
            self._on_results()

    def _housekeeping(self) -> bool:
        """Respawn, stop idle workers once closed (and kill those that do not
        exit), watch writability; True to exit."""
        spawned = False
        queue, lifecycle = self._queue, self._lifecycle
        with queue.lock:
            state = queue.state
            if state != TERMINATE:
                work_left = bool(queue.pending or queue.encoding or lifecycle.busy()
                                 or queue.feeders)
                if queue.broken is None and (state == RUN or work_left):
                    spawned = lifecycle.spawn_missing()
                    if spawned:
                        queue.changed.notify_all()  # wait_for_workers
                if queue.feeders:  # one may have been abandoned (ProcessEngine.abandon)
                    queue.changed.notify_all()
                if state == CLOSE and not work_left:
                    self._stop_wait = lifecycle.stop_idle()
                    if not len(lifecycle):
                        return True
                lifecycle.watch_writes()
        if state == TERMINATE:
            self._kill_all()
            return True
        queue.dispatch()
        if spawned and self._on_room is not None:
            self._on_room()  # a respawn added capacity: the Scheduler may have work
        return False

    def _kill_all(self) -> None:
        for worker in self._lifecycle.terminate_all():
            if worker.id in self._lifecycle.workers:
                self._reap(worker)

    def _crash(self, cause: BaseException) -> None:
        """The manager thread cannot go on: fail every task rather than leave
        any result pending forever, and stop the workers."""
        error = ShmrunnerError(f"the pool's manager thread crashed: {cause!r}")
        error.__cause__ = cause
        queue = self._queue
        with queue.lock:
            queue.broken = error
            queue.state = TERMINATE
            failed = queue.clear_locked()
        for task in failed:
            self._deliver_quietly(task, error)
        try:
            self._kill_all()
        except BaseException:  # noqa: BLE001 (the thread is ending either way)
            log.exception("shmrunner pool manager thread: stopping the workers failed too")
        # Whatever _kill_all could not account for (it failed as well): fail
        # those tasks here and make sure no worker outlives the engine.
        with queue.lock:
            ends, held = self._lifecycle.lose_all()
        self._lifecycle.destroy(ends)
        for task in held:
            self._deliver_quietly(task, error)

    def _deliver_quietly(self, task: Task, error: BaseException) -> None:
        try:
            deliver(task, False, error)
        except BaseException:  # noqa: BLE001 (one failing delivery must not strand the rest)
            log.exception("shmrunner pool: failing task %s after a crash raised", task.id)

    def close_resources(self) -> None:
        self._lifecycle.close()
        self._selector.close()
        self._wakeup.close()

