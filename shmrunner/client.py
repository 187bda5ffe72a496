"""The client of a runner daemon: ``shmrunner.connect(address) -> Client``.

Data flow::

    submit()/result()/status() (any thread) --> outbox + wake pipe --+
                                                                     v
    client thread (owns the DEALER socket): sends, receives, re-asks; it sleeps
        until a message, a wake-up, or its next timer (one heap: acknowledgement
        deadlines, re-asks every refetch_interval, busy backoffs)
        accepted -> the job is journaled (durable): future.accepted() is True
        result   -> settles the job's Future and any result(job_id) waiting
        error    -> busy: the submit is sent again after a backoff;
                    unknown job: settles that job's Future and result() calls;
                    otherwise a refused submit (draining, bad id) or a failed fetch

Every job has an id (``future.job_id``), chosen here so it is known at once;
submitting the same id again is idempotent in the daemon. A job whose
acknowledgement does not come within ``ack_timeout`` fails with
:class:`ShmrunnerError` saying it may or may not have been accepted: fetch it
with ``client.result(job_id)`` (from this or any later Client) or submit it
again with the same id. A daemon whose queue is full answers ``busy``: that is
a clear "not accepted", so the client submits again, backing off up to 1 s,
for as long as the daemon keeps answering. While a job runs (and while a
``result(job_id)`` call waits) the client asks about it again every
``refetch_interval`` seconds, so it completes even if the daemon was restarted
in between (and replayed the job from its journal), or fails with "does not
know job" if the restarted daemon has no record of it. Arrays travel as
zero-copy frames both ways.

``map``/``imap``/``imap_unordered`` read their input lazily (``_streams``),
and ``submit`` blocks while the submits not yet accepted hold more than
``max_pending_bytes``: a producer never outruns the daemon by more than that.

Guarantee: every Future and every waiting call settles. The client thread
survives an unexpected exception in one round (logged); if rounds keep
failing, or the socket breaks, it fails everything it holds with the cause,
and later calls raise it at once.
"""

from __future__ import annotations

import collections
import heapq
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from ._jobid import check_job_id
from ._streams import Progress, chunked_calls, stream, total_of
from ._wakeup import Wakeup
from .errors import ResultTimeoutError, ShmrunnerError
from .transport.protocol import Message, encode, exception_from_wire, function_ref
from .transport.zmqchannel import ChannelError, ChannelOptions, ZmqChannel, client_keys

__all__ = ["Client", "JobFuture", "connect"]

log = logging.getLogger("shmrunner.client")

_ACCEPT = frozenset({"accepted", "result", "error", "status_reply"})
_BUSY_FIRST, _BUSY_MAX = 0.02, 1.0   # backoff of a submit the daemon was too busy to take
_MAX_FAILED_ROUNDS = 10              # unexpected errors in a row before the thread gives up
# Error codes after which the daemon will never answer about that job (docs/protocol.md).
_FINAL_FETCH_CODES = frozenset({"unknown", "journal", "invalid"})
# What runs a chunk of map(chunksize=) items: the daemon's scheduler's own runner.
_CHUNK_RUNNER = "shmrunner.scheduler:_run_chunk"
# The client thread's timers (in one heap, ordered by when they are due).
_ACK, _REFETCH, _RETRY = 0, 1, 2
_Timer = tuple[float, int, str]  # (when, which, job id)


class JobFuture(Future[Any]):
    """The Future of a job submitted to a daemon: ``job_id``, and whether the
    daemon has journaled it (from then on it survives a daemon restart)."""

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self._accepted = False
        self._decided = threading.Event()  # accepted, or settled without it
        self.add_done_callback(lambda _: self._decided.set())

    def accepted(self) -> bool:
        """Whether the daemon said it journaled the job (durably accepted)."""
        return self._accepted

    def wait_accepted(self, timeout: float | None = None) -> bool:
        """Wait until the job is durably accepted (True), or until it settled
        without that or ``timeout`` seconds passed (False)."""
        self._decided.wait(timeout)
        return self._accepted

    def _set_accepted(self) -> None:
        self._accepted = True
        self._decided.set()


class _Call:
    """A synchronous request (fetch, status) waiting for its answer."""

    __slots__ = ("event", "reply", "deadline")

    def __init__(self, timeout: float | None = None) -> None:
        self.event = threading.Event()
        self.reply: Message | None = None
        self.deadline = float("inf") if timeout is None else time.monotonic() + timeout

    def settle(self, reply: Message) -> None:
        self.reply = reply
        self.event.set()


class Client(Executor):
    """A ``concurrent.futures.Executor`` whose tasks run in a runner daemon."""

    def __init__(self, address: str | None = None, *, ack_timeout: float = 30.0,
                 refetch_interval: float = 5.0,
                 allow_pickle: bool = False,
                 max_message_bytes: int = 1 << 31, curve_secret_key: str | None = None,
                 curve_server_key: str | None = None,
                 max_pending_bytes: int = 256 << 20) -> None:
        from ._endpoints import client_address

        self.address = address = client_address(address, "clients")
        self.ack_timeout = ack_timeout
        self.refetch_interval = refetch_interval
        self._allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._outbox: collections.deque[list[Any]] = collections.deque()
        self._futures: dict[str, JobFuture] = {}
        self._unacked: dict[str, float] = {}
        # Submits not accepted yet (their frames, to send again after "busy") and
        # when to send each again: job id -> (when, backoff so far).
        self._submits: dict[str, list[Any]] = {}
        # Their bytes: submit() blocks while they exceed max_pending_bytes, so a
        # fast producer cannot fill this process faster than the daemon accepts.
        self._submits_bytes = 0
        self.max_pending_bytes = max_pending_bytes
        self._room = threading.Condition(self._lock)
        self._retry_at: dict[str, tuple[float, float]] = {}
        # Jobs someone waits for (an acknowledged Future, a result() call) -> when
        # to ask the daemon about them again: a daemon restarted since does not
        # know this client is waiting.
        self._refetch_at: dict[str, float] = {}
        self._fetches: dict[str, list[_Call]] = {}
        # The deadlines above, soonest first, so the client thread sleeps until
        # the next one. The dicts are the truth: an entry whose time no longer
        # matches its dict's (answered, re-armed) is stale and skipped.
        self._timers: list[_Timer] = []
        self._status_calls: collections.deque[_Call] = collections.deque()
        self._closed = False
        self._broken: ShmrunnerError | None = None
        self._wakeup = Wakeup()
        self._channel = ZmqChannel("dealer", ChannelOptions(
            max_bytes=max_message_bytes, allow_pickle=allow_pickle, accept=_ACCEPT,
            curve=client_keys(curve_secret_key, curve_server_key)))
        try:
            self._channel.connect(address)
        except BaseException:
            self._channel.close()
            raise
        self._thread = threading.Thread(target=self._run, name="shmrunner-client", daemon=True)
        self._thread.start()

    # --- Executor API ------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any,  # type: ignore[override]
               retries: int | None = None, timeout: float | None = None,
               job_id: str | None = None, **kwargs: Any) -> JobFuture:
        """Run ``fn(*args, **kwargs)`` in the daemon. The future has ``job_id``
        (``job_id=``: 1-128 characters of ``A-Za-z0-9._:-``, no leading dot; by
        default a random one) and ``wait_accepted()``."""
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        job_id = uuid.uuid4().hex if job_id is None else check_job_id(job_id)
        options: dict[str, Any] = {}
        if retries is not None:
            options["retries"] = retries
        if timeout is not None:
            options["timeout"] = timeout
        frames = encode(Message("submit", {"job_id": job_id, "fn": fn, "args": args,
                                           "kwargs": kwargs, "options": options}),
                        allow_pickle=self._allow_pickle)
        nbytes = _frames_bytes(frames)
        future = JobFuture(job_id)
        future.set_running_or_notify_cancel()
        with self._lock:
            # A job larger than the budget alone goes once nothing else waits.
            while (self._submits_bytes and self._broken is None and not self._closed
                   and self._submits_bytes + nbytes > self.max_pending_bytes):
                self._room.wait()
            if self._broken is not None:
                future.set_exception(self._broken)
                return future
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._futures[job_id] = future
            self._unacked[job_id] = when = time.monotonic() + self.ack_timeout
            heapq.heappush(self._timers, (when, _ACK, job_id))
            self._submits[job_id] = frames
            self._submits_bytes += nbytes
            self._outbox.append(frames)
        self._wake()
        return future

    def map(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1, buffersize: int | None = None,
            progress: Progress = None) -> Iterator[Any]:
        """As ``Scheduler.map``: lazy, at most ``buffersize`` jobs ahead (default
        64), ``chunksize`` items per job, ``progress`` a tqdm bar or callable."""
        return self._stream(fn, iterables, True, timeout, chunksize, buffersize, progress)

    def imap(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
             timeout: float | None = None, chunksize: int = 1, buffersize: int | None = None,
             progress: Progress = None) -> Iterator[Any]:
        """The same as :meth:`map`."""
        return self._stream(fn, iterables, True, timeout, chunksize, buffersize, progress)

    def imap_unordered(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
                       timeout: float | None = None, chunksize: int = 1,
                       buffersize: int | None = None,
                       progress: Progress = None) -> Iterator[Any]:
        """As :meth:`imap`, in the order jobs finish."""
        return self._stream(fn, iterables, False, timeout, chunksize, buffersize, progress)

    def _stream(self, fn: Callable[..., Any] | str, iterables: tuple[Iterable[Any], ...],
                ordered: bool, timeout: float | None, chunksize: int,
                buffersize: int | None, progress: Progress) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        calls: Iterator[tuple[Any, ...]] = chunked_calls(iterables, chunksize)
        if chunksize > 1:
            ref = fn if isinstance(fn, str) else function_ref(fn)
            calls = ((_CHUNK_RUNNER, ref, chunk) for chunk in calls)
        else:
            calls = ((fn, *args) for args in calls)
        return stream(self.submit, calls, ordered=ordered, buffersize=buffersize or 64,
                      timeout=timeout, chunked=chunksize > 1, progress=progress,
                      total=total_of(iterables))

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """The result of job ``job_id`` (raising its exception), waiting up to
        ``timeout`` seconds for it to finish (then :class:`ResultTimeoutError`,
        a ``TimeoutError``); works after reconnecting and across a daemon
        restart. A job the daemon does not know raises :class:`ShmrunnerError`."""
        check_job_id(job_id)
        call = _Call(timeout)
        with self._lock:
            if self._broken is not None:
                raise self._broken
            self._fetches.setdefault(job_id, []).append(call)
            if job_id not in self._refetch_at:
                self._refetch_at[job_id] = when = time.monotonic() + self.refetch_interval
                heapq.heappush(self._timers, (when, _REFETCH, job_id))
            self._outbox.append(encode(Message("fetch", {"job_id": job_id, "timeout": timeout})))
        self._wake()
        if not call.event.wait(timeout):
            with self._lock:
                waiting = self._fetches.get(job_id, [])
                if call in waiting:
                    waiting.remove(call)
                    if not waiting:
                        del self._fetches[job_id]
            if not call.event.is_set():
                raise ResultTimeoutError(f"job {job_id} did not finish within {timeout} s "
                                         f"(or the daemon at {self.address} did not answer); "
                                         "it goes on running: ask again later")
        reply = call.reply
        assert reply is not None
        if reply.type == "error":
            if reply.body.get("code") == "timeout":
                raise ResultTimeoutError(reply.body["reason"])
            raise ShmrunnerError(reply.body["reason"])
        if reply.body["ok"]:
            return reply.body["value"]
        raise exception_from_wire(reply.body["error"])

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The daemon's workers, queue depth, running, done, failed and uptime."""
        call = _Call()
        with self._lock:
            if self._broken is not None:
                raise self._broken
            self._status_calls.append(call)
            self._outbox.append(encode(Message("status", {})))
        self._wake()
        if not call.event.wait(timeout):
            with self._lock:
                if call in self._status_calls:  # the next reply is not this one's
                    self._status_calls.remove(call)
            raise ShmrunnerError(f"no status from the daemon at {self.address} within "
                                 f"{timeout} s: is it running?")
        assert call.reply is not None
        if call.reply.type == "error":
            raise ShmrunnerError(call.reply.body["reason"])
        status: dict[str, Any] = call.reply.body["status"]
        return status

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop submitting; with ``wait``, wait for the outstanding jobs' results
        (the jobs themselves stay in the daemon either way)."""
        with self._lock:
            self._closed = True
            self._room.notify_all()  # a submit waiting for room gives up
        if wait:
            for future in list(self._futures.values()):
                try:
                    future.exception()
                except BaseException:  # noqa: BLE001 (cancelled: nothing to wait for)
                    pass
        self._stop = True  # before the wake: the thread may sleep with no deadline
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the client thread ------------------------------------------------------------

    _stop = False

    def _run(self) -> None:
        failed_rounds = 0
        try:
            while not self._stop:
                try:
                    self._round()
                    failed_rounds = 0
                except ChannelError:
                    raise
                except Exception as exc:  # noqa: BLE001 (a bug must not strand every future)
                    failed_rounds += 1
                    log.error("client thread: unexpected error (%d in a row), carrying on: %r",
                              failed_rounds, exc, exc_info=True)
                    if failed_rounds >= _MAX_FAILED_ROUNDS:
                        raise
        except Exception as exc:  # noqa: BLE001 (every waiter must hear about it)
            self._fail_all(ShmrunnerError(f"the client connection to {self.address} failed: "
                                          f"{exc!r}"), broken=True)
        finally:
            self._fail_all(ShmrunnerError("the client was shut down"))
            self._channel.close()
            self._wakeup.close()

    def _round(self) -> None:
        """Wait for a message, a wake-up (work from another thread), room to
        send what is stuck, or the next timer; then do what is due."""
        readable = self._channel.poll(self._next_timer(), wakeup=self._wakeup,
                                      writable=bool(self._outbox))
        while self._outbox:
            if not self._channel.try_send_frames(self._outbox[0]):
                break  # no connection takes it now (refused?): when one does
            self._outbox.popleft()
        if readable:
            while (received := self._channel.recv(0)) is not None:
                self._receive(received.message)
        self._check_acks()

    def _next_timer(self) -> float | None:
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

    def _receive(self, msg: Message) -> None:
        body = msg.body
        job_id = body.get("job_id") or ""
        if msg.type == "accepted":
            with self._lock:
                future = self._futures.get(job_id)
                self._drop_submit(job_id)
                self._retry_at.pop(job_id, None)
                if self._unacked.pop(job_id, None) is not None:
                    self._refetch_at[job_id] = when = time.monotonic() + self.refetch_interval
                    heapq.heappush(self._timers, (when, _REFETCH, job_id))
            if future is not None:
                future._set_accepted()
        elif msg.type == "status_reply":
            with self._lock:
                call = self._status_calls.popleft() if self._status_calls else None
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
        found._set_accepted()  # a result means the daemon had journaled it
        if body["ok"]:
            found.set_result(body["value"])
        else:
            found.set_exception(exception_from_wire(body["error"]))

    def _check_acks(self) -> None:
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
                        self._outbox.append(encode(Message("fetch", {"job_id": job_id})))
                    else:
                        del self._refetch_at[job_id]  # nobody waits for it any more
                elif which == _RETRY:
                    if job_id in self._submits:
                        self._retry_at[job_id] = (float("inf"), self._retry_at[job_id][1])
                        self._outbox.append(self._submits[job_id])
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

    def _fail_all(self, error: ShmrunnerError, broken: bool = False) -> None:
        with self._lock:
            if broken and self._broken is None:
                self._broken = error
            futures = list(self._futures.values())
            self._futures.clear()
            self._unacked.clear()
            self._submits.clear()
            self._submits_bytes = 0
            self._room.notify_all()
            self._retry_at.clear()
            calls = [c for cs in self._fetches.values() for c in cs] + list(self._status_calls)
            self._fetches.clear()
            self._status_calls.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)
        for call in calls:
            call.settle(Message("error", {"reason": str(error)}))

    def _drop_submit(self, job_id: str) -> None:
        """Under the lock: ``job_id``'s submit is answered; its frames go."""
        frames = self._submits.pop(job_id, None)
        if frames is not None:
            self._submits_bytes -= _frames_bytes(frames)
            self._room.notify_all()

    def _wake(self) -> None:
        self._wakeup.wake()


def _frames_bytes(frames: list[Any]) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


def connect(address: str | None = None, **options: Any) -> Client:
    """A :class:`Client` (an Executor) for the daemon at ``address`` (None: this
    user's daemon on this host, through its private ipc socket)."""
    return Client(address, **options)
