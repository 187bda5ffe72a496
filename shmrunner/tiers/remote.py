"""The Scheduler's remote tier: remote workers over one ZeroMQ ROUTER socket.

Data flow::

    Scheduler._pump (any thread) --start(jobs)--> inbox --wake pipe--+
        (the hub asleep: the caller sends them itself, _assign under the
        socket gate, transport/_gate.py: no thread hop on the latency path)
    Scheduler._expire (timer)    --stop(job)----> stops --wake pipe--+
    or Scheduler.cancel (a "cancel" to the agent; "now" for a cancelled job)
                                                                     v
    hub thread (owns the socket): zmq.Poller over the ROUTER socket and the wake pipe
        hello      -> Peers.join (capacity = advertised + prefetch), welcome
                      (with this hub's random session), events.on_room
        task out   <- inbox, to the worker Lifecycle.pick() names (try_send: never waits)
        result     -> of this session and a task the worker holds? Lifecycle.finish ->
                      events.on_done (the Scheduler retries or settles); else
                      ignored, counted
        logs       -> a running task's early log records: events.on_log (the
                      rest come with its result); not a task it holds: ignored
        heartbeat  -> last_seen; silence past heartbeat_timeout, a full send queue,
                      or a big message not taken for as long -> Peers.lose:
                      every task the worker held fails with WorkerLostError
                      (the Scheduler retries those it may)
        bye        -> the worker is draining: no new tasks; forgotten once empty
        slots      -> an agent's slot processes each say hello (``slot``, found by
                      the agent's group) and are dealt tasks as workers; a stop
                      for a slot's task goes to its agent (``cancel`` with the
                      slot, the task's place ``seq`` and ``after``), which kills
                      the slot and says ``lost``: that task fails (timeout,
                      cancel, memory, MemoryLimitError with oom_killer when
                      the kernel's OOM killer killed it, or WorkerLostError
                      when it died), the slot's other tasks go back to the
                      inbox (none counted an attempt)

Only the holder of the socket gate touches the socket and the roster
(ZeroMQ sockets are not thread-safe): the hub thread, except while it
sleeps; a thread that finds it asleep (and no worker busy) sends its jobs
itself, else hands
them over through the inbox and the wake-up pipe. Outcomes of one
``results`` message reach the Scheduler as one batch (one placement); a
worker gets jobs many at a time (filled, not dealt one each). A worker is
never sent more than its capacity plus the prefetch (more when it is fast:
``_peers.py``). Calls of a function known to be tiny are packed onto as
few workers as keep up instead of dealt evenly (``_packing.py``): those it
holds back wait in the inbox, and room() says 0 meanwhile.
Guarantees: no peer can block the hub thread (sends never wait); a round that
raises is logged, counted and recovered from (the workers' tasks rerun), and a
hub that cannot recover fails every future it holds or is given.

The hub reports only through the :class:`~shmrunner.tiers.base.TierEvents` it
is given. The roster of workers is ``_peers.py``; who may join (CURVE, ZAP),
``_admission.py``.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from typing import Any, TypedDict

import zmq

from .._endpoints import secure_ipc_socket
from .._job import Job
from .._tasklogs import MAX_WIRE_CHARS
from .._wakeup import Wakeup
from ..config import SchedulerSettings
from ..errors import (
    MemoryLimitError,
    ShmrunnerError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerLostError,
)
from ..transport._gate import SocketGate
from ..transport.curve import release
from ..transport.protocol import MAX_BATCH, Message, encode, exception_from_wire
from ..transport.zmqchannel import ChannelError, ChannelOptions, CurveKeys, ZmqChannel
from ..worker.lifecycle import Worker
from ._admission import admit_workers, warn_unauthenticated
from ._packing import Packer
from ._peers import Peer, Peers, WorkerStatus
from .base import TierEvents

__all__ = ["RemoteTier", "RemoteStatus"]

log = logging.getLogger("shmrunner.scheduler")

_ACCEPT = frozenset({"hello", "result", "results", "heartbeat", "bye", "lost", "logs"})
_OUTBOX = 1000  # messages queued for one worker that it has not taken: then it is lost
_RECEIVE_SLICE = 0.05  # seconds of receiving before heartbeats and sends get their turn
_MAX_FAILURES = 100  # rounds in a row that raise before the hub gives up (no busy loop)


class RemoteStatus(TypedDict):
    session: str  # this hub's random session, in every welcome and result
    workers: list[WorkerStatus]
    rejected: int  # messages refused (see RemoteTier.rejected)
    lost: int  # workers declared lost
    errors: int  # unexpected exceptions the hub thread recovered from
    alive: bool  # False once the hub thread gave up (every job then fails)


class RemoteTier:
    """Jobs run on remote workers that connect to ``settings.listen``."""

    def __init__(self, events: TierEvents, settings: SchedulerSettings,
                 curve: CurveKeys | None = None) -> None:
        assert settings.listen is not None
        self._events = events
        self._settings = settings
        self._peers = Peers(settings.prefetch)
        self._packer = Packer(self._peers)
        self._stuck = 0  # jobs the last _assign left in the inbox (no worker may take them)
        self._inbox: collections.deque[Job] = collections.deque()
        self._stops: collections.deque[tuple[Job, int, BaseException]] = collections.deque()
        # Timeouts due for jobs still in the inbox: their clock has not started (the
        # agent counts a timeout from when the task starts), so the stop goes out
        # with the job, aimed at the attempt it was meant for.
        self._stop_when_sent: dict[Job, int] = {}
        # Slot jobs a stop was sent for (attempt): if their slot ends and they go
        # back to the inbox, their stop goes out again with them.
        self._stopped: dict[Job, int] = {}
        self._wakeup = Wakeup()
        self._wake_pending = False  # a wake-up byte written and not yet seen by the hub
        # Every worker with room is topped up (Peers.topped_up): room() says 0,
        # so the Scheduler keeps its jobs (their timeouts not started, free for
        # another tier) until results free half a prefetch; set by _hold.
        self._held_back = False
        self._closing = False
        # What the jobs still held fail with when the hub stops (None: a lost
        # worker's error, retried): terminate() sets it, so they settle as cancelled.
        self._abandon: BaseException | None = None
        # Task ids restart at 0 in every Scheduler: results name this session (sent
        # in the welcome), so a result for an old scheduler's task 3 is never taken
        # for this one's task 3.
        self.session = secrets.token_hex(8)
        self._ignored = 0  # results for a session or task this hub does not know
        self._errors = 0  # unexpected exceptions the hub thread recovered from
        self._broken: BaseException | None = None  # why the hub thread died, if it did
        self._crash_lock = threading.Lock()
        # Its own context: term() in _release waits until libzmq has really closed
        # the socket, so the port is free when shutdown() returns. With CURVE the
        # process-wide context, where the ZAP authenticator (zmq.auth) listens.
        self._own_context = curve is None
        self._context: zmq.Context[Any] = (zmq.Context(io_threads=1) if self._own_context
                                           else zmq.Context.instance())
        # The hub never waits for a peer: it sends with try_send (a full per-peer
        # queue of _OUTBOX messages means that peer is lost), so one peer that
        # stops reading cannot hold up the heartbeats that keep the others alive.
        self._zap_domain: str | None = None
        try:
            if curve is not None:
                curve, self._zap_domain = admit_workers(self._context, curve)
            elif settings.listen.startswith("tcp://"):
                warn_unauthenticated(settings.listen)
            self._channel = ZmqChannel("router", ChannelOptions(
                max_bytes=settings.max_message_bytes, allow_pickle=settings.allow_pickle,
                accept=_ACCEPT, curve=curve, send_hwm=_OUTBOX), context=self._context)
        except BaseException:
            self._release_zap()
            self._wakeup.close()
            if self._own_context:
                self._context.term()
            raise
        try:
            self.address = self._channel.bind(settings.listen)
            secure_ipc_socket(self.address)
        except BaseException:
            self._release()
            raise
        self._gate = SocketGate(self._channel.socket, self._wakeup)
        self._thread = threading.Thread(target=self._run, name="shmrunner-hub", daemon=True)
        self._thread.start()

    def _release_zap(self) -> None:
        if self._zap_domain is not None:
            release(self._context, self._zap_domain)
            self._zap_domain = None

    # --- called from any thread --------------------------------------------------------

    @property
    def rejected(self) -> int:
        """Messages refused: malformed, oversized, of the wrong version, or results
        for a session or task this hub does not know."""
        return self._channel.rejected + self._ignored

    def status(self) -> RemoteStatus:
        """The remote tier at a glance: its session, the workers, and counters
        (``rejected`` messages, workers ``lost``)."""
        return {"session": self.session, "workers": self.workers(),
                "rejected": self.rejected, "lost": self._peers.lost, "errors": self._errors,
                "alive": self._thread.is_alive()}

    def room(self) -> int:
        if self._broken is not None:  # take the jobs, to fail them (start), not to hold them
            return 1 << 30
        if self._held_back:
            return 0
        return self._peers.free() - len(self._inbox)

    def start(self, jobs: list[Job]) -> None:
        with self._crash_lock:  # either the crash path fails them, or this raises
            if self._broken is not None:
                raise self._broken
            self._inbox.extend(jobs)
        if threading.current_thread() is self._thread:
            return  # its round ends with _assign (and does not sleep while it can send)
        # The hub asleep and no worker busy? Send them from this thread (no thread
        # hop on the latency path). Else the hub sends them in its round: a burst
        # of submits gathers there into a few messages per worker.
        if not self._closing and self._gate.try_enter():
            try:
                if not self._channel.closed and not self._peers.held:
                    self._assign()
                    return
            except Exception as exc:  # a bug: the hub's own recovery, here
                self._recover(exc)
            finally:
                self._gate.leave()
        self._wake()

    def stop(self, job: Job, attempt: int, reason: BaseException) -> bool:
        self._stops.append((job, attempt, reason))
        self._wake()
        return True

    def close(self, wait: bool) -> None:
        if self._closing and not self._thread.is_alive():
            return  # closed already: the wake-up pipe is gone
        self._closing = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def terminate(self) -> None:
        # The hub's socket closes; nothing here waits for the agents. They
        # notice the silence (heartbeat_timeout) and reconnect; a new scheduler
        # welcoming them stops what they still ran for this one (worker/remote.py).
        # What they held fails as cancelled, as the local tier's running tasks
        # do: not as lost, which the Scheduler would retry.
        self._abandon = TaskCancelledError("the scheduler was terminated")
        self.close(wait=True)

    def workers(self) -> list[WorkerStatus]:
        """What ``status`` shows of each connected worker."""
        return self._peers.status()

    def _wake(self) -> None:
        # One byte per round at most: a burst of submits writes once, not each.
        # Set only with a byte written, cleared by the hub after it wakes.
        if not self._wake_pending:
            self._wake_pending = True
            self._wakeup.wake()

    # --- the hub thread ------------------------------------------------------------------

    def _run(self) -> None:
        gate = self._gate
        gate.enter()  # the hub holds the socket except while it sleeps
        interval = self._settings.heartbeat_interval
        next_beat = time.monotonic() + interval
        failures = 0  # rounds in a row that raised
        stopped: BaseException = WorkerLostError(None, None, "the scheduler's remote tier stopped")
        try:
            while not self._closing:
                try:
                    wait = max(0.0, next_beat - time.monotonic())
                    if self._inbox and self._peers.free() > 0:
                        # Jobs handed over on this thread (start) go at once; those
                        # the packing rule held back wait for the busy workers' room
                        # (a result wakes us), or for one to stop turning tasks over.
                        wait = 0.0 if len(self._inbox) > self._stuck else min(
                            wait, self._packer.recheck)
                    readable = gate.sleep(wait)
                    self._wake_pending = False  # from here on, what is handed over is seen
                    if readable:
                        self._receive()
                    self._apply_stops()
                    if time.monotonic() >= next_beat:
                        self._heartbeat()
                        next_beat = time.monotonic() + interval
                    self._assign()  # last: what this round's outcomes let the Scheduler place
                    self._hold()
                    failures = 0
                except Exception as exc:  # a bug, or a hostile input we did not foresee
                    failures += 1
                    if failures >= _MAX_FAILURES:
                        raise
                    self._recover(exc)
        except BaseException as exc:
            log.exception("the scheduler's remote tier crashed; every task it held fails")
            stopped = ShmrunnerError(f"the scheduler's remote tier crashed: {exc!r}")
            stopped.__cause__ = exc
            with self._crash_lock:
                self._broken = stopped
        finally:
            if self._broken is None and self._abandon is not None:
                stopped = self._abandon
            try:
                self._fail_all(stopped)
                self._release()
            finally:
                gate.exit()
            if self._broken is not None:
                self._events.on_room()  # jobs queued for want of room now fail (start)

    def _recover(self, exc: Exception) -> None:
        """A round raised: the workers' bookkeeping may be half done, so start
        over from a clean slate. Every task a worker held fails with
        WorkerLostError (rerun if its retries allow); the workers are forgotten
        and say hello again once our heartbeats stop (their results meanwhile
        are ignored). Queued tasks stay queued."""
        self._errors += 1
        if self._errors <= 10 or self._errors % 1000 == 0:
            log.error("the scheduler's remote tier hit an unexpected error (#%d); its workers' "
                      "tasks are rerun or failed, and the workers rejoin", self._errors,
                      exc_info=exc)
        for worker in self._peers:
            self._lose(worker, f"the remote tier recovered from {exc!r}")

    def _release(self) -> None:
        self._channel.close()
        self._release_zap()
        if self._own_context:
            self._context.term()
        self._wakeup.close()

    def _receive(self) -> None:
        until = time.monotonic() + _RECEIVE_SLICE
        for count in range(256):  # bounded: heartbeats and stops get their turn
            if time.monotonic() > until:  # a flood of (even rejected) messages too
                return
            # The first waits (the gate said so); then read on while one does:
            # cheaper than the recv that finds none (pyzmq raises zmq.Again).
            if count and not self._channel.readable():
                return
            received = self._channel.recv(0)
            if stalled := self._channel.drained():  # a refused flood of frames held us
                self._peers.excuse(stalled)
            if received is None:
                return
            peer, msg = received
            assert peer is not None
            worker = self._peers.get(peer)
            if worker is not None:
                worker.endpoint.last_seen = time.monotonic()
            if msg.type == "hello":
                self._hello(peer, msg.body)
            elif worker is None:
                # A peer we do not know (yet, or any more): it will say hello. Its
                # results belong to no task of ours.
                if msg.type in ("result", "results"):
                    self._ignore(peer, "a result from a peer that has not said hello")
                continue
            elif msg.type == "result":
                self._peers.pace(worker, 1)
                self._result(worker, msg.body)
            elif msg.type == "results":
                # Paced per message: the agent batches what finished together.
                # The Scheduler places queued jobs once for the whole batch.
                self._peers.pace(worker, 1)
                try:
                    for body in msg.body["results"]:
                        self._result(worker, body, batch=True)
                finally:
                    self._events.on_room()
            elif msg.type == "bye":
                self._peers.retire(worker)
                if not worker.tasks:
                    self._forget(worker)
            elif msg.type == "lost":
                self._slot_lost(worker, msg.body)
            elif msg.type == "logs":
                self._early_logs(worker, msg.body)

    def _hello(self, identity: bytes, body: dict[str, Any]) -> None:
        old = self._peers.get(identity)
        if old is not None:  # it reconnected: what it held under the old session is lost
            self._lose(old, "reconnected")
        supervisor = None
        if "slot" in body and "slots" in body:
            # Both a slot and an agent of slots: chained, such peers once made
            # _lose recurse a thousand deep and killed the hub thread.
            self._ignore(identity, "a hello that is both a slot's and an agent's of slots")
            return
        if (slot := body.get("slot")) is not None:
            supervisor = self._peers.group(slot["group"])
            if supervisor is None or slot["index"] >= supervisor.endpoint.slot_count:
                # No agent of ours has that group (any more): not one to deal to.
                self._ignore(identity, f"a slot's hello for group {slot['group']!r}, index "
                             f"{slot['index']}, which no connected agent has")
                return
            previous = supervisor.endpoint.slots.get(slot["index"])
            if previous is not None:  # its agent's report on it may still be on its way
                self._peers.set_aside(previous)
        elif "slots" in body and self._peers.group(body["slots"]["group"]) is not None:
            self._ignore(identity, "an agent's hello with a slot group already in use")
            return
        worker = self._peers.join(identity, body, supervisor)
        peer: Peer = worker.endpoint
        log.info("worker %s (%s pid %d) joined with capacity %d",
                 peer.name, peer.host, peer.pid, peer.capacity)
        self._send(worker, Message("welcome", {
            "heartbeat_interval": self._settings.heartbeat_interval,
            "heartbeat_timeout": self._settings.heartbeat_timeout,
            "session": self.session}))
        self._events.on_room()

    def _slot_lost(self, agent: Worker[Job], body: dict[str, Any]) -> None:
        """``agent`` says its slot ended: the task it ran fails (why), the rest
        of what the slot held goes back to the inbox, unstarted or with its
        result lost in the kill (run again: at-least-once)."""
        slot = agent.endpoint.ended_slots.get(body.get("pid", -1)) or agent.endpoint.slots.get(
            body["slot"])
        if (slot is None or slot.endpoint.slot_index != body["slot"]
                or body.get("pid", slot.endpoint.pid) != slot.endpoint.pid):
            self._ignore(agent.endpoint.identity, f"a lost report for slot {body['slot']}, "
                         "which is not connected")
            return
        peer: Peer = slot.endpoint
        reason, task_id = body["reason"], body.get("task_id")
        if reason in ("died", "oom"):  # not killed on purpose: a lost worker
            self._peers.lost += 1
            log.warning("worker %s (%s pid %d) %s", peer.name, peer.host, peer.pid,
                        "died" if reason == "died" else
                        f"was killed by the kernel's OOM killer ({body.get('evidence', '')})")
        jobs = self._peers.drop(slot)
        culprit = next((job for job in jobs if job.id == task_id), None)
        again: list[Job] = []
        for job in jobs:
            if job is culprit:
                continue
            if job.cancelled is not None:
                self._events.on_done(job, False, job.cancelled, batch=True)
                continue
            attempt = self._stopped.pop(job, None)
            if attempt is not None:
                self._stop_when_sent[job] = attempt
            again.append(job)
        self._inbox.extendleft(reversed(again))
        if culprit is not None:
            self._stopped.pop(culprit, None)
            error: BaseException
            if reason == "timeout":
                error = TaskTimeoutError(f"task {culprit.id} ran past its timeout and was stopped")
            elif reason == "cancelled":
                error = TaskCancelledError(f"task {culprit.id} was cancelled by its scheduler")
            elif reason == "memory":
                error = MemoryLimitError(peer.pid, -9, culprit.id, body.get("limit"),
                                         body.get("size"))
            elif reason == "oom":  # as worker/lifecycle.py reports it for a pool process
                error = MemoryLimitError(peer.pid, -9, culprit.id, body.get("limit"),
                                         oom_killer=True, evidence=body.get("evidence", ""))
            else:
                error = WorkerLostError(peer.pid, None,
                                        f"{culprit.id} on {peer.name}@{peer.host}")
            self._events.on_done(culprit, False, error, batch=True)
        self._events.on_room()

    def _result(self, worker: Worker[Job], body: dict[str, Any], batch: bool = False) -> None:
        if body.get("session") != self.session:
            self._ignore(worker.endpoint.identity, f"a result of task {body.get('task_id')} "
                         f"from session {body.get('session')!r}, not this one")
            return
        job = self._peers.finish(worker, body.get("task_id", -1))
        if job is None:  # not one this worker holds (stopped, lost, or never sent)
            self._ignore(worker.endpoint.identity,
                         f"a result of task {body.get('task_id')}, which it does not hold")
            return
        if self._stopped:
            self._stopped.pop(job, None)
        self._packer.learn(job, worker.capacity == worker.fast_capacity)  # paced already
        if body["ok"]:
            ok, value = True, body["value"]
        else:
            ok, value = False, exception_from_wire(body["error"])
        if worker.retiring and not worker.tasks:
            self._forget(worker)
        if body.get("logs"):  # checked by the schema (types, sizes)
            peer: Peer = worker.endpoint
            self._events.on_log(job, [tuple(record) for record in body["logs"]],
                                worker=peer.name, host=peer.host)
        self._events.on_done(job, ok, value, batch=batch)

    def _early_logs(self, worker: Worker[Job], body: dict[str, Any]) -> None:
        """What a task still running on ``worker`` logged so far (its records
        checked by the schema): to the Scheduler, as its result's would be.
        Bounded per attempt as an honest agent's capture bounds a task's whole
        log (MAX_WIRE_CHARS), so a peer cannot flood the scheduler's log with
        one task."""
        task_id, peer = body["task_id"], worker.endpoint
        job = next((job for job in worker.tasks if job.id == task_id), None)
        if body["session"] != self.session or job is None:
            self._ignore(peer.identity, f"the log of task {task_id}, which it does not run "
                         "for this session")
            return
        logged = peer.logged
        if len(logged) > len(worker.tasks):  # forget the tasks it holds no more
            held = {(job.id, job.attempts) for job in worker.tasks}
            for key in [key for key in logged if key not in held]:
                del logged[key]
        key = (task_id, job.attempts)
        size = logged.get(key, 0) + sum(len(name) + len(text)
                                        for _, _, name, text in body["logs"])
        if size > MAX_WIRE_CHARS:
            self._ignore(peer.identity, f"the log of task {task_id}: more than "
                         f"{MAX_WIRE_CHARS} characters while it runs")
            return
        logged[key] = size
        self._events.on_log(job, [tuple(record) for record in body["logs"]],
                            worker=peer.name, host=peer.host)

    def _hold(self) -> None:
        """Whether the workers are topped up, or jobs wait in the inbox for
        the workers the packing rule fills (then room() is 0): tiny tasks
        are then refilled in bulk, once results free half a prefetch, so they
        travel many per message and the agents wake fewer times. Told to the
        Scheduler when it ends (on_room), so it places its queue then."""
        if not self._peers.held and not self._held_back:
            return  # no worker holds a task (e.g. 1,000 idle ones): not even O(workers)
        if self._inbox:  # the packing rule holds jobs back (or every worker is full)
            held = True
        else:
            worker = self._peers.lifecycle.pick()
            held = worker is not None and Peers.topped_up(worker)
        was, self._held_back = self._held_back, held
        if was and not held:
            self._events.on_room()

    def _assign(self) -> None:
        """Give queued jobs to workers with room; a worker's share of one round
        travels as one message (``tasks``), so tiny tasks cost one send each
        round instead of one each."""
        batches: dict[Worker[Job], list[Job]] = {}
        lifecycle = self._peers.lifecycle
        if not self._inbox:
            self._stuck = 0
            return
        # Each worker with room takes its even share of the queue at once (an
        # idle one first, then the one with the most room) rather than one job
        # in turn: jobs travel many per message and the agent and its processes
        # wake once for them, yet two jobs and two idle workers still go one each.
        # Tiny calls instead fill the worker the packing rule names.
        packer = self._packer
        with_room = sum(1 for worker in lifecycle.workers.values() if worker.free)
        share = -(-len(self._inbox) // max(1, with_room))
        while self._inbox:
            tiny = packer.tiny(self._inbox[0])
            worker = packer.pick(tiny)
            if worker is None:
                break
            peer: Peer = worker.endpoint
            name = f"{peer.name}@{peer.host}"
            batch = batches.setdefault(worker, [])
            take = worker.free if tiny else min(worker.free, share)
            for _ in range(min(take, len(self._inbox))):
                if tiny and not packer.tiny(self._inbox[0]):
                    break  # a call not known to be tiny is dealt by the even rule
                job = self._inbox.popleft()
                self._peers.assign(worker, job)
                job.worker = name
                batch.append(job)
        self._stuck = len(self._inbox)
        for worker, jobs in batches.items():
            due = [job for job in jobs if job in self._stop_when_sent] \
                if self._stop_when_sent else []
            self._send_jobs(worker, jobs)
            for job in due:  # sent now: their timeouts' stops go after them
                if self._stop_when_sent.pop(job) == job.attempts and job in worker.tasks:
                    self._send_stop(worker, job)

    def _send_jobs(self, worker: Worker[Job], jobs: list[Job]) -> None:
        if self._settings.allow_pickle and not worker.endpoint.allow_pickle:
            jobs = self._refuse_pickles(worker, jobs)
            if not jobs:
                return
        # args as a list: the agent makes the tuple; the wire's tuple ext would
        # cost a callback and a nested pack per task both ways.
        bodies = [{"task_id": job.id, "fn": job.fn, "args": list(job.args),
                   "kwargs": job.kwargs, "timeout": job.timeout} for job in jobs]
        try:
            if len(bodies) == 1:
                if self._send(worker, Message("task", bodies[0])):
                    self._sent_to_slot(worker, jobs)
            else:
                self._send_batch(worker, jobs, bodies)
        except (TypeError, ValueError) as exc:  # the call cannot travel: it fails
            self._peers.finish(worker, jobs[0].id)
            self._events.on_done(jobs[0], False, exc)

    def _refuse_pickles(self, worker: Worker[Job], jobs: list[Job]) -> list[Job]:
        """Fail here the calls that need a pickle: this worker would reject them
        unread (it does not allow pickles) and never answer."""
        kept = []
        for job in jobs:
            try:
                encode(Message("task", {"task_id": job.id, "fn": job.fn, "args": job.args,
                                        "kwargs": job.kwargs}), allow_pickle=False)
            except TypeError as exc:
                self._peers.finish(worker, job.id)
                self._events.on_done(job, False, TypeError(
                    f"{exc} (worker {worker.endpoint.name} does not accept pickles: start "
                    "it with --allow-pickle)"))
            else:
                kept.append(job)
        return kept

    def _send_batch(self, worker: Worker[Job], jobs: list[Job],
                    bodies: list[dict[str, Any]]) -> None:
        for start in range(0, len(bodies), MAX_BATCH):
            chunk = bodies[start:start + MAX_BATCH]
            try:
                if not self._send(worker, Message("tasks", {"tasks": chunk})):
                    return  # lost: what it held is rerun
                self._sent_to_slot(worker, jobs[start:start + MAX_BATCH])
            except (TypeError, ValueError):
                # One call in the batch cannot travel: send them one by one so
                # only that one fails.
                for job, body in zip(jobs[start:start + MAX_BATCH], chunk, strict=True):
                    try:
                        if not self._send(worker, Message("task", body)):
                            return
                        self._sent_to_slot(worker, [job])
                    except (TypeError, ValueError) as exc:
                        self._peers.finish(worker, job.id)
                        self._events.on_done(job, False, exc)

    @staticmethod
    def _sent_to_slot(worker: Worker[Job], jobs: list[Job]) -> None:
        """``jobs`` reached ``worker``: for a slot, number them in the order it
        runs them (a cancel's ``seq``: the agent compares it with the slot's count
        of tasks started)."""
        peer: Peer = worker.endpoint
        if peer.supervisor is None:
            return
        for job in jobs:
            peer.delivered += 1
            job.handle = peer.delivered

    def _apply_stops(self) -> None:
        while self._stops:
            job, attempt, reason = self._stops.popleft()
            if job.attempts != attempt:
                continue  # that attempt is over (the job was retried since)
            if job in self._inbox:
                if job.cancelled is None:  # a timeout: it has not run at all yet
                    self._stop_when_sent[job] = attempt
                    continue
                self._stop_when_sent.pop(job, None)
                self._inbox.remove(job)
                self._events.on_done(job, False, reason)
                continue
            for worker in self._peers:
                if job in worker.tasks:
                    self._send_stop(worker, job)

    def _send_stop(self, worker: Worker[Job], job: Job) -> None:
        # The agent kills the process running it and reports the timeout
        # (once it has run for it) or, "now", the cancel.
        body: dict[str, Any] = {"task_id": job.id}
        if job.cancelled is not None:
            body["now"] = True
        peer: Peer = worker.endpoint
        if peer.supervisor is not None:  # a slot: its agent kills it, and says "lost"
            body.update(slot=peer.slot_index, seq=job.handle, after=job.timeout or 0.0,
                        pid=peer.pid)
            self._stopped[job] = job.attempts
            worker = peer.supervisor
        self._send(worker, Message("cancel", body))

    def _heartbeat(self) -> None:
        free = self._peers.free()
        self._peers.recount()  # the running counts, checked
        if self._peers.free() > free:
            self._events.on_room()  # the counts had drifted low: room the Scheduler must hear of
        timeout = self._settings.heartbeat_timeout
        deadline = time.monotonic() - timeout
        for worker in self._peers:
            why = self._peers.verdict(worker, timeout, deadline)
            if why is not None:
                self._lose(worker, why)
            elif worker.endpoint.supervisor is None:  # a slot's agent hears them for it
                self._send(worker, Message("heartbeat", {}))

    def _send(self, worker: Worker[Job], msg: Message) -> bool:
        """Hand ``msg`` to ZeroMQ without waiting; False when the worker is lost
        instead (gone, or its queue is full: it stopped reading). Raises
        ``TypeError``/``ValueError`` for a message the protocol cannot carry."""
        peer: Peer = worker.endpoint
        try:
            sent = self._channel.try_send(msg, peer.identity, track=True)
        except ChannelError:
            if peer.supervisor is not None:
                # A slot whose process ended (its agent killed it, or it died):
                # its agent's "lost" says which task it ran.
                self._peers.set_aside(worker)
                return False
            self._lose(worker, "unreachable")
            return False
        if sent is False:
            self._lose(worker, f"its queue is full ({_OUTBOX} messages it has not taken): "
                       "it stopped reading")
            return False
        if isinstance(sent, zmq.MessageTracker) and not sent.done:
            self._peers.track(worker, sent)
        return True

    def _ignore(self, identity: bytes, what: str) -> None:
        self._ignored += 1
        if self._ignored <= 10 or self._ignored % 1000 == 0:  # a flood must not flood the log
            log.warning("ignored %s (peer %s; %d ignored so far)", what, identity.hex(),
                        self._ignored)

    def _lose(self, worker: Worker[Job], why: str) -> None:
        peer: Peer = worker.endpoint
        for slot in [*peer.slots.values(), *peer.ended_slots.values()]:  # lost with it
            self._lose_one(slot, f"its agent {peer.name} was lost: {why}")
        self._lose_one(worker, why)

    def _lose_one(self, worker: Worker[Job], why: str) -> None:
        """``worker`` is lost (a slot has no slots of its own: _hello sees to it)."""
        peer: Peer = worker.endpoint
        held = self._peers.lose(worker)
        if held is None:
            return
        if self._stopped:
            for job in held:
                self._stopped.pop(job, None)
        log.warning("worker %s (%s pid %d) lost: %s", peer.name, peer.host, peer.pid, why)
        for job in held:
            self._events.on_done(job, False, WorkerLostError(
                peer.pid, None, f"{job.id} on {peer.name}@{peer.host} ({why})"))

    def _forget(self, worker: Worker[Job]) -> None:
        peer: Peer = worker.endpoint
        if peer.slots or peer.ended_slots:
            return  # a draining agent stays while its slots drain (they live by its heartbeats)
        self._peers.forget(worker)
        agent = peer.supervisor
        if (agent is not None and agent.retiring and not agent.endpoint.slots
                and not agent.endpoint.ended_slots):
            self._peers.forget(agent)

    def _fail_all(self, error: BaseException) -> None:
        jobs = list(self._inbox)
        self._inbox.clear()
        self._stop_when_sent.clear()
        self._stopped.clear()
        jobs += self._peers.drop_all()
        for job in jobs:
            self._events.on_done(job, False, error, batch=True)
