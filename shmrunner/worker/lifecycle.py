"""Worker lifecycle: spawn, account, reap, respawn -- for any tier.

Data flow::

    tier (Pool manager thread, later the remote scheduler)
        |  spawn(worker_id) -> endpoint         (the tier builds the process/peer)
        v
    Lifecycle ---- workers: {id -> Worker(endpoint, tasks deque, sent count)}
        |  assign(worker, task)   tasks are appended in the order they are sent
        |  finish(worker, task_id)
        |  lose(worker) -> Loss(running task, tasks to requeue)
        v
    a dead worker's first outstanding task is the one it was running (a worker
    runs its tasks in the order received); every later one was never started
    and is safe to run elsewhere.

The module knows nothing of queues or sockets: a *tier* supplies a spawn
function and calls :meth:`Lifecycle.lose` when it learns a worker is gone
(a process sentinel fired, a heartbeat expired). It tells the tier who can take
work (:meth:`Lifecycle.pick`), honouring per-worker capacity and
``max_tasks`` (a worker that will retire after N tasks is never given more).

Not thread-safe by itself: the tier serialises calls (the Pool holds its lock).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Lifecycle", "Loss", "Worker", "TaskLike"]


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

    @property
    def free(self) -> int:
        """How many more tasks this worker may be sent now."""
        if self.retiring:
            return 0
        free = self.capacity - len(self.tasks)
        if self.max_tasks is not None:
            free = min(free, self.max_tasks - self.sent)
        return max(free, 0)


@dataclass
class Loss(Generic[T]):
    """What a lost worker held: the task it was running (lost with it) and the
    tasks it had been sent but never started (safe to run elsewhere)."""

    worker: Worker[T]
    running: T | None
    unstarted: list[T]


class Lifecycle(Generic[T]):
    def __init__(self, spawn: Callable[[int], Any] | None, size: int, capacity: int = 1,
                 max_tasks: int | None = None) -> None:
        self._spawn = spawn
        self.size = size
        self.capacity = capacity
        self.max_tasks = max_tasks
        self.workers: dict[int, Worker[T]] = {}
        self._next_id = 0

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
            worker: Worker[T] = Worker(worker_id, endpoint, self.capacity, self.max_tasks)
            self.workers[worker_id] = worker
            new.append(worker)
        return new

    def add(self, endpoint: Any, capacity: int) -> Worker[T]:
        """Register a worker that arrived by itself (a remote agent's hello)."""
        worker_id = self._next_id
        self._next_id += 1
        worker: Worker[T] = Worker(worker_id, endpoint, capacity)
        self.workers[worker_id] = worker
        return worker

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
        worker.tasks.append(task)
        worker.sent += 1

    def finish(self, worker: Worker[T], task_id: int) -> T | None:
        """Remove and return the task ``task_id`` that ``worker`` completed."""
        tasks = worker.tasks
        if tasks and tasks[0].id == task_id:
            return tasks.popleft()
        for task in tasks:
            if task.id == task_id:
                tasks.remove(task)
                return task
        return None

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
