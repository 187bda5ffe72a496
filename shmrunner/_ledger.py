"""The client's ledger: what a :class:`~shmrunner.client.Client` knows about
each of its jobs, and the timers that keep every one of them moving.

Data flow::

    callers (any thread), under the lock:
        add_submit -> futures, unacked (+ACK timer), submits (their frames and
                      bytes: add_submit waits for room), outbox
        add_fetch  -> fetches (a WaitingCall per result() call), refetch (+timer), outbox
        add_status -> status calls (answered in order), outbox
        add_jobs   -> jobs/cancel calls (answered in order), outbox
        withdraw   -> a job cancelled before it was accepted: forgotten, and a
                      cancel after its submit (it may have left), outbox
    client thread (the only reader of the socket):
        outbox --> socket (it pops; callers append: a deque needs no lock; a
                   submit wakes the thread only if it said the outbox was
                   drained since the last: outbox_drained, under the lock)
        receive(reply) -> accepted: ACK timer becomes a REFETCH timer
                          result / final error: settles the Future and the calls
                          busy: a RETRY timer sends the submit's frames again
        check_timers() -> due REFETCH: "fetch" again; due RETRY: the submit again;
                          due ACK: the Future fails ("may or may not be accepted")
        fail_all(error) -> every Future and call settles with ``error``

The timers live in one heap, soonest first, so the client thread sleeps until
the next one (``next_timer``). The dicts are the truth: a heap entry whose time
no longer matches its dict's (answered, re-armed) is stale and skipped.
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from typing import Any

from . import _pid
from ._jobfuture import JobFuture, WaitingCall
from .errors import ShmrunnerError
from .transport.protocol import Message, encode, exception_from_wire

__all__ = ["Ledger"]

_BUSY_FIRST, _BUSY_MAX = 0.02, 1.0   # backoff of a submit the daemon was too busy to take
# Error codes after which the daemon will never answer about that job (docs/protocol.md).
_FINAL_FETCH_CODES = frozenset({"unknown", "journal", "invalid"})
_IN_FLIGHT = ("job id {!r} is in flight on this client already (its future is not settled): "
              "wait for that future, or fetch the job with client.result(job_id)")
# The client thread's timers (in one heap, ordered by when they are due).
_ACK, _REFETCH, _RETRY = 0, 1, 2
_Timer = tuple[float, int, str]  # (when, which, job id)


class Ledger:
    """Every job, call and timer of one Client, behind one lock."""

    def __init__(self, address: str, *, ack_timeout: float, refetch_interval: float,
                 max_pending_bytes: int) -> None:
        self.address = address
        self.ack_timeout = ack_timeout
        self.refetch_interval = refetch_interval
        self.max_pending_bytes = max_pending_bytes
        # Frames for the client thread to send.
        self.outbox: collections.deque[list[Any]] = collections.deque()
        self._lock = threading.Lock()
        self._futures: dict[str, JobFuture] = {}
        self._unacked: dict[str, float] = {}
        # Submits not accepted yet (their frames, to send again after "busy") and
        # when to send each again: job id -> (when, backoff so far).
        self._submits: dict[str, list[Any]] = {}
        # Their bytes: add_submit() blocks while they exceed max_pending_bytes, so a
        # fast producer cannot fill this process faster than the daemon accepts.
        self._submits_bytes = 0
        self._submit_bytes: dict[str, int] = {}  # each one's (its frames, its memfd arrays)
        self._room = threading.Condition(self._lock)
        self._awaiting_room = 0  # callers waiting on _room (no notify per answer otherwise)
        self._retry_at: dict[str, tuple[float, float]] = {}
        # Jobs someone waits for (an acknowledged Future, a result() call) -> when
        # to ask the daemon about them again: a daemon restarted since does not
        # know this client is waiting.
        self._refetch_at: dict[str, float] = {}
        self._fetches: dict[str, list[WaitingCall]] = {}
        self._timers: list[_Timer] = []
        self._status_calls: collections.deque[WaitingCall] = collections.deque()
        # "jobs" and "cancel" requests: the daemon answers them in the order sent.
        self._jobs_calls: collections.deque[WaitingCall] = collections.deque()
        self.closed = False  # no more submits (shutdown began)
        self.ended = False  # the client thread stops (shutdown is over): no more requests
        self._broken: ShmrunnerError | None = None
        self._owner = _pid.current()  # a fork() child has no client thread: refused there
        # The daemon takes "submits" batches (it said so in an "accepted").
        self.batch_submits = False
        # A submit woke the client thread, which has not found the outbox empty since.
        self._sending = False

    # --- the callers' side ---------------------------------------------------------------

    def check_usable(self, what: str, submit: bool = False) -> None:
        """Raise if a call cannot be served: in a fork() child of the client's
        process (its thread is not there), or after shutdown (a submit once it
        began; other requests, such as its own cancels, once it is over)."""
        if _pid.current() != self._owner:
            raise ShmrunnerError(f"this Client was created in process {self._owner}; a fork() "
                                 "child cannot use it: call shmrunner.connect() in the child")
        if self.closed if submit else self.ended:
            raise RuntimeError(f"cannot {what} after shutdown")

    def refuse_in_flight(self, job_id: str) -> None:
        """ValueError if this client has ``job_id`` submitted and not settled."""
        with self._lock:
            if job_id in self._futures:
                raise ValueError(_IN_FLIGHT.format(job_id))

    def add_submit(self, job_id: str, frames: list[Any], future: JobFuture,
                   shared_bytes: int = 0, wait: bool = True) -> bool:
        """Queue a submit, waiting while the ones not yet accepted hold more than
        ``max_pending_bytes`` (its frames, and ``shared_bytes`` of arrays handed
        over as memfds); True if the client thread must be woken for it (it said
        the outbox was drained since the last such wake-up; until it does, it
        goes on sending, and takes this one with the others: which is what lets
        it batch them). A broken client fails ``future`` instead (False); a
        closed one raises, and so does one with ``job_id`` in flight already.
        ``wait=False`` (the client thread, in a done-callback: it is the one
        that frees room): queued at once, over the budget if need be."""
        nbytes = _frames_bytes(frames) + shared_bytes
        with self._lock:
            # A job larger than the budget alone goes once nothing else waits.
            while (wait and self._submits_bytes and self._broken is None and not self.closed
                   and self._submits_bytes + nbytes > self.max_pending_bytes):
                self._awaiting_room += 1
                try:
                    self._room.wait()
                finally:
                    self._awaiting_room -= 1
            if self._broken is not None:
                future.set_exception(self._broken)
                return False
            if self.closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if job_id in self._futures:  # its future would never settle: one per id
                raise ValueError(_IN_FLIGHT.format(job_id))
            self._futures[job_id] = future
            self._unacked[job_id] = when = time.monotonic() + self.ack_timeout
            heapq.heappush(self._timers, (when, _ACK, job_id))
            self._submits[job_id] = frames
            self._submits_bytes += nbytes
            self._submit_bytes[job_id] = nbytes
            self.outbox.append(frames)
            wake, self._sending = not self._sending, True
        return wake

    def outbox_drained(self) -> bool:
        """The client thread found the outbox empty: True if it still is (the
        next submit wakes the thread), False if a caller added to it meanwhile."""
        with self._lock:
            if self.outbox:
                return False
            self._sending = False
            return True

    def add_fetch(self, job_id: str, call: WaitingCall, timeout: float | None) -> None:
        """Queue a fetch of ``job_id`` that ``call`` waits for (raises if broken)."""
        self.check_usable("fetch a result")
        with self._lock:
            if self._broken is not None:
                raise self._broken
            self._fetches.setdefault(job_id, []).append(call)
            if job_id not in self._refetch_at:
                self._refetch_at[job_id] = when = time.monotonic() + self.refetch_interval
                heapq.heappush(self._timers, (when, _REFETCH, job_id))
            self.outbox.append(encode(Message("fetch", {"job_id": job_id, "timeout": timeout})))

    def drop_fetch(self, job_id: str, call: WaitingCall) -> None:
        """``call`` stopped waiting (its timeout passed)."""
        with self._lock:
            waiting = self._fetches.get(job_id, [])
            if call in waiting:
                waiting.remove(call)
                if not waiting:
                    del self._fetches[job_id]

    def add_status(self, call: WaitingCall) -> None:
        """Queue a status request that ``call`` waits for (raises if broken)."""
        self.check_usable("ask for the status")
        with self._lock:
            if self._broken is not None:
                raise self._broken
            self._status_calls.append(call)
            self.outbox.append(encode(Message("status", {})))

    def drop_status(self, call: WaitingCall) -> None:
        """``call`` stopped waiting: the next status reply is not its."""
        with self._lock:
            if call in self._status_calls:
                self._status_calls.remove(call)

    def add_jobs(self, call: WaitingCall, msg: Message) -> None:
        """Queue a "jobs" or "cancel" request that ``call`` waits for (raises if broken)."""
        self.check_usable("ask about jobs" if msg.type == "jobs" else "cancel a job")
        with self._lock:
            if self._broken is not None:
                raise self._broken
            self._jobs_calls.append(call)
            self.outbox.append(encode(msg))

    def withdraw(self, job_id: str, call: WaitingCall) -> None:
        """The caller cancelled ``job_id``'s future before the daemon accepted
        it: forget the job (its submit is not sent again, no timer waits for
        it) and send the daemon a cancel, answered to ``call``: the submit may
        have left already, and the daemon then cancels the job (stopping it if
        it started). The cancel follows the submit on the same socket, so the
        daemon never sees it first."""
        with self._lock:
            if self._futures.pop(job_id, None) is None or self._broken is not None:
                return  # settled meanwhile, or nothing will ever be sent again
            self._unacked.pop(job_id, None)
            self._drop_submit(job_id)
            self._retry_at.pop(job_id, None)
            if job_id not in self._fetches:
                self._refetch_at.pop(job_id, None)
            self._jobs_calls.append(call)
            self.outbox.append(encode(Message("cancel", {"job_id": job_id})))

    def drop_jobs(self, call: WaitingCall) -> None:
        """``call`` stopped waiting: the next jobs reply is not its."""
        with self._lock:
            if call in self._jobs_calls:
                self._jobs_calls.remove(call)

    def close(self) -> None:
        """No more submits; one waiting for room gives up."""
        with self._lock:
            self.closed = True
            self._room.notify_all()

    def futures(self) -> list[JobFuture]:
        """The Futures not settled yet."""
        return list(self._futures.values())

    # --- the client thread's side --------------------------------------------------------

    def next_timer(self) -> float | None:
        """Seconds to the next live timer (None: none; a wake-up brings new ones)."""
        with self._lock:
            timers = self._timers
            while timers and not self._live(timers[0]):
                heapq.heappop(timers)
            return max(0.0, timers[0][0] - time.monotonic()) if timers else None

    def _live(self, timer: _Timer) -> bool:
        """Under the lock: whether ``timer`` is still the deadline its dict holds."""
        when, which, job_id = timer
        if which == _ACK:
            return self._unacked.get(job_id) == when
        if which == _REFETCH:
            return self._refetch_at.get(job_id) == when
        retry = self._retry_at.get(job_id)
        return retry is not None and retry[0] == when

    def receive(self, msg: Message) -> None:
        body = msg.body
        job_id = body.get("job_id") or ""
        if msg.type == "results":  # a batch: each one exactly as a single result
            for item in body["results"]:
                one = item.get("job_id")
                if one:
                    self._settle(one, Message("result", item))
        elif msg.type == "accepted":
            # A batched "accepted" (job_ids) is, for each id, exactly a single one.
            ids = body["job_ids"] if "job_ids" in body else [job_id]
            if body.get("submits") is True:
                self.batch_submits = True
            accepted: list[JobFuture] = []
            with self._lock:
                for one in ids:
                    future = self._futures.get(one)
                    self._drop_submit(one)
                    self._retry_at.pop(one, None)
                    if self._unacked.pop(one, None) is not None:
                        self._refetch_at[one] = when = time.monotonic() + self.refetch_interval
                        heapq.heappush(self._timers, (when, _REFETCH, one))
                    if future is not None:
                        accepted.append(future)
            for future in accepted:
                future.set_accepted()
        elif msg.type == "status_reply":
            with self._lock:
                call = self._status_calls.popleft() if self._status_calls else None
            if call is not None:
                call.settle(msg)
        elif msg.type == "jobs_reply" or (msg.type == "error" and body.get("jobs")):
            with self._lock:
                call = self._jobs_calls.popleft() if self._jobs_calls else None
            if call is not None:
                call.settle(msg)
        elif msg.type == "error" and body.get("fetch"):
            self._fetch_error(job_id, msg)
        elif msg.type == "error" and body.get("code") == "busy":
            self._busy(job_id)
        elif job_id:  # result, or an error about one job
            self._settle(job_id, msg)

    def _fetch_error(self, job_id: str, msg: Message) -> None:
        """The answer to a fetch. "Unknown job" (and a lost result) is final: it
        settles every call and, if the daemon once accepted it, the job's Future.
        A wait that timed out settles one call only, never the job's Future."""
        code = msg.body.get("code")
        if code in _FINAL_FETCH_CODES or (
                code is None and msg.body["reason"].startswith("unknown job")):
            with self._lock:
                acked = job_id in self._futures and job_id not in self._unacked
            if acked or code != "unknown":
                reason = msg.body["reason"]
                if code == "unknown":
                    reason = (f"the daemon at {self.address} does not know job {job_id} (it "
                              "was restarted on another journal, or the result expired)")
                self._settle(job_id, Message("error", {"reason": reason, "job_id": job_id,
                                                       "code": code}), future=acked)
            else:
                self._settle_calls(job_id, msg)
            return
        now = time.monotonic()
        with self._lock:
            waiting = self._fetches.get(job_id, [])
            # The daemon's "not finished within the timeout" comes a little after the
            # caller's own deadline: it belongs to a call that is due, not a later one.
            due = [c for c in waiting if code != "timeout" or c.deadline <= now + 0.5]
            call = min(due, key=lambda c: c.deadline) if due else None
            if call is not None:
                waiting.remove(call)
                if not waiting:
                    del self._fetches[job_id]
        if call is not None:
            call.settle(msg)

    def _busy(self, job_id: str) -> None:
        with self._lock:
            if job_id not in self._submits:
                return
            _, backoff = self._retry_at.get(job_id, (0.0, 0.0))
            backoff = min(_BUSY_MAX, max(_BUSY_FIRST, 2 * backoff))
            now = time.monotonic()
            self._retry_at[job_id] = (now + backoff, backoff)
            # The daemon answered, so it is not the acknowledgement that is late.
            self._unacked[job_id] = now + backoff + self.ack_timeout
            heapq.heappush(self._timers, (now + backoff, _RETRY, job_id))
            heapq.heappush(self._timers, (self._unacked[job_id], _ACK, job_id))

    def _settle_calls(self, job_id: str, msg: Message) -> None:
        with self._lock:
            calls = self._fetches.pop(job_id, [])
            if job_id not in self._futures:
                self._refetch_at.pop(job_id, None)
        for call in calls:
            call.settle(msg)

    def _settle(self, job_id: str, msg: Message, future: bool = True) -> None:
        """Settle the job's Future (if ``future``) and every call waiting for it."""
        with self._lock:
            found = self._futures.pop(job_id, None) if future else None
            if future:
                self._unacked.pop(job_id, None)
                self._drop_submit(job_id)
                self._retry_at.pop(job_id, None)
            calls = self._fetches.pop(job_id, [])
            if job_id not in self._futures:
                self._refetch_at.pop(job_id, None)
        for call in calls:
            call.settle(msg)
        if found is None or found.done():
            return
        body = msg.body
        if msg.type == "error":
            found.set_exception(ShmrunnerError(body["reason"]))
            return
        found.set_accepted()  # a result means the daemon had journaled it
        if body["ok"]:
            found.set_result(body["value"])
        else:
            found.set_exception(exception_from_wire(body["error"]))

    def check_timers(self) -> None:
        """Act on the timers that are due: ask again about jobs someone waits
        for, send again the submits the daemon was too busy to take, fail the
        submits it never acknowledged."""
        now = time.monotonic()
        late = []
        with self._lock:
            timers = self._timers
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)
                if not self._live(timer):
                    continue
                _, which, job_id = timer
                if which == _REFETCH:
                    if job_id in self._fetches or (job_id in self._futures
                                                   and job_id not in self._unacked):
                        self._refetch_at[job_id] = when = now + self.refetch_interval
                        heapq.heappush(timers, (when, _REFETCH, job_id))
                        self.outbox.append(encode(Message("fetch", {"job_id": job_id})))
                    else:
                        del self._refetch_at[job_id]  # nobody waits for it any more
                elif which == _RETRY:
                    if job_id in self._submits:
                        self._retry_at[job_id] = (float("inf"), self._retry_at[job_id][1])
                        self.outbox.append(self._submits[job_id])
                else:
                    del self._unacked[job_id]
                    self._drop_submit(job_id)
                    self._retry_at.pop(job_id, None)
                    late.append(job_id)
            futures = [(job_id, self._futures.pop(job_id, None)) for job_id in late]
            live = len(self._unacked) + len(self._refetch_at) + len(self._retry_at)
            if len(timers) > 2 * live + 1024:  # mostly stale: answered long before due
                self._timers = [t for t in timers if self._live(t)]
                heapq.heapify(self._timers)
        for job_id, future in futures:
            if future is not None and not future.done():
                future.set_exception(ShmrunnerError(
                    f"the daemon at {self.address} did not acknowledge job {job_id} within "
                    f"{self.ack_timeout} s; it may or may not have been accepted: fetch it with "
                    "client.result(job_id) or submit it again with the same job_id"))

    def fail_all(self, error: ShmrunnerError, broken: bool = False) -> None:
        """Settle every Future and call with ``error``; ``broken``: later calls
        raise it at once."""
        with self._lock:
            if broken and self._broken is None:
                self._broken = error
            futures = list(self._futures.values())
            self._futures.clear()
            self._unacked.clear()
            self._submits.clear()
            self._submit_bytes.clear()
            self._submits_bytes = 0
            self._room.notify_all()
            self._retry_at.clear()
            calls = [c for cs in self._fetches.values() for c in cs] + list(self._status_calls)
            calls += self._jobs_calls
            self._fetches.clear()
            self._status_calls.clear()
            self._jobs_calls.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)
        for call in calls:
            call.settle(Message("error", {"reason": str(error)}))

    def _drop_submit(self, job_id: str) -> None:
        """Under the lock: ``job_id``'s submit is answered; its frames go."""
        if self._submits.pop(job_id, None) is not None:
            self._submits_bytes -= self._submit_bytes.pop(job_id)
            if self._awaiting_room:
                self._room.notify_all()


def _frames_bytes(frames: list[Any]) -> int:
    if len(frames) == 1 and type(frames[0]) is bytes:  # a tiny submit: its header alone
        return len(frames[0])
    return sum(memoryview(frame).nbytes for frame in frames)
