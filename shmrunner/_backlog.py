"""Backlog: the Scheduler's queued and running jobs, under one lock, with the
budgets that make ``submit`` block.

Data flow::

    submit() --admit()--> queue (waits while max_pending jobs are queued or
                          the held argument bytes would pass the byte budget);
                          says whether placing could start it now
    _pump()  --place()--> each tier with room gets its jobs --> running {job: tier}
    on_done  --finish()-> running --> settled (the bytes are released), or back
                          to the front of the queue for a retry, or, with a
                          retry backoff, waiting --resume()--> front of the queue
                          (no retry once shutdown(cancel_futures=True) began)
    cancel() --> a job queued for a retry or sitting out its backoff is taken
                 out (the caller settles it); a running one is marked (never
                 retried: finish() settles it) and its tier returned, to stop it
    future.cancel() of a queued job --drop()--> it no longer counts as queued
                 (its place in max_pending and its bytes are free at once);
                 place() passes over it later
    shutdown --shut_down() / wait_idle() / drain()

    a job with futures of this Scheduler among its arguments (_deps.py):
    submit() --admit(deferred=True)--> deferred (counted against max_pending)
             --ready()--> front of the queue, once they all have results; --forget()--> gone
             (a dependency failed or was cancelled, or the job itself was)

One lock guards the queue, the running map and the counters; ``submit``
waits on one condition of it (room in the budgets) and ``shutdown`` on
another (nothing queued or running). A job holds its arguments' bytes from
``admit`` until it is settled or cancelled, so the byte budget counts running
tasks too: their arguments are still in memory. The order of the tiers given
to :meth:`Backlog.place` is the placement policy (the Scheduler puts the local
tier first); the Backlog only fills each tier's room in that order.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

from ._job import Job
from .errors import SchedulerBusyError
from .tiers.base import Tier

__all__ = ["Backlog"]


class Backlog:
    """Queued and running jobs, the task-count and byte budgets, the shutdown flag."""

    def __init__(self, max_pending: int, byte_budget: int) -> None:
        self.byte_budget = byte_budget
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._all_done = threading.Condition(self._lock)
        # Threads waiting on each condition: a notify with none waiting is
        # skipped (a Condition's notify runs in Python; several per task).
        self._submitters_waiting = 0
        self._idle_waiters = 0
        self._queue: collections.deque[Job] = collections.deque()
        # Jobs in the queue whose futures were cancelled (drop()): not waiting
        # any more, but left where they are until place() passes them (taking
        # one out would scan the queue: cancelling 100,000 queued futures
        # newest first would take minutes under this lock).
        self._dropped = 0
        self._running: dict[Job, Tier] = {}  # each job handed to a tier, and which
        # Jobs sitting out a retry backoff: neither queued nor running, but not
        # settled either, so shutdown waits for them, cancels or drains them.
        self._waiting: set[Job] = set()
        # Jobs waiting for futures among their arguments (_deps.py): admitted
        # (they count against max_pending) but not queued yet.
        self._deferred: set[Job] = set()
        self._submitted = 0  # tasks accepted by submit, ever
        self._shutdown = False
        # shutdown(cancel_futures=True) began: no retry is queued from then on
        # (a retry of a running job that fails later would wait for a worker
        # with no end in sight; the job settles with that attempt's error).
        self._cancelling = False
        self._held_bytes = 0  # payload bytes of the jobs queued or running
        # The last place() left jobs queued: every tier was full. Until a
        # tier gains room, and says so (TierEvents.on_room, which places
        # again), a job queued behind them has no room either.
        self._tiers_full = False

    def queued(self) -> int:
        """Jobs waiting for a worker (the dropped ones in the queue wait for nothing)."""
        return len(self._queue) - self._dropped

    def snapshot(self) -> dict[str, Any]:
        """``queued``, ``running``, ``retry_waiting`` (sitting out a retry backoff),
        ``submitted``, ``shutdown`` and ``pending_bytes``, taken together."""
        with self._lock:
            return {"queued": self.queued(), "running": len(self._running),
                    "retry_waiting": len(self._waiting),
                    "waiting_on_futures": len(self._deferred),
                    "submitted": self._submitted, "shutdown": self._shutdown,
                    "pending_bytes": self._held_bytes}

    def admit(self, job: Job, block: bool, deferred: bool = False,
              over_budget: bool = False) -> bool:
        """Queue ``job`` once both budgets have room (``block=False``: raise
        :class:`SchedulerBusyError` instead of waiting; ``over_budget``: queue
        it now, room or not); RuntimeError after shutdown. ``deferred``: hold
        it aside until :meth:`ready` (it waits for futures).

        Returns whether a :meth:`place` now could start it: False when jobs
        wait ahead of it and the last place found every tier full (a tier
        that gains room calls ``on_room``, and that places the queue). In a
        burst of submits this spares each one a look at every tier's room."""
        with self._lock:
            # Blocks on either budget; a task larger than the byte budget alone
            # is let in once nothing else is held, or it could never run.
            while not self._shutdown and not over_budget and (
                    self.queued() + len(self._deferred) >= self._max_pending
                    or (self._held_bytes and self._held_bytes + job.nbytes > self.byte_budget)):
                if not block:
                    raise SchedulerBusyError(
                        f"{self.queued()} tasks ({self._held_bytes} bytes "
                        "of arguments) already wait for a worker (scheduler.max_pending, "
                        "max_pending_bytes); submit again later")
                self._submitters_waiting += 1
                try:
                    self._not_full.wait()
                finally:
                    self._submitters_waiting -= 1
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._held_bytes += job.nbytes
            self._submitted += 1
            if deferred:
                self._deferred.add(job)
                return True
            behind = self.queued() > 0 and self._tiers_full
            self._queue.append(job)
            job.queued = True
            return not behind

    def ready(self, job: Job, nbytes: int) -> bool:
        """The deferred ``job``'s futures have results: queue it first (it was
        counted at ``admit``, so this never waits), now holding ``nbytes``.
        First, because finishing a chain that has started frees its
        intermediate results sooner than starting new ones (depth first).
        False when it is no longer deferred (cancelled, or drained)."""
        with self._lock:
            if job not in self._deferred:
                return False
            self._deferred.discard(job)
            self._held_bytes += nbytes - job.nbytes
            job.nbytes = nbytes
            self._queue.appendleft(job)
            job.queued = True
            return True

    def forget(self, job: Job) -> bool:
        """Drop the deferred ``job`` (it will not run); True if it was
        deferred, so exactly one caller settles its future."""
        with self._lock:
            if job not in self._deferred:
                return False
            self._deferred.discard(job)
            self._release(job)
            self._wake_submitters()
            self._wake_idle_waiters()
            return True

    def place(self, tiers: Sequence[Tier]) -> list[tuple[Tier, list[Job]]]:
        """Take queued jobs for the tiers with room, in the order given; each
        taken job is counted as an attempt and marked running on its tier
        (jobs cancelled while queued are dropped)."""
        batches: list[tuple[Tier, list[Job]]] = []
        with self._lock:
            taken = False
            for tier in tiers:
                if not self._queue:
                    break
                room = tier.room()
                jobs = []
                while room > 0 and self._queue:
                    taken = True
                    job = self._queue.popleft()
                    if not job.queued:  # dropped: its future was cancelled, and told
                        self._dropped -= 1
                        continue
                    job.queued = False
                    if job.attempts == 0 and not job.future.set_running_or_notify_cancel():
                        self._release(job)
                        continue  # cancelled while queued
                    job.attempts += 1
                    self._running[job] = tier
                    jobs.append(job)
                    room -= 1
                if jobs:
                    batches.append((tier, jobs))
            self._tiers_full = self.queued() > 0
            if taken:  # (a pump per submit finds no room most of a burst: nothing to tell)
                self._wake_submitters()
                self._wake_idle_waiters()
        return batches

    def running_on(self, job: Job) -> Tier | None:
        """The tier running ``job`` now (None once that attempt is over)."""
        return self._running.get(job)

    def is_current(self, job: Job, attempt: int, tier: Tier) -> bool:
        """Whether attempt ``attempt`` of ``job`` is still running on ``tier``."""
        with self._lock:
            return (not job.future.done() and job.attempts == attempt
                    and self._running.get(job) is tier)

    def state(self, job: Job) -> str:
        """"running" (handed to a tier) or "queued" (waiting for a worker, or
        sitting out a retry backoff) for a job not settled yet."""
        with self._lock:
            return "running" if job in self._running else "queued"

    def cancel(self, job: Job, reason: BaseException) -> Tier | bool:
        """Mark ``job`` cancelled with ``reason``. Returns the tier running it
        (for the caller to stop it there); True when it was taken out of the
        queue or the retry backoff (the caller settles its future), or was
        cancelled before; False when no attempt of it is held (settled, or
        being settled right now)."""
        with self._lock:
            if job.cancelled is not None:
                return True
            tier = self._running.get(job)
            if tier is not None:
                job.cancelled = reason
                return tier
            if job in self._waiting:
                self._waiting.discard(job)
            elif job.queued:
                self._queue.remove(job)
                job.queued = False
            else:
                return False
            job.cancelled = reason
            self._release(job)
            self._wake_submitters()
            self._wake_idle_waiters()
            return True

    def finish(self, job: Job, retry: bool, wait: bool = False) -> bool:
        """One attempt of ``job`` is over: queue it first for a retry (one
        retry used; with ``wait``, it waits for :meth:`resume` instead), or
        release it for good. Returns whether it is retried (never once cancelled,
        nor once a shutdown cancelled the queued jobs)."""
        with self._lock:
            self._running.pop(job, None)
            retry = retry and job.cancelled is None and not self._cancelling
            if retry:
                job.retries -= 1
                if wait:
                    self._waiting.add(job)
                else:
                    self._queue.appendleft(job)
                    job.queued = True
            elif job.nbytes:
                self._release(job)
            if self._idle_waiters:  # (inline: this runs once per task)
                self._all_done.notify_all()
            return retry

    def resume(self, job: Job) -> bool:
        """``job``'s retry backoff is over: queue it first. False when it no
        longer waits (cancelled or drained by a shutdown meanwhile)."""
        with self._lock:
            if job not in self._waiting:
                return False
            self._waiting.discard(job)
            self._queue.appendleft(job)
            job.queued = True
            return True

    def shut_down(self, cancel_futures: bool) -> list[Job]:
        """Refuse new jobs from now on; with ``cancel_futures``, take every
        queued job out (returned, for the caller to cancel)."""
        with self._lock:
            self._shutdown = True
            self._cancelling = self._cancelling or cancel_futures
            cancelled = (list(self._queue) + list(self._waiting) + list(self._deferred)
                         if cancel_futures else [])
            if cancel_futures:
                self._clear_queue()
                self._waiting.clear()
                self._deferred.clear()
                for job in cancelled:
                    self._release(job)
            self._wake_submitters()
        return cancelled

    def wait_idle(self) -> None:
        """Wait until no job is queued, running or waiting for a retry."""
        with self._lock:
            while self.queued() or self._running or self._waiting or self._deferred:
                self._idle_waiters += 1
                try:
                    self._all_done.wait()
                finally:
                    self._idle_waiters -= 1

    def drain(self) -> list[Job]:
        """Take out every job still queued or running (the tiers are closed)."""
        with self._lock:
            leftover = (list(self._queue) + list(self._running) + list(self._waiting)
                        + list(self._deferred))
            self._clear_queue()
            self._deferred.clear()
            self._running.clear()
            self._waiting.clear()
            self._wake_idle_waiters()  # (a shutdown waiting for them: nothing is left)
        return leftover

    def drop(self, job: Job) -> bool:
        """``job``'s future was cancelled before it ran: if it is queued, it
        stops counting as queued now (its place in ``max_pending`` and its
        argument bytes are free) and True is returned: the caller tells
        ``wait`` and ``as_completed``, as no place() will. False for a job
        not queued (waiting on futures: Dependents forgets it; or being
        placed right now: place() tells them)."""
        with self._lock:
            if not job.queued:
                return False
            job.queued = False
            self._dropped += 1
            self._release(job)
            job.fn, job.args, job.kwargs = None, (), {}  # its arguments, freed now
            self._wake_submitters()
            if not self.queued():
                self._wake_idle_waiters()
            return True

    def _clear_queue(self) -> None:
        for job in self._queue:
            job.queued = False
        self._queue.clear()
        self._dropped = 0

    def _release(self, job: Job) -> None:
        """Under the lock: ``job`` no longer holds its arguments' bytes."""
        if job.nbytes:
            self._held_bytes -= job.nbytes
            job.nbytes = 0
            self._wake_submitters()

    def _wake_submitters(self) -> None:
        """Under the lock: the budgets may have room for a blocked submit."""
        if self._submitters_waiting:
            self._not_full.notify_all()

    def _wake_idle_waiters(self) -> None:
        """Under the lock: the backlog may be empty for a waiting shutdown."""
        if self._idle_waiters:
            self._all_done.notify_all()
