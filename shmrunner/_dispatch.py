"""The process engine's queue and dispatch: tasks waiting for a worker, and
how they are handed over.

Data flow::

    submit(tasks) --> pending (deque) --take_locked()--> pickled outside the lock
         any thread      | (no more than the workers        | (user __reduce__,
                         |  have room for, counting the     |  array copies)
                         |  tasks still being pickled)      v
                         |                        send(): under the lock, each to
                         +-- requeue_locked() <--  the worker Lifecycle.pick() names,
                         |   (a worker died or      one send_batch_nowait per worker;
                         |    shrank meanwhile)     slow pickling (arrays) is sent
                         +-- _trim_locked() <------ as it goes, every _FLUSH_AFTER
                             (taken, not pickled yet, beyond the workers' room)

One lock guards the queue, the engine's state and the workers' bookkeeping
(:class:`~shmrunner.worker.lifecycle.ProcessLifecycle`): assigning a task and
sending it happen in one locked step, so each worker's send order is its
assignment order (the lifecycle's accounting relies on it), and a worker that
died meanwhile is simply not picked. No user code runs under the lock.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

from . import _segcache
from ._tasks import Task, deliver, encode_task, frame
from .errors import TaskCancelledError
from .transport.fdchannel import FdChannel
from .transport.pickling import Encoded
from .worker.lifecycle import ProcessLifecycle, Worker

__all__ = ["TaskQueue", "Budget", "RUN", "CLOSE", "TERMINATE"]

# The states multiprocessing.pool uses (its tests read and write ``_state``).
RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"

_Frame = tuple[bytes, list[int], Callable[[], None]]

# Pickling taking longer than this is sent as it goes (TaskQueue.send).
_FLUSH_AFTER = 1e-3


class Budget:
    """An imap feeder's allowance: ``free`` more tasks it may submit (its
    ``buffersize``; None: no limit), one spent per task and one given back
    per result its consumer takes; ``abandoned`` once the consumer dropped
    the results (set without any lock: the feeder stops)."""

    __slots__ = ("free", "abandoned")

    def __init__(self, size: int | None) -> None:
        self.free = size
        self.abandoned = False


class TaskQueue:
    def __init__(self, lifecycle: ProcessLifecycle, threshold: int, feed_limit: int,
                 wake: Callable[[], None]) -> None:
        self.lock = threading.Lock()
        # Notified when the queue shrinks while feeders wait, when the state
        # changes to TERMINATE and when workers are spawned.
        self.changed = threading.Condition(self.lock)
        self.pending: collections.deque[Task] = collections.deque()
        self.encoding = 0  # tasks taken from pending, being pickled outside the lock
        self.state = RUN
        self.broken: BaseException | None = None
        self.feeders: set[threading.Thread] = set()  # imap feeders: they wait for room
        self.feed_limit = feed_limit
        self.lifecycle = lifecycle
        self._threshold = threshold
        self._wake = wake  # the manager thread: watch writability, dispatch the requeued

    def stopped_locked(self) -> BaseException | None:
        """Why no task can run any more (broken, terminated), or None."""
        if self.broken is None and self.state == TERMINATE:
            return TaskCancelledError("the pool was terminated")
        return self.broken

    def submit(self, tasks: Iterable[Task]) -> None:
        taken: list[Task] = []
        with self.lock:
            stopped = self.stopped_locked()
            if stopped is not None:
                failed = [(task, stopped) for task in tasks]
            else:
                self.pending.extend(tasks)
                failed = []
                taken = self.take_locked()
        if taken:
            failed = self.send(taken)
        for task, error in failed:
            deliver(task, False, error)

    def dispatch(self) -> None:
        with self.lock:
            taken = self.take_locked()
        if taken:
            for task, error in self.send(taken):
                deliver(task, False, error)

    def claim(self) -> Worker[Task] | None:
        """An idle worker for a task the calling thread will wait for, reading
        the worker's channel itself (``ProcessLifecycle.claim``); None: use
        :meth:`submit` (tasks wait in the queue, no worker is idle, stopped)."""
        if self.pending:
            return None  # (read without the lock: a stale answer only loses the shortcut)
        with self.lock:
            if self.pending or self.state != RUN or self.broken is not None:
                return None
            return self.lifecycle.claim()

    def send_claimed(self, worker: Worker[Task], task: Task) -> bool:
        """Pickle ``task`` and send it to ``worker`` (claimed); False if it
        failed instead (delivered: pickling raised, or the engine stopped)."""
        try:
            message = encode_task(task, self._threshold)
        except BaseException as exc:  # noqa: BLE001 (user __reduce__ code: the task fails)
            deliver(task, False, exc)
            return False
        with self.lock:
            stopped = self.stopped_locked()
            if stopped is None:
                worker.endpoint.channel.send_batch_nowait(
                    [self._assign_locked(worker, task, message)], [task.id])
                return True
        _segcache.give_back(message.leases)
        message.release()
        deliver(task, False, stopped)
        return False

    def hand_back(self, worker: Worker[Task]) -> None:
        """Return a claimed worker to the manager thread, and give it whatever
        waited meanwhile."""
        with self.lock:
            self.lifecycle.hand_back(worker)
            taken = self.take_locked()
            closing = self.state != RUN
        if closing:
            # The manager thread saw none of this worker's replies: once closed,
            # it must look again (stop the idle workers, end), or join() waits forever.
            self._wake()
        if taken:
            for task, error in self.send(taken):
                deliver(task, False, error)

    def wait_for_room(self, budget: Budget | None = None) -> bool:
        """Block a feeder until the queue has room and its ``budget`` a task
        to spend (then spent); False once terminated or abandoned."""
        with self.changed:
            # Woken by every change that ends the wait (take_locked,
            # remove_locked, clear_locked and give_back notify; so do
            # terminating, and the manager thread when an abandon woke it).
            while self.state != TERMINATE and (budget is None or not budget.abandoned) and (
                    len(self.pending) >= self.feed_limit
                    or (budget is not None and budget.free is not None and budget.free <= 0)):
                self.changed.wait()
            if self.state == TERMINATE or budget is not None and budget.abandoned:
                return False
            if budget is not None and budget.free is not None:
                budget.free -= 1
            return True

    def give_back(self, budget: Budget) -> None:
        """A result of ``budget``'s imap was consumed: its feeder may read on."""
        if budget.free is None:
            return
        with self.changed:
            budget.free += 1
            self.changed.notify_all()

    def take_locked(self) -> list[Task]:
        """Take from the queue as many tasks as the workers have room for,
        counting those other threads are still encoding; the caller encodes and
        sends them with :meth:`send` once it has released the lock."""
        pending = self.pending
        if not pending or self.state == TERMINATE:
            return []
        self.lifecycle.backlog(len(pending))
        room = self.lifecycle.room() - self.encoding
        if room <= 0:
            return []
        taken = [pending.popleft() for _ in range(min(room, len(pending)))]
        self.encoding += len(taken)
        if self.feeders:  # the only threads that wait for room
            self.changed.notify_all()
        return taken

    def send(self, tasks: list[Task]) -> list[tuple[Task, BaseException]]:
        """Pickle ``tasks`` without the lock, then under it give each to a
        worker with room and send, one syscall per worker. Returns the tasks
        to fail once no lock is held (their callbacks must not run under it).

        Pickling that takes long (arrays copied into shared memory) is sent as
        it goes, every ``_FLUSH_AFTER``: a worker starts on the first array
        task while the next is copied, and once the workers are full the tasks
        not pickled yet go back to the queue instead of being copied for
        nothing. Tiny tasks still go in one batch per worker."""
        failed: list[tuple[Task, BaseException]] = []
        todo = collections.deque(tasks)
        wake = False
        while todo:
            encoded: list[tuple[Task, Encoded]] = []
            handled = unpicklable = 0
            since = time.monotonic()
            while todo:
                task = todo.popleft()
                handled += 1
                try:
                    encoded.append((task, encode_task(task, self._threshold)))
                except BaseException as exc:  # noqa: BLE001 (user __reduce__ code: the task fails)
                    failed.append((task, exc))
                    unpicklable += 1
                if todo and time.monotonic() - since >= _FLUSH_AFTER:
                    break
            with self.lock:
                self.encoding -= handled
                wake = self._send_locked(encoded, failed) or wake
                if todo:
                    self._trim_locked(todo, failed)
                elif unpicklable:
                    # The room they were taken for is free again, and no reply
                    # will come to dispatch the tasks queued behind them.
                    todo.extend(self.take_locked())
        if wake:
            self._wake()
        return failed

    def _send_locked(self, encoded: list[tuple[Task, Encoded]],
                     failed: list[tuple[Task, BaseException]]) -> bool:
        """Give each encoded task to the worker ``Lifecycle.pick`` names and
        send, one batch per worker; True if the manager thread must look (output
        queued, tasks requeued)."""
        batches: dict[Worker[Task], tuple[list[_Frame], list[int]]] = {}
        requeue: list[Task] = []
        stopped = self.stopped_locked()
        lifecycle = self.lifecycle
        for task, message in encoded:
            worker = lifecycle.pick() if stopped is None else None
            if worker is None:
                _segcache.give_back(message.leases)
                message.release()
                if stopped is not None:
                    failed.append((task, stopped))
                else:  # a worker died or shrank its capacity meanwhile
                    requeue.append(task)
                continue
            frames, ids = batches.setdefault(worker, ([], []))
            frames.append(self._assign_locked(worker, task, message))
            ids.append(task.id)
        if requeue:
            self.pending.extendleft(reversed(requeue))
        wake = bool(requeue)
        for worker, (frames, ids) in batches.items():
            channel: FdChannel = worker.endpoint.channel
            # A worker that is gone drops what it is sent; its sentinel fires
            # and the engine reaps it, requeueing its tasks.
            channel.send_batch_nowait(frames, ids)
            wake = wake or channel.wants_write
        return wake

    def _assign_locked(self, worker: Worker[Task], task: Task, message: Encoded) -> _Frame:
        """``task`` is ``worker``'s from now on (what it is lent goes with it):
        its frame, for the caller to send in this same locked step."""
        self.lifecycle.assign(worker, task)
        _segcache.lend(message.leases, worker, message.borrowed)
        if worker.tasks[0] is task and not task.report_start:
            task.started = time.monotonic()
        return frame(task, message)

    def _trim_locked(self, todo: collections.deque[Task],
                     failed: list[tuple[Task, BaseException]]) -> None:
        """Keep of ``todo`` (taken, not pickled yet) only what the workers
        still have room for; the rest goes back to the head of the queue."""
        stopped = self.stopped_locked()
        if stopped is not None:
            failed.extend((task, stopped) for task in todo)
            self.encoding -= len(todo)
            todo.clear()
            return
        others = self.encoding - len(todo)  # tasks other threads are pickling
        keep = max(0, self.lifecycle.room() - others)
        if keep < len(todo):
            back = [todo.pop() for _ in range(len(todo) - keep)]
            self.pending.extendleft(back)  # popped last-first: extendleft restores the order
            self.encoding -= len(back)

    def requeue_locked(self, tasks: list[Task]) -> None:
        """Put ``tasks`` back at the head of the queue (pickled again at dispatch)."""
        self.pending.extendleft(reversed(tasks))

    def remove_locked(self, task: Task) -> bool:
        """Drop ``task`` from the queue if it is still there."""
        try:
            self.pending.remove(task)
        except ValueError:
            return False
        self.changed.notify_all()
        return True

    def clear_locked(self) -> list[Task]:
        """Empty the queue (terminate, a broken engine); return what it held."""
        tasks = list(self.pending)
        self.pending.clear()
        self.changed.notify_all()
        return tasks

