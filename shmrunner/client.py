"""The client of a runner daemon: ``shmrunner.connect(address) -> Client``.

Data flow::

    submit()/result()/status() (any thread) --> outbox + wake pipe --+
                                                                     v
    client thread (owns the DEALER socket): sends, receives, re-asks; it sleeps
        until a message, a wake-up, or its next timer (one heap: acknowledgement
        deadlines, re-asks every refetch_interval, busy backoffs)
        accepted -> the job is journaled (durable): future.accepted() is True, and
                    the future goes from PENDING to RUNNING (a future cancelled
                    before that is withdrawn: its submit is dropped and a
                    cancel follows it, Ledger.withdraw)
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
zero-copy frames both ways, except to a daemon on this host: there a
submit's large arrays go as memfds (``_shmclient``; ``same_host=False``: never),
journaled by the daemon before the ack unless ``durable=False``, and a
result's large arrays come back as memfds (a result naming them, taken on
the client thread; journaled as ever unless ``durable=False``).

``map``/``imap``/``imap_unordered`` read their input lazily (``_streams``),
and ``submit`` blocks while the submits not yet accepted hold more than
``max_pending_bytes``: a producer never outruns the daemon by more than that.

What the client knows about each job, and its timers, is in ``_ledger``; the
Future type in ``_jobfuture``; following a batch by its ids (``progress``) in
``_batchprogress``.

The thread holds its Client only while it handles a round (``_serve``), and
nothing the Client holds points back at it (``SameHost`` holds it weakly):
a Client dropped without ``shutdown()`` is freed once nothing holds it (its
pending futures do), and its thread then closes the socket and ends.

Guarantee: every Future and every waiting call settles. The client thread
survives an unexpected exception in one round (logged); if rounds keep
failing, or the socket breaks, it fails everything it holds with the cause,
and later calls raise it at once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

from . import _config_checks as checks
from ._jobfuture import JobFuture, WaitingCall
from ._jobid import check_job_id, new_job_id
from ._jobrefs import extract
from ._ledger import Ledger
from ._shmclient import SameHost
from ._streams import Progress, check_sizes, chunked_calls, stream, total_of
from ._submitbatch import SubmitFrames, next_message, restore
from ._wakeup import Wakeup
from .errors import (
    DependencyError,
    ProtocolError,
    ResultTimeoutError,
    ShmrunnerError,
    TaskCancelledError,
)
from .transport._schema import MAX_JOB_IDS, MAX_JOBS_LIMIT
from .transport.protocol import (
    DEFAULT_MAX_HEADER_BYTES,
    Message,
    encode,
    exception_from_wire,
    function_ref,
)
from .transport.zmqchannel import ChannelError, ChannelOptions, ZmqChannel, client_keys

__all__ = ["Client", "JobFuture", "connect"]

log = logging.getLogger("shmrunner.client")

_ACCEPT = frozenset({"accepted", "result", "results", "error", "status_reply", "jobs_reply"})
_MAX_FAILED_ROUNDS = 10              # unexpected errors in a row before the thread gives up
_CANCEL_LINGER = 2.0  # seconds the last cancels of a shutdown may take to leave (in the background)
# What runs a chunk of map(chunksize=) items: the daemon's scheduler's own runner.
_CHUNK_RUNNER = "shmrunner.scheduler:_run_chunk"


class Client(Executor):
    """A ``concurrent.futures.Executor`` whose tasks run in a runner daemon."""

    def __init__(self, address: str | None = None, *, ack_timeout: float = 30.0,
                 refetch_interval: float = 5.0,
                 allow_pickle: bool = False,
                 max_message_bytes: int = 1 << 31, curve_secret_key: str | None = None,
                 curve_server_key: str | None = None,
                 max_pending_bytes: int = 256 << 20, durable: bool = True,
                 same_host: bool = True) -> None:
        from ._endpoints import client_address

        self.address = address = client_address(address, "clients")
        self._allow_pickle = allow_pickle
        self._ledger = Ledger(address, ack_timeout=_option("ack_timeout", ack_timeout),
                              refetch_interval=_option("refetch_interval", refetch_interval),
                              max_pending_bytes=_option("max_pending_bytes",
                                                        max_pending_bytes))
        self._wakeup = Wakeup()
        # Arrays to a daemon on this host go as memfds (_shmclient.py). It
        # holds this Client weakly: no cycle, so a dropped Client is freed at
        # once, whatever its thread was doing when the cycle collector ran.
        me = weakref.ref(self)
        self._same_host = SameHost(lambda: _ask_status_of(me), self._ledger.drop_status,
                                   durable=durable, enabled=same_host,
                                   on_client_thread=lambda: _is_thread_of(me))
        self._channel = ZmqChannel("dealer", ChannelOptions(
            max_bytes=max_message_bytes, allow_pickle=allow_pickle, accept=_ACCEPT,
            curve=client_keys(curve_secret_key, curve_server_key)))
        try:
            self._channel.connect(address)
        except BaseException:
            self._channel.close()
            raise
        # The thread holds this Client only while it handles a round (_serve),
        # so one dropped without shutdown() is collected once nothing else
        # holds it (its futures do: their jobs finish first); this wake-up
        # then lets the thread see it is gone and end.
        self._thread = threading.Thread(
            target=_serve, args=(weakref.ref(self), self._channel, self._wakeup, self._ledger),
            name="shmrunner-client", daemon=True)
        weakref.finalize(self, self._wakeup.wake)
        self._thread.start()

    # The settings live in the ledger, which acts on them.
    @property
    def ack_timeout(self) -> float:
        return self._ledger.ack_timeout

    @ack_timeout.setter
    def ack_timeout(self, value: float) -> None:
        self._ledger.ack_timeout = _option("ack_timeout", value)

    @property
    def refetch_interval(self) -> float:
        return self._ledger.refetch_interval

    @refetch_interval.setter
    def refetch_interval(self, value: float) -> None:
        self._ledger.refetch_interval = _option("refetch_interval", value)

    @property
    def max_pending_bytes(self) -> int:
        return self._ledger.max_pending_bytes

    @max_pending_bytes.setter
    def max_pending_bytes(self, value: int) -> None:
        self._ledger.max_pending_bytes = _option("max_pending_bytes", value)

    @property
    def same_host(self) -> dict[str, Any]:
        """How this client hands arrays to a daemon on its host: ``enabled``
        (``same_host=``), ``durable`` (``durable=``), ``connected`` (to the
        daemon's side channel now), ``submits`` (those whose arrays went as
        memfds so far), ``results`` (results whose arrays came back as memfds)
        and ``results_failed`` (results whose memfds could not be taken: they
        were fetched again, as frames or a clear error)."""
        return self._same_host.describe()

    # --- Executor API ------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any,  # type: ignore[override]
               retries: int | None = None, timeout: float | None = None,
               job_id: str | None = None, **kwargs: Any) -> JobFuture:
        """Run ``fn(*args, **kwargs)`` in the daemon. The future has ``job_id``
        (``job_id=``: 1-128 characters of ``A-Za-z0-9._:-``, no leading dot; by
        default a random one) and ``wait_accepted()``.

        This client's futures among the arguments (in lists, tuples and dict
        values) travel as references to their jobs: the daemon passes their
        results (without a trip through this client) once they finish; a
        failed one fails this job with DependencyError, a cancelled one
        cancels it. ``submit`` first waits until those jobs are accepted."""
        self._ledger.check_usable("schedule new futures", submit=True)
        if job_id is None:
            job_id = new_job_id()
        else:  # checked before its arrays are handed over
            self._ledger.refuse_in_flight(check_job_id(job_id))
        options: dict[str, Any] = {}
        if retries is not None:
            options["retries"] = _option("retries", retries)
        if timeout is not None:
            options["timeout"] = _option("timeout", timeout)
        future = JobFuture(job_id, owner=self)
        args, kwargs, refs = extract(args, kwargs, self)
        if refs:
            if threading.current_thread() is self._thread and not all(
                    dep.accepted() or dep.done() for _, dep in refs):
                # (a done-callback: the thread that would hear the acceptance)
                raise RuntimeError("a job referring to jobs not yet accepted cannot be "
                                   "submitted from a future's done-callback")
            failed = _wait_accepted(refs)  # so the daemon knows every job referred to
            if failed is not None:
                future.set_exception(failed)
                return future
            options["refs"] = [[path, dep.job_id] for path, dep in refs]
        args, kwargs, shm, shared_bytes = self._same_host.prepare(args, kwargs)
        if shm is not None:
            options["shm"] = shm
        shm_results = self._same_host.results_option()
        if shm_results is not None:
            options["shm_results"] = shm_results
        # args as a list: a tuple would travel as an extension type (a nested
        # pack here, a nested unpack in the daemon), and the daemon unpacks
        # them into the call either way.
        body = {"job_id": job_id, "fn": fn, "args": list(args), "kwargs": kwargs,
                "batch_accepted": True, "batch_results": True}
        if options:  # optional: none is the common case, and an empty map costs both ends
            body["options"] = options
        frames = SubmitFrames(encode(Message("submit", body), allow_pickle=self._allow_pickle))
        _check_header(frames, job_id)
        future.withdraw = self._withdraw  # PENDING until the daemon accepts the job
        future.cancel_in_daemon = self._cancel_soon
        # On the client thread (a done-callback) a submit never waits for room:
        # that thread is the one that frees it.
        if self._ledger.add_submit(job_id, frames, future, shared_bytes,
                                   wait=threading.current_thread() is not self._thread):
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
        check_sizes(chunksize, buffersize)
        calls: Iterator[tuple[Any, ...]] = chunked_calls(iterables, chunksize)
        if chunksize > 1:
            ref = fn if isinstance(fn, str) else function_ref(fn)
            calls = ((_CHUNK_RUNNER, ref, chunk) for chunk in calls)
        else:
            calls = ((fn, *args) for args in calls)
        return stream(self.submit, calls, ordered=ordered,
                      buffersize=64 if buffersize is None else buffersize,
                      timeout=timeout, chunked=chunksize > 1, progress=progress,
                      total=total_of(iterables))

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """The result of job ``job_id`` (raising its exception), waiting up to
        ``timeout`` seconds for it to finish (then :class:`ResultTimeoutError`,
        a ``TimeoutError``); works after reconnecting and across a daemon
        restart. A job the daemon does not know raises :class:`ShmrunnerError`."""
        check_job_id(job_id)
        if timeout is not None and timeout < 0:
            timeout = 0  # as concurrent.futures: a time already run out, not a bad value
        call = WaitingCall(timeout)
        self._ledger.add_fetch(job_id, call, timeout)
        self._wake()
        if not call.event.wait(timeout):
            self._ledger.drop_fetch(job_id, call)
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
        call = WaitingCall()
        self._ledger.add_status(call)
        self._wake()
        if not call.event.wait(timeout):
            self._ledger.drop_status(call)
            raise ShmrunnerError(f"no status from the daemon at {self.address} within "
                                 f"{timeout} s: is it running?")
        assert call.reply is not None
        if call.reply.type == "error":
            raise ShmrunnerError(call.reply.body["reason"])
        status: dict[str, Any] = call.reply.body["status"]
        return status

    # --- job control ----------------------------------------------------------------------

    def job_state(self, job_id: str, timeout: float = 10.0) -> str:
        """The state of job ``job_id`` in the daemon: "queued" (journaled, not
        started), "running", "done", "failed", "cancelled" or "unknown"."""
        return self.job_states([job_id], timeout)[job_id]

    def job_states(self, job_ids: Iterable[str], timeout: float = 10.0) -> dict[str, str]:
        """job id -> state (as :meth:`job_state`) for up to 256 ids."""
        return {job["job_id"]: job["state"] for job in self.jobs(job_ids=job_ids,
                                                                 timeout=timeout)}

    def job_info(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Job ``job_id`` as :meth:`jobs` describes it (state, attempts, worker, times)."""
        return self.jobs(job_ids=[job_id], timeout=timeout)[0]

    def job_log(self, job_id: str, timeout: float = 10.0) -> str:
        """What job ``job_id``'s task logged and printed, as the daemon keeps it
        (one line per record: time, level, logger or stdout/stderr, worker@host,
        message; bounded, "" when nothing was logged or none is kept any
        more). Raises ShmrunnerError for a job the daemon does not know."""
        (job,) = self._jobs_request(
            Message("jobs", {"job_ids": [check_job_id(job_id)], "log": True}), timeout)["jobs"]
        if job.get("state") == "unknown":
            raise ShmrunnerError(f"the daemon does not know job {job_id}")
        log = job.get("log")
        return log if isinstance(log, str) else ""

    def jobs(self, limit: int = 20, timeout: float = 10.0, *,
             job_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The ``limit`` (1 to 1000) most recently accepted jobs the daemon's
        journal holds, newest first; or, with ``job_ids`` (1 to 256), those
        jobs in that order. Each is a map of ``job_id``, ``state`` (as
        :meth:`job_state`), ``attempts`` (started so far, retries included),
        ``worker`` (``name@host`` of the worker that runs or ran its latest
        attempt; ``local@host`` for the daemon's own processes; None before
        the first), ``created`` and ``finished`` (Unix times; None until then
        or for an unknown job)."""
        if job_ids is not None:
            ids = _check_ids(job_ids, "jobs")
            named: list[dict[str, Any]] = self._jobs_request(
                Message("jobs", {"job_ids": ids}), timeout)["jobs"]
            return named
        if type(limit) is not int or not 1 <= limit <= MAX_JOBS_LIMIT:
            raise ValueError(f"limit must be an int from 1 to {MAX_JOBS_LIMIT}, got {limit!r}")
        jobs: list[dict[str, Any]] = self._jobs_request(Message("jobs", {"limit": limit}),
                                                        timeout)["jobs"]
        return jobs

    def cancel(self, job: str | JobFuture, timeout: float = 10.0) -> str:
        """Cancel a job (by id, or its future), queued or running: a running one
        is stopped on its worker (its process is killed and replaced). Its
        result becomes :class:`TaskCancelledError` (its future's too), it is
        not retried, and a restarted daemon does not run it. Returns its
        state afterwards: "cancelled", or the state it keeps ("done" or
        "failed": it finished first; "running": it is finishing, its result
        being recorded; "unknown"). A future the daemon has not accepted yet
        is cancelled as by ``future.cancel()``."""
        if isinstance(job, JobFuture):
            if job.cancel():
                return "cancelled"
            job = job.job_id
        reply = self._jobs_request(Message("cancel", {"job_id": check_job_id(job)}), timeout)
        state: str = reply["jobs"][0]["state"]
        return state

    def progress(self, job_ids: Iterable[str], *, progress: Progress = None,
                 wait: bool = True, interval: float = 0.5,
                 timeout: float | None = None) -> dict[str, int]:
        """Follow jobs submitted earlier, by this or any Client (ids the user
        kept): how many are queued, running, done, failed, cancelled and
        unknown (never accepted, or expired), and ``total``. With ``wait``,
        ask every ``interval`` seconds until all have finished (unknown ones
        count as finished), or raise :class:`ResultTimeoutError` after
        ``timeout``; else answer once. ``progress``: True for a tqdm bar of
        finished jobs (when tqdm is installed), or a callable(finished, total),
        as map/imap take. Up to 1,000,000 ids, asked about 256 per request."""
        from ._batchprogress import batch_progress

        def ask(chunk: list[str]) -> dict[str, int]:
            body = self._jobs_request(Message("jobs", {"job_ids": chunk, "summary": True}),
                                      10.0)
            counts = body.get("counts")
            if counts is None:  # an older daemon: it answers every job's state
                from ._batchprogress import job_counts

                counts = job_counts(body["jobs"])
            return dict(counts)

        return batch_progress(ask, job_ids, progress=progress, wait=wait, interval=interval,
                              timeout=timeout)

    def _ask_status(self) -> WaitingCall:
        call = WaitingCall()
        self._ledger.add_status(call)
        self._wake()
        return call

    def _withdraw(self, job_id: str) -> None:
        """JobFuture.cancel() before the job was accepted (never blocks)."""
        self._ledger.withdraw(job_id, _WithdrawCall(job_id))
        self._wake()

    def _cancel_soon(self, job_id: str) -> None:
        """JobFuture.cancel() of an accepted job: ask the daemon to drop it if it
        has not started; nobody waits for the answer."""
        try:
            self._ledger.add_jobs(WaitingCall(), Message("cancel", {"job_id": job_id,
                                                                    "queued_only": True}))
        except ShmrunnerError:
            return  # the client is broken: the future settles with that
        self._wake()

    def _jobs_request(self, msg: Message, timeout: float) -> dict[str, Any]:
        call = WaitingCall()
        self._ledger.add_jobs(call, msg)
        self._wake()
        if not call.event.wait(timeout):
            self._ledger.drop_jobs(call)
            raise ShmrunnerError(f"no answer to {msg.type!r} from the daemon at {self.address} "
                                 f"within {timeout} s: is it running (and as new as this "
                                 "client)?")
        assert call.reply is not None
        if call.reply.type == "error":
            raise ShmrunnerError(call.reply.body["reason"])
        return call.reply.body

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop submitting; with ``wait``, wait for the outstanding jobs' results
        (the jobs themselves stay in the daemon either way). Called from a
        done-callback, it returns at once and a thread of its own waits.

        ``cancel_futures``, as in ``concurrent.futures``: every future whose job
        has not started is cancelled first. A job the daemon has not accepted yet
        is withdrawn (:meth:`JobFuture.cancel`); an accepted one that waits in
        the daemon's queue is dropped there (its future then fails with
        TaskCancelledError); running jobs finish. The cancels are sent before
        the connection closes, and get ``_CANCEL_LINGER`` seconds to leave."""
        self._ledger.close()  # a submit waiting for room gives up
        if wait and threading.current_thread() is self._thread:
            # A done-callback: this thread settles the futures waited for, so
            # waiting here would wait forever. As Scheduler.shutdown does, it
            # returns at once and a thread of its own waits (not a daemon
            # thread: the program does not exit before the results come).
            threading.Thread(target=self.shutdown, name="shmrunner-client-shutdown",
                             kwargs={"cancel_futures": cancel_futures}, daemon=False).start()
            return
        if cancel_futures:
            for future in self._ledger.futures():
                future.cancel()
            self._flush_on_stop = True
        if wait:
            for future in self._ledger.futures():
                try:
                    future.exception()
                except BaseException:  # noqa: BLE001 (cancelled: nothing to wait for)
                    pass
        self._same_host.close()
        self._ledger.ended = True  # later requests would never be answered: refused
        self._stop = True  # before the wake: the thread may sleep with no deadline
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the client thread ------------------------------------------------------------

    _stop = False
    _flush_on_stop = False  # shutdown(cancel_futures=True): the cancels must leave

    def _round(self, readable: bool) -> None:
        """What is due after the thread's wait (_serve) for a message, a
        wake-up (work from another thread), room to send what is stuck, or
        the next timer."""
        _send_outbox(self._ledger, self._channel)
        if readable:
            while (received := self._channel.recv(0)) is not None:
                self._receive(received.message)
            self._same_host.reclaim()  # memfds of finished jobs back to the cache
        self._check_acks()

    # The round's two steps that act on the ledger (one seam each for fault tests).

    def _receive(self, msg: Message) -> None:
        if msg.type == "accepted" and "same_host" in msg.body:
            self._same_host.advertised(msg.body["same_host"])
        elif msg.type == "result" and "shm" in msg.body:
            body = self._by_memfd(msg.body)
            if body is None:
                return
            msg = Message("result", body)
        elif msg.type == "results" and any("shm" in item for item in msg.body["results"]):
            items = [self._by_memfd(item) if "shm" in item else item
                     for item in msg.body["results"]]
            msg = Message("results", {"results": [item for item in items if item is not None]})
        self._ledger.receive(msg)

    def _by_memfd(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A result whose arrays the daemon holds as memfds, with them in place;
        None when they cannot be taken: the job is fetched again at once (the
        journal's copy for a durable client, else a clear error)."""
        try:
            return self._same_host.collect(body)
        except (OSError, ValueError):
            job_id = body.get("job_id")
            if type(job_id) is str:
                self._ledger.outbox.append(encode(Message("fetch", {"job_id": job_id})))
            return None

    def _check_acks(self) -> None:
        self._ledger.check_timers()

    def _wake(self) -> None:
        self._wakeup.wake()


def _ask_status_of(client_ref: weakref.ref[Client]) -> WaitingCall:
    client = client_ref()
    if client is None:
        raise ShmrunnerError("the client is gone")
    return client._ask_status()


def _is_thread_of(client_ref: weakref.ref[Client]) -> bool:
    client = client_ref()
    return client is not None and threading.current_thread() is client._thread


def _serve(client_ref: weakref.ref[Client], channel: ZmqChannel, wakeup: Wakeup,
           ledger: Ledger) -> None:
    """The client thread. It holds its Client only while it handles a round:
    a Client dropped without shutdown() ends it, as shutdown(wait=False)
    would, once nothing holds the Client any more (not even a future)."""
    address = ledger.address
    failed_rounds = 0
    flush = False
    try:
        while True:
            readable = channel.poll(ledger.next_timer(), wakeup=wakeup,
                                    writable=bool(ledger.outbox))
            client = client_ref()
            if client is None or client._stop:
                flush = client is not None and client._flush_on_stop
                break
            try:
                client._round(readable)
                failed_rounds = 0
            except ChannelError:
                raise
            except Exception as exc:  # noqa: BLE001 (a bug must not strand every future)
                failed_rounds += 1
                log.error("client thread: unexpected error (%d in a row), carrying on: %r",
                          failed_rounds, exc, exc_info=True)
                if failed_rounds >= _MAX_FAILED_ROUNDS:
                    raise
            finally:
                del client
    except Exception as exc:  # noqa: BLE001 (every waiter must hear about it)
        ledger.fail_all(ShmrunnerError(
            f"the client connection to {address} failed: {exc!r}"), broken=True)
    finally:
        linger = 0.0
        if flush:
            try:
                _send_outbox(ledger, channel)  # what is left is cancels: every submit was withdrawn
                linger = _CANCEL_LINGER
            except Exception:  # noqa: BLE001 (a broken connection: closing anyway)
                log.warning("client: the cancels of shutdown(cancel_futures=True) could "
                            "not be sent", exc_info=True)
        ledger.fail_all(ShmrunnerError(
            "the client was shut down before this job's result came; the job itself "
            "stays in the daemon: fetch its result by id (future.job_id) with "
            "shmrunner.connect(...).result(job_id)"))
        channel.close(linger=linger)
        wakeup.close()


def _send_outbox(ledger: Ledger, channel: ZmqChannel) -> None:
    """Hand the socket what it takes now, without waiting."""
    outbox = ledger.outbox
    while True:
        if not outbox:
            if ledger.outbox_drained():  # else a submit came meanwhile
                break
            continue
        frames, taken = next_message(outbox, ledger.batch_submits)
        try:
            sent = channel.try_send_frames(frames)
        except BaseException:
            restore(outbox, taken)
            raise
        if not sent:
            restore(outbox, taken)
            break  # no connection takes it now (refused?): when one does


def _check_header(frames: list[Any], job_id: str) -> None:
    """ProtocolError now for a submit whose header (every argument but the
    arrays, which travel as frames of their own) the daemon would reject: it
    only logs that, and the future waited ``ack_timeout`` for an ack that
    never comes, then said the job "may or may not have been accepted"."""
    size = memoryview(frames[0]).nbytes
    if size > DEFAULT_MAX_HEADER_BYTES:
        raise ProtocolError(
            f"job {job_id}: its arguments other than arrays encode to {size} bytes, over "
            f"the {DEFAULT_MAX_HEADER_BYTES >> 20} MiB a daemon accepts in a message's "
            "header; send large bytes or lists as a numpy array (np.frombuffer(data, "
            "np.uint8)), which travels as a frame of its own")


def _check_ids(job_ids: Iterable[str], what: str) -> list[str]:
    if isinstance(job_ids, str):
        raise TypeError(f"{what} takes an iterable of job ids, not one str")
    ids = [check_job_id(job_id) for job_id in job_ids]
    if not 0 < len(ids) <= MAX_JOB_IDS:
        raise ValueError(f"{what} takes 1 to {MAX_JOB_IDS} job ids, got {len(ids)}: "
                         "ask in batches")
    return ids


class _WithdrawCall(WaitingCall):
    """The daemon's answer to the cancel of a job withdrawn before it was
    accepted: nobody waits for it, but a job that had already finished there
    is said in the log rather than silently forgotten."""

    __slots__ = ("job_id",)

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id

    def settle(self, reply: Message) -> None:
        super().settle(reply)
        jobs = reply.body.get("jobs") if reply.type == "jobs_reply" else None
        state = jobs[0].get("state") if jobs else None
        if state in ("done", "failed"):
            log.warning("job %s, cancelled before the daemon acknowledged it, had already "
                        "finished there (%s); its result is not this future's", self.job_id,
                        state)
def _wait_accepted(refs: list[tuple[list[Any], JobFuture]]) -> BaseException | None:
    """Wait until the daemon has accepted every job referred to; the error the
    dependent job then settles with, if one of them never will be."""
    for _, dep in refs:
        if dep.wait_accepted():
            continue
        if dep.cancelled():
            # Withdrawn before the daemon had it: cancelled, as a dependency
            # the daemon cancels makes its dependents (not a failure).
            return TaskCancelledError(f"job {dep.job_id}, whose future is among the "
                                      "arguments, was cancelled before the daemon "
                                      "accepted it")
        cause = dep.exception()
        error = DependencyError(f"job {dep.job_id}, whose future is among the arguments, "
                                f"failed before the daemon accepted it: {cause}")
        error.__cause__ = cause
        return error
    return None


# What each option (and submit's per-job ones) must be: checked where the
# caller passes it, not found out later as a busy loop (refetch_interval=0),
# every submit failing (ack_timeout=0) or the wire codec's list of fields.
_OPTIONS = {"ack_timeout": checks.seconds, "refetch_interval": checks.seconds,
            "max_pending_bytes": checks.positive, "timeout": checks.seconds,
            "retries": checks.count}


def _option(name: str, value: Any) -> Any:
    problem = _OPTIONS[name](value)
    if problem is not None:
        raise ValueError(f"{name} must be {problem}, got {value!r}")
    return value


def connect(address: str | None = None, **options: Any) -> Client:
    """A :class:`Client` (an Executor) for the daemon at ``address`` (None: this
    user's daemon on this host, through its private ipc socket)."""
    return Client(address, **options)
