"""The Scheduler's remote tier: remote workers over one ZeroMQ ROUTER socket.

Data flow::

    Scheduler._pump (any thread) --start(jobs)--> inbox --wake pipe--+
    Scheduler._expire (timer)    --stop(job)----> stops --wake pipe--+
                                                                     v
    hub thread (owns the socket): zmq.Poller over the ROUTER socket and the wake pipe
        hello      -> Lifecycle.add (capacity = advertised + prefetch), welcome
                      (with this hub's random session)
        task out   <- inbox, to the worker Lifecycle.pick() names (try_send: never waits)
        result     -> of this session and a task the worker holds? Lifecycle.finish ->
                      Scheduler._finish (retry or settle); else ignored, counted
        heartbeat  -> last_seen; silence past heartbeat_timeout, a full send queue,
                      or a big message not taken for as long -> Lifecycle.lose:
                      every task the worker held fails with WorkerLostError
                      (the Scheduler retries those it may)
        bye        -> the worker is draining: no new tasks; forgotten once empty

Only the hub thread touches the socket (ZeroMQ sockets are not thread-safe);
other threads hand it work through deques and a wake-up pipe the poller
watches. A worker is never sent more than its capacity plus the prefetch.
Guarantees: no peer can block the hub thread (sends never wait); a round that
raises is logged, counted and recovered from (the workers' tasks rerun), and a
hub that cannot recover fails every future it holds or is given.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import zmq

from ._endpoints import secure_ipc_socket
from ._wakeup import Wakeup
from .config import SchedulerSettings
from .errors import ConfigError, ShmrunnerError, WorkerLostError
from .transport.curve import authorize, load_public_keys, release
from .transport.protocol import MAX_BATCH, Message, encode, exception_from_wire
from .transport.zmqchannel import ChannelError, ChannelOptions, CurveKeys, ZmqChannel
from .worker.lifecycle import Lifecycle, Worker

if TYPE_CHECKING:
    from .scheduler import Job, Scheduler

__all__ = ["Hub"]

log = logging.getLogger("shmrunner.scheduler")

_ACCEPT = frozenset({"hello", "result", "results", "heartbeat", "bye"})
_FAST_TASK = 2e-3  # seconds between results under which a worker counts as fast
_FAST_PREFETCH = 32  # tasks a fast worker may hold beyond its capacity
_OUTBOX = 1000  # messages queued for one worker that it has not taken: then it is lost
_RECEIVE_SLICE = 0.05  # seconds of receiving before heartbeats and sends get their turn
_MAX_FAILURES = 100  # rounds in a row that raise before the hub gives up (no busy loop)


_warned: set[str] = set()


def _warn_unauthenticated(listen: str) -> None:
    """Once per process: an explicit library call may listen on TCP without
    CURVE, but its owner should know what that opens."""
    if not _warned:
        _warned.add(listen)
        log.warning("Scheduler listening on %s without CURVE: anyone who can reach that port "
                    "can join as a worker, receive tasks and their arguments, and forge "
                    "results; pass curve= to authenticate workers", listen)


class _Peer:
    """A remote worker as the hub knows it."""

    __slots__ = ("identity", "name", "host", "pid", "capacity", "last_seen", "last_result",
                 "allow_pickle", "outbox")

    def __init__(self, identity: bytes, body: dict[str, Any]) -> None:
        self.identity = identity
        self.name: str = body["name"]
        self.host: str = body["host"]
        self.pid: int = body["pid"]
        self.capacity: int = body["capacity"]
        self.last_seen = time.monotonic()
        self.last_result = 0.0
        self.allow_pickle = body.get("allow_pickle") is True  # optional: older agents
        # Big messages sent, not yet taken by ZeroMQ's I/O thread (tracker, when
        # sent): one stuck at the head for heartbeat_timeout means the peer stopped
        # reading. Small ones are copied by pyzmq and never tracked.
        self.outbox: collections.deque[tuple[zmq.MessageTracker, float]] = collections.deque()


class Hub:
    def __init__(self, scheduler: Scheduler, settings: SchedulerSettings,
                 curve: CurveKeys | None = None) -> None:
        assert settings.listen is not None
        self._scheduler = scheduler
        self._settings = settings
        self._workers: Lifecycle[Job] = Lifecycle(None, 0)
        self._by_identity: dict[bytes, Worker[Job]] = {}
        self._inbox: collections.deque[Job] = collections.deque()
        self._stops: collections.deque[tuple[Job, int, BaseException]] = collections.deque()
        self._wakeup = Wakeup()
        self._closing = False
        # Task ids restart at 0 in every Scheduler: results name this session (sent
        # in the welcome), so a result for an old scheduler's task 3 is never taken
        # for this one's task 3.
        self.session = secrets.token_hex(8)
        self._ignored = 0  # results for a session or task this hub does not know
        self._lost = 0
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
                curve = self._authorize(curve)
            elif settings.listen.startswith("tcp://"):
                _warn_unauthenticated(settings.listen)
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
        self._thread = threading.Thread(target=self._run, name="shmrunner-hub", daemon=True)
        self._thread.start()

    def _authorize(self, curve: CurveKeys) -> CurveKeys:
        """Admit only the workers whose keys are in ``curve.authorized``: the ZAP
        domain is registered before the socket binds, so no stranger gets in."""
        if curve.server_key is not None:
            raise ConfigError("Scheduler(curve=...): these are a client's keys (they name a "
                              "server_key); pass the scheduler's own key pair")
        if curve.authorized is None:
            raise ConfigError("Scheduler(curve=...): no directory of authorised worker keys "
                              "(CurveKeys.authorized); without one any key pair could join "
                              "and receive tasks")
        keys = load_public_keys(curve.authorized, "authorised worker keys")
        self._zap_domain = authorize(self._context, "workers", keys, "workers")
        return replace(curve, zap_domain=self._zap_domain)

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

    def status(self) -> dict[str, Any]:
        """The remote tier at a glance: its session, the workers, and counters
        (``rejected`` messages, workers ``lost``)."""
        return {"session": self.session, "workers": self.workers(),
                "rejected": self.rejected, "lost": self._lost, "errors": self._errors,
                "alive": self._thread.is_alive()}

    def room(self) -> int:
        if self._broken is not None:  # take the jobs, to fail them (start), not to hold them
            return 1 << 30
        workers = list(self._workers.workers.values())
        return sum(worker.free for worker in workers) - len(self._inbox)

    def start(self, jobs: list[Job]) -> None:
        with self._crash_lock:  # either the crash path fails them, or this raises
            if self._broken is not None:
                raise self._broken
            self._inbox.extend(jobs)
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

    def workers(self) -> list[dict[str, Any]]:
        """What ``status`` shows of each connected worker."""
        now = time.monotonic()
        return [{"name": w.endpoint.name, "host": w.endpoint.host, "pid": w.endpoint.pid,
                 "capacity": w.endpoint.capacity, "busy": len(w.tasks),
                 "last_heartbeat": round(now - w.endpoint.last_seen, 3)}
                for w in list(self._workers.workers.values())]

    def _wake(self) -> None:
        self._wakeup.wake()

    # --- the hub thread ------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._channel.socket, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        interval = self._settings.heartbeat_interval
        next_beat = time.monotonic() + interval
        failures = 0  # rounds in a row that raised
        stopped: BaseException = WorkerLostError(None, None, "the scheduler's remote tier stopped")
        try:
            while not self._closing:
                try:
                    wait = max(0.0, next_beat - time.monotonic())
                    events = dict(poller.poll(round(wait * 1000)))
                    if self._wakeup.fd in events:
                        self._wakeup.drain()
                    if self._channel.socket in events:
                        self._receive()
                    self._assign()
                    self._apply_stops()
                    if time.monotonic() >= next_beat:
                        self._heartbeat()
                        next_beat = time.monotonic() + interval
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
            self._fail_all(stopped)
            self._release()
            if self._broken is not None:
                self._scheduler._pump()  # jobs queued for want of room now fail (start)

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
        for worker in self._workers:
            self._lose(worker, f"the remote tier recovered from {exc!r}")

    def _release(self) -> None:
        self._channel.close()
        self._release_zap()
        if self._own_context:
            self._context.term()
        self._wakeup.close()

    def _receive(self) -> None:
        until = time.monotonic() + _RECEIVE_SLICE
        for _ in range(256):  # bounded: heartbeats and stops get their turn
            if time.monotonic() > until:  # a flood of (even rejected) messages too
                return
            received = self._channel.recv(0)
            if received is None:
                return
            peer, msg = received
            assert peer is not None
            worker = self._by_identity.get(peer)
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
                self._pace(worker)
                self._result(worker, msg.body)
            elif msg.type == "results":
                self._pace(worker)
                for body in msg.body["results"]:
                    self._result(worker, body)
            elif msg.type == "bye":
                worker.retiring = True
                if not worker.tasks:
                    self._forget(worker)

    def _hello(self, identity: bytes, body: dict[str, Any]) -> None:
        old = self._by_identity.get(identity)
        if old is not None:  # it reconnected: what it held under the old session is lost
            self._lose(old, "reconnected")
        peer = _Peer(identity, body)
        worker = self._workers.add(peer, peer.capacity + self._settings.prefetch)
        self._by_identity[identity] = worker
        log.info("worker %s (%s pid %d) joined with capacity %d",
                 peer.name, peer.host, peer.pid, peer.capacity)
        self._send(worker, Message("welcome", {
            "heartbeat_interval": self._settings.heartbeat_interval,
            "heartbeat_timeout": self._settings.heartbeat_timeout,
            "session": self.session}))
        self._scheduler._pump()

    def _result(self, worker: Worker[Job], body: dict[str, Any]) -> None:
        if body.get("session") != self.session:
            self._ignore(worker.endpoint.identity, f"a result of task {body.get('task_id')} "
                         f"from session {body.get('session')!r}, not this one")
            return
        job = self._workers.finish(worker, body.get("task_id", -1))
        if job is None:  # not one this worker holds (stopped, lost, or never sent)
            self._ignore(worker.endpoint.identity,
                         f"a result of task {body.get('task_id')}, which it does not hold")
            return
        if body["ok"]:
            ok, value = True, body["value"]
        else:
            ok, value = False, exception_from_wire(body["error"])
        if worker.retiring and not worker.tasks:
            self._forget(worker)
        self._scheduler._finish(job, ok, value)

    def _pace(self, worker: Worker[Job]) -> None:
        """Let a worker that turns tasks around fast hold many more, so tiny
        tasks are pipelined over the network instead of paying a round trip
        each; slow tasks keep capacity + prefetch, which keeps load balanced."""
        peer: _Peer = worker.endpoint
        now = time.monotonic()
        fast = now - peer.last_result < _FAST_TASK
        peer.last_result = now
        worker.capacity = peer.capacity + (_FAST_PREFETCH if fast else self._settings.prefetch)

    def _assign(self) -> None:
        """Give queued jobs to workers with room; a worker's share of one round
        travels as one message (``tasks``), so tiny tasks cost one send each
        round instead of one each."""
        batches: dict[Worker[Job], list[Job]] = {}
        while self._inbox:
            worker = self._workers.pick()
            if worker is None:
                break
            job = self._inbox.popleft()
            self._workers.assign(worker, job)
            batches.setdefault(worker, []).append(job)
        for worker, jobs in batches.items():
            if self._settings.allow_pickle and not worker.endpoint.allow_pickle:
                jobs = self._refuse_pickles(worker, jobs)
                if not jobs:
                    continue
            bodies = [{"task_id": job.id, "fn": job.fn, "args": job.args, "kwargs": job.kwargs,
                       "timeout": job.timeout} for job in jobs]
            try:
                if len(bodies) == 1:
                    self._send(worker, Message("task", bodies[0]))
                else:
                    self._send_batch(worker, jobs, bodies)
            except (TypeError, ValueError) as exc:  # the call cannot travel: it fails
                self._workers.finish(worker, jobs[0].id)
                self._scheduler._finish(jobs[0], False, exc)

    def _refuse_pickles(self, worker: Worker[Job], jobs: list[Job]) -> list[Job]:
        """Fail here the calls that need a pickle: this worker would reject them
        unread (it does not allow pickles) and never answer."""
        kept = []
        for job in jobs:
            try:
                encode(Message("task", {"task_id": job.id, "fn": job.fn, "args": job.args,
                                        "kwargs": job.kwargs}), allow_pickle=False)
            except TypeError as exc:
                self._workers.finish(worker, job.id)
                self._scheduler._finish(job, False, TypeError(
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
            except (TypeError, ValueError):
                # One call in the batch cannot travel: send them one by one so
                # only that one fails.
                for job, body in zip(jobs[start:start + MAX_BATCH], chunk, strict=True):
                    try:
                        if not self._send(worker, Message("task", body)):
                            return
                    except (TypeError, ValueError) as exc:
                        self._workers.finish(worker, job.id)
                        self._scheduler._finish(job, False, exc)

    def _apply_stops(self) -> None:
        while self._stops:
            job, attempt, reason = self._stops.popleft()
            if job.attempts != attempt:
                continue  # that attempt is over (the job was retried since)
            if job in self._inbox:
                self._inbox.remove(job)
                self._scheduler._finish(job, False, reason)
                continue
            for worker in self._workers:
                if job in worker.tasks:
                    # The agent kills the process running it and reports the timeout.
                    self._send(worker, Message("cancel", {"task_id": job.id}))

    def _heartbeat(self) -> None:
        timeout = self._settings.heartbeat_timeout
        deadline = time.monotonic() - timeout
        for worker in self._workers:
            peer: _Peer = worker.endpoint
            while peer.outbox and peer.outbox[0][0].done:
                peer.outbox.popleft()
            if peer.last_seen < deadline:
                self._lose(worker, f"silent for over {timeout} s")
            elif peer.outbox and peer.outbox[0][1] < deadline:
                self._lose(worker, f"it took nothing of what it was sent for over {timeout} s: "
                           "it stopped reading")
            else:
                self._send(worker, Message("heartbeat", {}))

    def _send(self, worker: Worker[Job], msg: Message) -> bool:
        """Hand ``msg`` to ZeroMQ without waiting; False when the worker is lost
        instead (gone, or its queue is full: it stopped reading). Raises
        ``TypeError``/``ValueError`` for a message the protocol cannot carry."""
        peer: _Peer = worker.endpoint
        try:
            sent = self._channel.try_send(msg, peer.identity, track=True)
        except ChannelError:
            self._lose(worker, "unreachable")
            return False
        if sent is False:
            self._lose(worker, f"its queue is full ({_OUTBOX} messages it has not taken): "
                       "it stopped reading")
            return False
        if isinstance(sent, zmq.MessageTracker) and not sent.done:
            while peer.outbox and peer.outbox[0][0].done:
                peer.outbox.popleft()
            peer.outbox.append((sent, time.monotonic()))
        return True

    def _ignore(self, identity: bytes, what: str) -> None:
        self._ignored += 1
        if self._ignored <= 10 or self._ignored % 1000 == 0:  # a flood must not flood the log
            log.warning("ignored %s (peer %s; %d ignored so far)", what, identity.hex(),
                        self._ignored)

    def _lose(self, worker: Worker[Job], why: str) -> None:
        if worker.id not in self._workers.workers:
            return
        self._lost += 1
        loss = self._workers.lose(worker)
        self._by_identity.pop(worker.endpoint.identity, None)
        peer: _Peer = worker.endpoint
        log.warning("worker %s (%s pid %d) lost: %s", peer.name, peer.host, peer.pid, why)
        # A remote worker runs many tasks at once: any of them may have started.
        held = ([loss.running] if loss.running is not None else []) + loss.unstarted
        for job in held:
            self._scheduler._finish(job, False, WorkerLostError(
                peer.pid, None, f"{job.id} on {peer.name}@{peer.host} ({why})"))

    def _forget(self, worker: Worker[Job]) -> None:
        self._workers.lose(worker)
        self._by_identity.pop(worker.endpoint.identity, None)

    def _fail_all(self, error: BaseException) -> None:
        jobs = list(self._inbox)
        self._inbox.clear()
        for worker in self._workers:
            loss = self._workers.lose(worker)
            jobs += ([loss.running] if loss.running is not None else []) + loss.unstarted
        for job in jobs:
            self._scheduler._finish(job, False, error, pump=False)
