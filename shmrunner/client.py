"""The client of a runner daemon: ``shmrunner.connect(address) -> Client``.

Data flow::

    submit()/result()/status() (any thread) --> outbox + wake pipe --+
                                                                     v
    client thread (owns the DEALER socket): sends, receives
        accepted -> the job is journaled (durable) in the daemon
        result   -> settles the job's Future and any result(job_id) waiting
        error    -> a refused submit (draining daemon) or a failed fetch

Every job has an id (``future.job_id``), chosen here so it is known at once;
submitting the same id again is idempotent in the daemon. A job whose
acknowledgement does not come within ``ack_timeout`` fails with
:class:`ShmrunnerError` saying it may or may not have been accepted: fetch it
with ``client.result(job_id)`` (from this or any later Client) or submit it
again with the same id. While a job runs, the client asks about it again every
``refetch_interval`` seconds, so its Future completes even if the daemon was
restarted in between (and replayed the job from its journal). Arrays travel as
zero-copy frames both ways.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import zmq

from ._jobid import check_job_id
from ._wakeup import Wakeup
from .errors import ShmrunnerError, TaskTimeoutError
from .transport.protocol import Message, encode, exception_from_wire
from .transport.zmqchannel import ChannelError, ChannelOptions, ZmqChannel, client_keys

__all__ = ["Client", "connect"]

_ACCEPT = frozenset({"accepted", "result", "error", "status_reply"})


class _Call:
    """A synchronous request (fetch, status) waiting for its answer."""

    __slots__ = ("event", "reply", "deadline")

    def __init__(self, timeout: float | None = None) -> None:
        self.event = threading.Event()
        self.reply: Message | None = None
        self.deadline = float("inf") if timeout is None else time.monotonic() + timeout


class Client(Executor):
    """A ``concurrent.futures.Executor`` whose tasks run in a runner daemon."""

    def __init__(self, address: str, *, ack_timeout: float = 30.0, refetch_interval: float = 5.0,
                 allow_pickle: bool = False,
                 max_message_bytes: int = 1 << 31, curve_secret_key: str | None = None,
                 curve_server_key: str | None = None) -> None:
        self.address = address
        self.ack_timeout = ack_timeout
        self.refetch_interval = refetch_interval
        self._allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._outbox: collections.deque[list[Any]] = collections.deque()
        self._futures: dict[str, Future[Any]] = {}
        self._unacked: dict[str, float] = {}
        # Acknowledged jobs still running -> when to ask the daemon about them
        # again: a daemon restarted since does not know this client is waiting.
        self._refetch_at: dict[str, float] = {}
        self._fetches: dict[str, list[_Call]] = {}
        self._status_calls: collections.deque[_Call] = collections.deque()
        self._closed = False
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
               job_id: str | None = None, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in the daemon; the future has ``job_id``."""
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
        future: Future[Any] = Future()
        future.job_id = job_id  # type: ignore[attr-defined]
        future.set_running_or_notify_cancel()
        with self._lock:
            self._futures[job_id] = future
            self._unacked[job_id] = time.monotonic() + self.ack_timeout
            self._outbox.append(frames)
        self._wake()
        return future

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """The result of job ``job_id`` (raising its exception), waiting up to
        ``timeout`` seconds for it to finish; works after reconnecting."""
        check_job_id(job_id)
        call = _Call(timeout)
        with self._lock:
            self._fetches.setdefault(job_id, []).append(call)
            self._outbox.append(encode(Message("fetch", {"job_id": job_id, "timeout": timeout})))
        self._wake()
        if not call.event.wait(None if timeout is None else timeout + self.ack_timeout):
            raise TaskTimeoutError(f"no answer from the daemon at {self.address} about "
                                   f"job {job_id}")
        reply = call.reply
        assert reply is not None
        if reply.type == "error":
            raise ShmrunnerError(reply.body["reason"])
        if reply.body["ok"]:
            return reply.body["value"]
        raise exception_from_wire(reply.body["error"])

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The daemon's workers, queue depth, running, done, failed and uptime."""
        call = _Call()
        with self._lock:
            self._status_calls.append(call)
            self._outbox.append(encode(Message("status", {})))
        self._wake()
        if not call.event.wait(timeout):
            raise ShmrunnerError(f"no status from the daemon at {self.address} within "
                                 f"{timeout} s: is it running?")
        assert call.reply is not None
        status: dict[str, Any] = call.reply.body["status"]
        return status

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop submitting; with ``wait``, wait for the outstanding jobs' results
        (the jobs themselves stay in the daemon either way)."""
        self._closed = True
        if wait:
            for future in list(self._futures.values()):
                try:
                    future.exception()
                except BaseException:  # noqa: BLE001 (cancelled: nothing to wait for)
                    pass
        self._wake()
        self._stop = True
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the client thread ------------------------------------------------------------

    _stop = False

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._channel.socket, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        try:
            while not self._stop:
                events = dict(poller.poll(200))
                if self._wakeup.fd in events:
                    self._wakeup.drain()
                while self._outbox:
                    try:
                        self._channel.socket.send_multipart(self._outbox[0], copy=False,
                                                            flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break  # no connection that takes it now (refused?): next round
                    except zmq.ZMQError as exc:
                        raise ChannelError(f"cannot reach the daemon: {exc}") from exc
                    self._outbox.popleft()
                if self._channel.socket in events:
                    while (received := self._channel.recv(0)) is not None:
                        self._receive(received.message)
                self._check_acks()
        except Exception as exc:  # noqa: BLE001 (every waiter must hear about it)
            self._fail_all(ShmrunnerError(f"the client connection failed: {exc}"))
        finally:
            self._fail_all(ShmrunnerError("the client was shut down"))
            self._channel.close()
            self._wakeup.close()

    def _receive(self, msg: Message) -> None:
        body = msg.body
        job_id = body.get("job_id")
        if msg.type == "accepted":
            with self._lock:
                if self._unacked.pop(job_id or "", None) is not None:
                    self._refetch_at[job_id or ""] = time.monotonic() + self.refetch_interval
        elif msg.type == "status_reply":
            with self._lock:
                call = self._status_calls.popleft() if self._status_calls else None
            if call is not None:
                call.reply = msg
                call.event.set()
        elif msg.type == "error" and body.get("fetch"):
            # The answer to one result() call (unknown job, or its wait timed out): it
            # settles that call only, never the job's own Future.
            with self._lock:
                waiting = self._fetches.get(job_id or "", [])
                call = min(waiting, key=lambda c: c.deadline) if waiting else None
                if call is not None:
                    waiting.remove(call)
                    if not waiting:
                        del self._fetches[job_id or ""]
            if call is not None:
                call.reply = msg
                call.event.set()
        elif job_id is not None:  # result, or an error about one job
            with self._lock:
                future = self._futures.pop(job_id, None)
                self._unacked.pop(job_id, None)
                self._refetch_at.pop(job_id, None)
                calls = self._fetches.pop(job_id, [])
            for call in calls:
                call.reply = msg
                call.event.set()
            if future is not None and not future.done():
                if msg.type == "error":
                    future.set_exception(ShmrunnerError(body["reason"]))
                elif body["ok"]:
                    future.set_result(body["value"])
                else:
                    future.set_exception(exception_from_wire(body["error"]))

    def _check_acks(self) -> None:
        now = time.monotonic()
        with self._lock:
            for job_id, when in list(self._refetch_at.items()):
                if when < now:
                    self._refetch_at[job_id] = now + self.refetch_interval
                    self._outbox.append(encode(Message("fetch", {"job_id": job_id})))
            late = [job_id for job_id, deadline in self._unacked.items() if deadline < now]
            for job_id in late:
                del self._unacked[job_id]
            futures = [(job_id, self._futures.pop(job_id, None)) for job_id in late]
        for job_id, future in futures:
            if future is not None and not future.done():
                future.set_exception(ShmrunnerError(
                    f"the daemon at {self.address} did not acknowledge job {job_id} within "
                    f"{self.ack_timeout} s; it may or may not have been accepted: fetch it with "
                    "client.result(job_id) or submit it again with the same job_id"))

    def _fail_all(self, error: ShmrunnerError) -> None:
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
            calls = [c for cs in self._fetches.values() for c in cs] + list(self._status_calls)
            self._fetches.clear()
            self._status_calls.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)
        for call in calls:
            call.reply = Message("error", {"reason": str(error)})
            call.event.set()

    def _wake(self) -> None:
        self._wakeup.wake()


def connect(address: str, **options: Any) -> Client:
    """A :class:`Client` (an Executor) for the daemon at ``address``."""
    return Client(address, **options)
