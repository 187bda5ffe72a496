"""The runner daemon: a long-lived Scheduler that clients and remote workers join.

Data flow::

    clients (DEALER) ==> client ROUTER ==> front thread (owns that socket and the journal)
        submit  -> batch of one poll round -> Journal.add (one commit) -> "accepted"
                   -> Scheduler.submit; the submitting peer is told the result
        submits -> each item as one submit, journaled as received (_submitbatch)
        fetch   -> result from the journal now, or when the job finishes (or "error" at
                   the fetch's timeout)
        status  -> workers, queue depth, running, done, failed, cancelled, uptime,
                   per-client job counts
        jobs    -> states by id (the intake's, else the journal's) with attempts and
                   worker, or only their counts ("summary"), or recent jobs; with
                   log: true, one job's task log too (_joblogs.py)
        cancel  -> (after the batch's submits are journaled, before they start) the
                   job settles as cancelled, journaled before the answer; a running
                   one is stopped on its worker (Scheduler.cancel)
    Scheduler (local shared-memory workers + the worker ROUTER of its hub)
        future done -> completions deque + wake pipe -> front thread:
                   Journal.finish (one commit per round) -> results to waiting peers

The pieces, each in its module: ``_intake`` (backlog -> Scheduler -> journal ->
replies), ``_fetchwaiters`` (who waits for which job, until when), ``_replier``
(replies that never block the front thread), ``_submitbatch`` (submits batched
on the wire), ``_daemonkeys`` (CURVE).

Guarantees: a job is acknowledged only once it is in the journal; a daemon
killed at any moment and restarted runs every acknowledged job that had not
finished (at-least-once: a job that was running may run twice). SIGTERM or
SIGINT drains: new submits are refused with an error, running jobs get
``drain_timeout`` seconds to finish (the rest stay journaled), requests keep
being answered until none came for 0.1 s, then exit 0.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ._allowlist import AllowList
from ._batchprogress import job_counts
from ._daemonkeys import daemon_keys, release_clients_domain
from ._endpoints import daemon_addresses, refuse_served_ipc, secure_ipc_socket
from ._fetchwaiters import MAX_TIMED_FETCHES, FetchWaiters
from ._intake import Intake, Request
from ._jobid import job_id_problem
from ._joblogs import JobLogs
from ._journal import CANCELLED, DONE, FAILED, PENDING, Journal
from ._localclients import LocalClients
from ._replier import Replier, refusal
from ._submitbatch import unbatch
from ._wakeup import Wakeup
from .config import DaemonSettings, SchedulerSettings
from .errors import (
    ChannelClosedError,
    ConfigError,
    JournalError,
    ProtocolError,
    ShmrunnerError,
)
from .scheduler import Scheduler
from .transport._schema import MAX_ACCEPTED_IDS
from .transport.protocol import Message, encode
from .transport.zmqchannel import ChannelOptions, ZmqChannel

__all__ = ["Daemon"]

log = logging.getLogger("shmrunner.daemon")

_ACCEPT = frozenset({"submit", "submits", "fetch", "status", "jobs", "cancel"})
_RECENT_JOBS = 20  # jobs a "jobs" listing without ids or limit names
_EXPIRE_EVERY = 60.0  # longest time between sweeps of expired results
_BACKLOG_POLL = 0.02  # how soon to retry the scheduler while jobs wait in the backlog
_MAX_FAILED_ROUNDS = 10  # unexpected errors in a row before the front thread gives up
_DRAIN_QUIET = 0.1  # seconds without a request before a drained daemon exits


class Daemon:
    def __init__(self, daemon: DaemonSettings, scheduler: SchedulerSettings) -> None:
        if scheduler.listen is not None:
            raise ConfigError("scheduler.listen: not used by the daemon; set daemon.workers "
                              "to the address remote workers connect to")
        self.settings = daemon
        self._scheduler_settings = scheduler
        self._started = time.monotonic()
        self._accepted_messages = 0  # "accepted" messages sent (a batched one counts once)
        self._rejected_items = 0  # items of "submits" messages that were no valid submit
        self._batched_submits = 0  # submits that came in "submits" messages
        # Fetches left unanswered: a large result of that job was on its way to the peer.
        self._repeated_fetches = 0
        self._request_errors = 0  # requests whose handling raised (a bug), answered with it
        self._stop = threading.Event()
        self._wakeup = Wakeup()
        self._waiters = FetchWaiters()
        self._allowed = AllowList(scheduler.allowed_functions, "scheduler.allowed_functions")
        # Who can reach the endpoints is settled before anything is opened.
        clients, workers, warnings = daemon_addresses(
            daemon, curve=daemon.curve_secret_key is not None)
        clients_curve, workers_curve, self._zap_domain = daemon_keys(daemon)
        try:
            self.journal = Journal(daemon.journal_path())
        except BaseException:
            self._release_zap()
            raise
        try:  # after the journal's lock, whose refusal names the daemon holding it
            refuse_served_ipc(clients, "daemon.clients")
            refuse_served_ipc(workers, "daemon.workers")
        except BaseException:
            self.journal.close()
            self._release_zap()
            raise
        self._channel = ZmqChannel("router", ChannelOptions(
            max_bytes=scheduler.max_message_bytes, allow_pickle=scheduler.allow_pickle,
            accept=_ACCEPT, curve=clients_curve))
        self._replier = Replier(self._channel, allow_pickle=scheduler.allow_pickle)
        self.scheduler: Scheduler | None = None
        self._local: LocalClients | None = None  # same-host clients' memfds (_localclients)
        self._logs = JobLogs()
        try:
            self.address = self._channel.bind(clients)
            secure_ipc_socket(self.address)
            self.scheduler = Scheduler(settings=scheduler, listen=workers, curve=workers_curve,
                                       on_task_log=self._logs.add)
            self._local = LocalClients(scheduler.max_message_bytes)
        except BaseException:
            self._close()
            raise
        self._intake = Intake(self.scheduler, scheduler, journal=self.journal,
                              waiters=self._waiters, replier=self._replier,
                              allowed=self._allowed, wakeup=self._wakeup, stopping=self._stop,
                              logs=self._logs, local=self._local)
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
                self._replier.flush()
                self._expire_waiters()
                if time.monotonic() >= next_expiry:
                    self.journal.expire(self.settings.result_ttl)
                    if self._local is not None:  # result memfds never picked up
                        self._local.expire(self.settings.result_ttl)
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
        longest = _BACKLOG_POLL if self._intake.backlog or self._replier.waiting else 1.0
        deadline = self._waiters.next_deadline()
        if deadline is None:
            return longest
        return max(0.0, min(deadline - time.monotonic(), longest))

    def _serve_requests(self) -> None:
        accepted: list[tuple[str, list[bytes | memoryview], bytes, Message]] = []
        # Fetches wait for this batch's submits to be journaled: a client that
        # submits and at once asks for the result must not hear "unknown job".
        fetches: list[tuple[bytes, Message]] = []
        # Cancels too, and they come before the batch's jobs are fed to the
        # scheduler: a submit cancelled at once (a client's future cancelled
        # before it was accepted) never starts. "jobs" queries wait with them:
        # a client matches the answers to both to its requests in the order it
        # sent them (docs/protocol.md), so a query answered before a cancel it
        # followed settled the wrong call, with another job's record.
        controls: list[tuple[bytes, Message]] = []
        assert self.scheduler is not None
        limit = self._scheduler_settings.max_pending
        room = limit - self.scheduler.queued() - self._intake.backlog
        for _ in range(1024):
            received = self._channel.recv(0)
            if received is None:
                break
            peer, msg = received
            assert peer is not None
            try:
                if msg.type == "submits":  # each item as the single submit it is
                    self._batched_submits += len(msg.body["submits"])
                    for inner in self._unbatch(msg):
                        self._take_submit(peer, inner[0], inner[1], accepted, room)
                elif msg.type == "submit":
                    self._take_submit(peer, msg, None, accepted, room)
                elif self._bad_id(peer, msg):
                    pass
                elif msg.type == "fetch":
                    fetches.append((peer, msg))
                elif msg.type == "status":
                    self._reply_status(peer)
                else:  # "jobs" or "cancel"
                    controls.append((peer, msg))
            except (JournalError, ChannelClosedError):
                raise  # the daemon's own failures: the loop decides
            except Exception as exc:  # our bug, met by one request: not the round's others
                self._failed_request(peer, msg, exc)
        if accepted:
            try:
                new = set(self.journal.add([(job_id, frames)
                                            for job_id, frames, _, _ in accepted]))
            except JournalError as exc:
                log.error("%s: the batch's submits are refused", exc)
                for job_id, _, peer, _ in accepted:
                    self._reply(peer, refusal(f"the daemon cannot journal job {job_id}: {exc}",
                                              job_id, "journal"))
                accepted = []
                new = set()
            self._acknowledge(accepted)
            for job_id, _, peer, msg in accepted:
                if msg.body.get("batch_results") is True:
                    self._replier.batches_for(peer)
                if job_id in new:
                    new.discard(job_id)  # the same id again in this batch is a resubmission
                    self._start(job_id, msg, peer)
                else:  # a resubmission of a known job: answer as a fetch would
                    self._fetch(peer, job_id, None)
        for peer, msg in controls:
            try:
                self._control(peer, msg)
            except (JournalError, ChannelClosedError):
                raise
            except Exception as exc:  # our bug, met by one request: not the round's others
                self._failed_request(peer, msg, exc)
        for peer, msg in fetches:
            self._fetch(peer, msg.body["job_id"], msg.body.get("timeout"))

    def _take_submit(self, peer: bytes, msg: Message, frames: list[Any] | None,
                     accepted: list[tuple[str, list[bytes | memoryview], bytes, Message]],
                     room: int) -> None:
        """One submit of a round: refused, or added to ``accepted`` with the frames
        the journal keeps (``frames``, else ``msg`` encoded)."""
        job_id = msg.body.get("job_id")
        if self._bad_id(peer, msg):
            pass
        elif self._stop.is_set():  # SIGTERM arrived mid-batch
            self._refuse(peer, msg)
        elif len(accepted) >= room:
            # Never block on a full queue (the front thread would stop answering
            # everyone): refuse, and the client submits again later.
            self._reply(peer, refusal(
                f"the daemon is busy: {self._scheduler_settings.max_pending} jobs wait for a "
                "worker (scheduler.max_pending); submit again later", job_id, "busy"))
        else:
            try:  # arrays a same-host client handed over as memfds
                run, journaled = self._claim(msg)
            except ShmrunnerError as exc:
                self._reply(peer, refusal(str(exc), job_id, "invalid"))
                return
            except Exception as exc:  # our bug, met by one submit of a batch: not the others
                self._failed_request(peer, msg, exc)
                return
            if frames is None or journaled is not msg:  # not the message as received
                frames = encode(journaled, allow_pickle=self._scheduler_settings.allow_pickle)
            accepted.append((job_id or uuid.uuid4().hex, frames, peer, run))

    def _failed_request(self, peer: bytes, msg: Message, exc: Exception) -> None:
        """Handling ``msg`` raised (a bug): log it, count it, and tell the peer."""
        self._request_errors += 1
        log.exception("handling a %s request failed", msg.type)
        job_id = msg.body.get("job_id")
        error = refusal(f"the daemon could not handle this {msg.type}: "
                        f"{type(exc).__name__}: {str(exc)[:200]}",
                        job_id if type(job_id) is str else None, "invalid")
        if msg.type in ("jobs", "cancel"):  # so a client settles its jobs() call with it
            error.body["jobs"] = True
        self._reply(peer, error)

    def _unbatch(self, msg: Message) -> Iterator[tuple[Message, list[Any]]]:
        """The valid submits of a "submits" message; the others are counted in
        ``rejected`` and logged (the first few)."""
        for inner in unbatch(msg, max_bytes=self._scheduler_settings.max_message_bytes,
                             allow_pickle=self._scheduler_settings.allow_pickle):
            if isinstance(inner, ProtocolError):
                self._rejected_items += 1
                if self._rejected_items <= 10:
                    log.warning("rejected a batched submit: %s", inner)
                continue
            yield inner

    def _acknowledge(self, accepted: list[tuple[str, list[bytes | memoryview], bytes, Message]]
                     ) -> None:
        """Tell each client its journaled submits: one "accepted" naming all of a
        round's jobs to a client that said ``batch_accepted``, one per job to
        others. A client that does not take results as memfds yet hears the
        side channel's name (``same_host``): one on this host may then open it."""
        batched: dict[bytes, list[str]] = {}
        side: set[bytes] = set()
        for job_id, _, peer, msg in accepted:
            if self._local is not None and not self._local.results.knows(
                    (msg.body.get("options") or {}).get("shm_results")):
                side.add(peer)
            if msg.body.get("batch_accepted") is True:
                batched.setdefault(peer, []).append(job_id)
            else:
                self._accepted_messages += 1
                self._reply(peer, Message("accepted", {"job_id": job_id, "submits": True,
                                                       **self._side(peer in side)}))
        for peer, ids in batched.items():
            ids = list(dict.fromkeys(ids))  # a resubmission in the same round: once
            for start in range(0, len(ids), MAX_ACCEPTED_IDS):
                self._accepted_messages += 1
                self._reply(peer, Message("accepted",
                                          {"job_ids": ids[start:start + MAX_ACCEPTED_IDS],
                                           "submits": True, **self._side(peer in side)}))

    def _side(self, tell: bool) -> dict[str, str]:
        return {"same_host": self._local.name} if tell and self._local is not None else {}

    # The intake's steps, called by the rounds (one seam each for fault tests).

    def _claim(self, msg: Message) -> tuple[Message, Message]:
        assert self._local is not None
        return self._local.claim(msg)

    def _start(self, job_id: str, request: Request, peer: bytes | None) -> None:
        self._intake.start(job_id, request, peer)

    def _feed(self) -> None:
        self._intake.feed()

    def _settle(self) -> None:
        self._intake.settle()

    def _fetch(self, peer: bytes, job_id: str, timeout: float | None) -> None:
        if self._replier.result_pending(peer, job_id):
            self._repeated_fetches += 1
            return  # its large result is on its way to this peer already
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
        elif found[0] in (DONE, FAILED, CANCELLED) and found[1] is not None:
            self._replier.reply_result(peer, job_id, found[1])
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self._waiters.add(job_id, peer, deadline):
                self._reply(peer, Message("error", {
                    "reason": f"{MAX_TIMED_FETCHES} fetches of job {job_id} with a timeout "
                              "already wait from this client; wait for their answers",
                    "job_id": job_id, "fetch": True, "code": "busy"}))

    # --- job control: "jobs" (states) and "cancel" ----------------------------------------

    def _control(self, peer: bytes, msg: Message) -> None:
        """Answer a "jobs" query or a "cancel" with a jobs_reply; a bad job id is
        refused (an error with ``jobs: True``, which the client matches)."""
        job_ids: list[str] = ([msg.body.get("job_id", "")] if msg.type == "cancel"
                              else msg.body.get("job_ids") or [])
        for job_id in job_ids:  # a cancel by task_id (a worker's message) has "" here
            problem = job_id_problem(job_id)
            if problem is not None:
                self._reply(peer, Message("error", {"reason": problem, "code": "invalid",
                                                    "jobs": True}))
                return
        if msg.type == "jobs" and msg.body.get("log") and len(job_ids) != 1:
            self._reply(peer, Message("error", {"reason": "a jobs query with log: true names "
                                                "exactly one job id", "code": "invalid",
                                                "jobs": True}))
            return
        body: dict[str, Any] = {}
        try:
            if msg.type == "cancel":
                jobs = [self._cancel(job_ids[0], running=not msg.body.get("queued_only"))]
            elif job_ids and msg.body.get("summary") is True:
                jobs = []
                body["counts"] = job_counts(self._states(job_ids))
            elif job_ids:
                jobs = self._states(job_ids)
                if msg.body.get("log"):
                    jobs[0]["log"] = self._logs.text(job_ids[0], self._intake.future(job_ids[0]))
            else:
                jobs = [self._held(job) for job in self.journal.recent(
                    msg.body.get("limit", _RECENT_JOBS))]
        except JournalError as exc:
            self._reply(peer, Message("error", {"reason": f"the journal cannot answer: {exc}",
                                                "code": "journal", "jobs": True}))
            return
        self._reply(peer, Message("jobs_reply", {"jobs": jobs, **body}))

    def _held(self, job: dict[str, Any]) -> dict[str, Any]:
        """A journaled job's row, with the intake's state, attempts and worker
        while it holds the job."""
        described = self._intake.describe(job["job_id"])
        if described is not None:
            job.update(described)
        elif job["state"] == PENDING:  # journaled, not held: a drain left it for the restart
            job["state"] = "queued"
        return job

    def _states(self, job_ids: list[str]) -> list[dict[str, Any]]:
        journaled = self.journal.states(job_ids)
        jobs = []
        for job_id in job_ids:
            job = journaled.get(job_id) or {"job_id": job_id, "state": "unknown",
                                            "created": None, "finished": None,
                                            "attempts": None, "worker": None}
            jobs.append(self._held(job))
        return jobs

    def _cancel(self, job_id: str, running: bool = True) -> dict[str, Any]:
        if self._intake.cancel(job_id, running=running):
            self._settle()  # journaled as cancelled before anyone hears so
            job = self._states([job_id])[0]
            job["cancelled"] = True
            return job
        job = self._states([job_id])[0]
        job["cancelled"] = job["state"] == CANCELLED
        if job["state"] == "running":
            job["reason"] = (f"job {job_id} is finishing: too late to cancel" if running
                             else f"job {job_id} is running (queued_only: not stopped)")
        return job

    def _expire_waiters(self) -> None:
        for peer, job_id in self._waiters.expired(time.monotonic()):
            self._reply(peer, Message("error", {
                "reason": f"job {job_id} not finished within the fetch timeout",
                "job_id": job_id, "fetch": True, "code": "timeout"}))

    def status(self) -> dict[str, Any]:
        assert self.scheduler is not None
        scheduler = self.scheduler.status()
        return {
            "workers": scheduler["workers"],
            "local_workers": scheduler["local_workers"],
            "memory_kills": scheduler["memory_kills"],
            "oom_kills": scheduler["oom_kills"],
            "queued": self.scheduler.queued() + self._intake.backlog,
            "running": self._intake.running,
            "done": self._intake.done,
            "failed": self._intake.failed,
            "cancelled": self._intake.cancelled,
            "clients": self._intake.clients(),
            "rejected": self._channel.rejected + scheduler["rejected"] + self._rejected_items,
            "uptime": round(time.monotonic() - self._started, 3),
            "draining": self._stop.is_set(),
            "dropped_replies": self._replier.dropped,
            "repeated_fetches": self._repeated_fetches,
            "request_errors": self._request_errors,
            "accepted_messages": self._accepted_messages,
            "batched_submits": self._batched_submits,
            "same_host": (None if self._local is None
                          else {**self._local.advert(), **self._local.status()}),
        }

    def _drain(self) -> int:
        # Jobs still in the backlog or the scheduler's queue never started: they
        # stay journaled for the next start, and the drain starts none of them.
        withdrawn = self._intake.withdraw_queued()
        log.info("draining: %d jobs running; new submits are refused (%d queued jobs stay "
                 "journaled for the next start)", self._intake.running - self._intake.backlog,
                 withdrawn + self._intake.backlog)
        deadline = time.monotonic() + self.settings.drain_timeout
        failed_rounds = 0
        # Requests keep their answers (submits a refusal) until none came for
        # _DRAIN_QUIET, even when no job runs: a client whose request was on its
        # way gets "shutting down" at once, not its own timeout.
        last_request = time.monotonic()
        while time.monotonic() < deadline and (
                self._intake.running > self._intake.backlog
                or time.monotonic() - last_request < _DRAIN_QUIET):
            try:
                # Completions and requests wake the poll; the deadlines are the drain's
                # and the quiet spell's.
                now = time.monotonic()
                wait = max(0.0, min(deadline, last_request + _DRAIN_QUIET) - now
                           if self._intake.running <= self._intake.backlog else deadline - now)
                if self._channel.poll(min(wait, _BACKLOG_POLL) if self._replier.waiting
                                      else wait, wakeup=self._wakeup):
                    self._refuse_submits()
                    last_request = time.monotonic()
                self._settle()
                self._replier.flush()
                failed_rounds = 0
            except (JournalError, ChannelClosedError):
                raise
            except Exception as exc:  # noqa: BLE001 (as in _serve)
                failed_rounds = self._survive(exc, failed_rounds)
        if self._intake.running > self._intake.backlog:
            log.warning("%d jobs still running at the drain timeout; they stay journaled "
                        "and run again after a restart",
                        self._intake.running - self._intake.backlog)
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
            elif msg.type == "submits":
                for inner, _ in self._unbatch(msg):
                    if not self._bad_id(peer, inner):
                        self._refuse(peer, inner)
            elif msg.type == "fetch":
                self._fetch(peer, msg.body["job_id"], msg.body.get("timeout"))
            elif msg.type in ("jobs", "cancel"):
                self._control(peer, msg)
            else:
                self._reply_status(peer)

    def _reply_status(self, peer: bytes) -> None:
        # "client": the asker's own id, so it can find its entry among "clients".
        self._reply(peer, Message("status_reply", {"status": {**self.status(),
                                                              "client": peer.hex()}}))

    def _refuse(self, peer: bytes, msg: Message) -> None:
        self._reply(peer, refusal("the daemon is shutting down; submit again after it "
                                  "restarts", msg.body.get("job_id"), "draining"))

    def _bad_id(self, peer: bytes, msg: Message) -> bool:
        """Refuse a submit or fetch whose job id breaks the rules (shmrunner/_jobid.py)."""
        job_id = msg.body.get("job_id")
        if msg.type not in ("submit", "fetch") or job_id is None:
            return False
        problem = job_id_problem(job_id)
        if problem is None:
            return False
        reply = refusal(problem, job_id, "invalid")
        if msg.type == "fetch":
            reply.body["fetch"] = True
        self._reply(peer, reply)
        return True

    # --- plumbing -------------------------------------------------------------------------

    def _reply(self, peer: bytes, msg: Message) -> None:
        self._replier.reply(peer, msg)

    def _wake(self) -> None:
        self._wakeup.wake()

    def _release_zap(self) -> None:
        if self._zap_domain is not None:
            release_clients_domain(self._zap_domain)
            self._zap_domain = None

    def _close(self) -> None:
        if self.scheduler is not None:
            # The drain is over: what still runs stays journaled for the
            # restart, and the process does not wait for it.
            self.scheduler.terminate()
        if self._local is not None:
            self._local.close()
        self._channel.close()
        self.journal.close()
        self._release_zap()
        self._wakeup.close()
