"""The daemon's jobs from journaled to settled.

Data flow::

    front thread: start(job_id, request) -> backlog (journaled, in order)
        feed(): backlog -> Scheduler.try_submit while its queue has room (never
                waiting for room: a replay or a burst larger than max_pending
                waits here); a request that cannot run settles as a failure
    front thread: state(job_id) / cancel(job_id): a job not yet handed to a
        worker (backlog, or the scheduler's queue) settles as cancelled
    scheduler threads: future done -> completions deque + wake-up
    front thread: settle(): Journal.finish (one commit for all completions),
        then the result to every peer waiting for the job (FetchWaiters)

Guarantee: a result is journaled before any client sees it, so a result a
client has seen is never run again after a restart.
"""

from __future__ import annotations

import collections
import functools
import threading
from concurrent.futures import Future
from typing import Any

from ._allowlist import AllowList
from ._fetchwaiters import FetchWaiters
from ._joblogs import JobLogs
from ._journal import Journal
from ._replier import Replier
from ._wakeup import Wakeup
from .config import SchedulerSettings
from .errors import JournalError, SchedulerBusyError, TaskCancelledError
from .scheduler import Scheduler
from .transport.protocol import Message, decode, encode, exception_to_wire

__all__ = ["Intake", "Request"]

# A journaled job: the submit message, its frames as the journal kept them, or
# why the journal could not give them back.
Request = Message | list[Any] | JournalError


class Intake:
    def __init__(self, scheduler: Scheduler, settings: SchedulerSettings, *,
                 journal: Journal, waiters: FetchWaiters, replier: Replier,
                 allowed: AllowList, wakeup: Wakeup, stopping: threading.Event,
                 logs: JobLogs | None = None) -> None:
        self._scheduler = scheduler
        self._settings = settings
        self._journal = journal
        self._waiters = waiters
        self._replier = replier
        self._allowed = allowed
        self._wakeup = wakeup
        self._stopping = stopping
        self._logs = logs  # the jobs' task logs (kept by job id once settled)
        self._completions: collections.deque[tuple[str, Future[Any]]] = collections.deque()
        self._running: set[str] = set()  # accepted, not finished (backlog included)
        # Journaled jobs not yet handed to the scheduler (its queue was full).
        self._backlog: collections.deque[tuple[str, Request]] = collections.deque()
        # Jobs handed to the scheduler, until settled: their state, and a cancel.
        self._futures: dict[str, Future[Any]] = {}
        self._cancelled: set[str] = set()  # cancelled by a client, not yet journaled
        self.done = self.failed = 0

    @property
    def running(self) -> int:
        """Jobs accepted and not finished, the backlog included."""
        return len(self._running)

    @property
    def backlog(self) -> int:
        """Journaled jobs waiting for room in the scheduler's queue."""
        return len(self._backlog)

    def start(self, job_id: str, request: Request, peer: bytes | None) -> None:
        """Hand a journaled job to the scheduler; ``peer`` (if any) hears its result."""
        if peer is not None:
            self._waiters.add_submitter(job_id, peer)
        self._running.add(job_id)
        self._backlog.append((job_id, request))
        self.feed()

    def feed(self) -> None:
        """Move journaled jobs from the backlog into the scheduler while its queue
        has room (never waiting for room: a replay or a burst larger than
        ``max_pending`` waits here, journaled, in order)."""
        while self._backlog and not self._stopping.is_set():
            job_id, request = self._backlog[0]
            try:
                if isinstance(request, JournalError):
                    raise request
                msg = request if isinstance(request, Message) else decode(
                    request, max_bytes=self._settings.max_message_bytes,
                    allow_pickle=self._settings.allow_pickle)
                body = msg.body
                self._allowed.check(body["fn"], body["args"])  # before anything is imported
                options = body.get("options") or {}
                future = self._scheduler.try_submit(
                    body["fn"], *body["args"], retries=options.get("retries"),
                    timeout=options.get("timeout"), **body["kwargs"])
            except SchedulerBusyError:
                return
            except Exception as exc:
                future = Future()
                future.set_exception(exc)
            self._backlog.popleft()
            self._futures[job_id] = future
            future.add_done_callback(functools.partial(self._completed, job_id))

    def state(self, job_id: str) -> str | None:
        """"queued" or "running" for a job this intake holds, else None (ask the journal)."""
        if job_id not in self._running:
            return None
        if job_id in self._cancelled:
            return "cancelled"
        future = self._futures.get(job_id)
        if future is None:
            return "queued"
        # A finished future not yet journaled still counts as running: done/failed
        # is said only once the journal holds the result.
        return "running" if future.running() or future.done() else "queued"

    def future(self, job_id: str) -> Future[Any] | None:
        """The future of a job handed to the scheduler and not yet settled."""
        return self._futures.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not started (in the backlog or the scheduler's
        queue): it settles as cancelled with TaskCancelledError. False if it
        runs already (a running task cannot be stopped from here) or is not held."""
        if job_id not in self._running:
            return False
        future = self._futures.get(job_id)
        if future is not None:
            if not future.cancel():  # running (or finishing): cannot be cancelled
                return False
            self._cancelled.add(job_id)  # its done callback queues the completion
            return True
        for index, (queued_id, _) in enumerate(self._backlog):
            if queued_id == job_id:
                del self._backlog[index]
                self._cancelled.add(job_id)
                self._completed(job_id, Future())  # never set: settle() sees a cancel
                return True
        return False

    def _completed(self, job_id: str, future: Future[Any]) -> None:
        self._completions.append((job_id, future))
        self._wakeup.wake()

    def settle(self) -> None:
        """Journal finished jobs (one commit), then tell whoever waits for them: a
        result a client has seen is never run again after a restart."""
        if not self._completions:
            return
        outcomes = []
        replies = []
        while self._completions:
            job_id, future = self._completions.popleft()
            self._running.discard(job_id)
            self._futures.pop(job_id, None)
            if self._logs is not None:
                self._logs.settle(job_id, future)
            if job_id in self._cancelled:
                msg = _error_message(job_id, TaskCancelledError(
                    f"job {job_id} was cancelled before it started"))
            else:
                msg = _result_message(job_id, future)
            try:
                frames = encode(msg, allow_pickle=self._settings.allow_pickle)
            except (TypeError, ValueError) as exc:
                msg = _error_message(job_id, TypeError(
                    f"the result of job {job_id} cannot be sent to clients: {exc}"))
                frames = encode(msg)
            ok = bool(msg.body["ok"])
            if ok:
                self.done += 1
            else:
                self.failed += 1
            outcomes.append((job_id, ok, frames))
            replies += [(peer, frames) for peer in self._waiters.pop(job_id)]
        cancelled, self._cancelled = self._cancelled, set()
        self._journal.finish(outcomes, cancelled)
        for peer, frames in replies:
            self._replier.reply_frames(peer, frames)


def _result_message(job_id: str, future: Future[Any]) -> Message:
    exc = future.exception()
    if exc is None:
        return Message("result", {"job_id": job_id, "ok": True, "value": future.result()})
    return _error_message(job_id, exc)


def _error_message(job_id: str, exc: BaseException) -> Message:
    return Message("result", {"job_id": job_id, "ok": False, "error": exception_to_wire(exc)})
