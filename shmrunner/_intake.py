"""The daemon's jobs from journaled to settled.

Data flow::

    front thread: start(job_id, request) -> backlog (journaled, in order)
        feed(): backlog -> Scheduler.try_submit_call while its queue has room (never
                waiting for room: a replay or a burst larger than max_pending
                waits here); a request that cannot run settles as a failure
    front thread: describe(job_id): state, attempts, worker (Scheduler.describe)
    front thread: cancel(job_id): a job in the backlog is dropped; one handed
        to the scheduler is cancelled there (Scheduler.cancel: a running one is
        stopped on its worker); either way it settles as cancelled at once
        (the scheduler's own outcome, when it comes, is ignored)
    front thread: start(): a job whose options carry refs to other jobs gets
        their Scheduler futures, or their journaled results, in place
        (_jobrefs.py)
    scheduler threads: future done -> completions deque (+ a wake-up if it is
        the first since the front thread last took them)
    front thread: settle(): Journal.finish (one commit for all completions),
        then the result to every peer waiting for the job (FetchWaiters); to
        the submitter of a job whose submit said ``shm_results`` (a same-host
        client), its large result arrays as memfds held for it
        (LocalClients.offer_result) and a result naming them; the journal
        keeps the whole result (durable) or result_lost (not durable)

Guarantees: a result is journaled before any client sees it, so a result a
client has seen is never run again after a restart; a cancel is journaled
before the daemon answers it, so a cancelled job is never run again either.

Per-client counts (``clients()``, in the daemon's status): the jobs each
submitting connection holds, queued or running, and those that finished in
this daemon's life (kept for the ``_CLIENTS`` connections that saw one finish
most recently; at most ``_CLIENTS`` connections are reported).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from concurrent.futures import Future
from typing import Any

from . import _jobrefs
from ._allowlist import AllowList
from ._deps import TaskFuture
from ._fetchwaiters import FetchWaiters
from ._joblogs import JobLogs
from ._journal import Journal
from ._localclients import LocalClients, lost, result_lost, results_option
from ._replier import Replier
from ._wakeup import Wakeup
from .config import SchedulerSettings
from .errors import (
    DependencyError,
    JournalError,
    SchedulerBusyError,
    ShmrunnerError,
    TaskCancelledError,
)
from .scheduler import Scheduler
from .transport.protocol import (
    Message,
    decode,
    encode,
    exception_from_wire,
    exception_to_wire,
)

__all__ = ["Intake", "Request"]

log = logging.getLogger("shmrunner.daemon")

_CLIENTS = 64  # submitting connections whose finished-job counts are kept

# A journaled job: the submit message, its frames as the journal kept them, or
# why the journal could not give them back.
Request = Message | list[Any] | JournalError


class Intake:
    def __init__(self, scheduler: Scheduler, settings: SchedulerSettings, *,
                 journal: Journal, waiters: FetchWaiters, replier: Replier,
                 allowed: AllowList, wakeup: Wakeup, stopping: threading.Event,
                 logs: JobLogs | None = None, local: LocalClients | None = None) -> None:
        self._scheduler = scheduler
        self._settings = settings
        self._journal = journal
        self._waiters = waiters
        self._replier = replier
        self._allowed = allowed
        self._wakeup = wakeup
        self._stopping = stopping
        self._logs = logs  # the jobs' task logs (kept by job id once settled)
        self._local = local  # same-host clients (results as memfds)
        # Jobs whose submitter takes results as memfds: job id -> (channel, durable).
        self._by_memfd: dict[str, tuple[str, bool]] = {}
        # Finished futures, or None for a job this intake cancelled itself.
        self._completions: collections.deque[tuple[str, Future[Any] | None]] = (
            collections.deque())
        self._completions_lock = threading.Lock()
        self._woken = False  # a completion woke the front thread; settle() not run since
        self._running: set[str] = set()  # accepted, not finished (backlog included)
        # Journaled jobs not yet handed to the scheduler (its queue was full).
        self._backlog: collections.deque[tuple[str, Request]] = collections.deque()
        # Jobs handed to the scheduler, until settled: their state, and a cancel.
        self._futures: dict[str, Future[Any]] = {}
        # Cancelled by a client, not yet journaled: job id -> (attempts, worker, when it
        # was cancelled if not before it started).
        self._cancelled: dict[str, tuple[int, str | None, str | None]] = {}
        # Taken back from the scheduler at the drain's start (journaled, never started).
        self._withdrawn: set[str] = set()
        self._owners: dict[str, bytes] = {}  # held job -> the connection that submitted it
        self._finished_by: collections.OrderedDict[bytes, collections.Counter[str]] = (
            collections.OrderedDict())
        self.done = self.failed = self.cancelled = 0

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
            self._owners[job_id] = peer
            if self._local is not None and isinstance(request, Message):
                try:
                    wanted = results_option(request.body.get("options") or {})
                except ShmrunnerError:
                    wanted = None  # (claim refused such a submit before)
                if wanted is not None:
                    self._by_memfd[job_id] = wanted
        self._running.add(job_id)
        self._backlog.append((job_id, request))
        # Not fed here: the front thread feeds after the batch, so a cancel in
        # the same batch finds the job still in the backlog (it never starts).

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
                if options.get("shm") is not None:  # journaled without its arrays
                    raise lost(job_id)
                args, kwargs = body["args"], body["kwargs"]
                if options.get("refs"):  # other jobs' futures among the arguments
                    args, kwargs = self._resolve(job_id, args, kwargs, options["refs"])
                # Arguments as values: a kwarg named retry_on is the function's.
                future = self._scheduler.try_submit_call(
                    body["fn"], args, kwargs, retries=options.get("retries"),
                    timeout=options.get("timeout"))
            except SchedulerBusyError:
                return
            except Exception as exc:
                future = Future()
                future.set_exception(exc)
            self._backlog.popleft()
            self._futures[job_id] = future
            future.add_done_callback(functools.partial(self._completed, job_id))

    def _resolve(self, job_id: str, args: Any, kwargs: dict[str, Any],
                 refs: Any) -> tuple[Any, dict[str, Any]]:
        """The arguments with each job reference replaced by that job's
        Scheduler future (still running here: the Scheduler waits for it) or
        its journaled result; DependencyError (TaskCancelledError for a
        cancelled one) when a job referred to failed or is unknown."""
        for path, dep_id in _jobrefs.parse(refs):
            args, kwargs = _jobrefs.place(args, kwargs, path, self._dependency(job_id, dep_id))
        return args, kwargs

    def _dependency(self, job_id: str, dep_id: str) -> Any:
        if dep_id in self._cancelled:
            raise TaskCancelledError(f"job {job_id} was cancelled: job {dep_id}, whose "
                                     "future is among its arguments, was cancelled")
        future = self._futures.get(dep_id)
        if future is not None:
            if isinstance(future, TaskFuture):
                return future
            cause = future.exception()  # the intake's own: it could not be submitted
            raise _dependency_error(job_id, dep_id, cause)
        if dep_id in self._running:
            raise DependencyError(f"job {job_id} refers to job {dep_id}, which was "
                                  "accepted after it")
        found = self._journal.get(dep_id)
        if found is None or found[1] is None:
            raise DependencyError(f"job {job_id} refers to job {dep_id}, which this daemon "
                                  "does not know (never accepted, or its result expired)")
        frames = found[1]  # the daemon's own result message, as it journaled it
        reply = decode(frames, max_bytes=sum(memoryview(f).nbytes for f in frames),
                       allow_pickle=self._settings.allow_pickle)
        if reply.type == "error":  # not journaled (result_lost)
            raise DependencyError(f"job {job_id} did not run: {reply.body['reason']}")
        if reply.body.get("ok"):
            return reply.body["value"]
        cause = exception_from_wire(reply.body["error"])
        if isinstance(cause, TaskCancelledError):
            raise TaskCancelledError(f"job {job_id} was cancelled: job {dep_id}, whose "
                                     "future is among its arguments, was cancelled")
        raise _dependency_error(job_id, dep_id, cause)

    def state(self, job_id: str) -> str | None:
        """"queued", "running" or "cancelled" for a job this intake holds, else
        None (ask the journal)."""
        described = self.describe(job_id)
        return None if described is None else str(described["state"])

    def describe(self, job_id: str) -> dict[str, Any] | None:
        """{state, attempts, worker} of a job this intake holds, else None. A
        finished job not yet journaled still reads "running": done/failed is
        said only once the journal holds the result."""
        if job_id not in self._running:
            return None
        cancelled = self._cancelled.get(job_id)
        if cancelled is not None:
            return {"state": "cancelled", "attempts": cancelled[0], "worker": cancelled[1]}
        future = self._futures.get(job_id)
        described = None if future is None else self._scheduler.describe(future)
        if described is None:
            return {"state": "queued", "attempts": 0, "worker": None}
        if described["state"] not in ("queued", "running"):
            described["state"] = "running"
        return described

    def future(self, job_id: str) -> Future[Any] | None:
        """The future of a job handed to the scheduler and not yet settled."""
        return self._futures.get(job_id)

    def cancel(self, job_id: str, *, running: bool = True) -> bool:
        """Cancel a job this intake holds: dropped from the backlog, cancelled in
        the scheduler's queue, or (``running``) stopped on its worker. It
        settles as cancelled (TaskCancelledError) at the next ``settle()``.
        False if it is not held, finished already, or runs and not ``running``."""
        if job_id in self._withdrawn:  # draining: it never started, settle it as cancelled
            self._withdrawn.discard(job_id)
            self._running.add(job_id)
            self._cancel_unstarted(job_id)
            return True
        if job_id not in self._running or job_id in self._cancelled:
            return job_id in self._cancelled
        future = self._futures.get(job_id)
        if future is not None:
            described = self._scheduler.describe(future) or {}
            attempts, worker = described.get("attempts", 0), described.get("worker")
            # "running": placed on a worker (it may still wait there behind
            # another task); "queued" after an attempt: in its retry backoff.
            ran = ("while it ran or waited on its worker (stopped there)"
                   if described.get("state") == "running"
                   else "while it waited to be retried" if attempts > 0 else None)
            del self._futures[job_id]  # its own completion, when it comes, is ignored
            stopped = (self._scheduler.cancel(future)
                       if running or described.get("state") == "queued" else False)
            if not stopped:
                self._futures[job_id] = future
                return False
            self._cancelled[job_id] = (attempts, worker, ran)
            with self._completions_lock:
                self._completions.append((job_id, None))
            if self._logs is not None:  # what the stopped attempt logged stays fetchable
                self._logs.settle(job_id, future)
            return True
        for index, (queued_id, _) in enumerate(self._backlog):
            if queued_id == job_id:
                del self._backlog[index]
                self._cancel_unstarted(job_id)
                return True
        return False

    def _cancel_unstarted(self, job_id: str) -> None:
        """Settle a held job that never started as cancelled at the next settle()."""
        self._cancelled[job_id] = (0, None, None)
        with self._completions_lock:
            self._completions.append((job_id, None))

    def withdraw_queued(self) -> int:
        """At the drain's start: take back the jobs handed to the scheduler that
        have not started (their futures still cancel), so that the drain waits
        only for the running ones and starts none; they stay journaled, unsettled,
        for the next start. Returns how many. Newest first: a job that waits for
        another's result is withdrawn before the Scheduler could cancel it
        along with that one (which would settle it)."""
        withdrawn = 0
        for job_id, future in reversed(list(self._futures.items())):
            if future.cancel():
                del self._futures[job_id]  # its completion, queued now, is ignored
                self._running.discard(job_id)
                self._by_memfd.pop(job_id, None)
                self._withdrawn.add(job_id)  # a cancel still settles it (cancel())
                withdrawn += 1
        return withdrawn

    def clients(self) -> list[dict[str, Any]]:
        """Per submitting connection (hex id): its jobs queued and running now,
        and done, failed and cancelled in this daemon's life (at most
        ``_CLIENTS`` connections: those holding the most jobs)."""
        counts: dict[bytes, collections.Counter[str]] = {
            peer: collections.Counter(finished) for peer, finished in self._finished_by.items()}
        for job_id, peer in self._owners.items():
            state = self.state(job_id) or "queued"
            counts.setdefault(peer, collections.Counter())[state] += 1
        if len(counts) > _CLIENTS:  # bounded: those holding the most jobs now
            kept = sorted(counts, key=lambda p: counts[p]["queued"] + counts[p]["running"],
                          reverse=True)[:_CLIENTS]
            counts = {peer: counts[peer] for peer in kept}
        return [{"client": peer.hex(), **{k: c[k] for k in
                                          ("queued", "running", "done", "failed", "cancelled")}}
                for peer, c in counts.items()]

    def _completed(self, job_id: str, future: Future[Any]) -> None:
        # One wake-up per settle round, not per job: the front thread takes every
        # completion queued so far, so only the first after that must wake it.
        with self._completions_lock:
            self._completions.append((job_id, future))
            wake, self._woken = not self._woken, True
        if wake:
            self._wakeup.wake()

    def settle(self) -> None:
        """Journal finished jobs (one commit), then tell whoever waits for them: a
        result a client has seen is never run again after a restart."""
        if not self._completions:
            return
        outcomes = []
        replies = []
        runs: dict[str, tuple[int, str | None]] = {}
        cancelled: set[str] = set()
        with self._completions_lock:
            completions = list(self._completions)
            self._completions.clear()
            self._woken = False
        for job_id, future in completions:
            if future is not None:
                if self._futures.get(job_id) is not future:
                    continue  # cancelled meanwhile: settled as such already
                del self._futures[job_id]
                if self._logs is not None:
                    self._logs.settle(job_id, future)
                attempts_worker = self._scheduler.runs(future)
                if attempts_worker is not None:
                    runs[job_id] = attempts_worker
                if future.cancelled():  # e.g. cancelled with a job it depends on
                    cancelled.add(job_id)
                    msg = _error_message(job_id, TaskCancelledError(
                        f"job {job_id} was cancelled before it started"))
                else:
                    msg = _result_message(job_id, future)
            else:
                attempts, worker, ran = self._cancelled.pop(job_id)
                runs[job_id] = (attempts, worker)
                cancelled.add(job_id)
                msg = _error_message(job_id, TaskCancelledError(
                    f"job {job_id} was cancelled {ran or 'before it started'}"))
            self._running.discard(job_id)
            try:
                frames = encode(msg, allow_pickle=self._settings.allow_pickle)
            except (TypeError, ValueError) as exc:
                msg = _error_message(job_id, TypeError(
                    f"the result of job {job_id} cannot be sent to clients: {exc}"))
                frames = encode(msg)
            ok = bool(msg.body["ok"])
            peers = self._waiters.pop(job_id)
            memfd = self._by_memfd.pop(job_id, None)
            owner = self._owners.get(job_id)
            handed = None
            journaled = frames
            if memfd is not None and ok and owner is not None and owner in peers:
                handed = self._handed(job_id, memfd[0], msg)
            if handed is not None and owner is not None and memfd is not None:
                shm_frames = encode(handed)
                peers.remove(owner)  # the first time only: its other waits get frames
                replies.append((owner, shm_frames, handed))
                if not memfd[1]:  # not durable: the arrays live in the memfds only
                    # Only later fetches are told so: the peers waiting now
                    # get the result this round has in hand.
                    journaled = encode(result_lost(job_id))
            if job_id in cancelled:
                self.cancelled += 1
                self._count(job_id, "cancelled")
            elif ok:
                self.done += 1
                self._count(job_id, "done")
            else:
                self.failed += 1
                self._count(job_id, "failed")
            outcomes.append((job_id, ok, journaled))
            replies += [(peer, frames, msg) for peer in peers]
        if not outcomes:
            return
        self._journal.finish(outcomes, cancelled, runs)
        self._replier.reply_results(replies)

    def _handed(self, job_id: str, channel: str, msg: Message) -> Message | None:
        """The result naming memfds held for ``channel``, or None (frames)."""
        assert self._local is not None
        try:
            return self._local.offer_result(channel, msg)
        except (OSError, ShmrunnerError) as exc:  # e.g. no memory for a copy: frames
            log.info("the result of job %s goes as frames: %s", job_id, exc)
            return None

    def _count(self, job_id: str, outcome: str) -> None:
        peer = self._owners.pop(job_id, None)
        if peer is None:
            return  # replayed after a restart: its connection is not known
        finished = self._finished_by.pop(peer, None) or collections.Counter()
        finished[outcome] += 1
        self._finished_by[peer] = finished  # most recent last
        while len(self._finished_by) > _CLIENTS:
            self._finished_by.popitem(last=False)


def _dependency_error(job_id: str, dep_id: str, cause: BaseException | None) -> DependencyError:
    error = DependencyError(f"job {job_id} did not run: job {dep_id}, whose future is among "
                            f"its arguments, failed with {type(cause).__name__}: {cause}")
    error.__cause__ = cause
    return error


def _result_message(job_id: str, future: Future[Any]) -> Message:
    exc = future.exception()
    if exc is None:
        return Message("result", {"job_id": job_id, "ok": True, "value": future.result()})
    return _error_message(job_id, exc)


def _error_message(job_id: str, exc: BaseException) -> Message:
    return Message("result", {"job_id": job_id, "ok": False, "error": exception_to_wire(exc)})
