"""The runner daemon: a long-lived Scheduler that clients and remote workers join.

Data flow::

    clients (DEALER) ==> client ROUTER ==> front thread (owns that socket and the journal)
        submit  -> batch of one poll round -> Journal.add (one commit) -> "accepted"
                   -> Scheduler.submit; the submitting peer is told the result
        fetch   -> result from the journal now, or when the job finishes (or "error" at
                   the fetch's timeout)
        status  -> workers, queue depth, running, done, failed, uptime
    Scheduler (local shared-memory workers + the worker ROUTER of its hub)
        future done -> completions deque + wake pipe -> front thread:
                   Journal.finish (one commit per round) -> results to waiting peers

Guarantees: a job is acknowledged only once it is in the journal; a daemon
killed at any moment and restarted runs every acknowledged job that had not
finished (at-least-once: a job that was running may run twice). SIGTERM or
SIGINT drains: new submits are refused with an error, running jobs get
``drain_timeout`` seconds to finish (the rest stay journaled), then exit 0.
"""

from __future__ import annotations

import collections
import functools
import heapq
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import zmq

from ._allowlist import AllowList
from ._endpoints import daemon_addresses, secure_ipc_socket
from ._jobid import job_id_problem
from ._journal import DONE, FAILED, Journal
from ._wakeup import Wakeup
from .config import DaemonSettings, SchedulerSettings
from .errors import (
    ChannelClosedError,
    ChannelError,
    ConfigError,
    JournalError,
    SchedulerBusyError,
    ShmrunnerError,
)
from .scheduler import Scheduler
from .transport.curve import authorize, load_public_keys, release, server_keys
from .transport.protocol import Message, decode, encode, exception_to_wire
from .transport.zmqchannel import ChannelOptions, CurveKeys, ZmqChannel

__all__ = ["Daemon"]

log = logging.getLogger("shmrunner.daemon")

_ACCEPT = frozenset({"submit", "fetch", "status"})
_EXPIRE_EVERY = 60.0  # longest time between sweeps of expired results
_BACKLOG_POLL = 0.02  # how soon to retry the scheduler while jobs wait in the backlog
_MAX_FAILED_ROUNDS = 10  # unexpected errors in a row before the front thread gives up


class Daemon:
    def __init__(self, daemon: DaemonSettings, scheduler: SchedulerSettings) -> None:
        if scheduler.listen is not None:
            raise ConfigError("scheduler.listen: not used by the daemon; set daemon.workers "
                              "to the address remote workers connect to")
        self.settings = daemon
        self._scheduler_settings = scheduler
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._wakeup = Wakeup()
        self._completions: collections.deque[tuple[str, Future[Any]]] = collections.deque()
        self._waiters: dict[str, list[tuple[bytes, float | None]]] = {}
        # Fetches with a timeout, soonest first: the poll round looks at these
        # only, not at every job a client waits for.
        self._deadlines: list[tuple[float, str, bytes]] = []
        self._running: set[str] = set()  # accepted, not finished (backlog included)
        # Journaled jobs not yet handed to the scheduler (its queue was full).
        self._backlog: collections.deque[tuple[str, Message | list[Any] | JournalError]] = \
            collections.deque()
        self._dropped = 0  # replies dropped: the peer's queue was full, or it was gone
        self._done = self._failed = 0
        self._allowed = AllowList(scheduler.allowed_functions, "scheduler.allowed_functions")
        # Who can reach the endpoints is settled before anything is opened.
        clients, workers, warnings = daemon_addresses(
            daemon, curve=daemon.curve_secret_key is not None)
        self._zap_domain: str | None = None
        clients_curve, workers_curve = self._start_curve()
        try:
            self.journal = Journal(daemon.journal_path())
        except BaseException:
            self._release_zap()
            raise
        self._channel = ZmqChannel("router", ChannelOptions(
            max_bytes=scheduler.max_message_bytes, allow_pickle=scheduler.allow_pickle,
            accept=_ACCEPT, curve=clients_curve))
        self.scheduler: Scheduler | None = None
        try:
            self.address = self._channel.bind(clients)
            secure_ipc_socket(self.address)
            self.scheduler = Scheduler(settings=scheduler, listen=workers, curve=workers_curve)
        except BaseException:
            self._close()
            raise
        for warning in warnings:
            log.warning("%s", warning)

    @property
    def workers_address(self) -> str | None:
        return self.scheduler.address if self.scheduler is not None else None

    def stop(self) -> None:
        """Begin draining: safe from a signal handler."""
        self._stop.set()
        self._wake()

    # --- the front thread (the caller of run) -------------------------------------------

    def run(self) -> int:
        """Serve until stop(); drain; return the exit code. A journal that cannot
        be written raises JournalError (one line for the CLI): the jobs it
        holds stay journaled for the next start."""
        try:
            self._replay()
            self._serve()
            return self._drain()
        except JournalError as exc:
            raise JournalError(f"{exc}; the daemon stops (unfinished jobs stay journaled "
                               "and run again after a restart)") from None
        finally:
            self._close()

    def _replay(self) -> None:
        if self.journal.orphans_removed:
            log.info("deleted %d spill files no journaled job named (left by a crash)",
                     self.journal.orphans_removed)
        replayed = self.journal.unfinished()
        for job_id, request in replayed:
            self._start(job_id, request, peer=None)  # frames from the journal
        if replayed:
            log.info("re-running %d journaled jobs that had not finished", len(replayed))
        log.info("daemon serving clients on %s, workers on %s", self.address,
                 self.workers_address)

    def _serve(self) -> None:
        next_expiry = time.monotonic()
        failed_rounds = 0
        while not self._stop.is_set():
            try:
                if self._channel.poll(self._poll_wait(), wakeup=self._wakeup):
                    self._serve_requests()
                self._feed()
                self._settle()
                self._expire_waiters()
                if time.monotonic() >= next_expiry:
                    self.journal.expire(self.settings.result_ttl)
                    next_expiry = time.monotonic() + min(_EXPIRE_EVERY,
                                                         self.settings.result_ttl / 2)
                failed_rounds = 0
            except (JournalError, ChannelClosedError):
                raise
            except Exception as exc:  # noqa: BLE001 (one bad round must not end the service)
                failed_rounds = self._survive(exc, failed_rounds)

    @staticmethod
    def _survive(exc: Exception, failed_rounds: int) -> int:
        """Log an unexpected error of the front thread and carry on; give up (one
        line, a non-zero exit, the journal intact) if every round fails."""
        failed_rounds += 1
        log.error("front thread: unexpected error (%d in a row), carrying on: %r",
                  failed_rounds, exc, exc_info=True)
        if failed_rounds >= _MAX_FAILED_ROUNDS:
            raise ShmrunnerError(f"the front thread failed {failed_rounds} times in a row "
                                 f"(last: {exc!r}); stopping: journaled jobs run again after a "
                                 "restart") from None
        return failed_rounds

    def _poll_wait(self) -> float:
        # A backlog waits for room in the scheduler's queue, which frees without
        # waking us: look again soon.
        longest = _BACKLOG_POLL if self._backlog else 1.0
        if not self._deadlines:
            return longest
        return max(0.0, min(self._deadlines[0][0] - time.monotonic(), longest))

    def _serve_requests(self) -> None:
        accepted: list[tuple[str, list[bytes | memoryview], bytes, Message]] = []
        # Fetches wait for this batch's submits to be journaled: a client that
        # submits and at once asks for the result must not hear "unknown job".
        fetches: list[tuple[bytes, Message]] = []
        assert self.scheduler is not None
        limit = self._scheduler_settings.max_pending
        room = limit - self.scheduler.queued() - len(self._backlog)
        for _ in range(1024):
            received = self._channel.recv(0)
            if received is None:
                break
            peer, msg = received
            assert peer is not None
            job_id = msg.body.get("job_id")
            if self._bad_id(peer, msg):
                pass
            elif msg.type == "submit" and self._stop.is_set():  # SIGTERM arrived mid-batch
                self._refuse(peer, msg)
            elif msg.type == "submit" and len(accepted) >= room:
                # Never block on a full queue (the front thread would stop answering
                # everyone): refuse, and the client submits again later.
                self._reply(peer, _refusal(
                    f"the daemon is busy: {limit} jobs wait for a worker "
                    "(scheduler.max_pending); submit again later", job_id, "busy"))
            elif msg.type == "submit":
                frames = encode(msg, allow_pickle=self._scheduler_settings.allow_pickle)
                accepted.append((job_id or uuid.uuid4().hex, frames, peer, msg))
            elif msg.type == "fetch":
                fetches.append((peer, msg))
            elif msg.type == "status":
                self._reply(peer, Message("status_reply", {"status": self.status()}))
        if accepted:
            try:
                new = set(self.journal.add([(job_id, frames)
                                            for job_id, frames, _, _ in accepted]))
            except JournalError as exc:
                log.error("%s: the batch's submits are refused", exc)
                for job_id, _, peer, _ in accepted:
                    self._reply(peer, _refusal(f"the daemon cannot journal job {job_id}: {exc}",
                                               job_id, "journal"))
                accepted = []
                new = set()
            for job_id, _, peer, msg in accepted:
                self._reply(peer, Message("accepted", {"job_id": job_id}))
                if job_id in new:
                    new.discard(job_id)  # the same id again in this batch is a resubmission
                    self._start(job_id, msg, peer)
                else:  # a resubmission of a known job: answer as a fetch would
                    self._fetch(peer, job_id, None)
        for peer, msg in fetches:
            self._fetch(peer, msg.body["job_id"], msg.body.get("timeout"))

    def _start(self, job_id: str, request: Message | list[Any] | JournalError,
               peer: bytes | None) -> None:
        """Hand a journaled job to the scheduler (``request``: the submit message,
        its frames as the journal kept them, or why the journal could not)."""
        if peer is not None:
            self._waiters.setdefault(job_id, []).append((peer, None))
        self._running.add(job_id)
        self._backlog.append((job_id, request))
        self._feed()

    def _feed(self) -> None:
        """Move journaled jobs from the backlog into the scheduler while its queue
        has room (never waiting for room: a replay or a burst larger than
        ``max_pending`` waits here, journaled, in order)."""
        assert self.scheduler is not None
        while self._backlog and not self._stop.is_set():
            job_id, request = self._backlog[0]
            try:
                if isinstance(request, JournalError):
                    raise request
                msg = request if isinstance(request, Message) else decode(
                    request, max_bytes=self._scheduler_settings.max_message_bytes,
                    allow_pickle=self._scheduler_settings.allow_pickle)
                body = msg.body
                self._allowed.check(body["fn"], body["args"])  # before anything is imported
                options = body.get("options") or {}
                future = self.scheduler.try_submit(
                    body["fn"], *body["args"], retries=options.get("retries"),
                    timeout=options.get("timeout"), **body["kwargs"])
            except SchedulerBusyError:
                return
            except Exception as exc:
                future = Future()
                future.set_exception(exc)
            self._backlog.popleft()
            future.add_done_callback(functools.partial(self._completed, job_id))

    def _completed(self, job_id: str, future: Future[Any]) -> None:
        self._completions.append((job_id, future))
        self._wake()

    def _settle(self) -> None:
        """Journal finished jobs (one commit), then tell whoever waits for them: a
        result a client has seen is never run again after a restart."""
        if not self._completions:
            return
        outcomes = []
        replies = []
        while self._completions:
            job_id, future = self._completions.popleft()
            self._running.discard(job_id)
            msg = _result_message(job_id, future)
            try:
                frames = encode(msg, allow_pickle=self._scheduler_settings.allow_pickle)
            except (TypeError, ValueError) as exc:
                msg = _error_message(job_id, TypeError(
                    f"the result of job {job_id} cannot be sent to clients: {exc}"))
                frames = encode(msg)
            ok = bool(msg.body["ok"])
            if ok:
                self._done += 1
            else:
                self._failed += 1
            outcomes.append((job_id, ok, frames))
            replies += [(peer, frames) for peer, _ in self._waiters.pop(job_id, [])]
        self.journal.finish(outcomes)
        for peer, frames in replies:
            self._reply_frames(peer, frames)

    def _fetch(self, peer: bytes, job_id: str, timeout: float | None) -> None:
        try:
            found = self.journal.get(job_id)
        except JournalError as exc:
            self._reply(peer, Message("error", {"reason": f"the result of job {job_id} is "
                                                          f"lost: {exc}", "job_id": job_id,
                                                "fetch": True, "code": "journal"}))
            return
        if found is None:
            self._reply(peer, Message("error", {"reason": f"unknown job {job_id} (never "
                                                          "accepted, or its result expired)",
                                                "job_id": job_id, "fetch": True,
                                                "code": "unknown"}))
        elif found[0] in (DONE, FAILED) and found[1] is not None:
            self._reply_frames(peer, found[1])
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            waiters = self._waiters.setdefault(job_id, [])
            if deadline is not None:
                waiters.append((peer, deadline))
                heapq.heappush(self._deadlines, (deadline, job_id, peer))
            elif (peer, None) not in waiters:  # not again for a client re-asking
                waiters.append((peer, None))

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, job_id, peer = heapq.heappop(self._deadlines)
            waiters = self._waiters.get(job_id, [])
            if (peer, deadline) not in waiters:
                continue  # answered already: the job finished in time
            waiters.remove((peer, deadline))
            if not waiters:
                del self._waiters[job_id]
            self._reply(peer, Message("error", {
                "reason": f"job {job_id} not finished within the fetch timeout",
                "job_id": job_id, "fetch": True, "code": "timeout"}))

    def status(self) -> dict[str, Any]:
        assert self.scheduler is not None
        scheduler = self.scheduler.status()
        return {
            "workers": scheduler["workers"],
            "local_workers": scheduler["local_workers"],
            "queued": self.scheduler.queued() + len(self._backlog),
            "running": len(self._running),
            "done": self._done,
            "failed": self._failed,
            "rejected": self._channel.rejected + scheduler["rejected"],
            "uptime": round(time.monotonic() - self._started, 3),
            "draining": self._stop.is_set(),
            "dropped_replies": self._dropped,
        }

    def _drain(self) -> int:
        # Jobs still in the backlog never started: they stay journaled, nothing to wait for.
        log.info("draining: %d jobs running; new submits are refused",
                 len(self._running) - len(self._backlog))
        deadline = time.monotonic() + self.settings.drain_timeout
        failed_rounds = 0
        while len(self._running) > len(self._backlog) and time.monotonic() < deadline:
            try:
                # Completions and requests wake the poll; the only deadline is the drain's.
                wait = max(0.0, deadline - time.monotonic())
                if self._channel.poll(wait, wakeup=self._wakeup):
                    self._refuse_submits()
                self._settle()
                failed_rounds = 0
            except (JournalError, ChannelClosedError):
                raise
            except Exception as exc:  # noqa: BLE001 (as in _serve)
                failed_rounds = self._survive(exc, failed_rounds)
        if len(self._running) > len(self._backlog):
            log.warning("%d jobs still running at the drain timeout; they stay journaled "
                        "and run again after a restart", len(self._running) - len(self._backlog))
        return 0

    def _refuse_submits(self) -> None:
        for _ in range(1024):  # a flood cannot hold the drain past its deadline
            received = self._channel.recv(0)
            if received is None:
                break
            peer, msg = received
            assert peer is not None
            if self._bad_id(peer, msg):
                pass
            elif msg.type == "submit":
                self._refuse(peer, msg)
            elif msg.type == "fetch":
                self._fetch(peer, msg.body["job_id"], msg.body.get("timeout"))
            else:
                self._reply(peer, Message("status_reply", {"status": self.status()}))

    def _refuse(self, peer: bytes, msg: Message) -> None:
        self._reply(peer, _refusal("the daemon is shutting down; submit again after it "
                                   "restarts", msg.body.get("job_id"), "draining"))

    def _bad_id(self, peer: bytes, msg: Message) -> bool:
        """Refuse a submit or fetch whose job id breaks the rules (shmrunner/_jobid.py)."""
        job_id = msg.body.get("job_id")
        if msg.type not in ("submit", "fetch") or job_id is None:
            return False
        problem = job_id_problem(job_id)
        if problem is None:
            return False
        reply = _refusal(problem, job_id, "invalid")
        if msg.type == "fetch":
            reply.body["fetch"] = True
        self._reply(peer, reply)
        return True

    # --- plumbing -------------------------------------------------------------------------

    def _reply(self, peer: bytes, msg: Message) -> None:
        try:
            frames = encode(msg, allow_pickle=self._scheduler_settings.allow_pickle)
        except (TypeError, ValueError) as exc:
            log.warning("could not encode a %s reply: %s", msg.type, exc)
            return
        self._reply_frames(peer, frames)

    def _reply_frames(self, peer: bytes, frames: list[Any]) -> None:
        """Send without ever waiting: the front thread serves every client, so a
        peer that stops reading (its queue at the high-water mark) or has gone
        loses this reply instead of stalling the others. Its futures settle
        anyway: the client asks about its running jobs again every
        ``refetch_interval``."""
        try:
            if self._channel.try_send_frames(frames, peer):
                return
            why = f"peer {peer.hex()}: its queue is full (not reading?)"
        except ChannelError as exc:  # "peer … is not connected" (gone), or the socket failed
            why = str(exc)
        self._dropped += 1
        if self._dropped <= 10 or self._dropped % 1000 == 0:
            log.info("reply #%d dropped: %s", self._dropped, why)

    def _wake(self) -> None:
        self._wakeup.wake()

    def _start_curve(self) -> tuple[CurveKeys | None, CurveKeys | None]:
        """(clients, workers) CURVE keys: one key pair, a ZAP domain per endpoint,
        each admitting only its own directory of keys."""
        settings = self.settings
        if settings.curve_secret_key is None:
            return None, None
        assert settings.curve_authorized_clients is not None  # DaemonSettings checks
        keys = server_keys(settings.curve_secret_key, settings.curve_authorized_workers,
                           "daemon.curve_secret_key")
        clients = load_public_keys(settings.curve_authorized_clients,
                                   "daemon.curve_authorized_clients")
        self._zap_domain = authorize(zmq.Context.instance(), "clients", clients, "clients")
        return replace(keys, authorized=None, zap_domain=self._zap_domain), keys

    def _release_zap(self) -> None:
        if self._zap_domain is not None:
            release(zmq.Context.instance(), self._zap_domain)
            self._zap_domain = None

    def _close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False, cancel_futures=True)
        self._channel.close()
        self.journal.close()
        self._release_zap()
        self._wakeup.close()


def _refusal(reason: str, job_id: str | None, code: str) -> Message:
    """An error about one submit or fetch; ``code`` says which kind (docs/protocol.md).
    A client's own id comes back so it can settle that job; an absurdly long one
    (only a hostile peer sends those) does not."""
    echo = job_id if job_id is None or len(job_id) <= 1024 else None
    return Message("error", {"reason": reason, "job_id": echo, "code": code})


def _result_message(job_id: str, future: Future[Any]) -> Message:
    exc = future.exception()
    if exc is None:
        return Message("result", {"job_id": job_id, "ok": True, "value": future.result()})
    return _error_message(job_id, exc)


def _error_message(job_id: str, exc: BaseException) -> Message:
    return Message("result", {"job_id": job_id, "ok": False, "error": exception_to_wire(exc)})
