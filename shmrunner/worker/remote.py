"""The remote worker agent: ``shmrunner worker --connect ADDR``.

Data flow::

    scheduler ROUTER <== DEALER socket (this thread only) ==> agent loop
        task   -> resolve the function -> process engine (_engine.py) on this
                  host: shared-memory workers, the same lifecycle as the Pool
                  (a dead process is reaped, replaced, its task reported lost);
                  torch, Arrow and pandas values arrive unbuilt (decoded with
                  defer_foreign: this loop never imports those libraries) and
                  are built in the process that runs the task
        cancel -> ProcessEngine.kill: the process running the task is killed, the task
                  fails with TaskTimeoutError, or TaskCancelledError for a cancel
                  marked "now" (killed at once) (only a task of this connection's
                  session still running here)
        results <- the engine's manager thread appends them to a deque and,
                   after each batch it read (on_results), sends them itself
                   when this loop is asleep (transport/_gate.py: one thread at
                   a time uses the socket; no thread hop on the latency path),
                   else wakes this loop, which sends them; each to the session
                   whose task it was, or nowhere
        logs    <- a task's log records ride in its result; a long task's early
                   ones (on_logs, not final) go the same way ahead of it, as a
                   "logs" message
        welcome -> names the scheduler's session; a new one means the old
                   scheduler is gone: its tasks are stopped, its results dropped
        heartbeats both ways; no word from the scheduler for heartbeat_timeout
        -> the agent drops the connection and says hello again (the scheduler
        restarted, or the network was cut): it reconnects by itself. An
        unexpected error in this loop is logged, counted and ends the
        connection the same way, never the agent.
        never welcomed -> until its first welcome the agent may be talking to
        the wrong thing (a daemon's clients address, another program): an
        answer that is not the protocol's, or no welcome within join_timeout,
        ends the agent with one line naming the address (run() raises
        ShmrunnerError). Once welcomed, it reconnects forever.

SIGTERM or SIGINT: the agent says ``bye`` (the scheduler stops sending work),
finishes the tasks it holds, sends their results and exits 0.

With ``slots`` (``--slots``) the agent runs no task itself: its processes
each hold their own connection to the scheduler and it supervises them
(``_slots.py``): it says hello with ``slots: {group, count}``, forks them
after each welcome, kills one when the scheduler's cancel names its task
(``seq``, ``after``) or it goes over ``memory_limit``, and reports every end
of one as ``lost`` (why: ``timeout``, ``cancelled``, ``memory``, ``oom`` when the
kernel's OOM killer killed it, else ``died``). Its heartbeats cover its slots.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

from .. import _memsize
from .._allowlist import AllowList
from .._engine import EngineSettings, ProcessEngine, Task
from .._tasklogs import Record, engine_setting
from .._wakeup import Wakeup
from ..config import WorkerSettings
from ..errors import ShmrunnerError, TaskCancelledError, TaskTimeoutError
from ..transport._gate import SocketGate
from ..transport.protocol import MAX_BATCH, MAX_CAPACITY, MAX_CPUS, Message, _pickle_dumps
from ..transport.zmqchannel import ChannelError, ChannelOptions, ZmqChannel, client_keys
from ._slots import Slots, SlotSpec, lost_body
from ._taskcall import call_pickled, resolve, result_body, send_results

__all__ = ["Agent", "run_agent"]

log = logging.getLogger("shmrunner.worker")

_ACCEPT = frozenset({"welcome", "task", "tasks", "heartbeat", "cancel", "shutdown"})
_DRAIN_GRACE = 0.2  # seconds without new work before a draining agent exits
# How soon to ask ProcessEngine.kill again about a task that is not running yet (its start
# usually comes with another task's result, which wakes the loop anyway): the
# first retry, doubled up to the cap.
_CANCEL_RETRY, _CANCEL_RETRY_MAX = 0.02, 1.0


_Key = tuple[str, int]  # (the scheduler's session, its task id): unique across restarts


class _Reply:
    """The engine's :class:`~shmrunner._sink.ResultSink` for one task: queues
    (key, task, ok, value, logs) for the agent loop to send."""

    __slots__ = ("agent", "key", "task", "logs")

    def __init__(self, agent: Agent, key: _Key) -> None:
        self.agent = agent
        self.key = key
        self.task: Task | None = None
        self.logs: list[Record] | None = None  # what the task logged (engine's on_logs)

    def settle(self, index: int, ok: bool, value: Any) -> None:
        # No wake-up: on the manager thread, its on_results (Agent._flush) follows
        # each batch of results; elsewhere it is the agent loop, which sends
        # before it sleeps. (A crashed manager thread's last failures wait for
        # the loop's next round: within a heartbeat interval.)
        self.agent._completed(self.key, self.task, ok, value, self.logs, wake=False)
        self.logs = None


def _keep_logs(task: Task, pid: int | None, records: list[Record], final: bool) -> None:
    """The engine's ``on_logs``: a task's last records ride with its result; a
    long task's early ones go out at once, as a ``logs`` message."""
    reply = task.result
    if isinstance(reply, _Reply):
        if final:
            reply.logs = records if reply.logs is None else reply.logs + records
        else:
            reply.agent._completed(reply.key, task, None, None, records)


class Agent:
    def __init__(self, settings: WorkerSettings,
                 context: multiprocessing.context.BaseContext | None = None) -> None:
        if settings.connect is None:
            raise ShmrunnerError("a worker needs the scheduler's address: --connect ADDR")
        self.settings = settings
        self.processes = settings.processes or os.cpu_count() or 1
        self.name = settings.name or f"{socket.gethostname()}-{os.getpid()}"
        self._ctx = context or multiprocessing.get_context()
        self._done: collections.deque[
            tuple[_Key, Task | None, bool | None, Any, list[Record] | None]] = collections.deque()
        self._running: dict[_Key, Task] = {}
        # Cancels ProcessEngine.kill put off: why, the seconds the task must have run
        # first, and how many times it was asked; when to ask again at the latest.
        self._cancels: dict[_Key, tuple[BaseException, float, int]] = {}
        self._cancel_at: float | None = None
        self._timeouts: dict[_Key, float] = {}  # the running tasks' timeouts (those with one)
        # The session of the scheduler this agent last joined, and the one of the
        # current connection (None until its welcome): tasks and cancels belong to
        # the connection's session, and results are sent only to their own session.
        self._joined: str | None = None
        self._session_id: str | None = None
        # Until the first welcome, whoever answers may be no scheduler at all:
        # when the agent first said hello, and why it gave up (then run() raises).
        self._first_hello: float | None = None
        self._wrong_endpoint: str | None = None
        self.refused = 0  # tasks that arrived before a welcome (no session to file them)
        self.errors = 0  # unexpected exceptions the agent loop recovered from
        self._beat = (settings.heartbeat_interval, settings.heartbeat_timeout)
        self._wakeup = Wakeup()
        self._stopping = threading.Event()
        self._core: ProcessEngine | None = None
        # The current connection, for the manager thread's _flush: the socket
        # is used by whoever holds the gate.
        self._gate: SocketGate | None = None
        self._channel: ZmqChannel | None = None
        self._flush_error: Exception | None = None  # a _flush send that raised
        self._allowed = AllowList(settings.allowed_functions, "worker.allowed_functions")
        self._slots: Slots | None = None  # with settings.slots: the processes it supervises

    def stop(self) -> None:
        """Drain and exit: safe from a signal handler or another thread."""
        self._stopping.set()
        self._wakeup.wake()

    def run(self) -> int:
        logs = engine_setting(self.settings.task_logs, self.settings.task_log_bytes,
                              "worker.task_logs")
        if self.settings.slots:
            self._slots = Slots(
                SlotSpec(self.settings, client_keys(self.settings.curve_secret_key,
                                                    self.settings.curve_server_key),
                         self.name, os.getpid(), logs),
                min(self.processes, MAX_CAPACITY), self._ctx, self._wakeup,
                _memsize.resolve(self.settings.memory_limit))
            try:
                return self._serve()
            finally:
                self._slots.close()
                self._wakeup.close()
        self._core = ProcessEngine(EngineSettings(
            processes=self.processes, context=self._ctx,
            shm_threshold=self.settings.shm_threshold, task_logs=logs,
            memory_limit=self.settings.memory_limit,
            # One process: nothing to balance here (the hub paces what this agent
            # holds), so it gets tiny tasks many at a time however busy the host.
            fast_task=math.inf if self.processes == 1 else None),
            on_results=self._flush, on_logs=None if logs is None else _keep_logs)
        try:
            return self._serve()
        finally:
            if self._running:
                self._core.terminate()
            else:
                self._core.close()
            self._core.join()
            self._wakeup.close()

    def _serve(self) -> int:
        while True:
            if self._session():
                if self._wrong_endpoint is not None:
                    raise ShmrunnerError(self._wrong_endpoint)
                return 0

    # --- one connection ------------------------------------------------------------------

    def _session(self) -> bool:
        """Serve one connection; True when the agent should exit, False to reconnect."""
        settings = self.settings
        channel = ZmqChannel("dealer", ChannelOptions(
            max_bytes=settings.max_message_bytes, allow_pickle=settings.allow_pickle,
            accept=_ACCEPT, curve=client_keys(settings.curve_secret_key,
                                              settings.curve_server_key),
            # The loop only forwards task values to its processes: importing torch or
            # pandas here (seconds) would stall heartbeats; the task's process does it.
            defer_foreign=True))
        self._session_id = None
        gate = SocketGate(channel.socket, self._wakeup)
        gate.enter()  # this loop holds the socket except while it sleeps
        self._gate, self._channel = gate, channel
        try:
            if self._first_hello is None:
                self._first_hello = time.monotonic()
            elif self._not_a_scheduler(0):
                return True
            channel.connect(settings.connect or "")
            hello = Message("hello", {"name": self.name, "host": socket.gethostname(),
                                      "pid": os.getpid(),
                                      "capacity": min(self.processes, MAX_CAPACITY),
                                      "cpus": min(os.cpu_count() or 1, MAX_CPUS),
                                      "allow_pickle": settings.allow_pickle})
            if self._slots is not None:  # new slots for a new connection
                self._slots.reset()
                hello.body["slots"] = {"group": self._slots.group, "count": self._slots.count}
            said_hello = False
            # Until the welcome says otherwise (the scheduler's settings win).
            self._beat = (settings.heartbeat_interval, settings.heartbeat_timeout)
            last_heard = time.monotonic()
            next_beat = last_heard + self._beat[0]
            said_bye = False
            idle_since: float | None = None
            while True:
                # Sent once the connection is up: a send with no pipe blocks for
                # the whole send timeout (a refused CURVE key), deaf to SIGTERM.
                if not said_hello and channel.writable():
                    channel.send(hello)
                    said_hello = True
                # Sleep until the next deadline (a heartbeat, a cancel to ask
                # again, the end of a drain's grace); a message, a result (the
                # engine wakes the pipe), a stop, or before the hello room to
                # send it, end the sleep sooner.
                wake_at = next_beat
                if self._cancel_at is not None:
                    wake_at = min(wake_at, self._cancel_at)
                if self._slots is not None and (due := self._slots.wake_at()) is not None:
                    wake_at = min(wake_at, due)
                if idle_since is not None:
                    wake_at = min(wake_at, idle_since + _DRAIN_GRACE)
                readable = gate.sleep(max(0.0, wake_at - time.monotonic()),
                                      writable=not said_hello)
                if self._flush_error is not None:  # the manager thread's send failed
                    error, self._flush_error = self._flush_error, None
                    raise error
                if readable:
                    batch: list[Task] = []
                    try:
                        while (received := channel.recv(0)) is not None:
                            last_heard = time.monotonic()
                            if not self._handle(received.message, batch):
                                self._stopping.set()
                    finally:  # accepted is accepted, even if a later message raised
                        if batch:  # one hand-over to the engine: they travel together
                            assert self._core is not None
                            self._core.submit(batch)
                    # A welcome may have shortened the interval.
                    next_beat = min(next_beat, last_heard + self._beat[0])
                if self._joined is None and self._not_a_scheduler(channel.rejected):
                    return True
                if self._slots is not None:
                    self._tend_slots(channel)
                else:
                    self._retry_cancels()
                self._send_results(channel)
                now = time.monotonic()
                if self._stopping.is_set():
                    if not said_bye:
                        if channel.writable():
                            channel.send(Message("bye", {"reason": "draining"}))
                        said_bye = True
                        if self._slots is not None:
                            self._slots.drain()
                    if self._running or (self._slots is not None and self._slots.alive()):
                        idle_since = None
                    elif idle_since is None:
                        idle_since = now
                    elif now - idle_since > _DRAIN_GRACE:
                        return True
                if now >= next_beat:
                    if channel.writable():  # no pipe: e.g. the scheduler refused our key
                        channel.send(Message("heartbeat", {}))
                    next_beat = now + self._beat[0]
                    if now - last_heard > self._beat[1]:
                        log.warning("no word from the scheduler at %s for %.1f s; reconnecting",
                                    settings.connect, now - last_heard)
                        return False
        except ChannelError as exc:
            log.warning("connection to %s failed (%s); reconnecting", settings.connect, exc)
            self._stopping.wait(settings.heartbeat_interval)  # pacing a retry; SIGTERM ends it
            return self._stopping.is_set()
        except Exception as exc:
            # A bug, or an input nobody foresaw: the agent must not die of it with
            # tasks in hand. A new connection starts clean; the scheduler loses the
            # old one (reruns what it held) and ignores its late results.
            self.errors += 1
            if self.errors <= 10 or self.errors % 1000 == 0:
                log.error("unexpected error (#%d) serving %s; reconnecting", self.errors,
                          settings.connect, exc_info=exc)
            self._stopping.wait(settings.heartbeat_interval)
            return self._stopping.is_set()
        finally:
            self._gate = self._channel = None
            channel.close()
            gate.exit()

    def _not_a_scheduler(self, rejected: int) -> bool:
        """Before the first welcome: whether to give up on this address (True,
        with the reason in ``_wrong_endpoint``): it answered with messages that
        are not the protocol's (``rejected``, or tasks before a welcome), or no
        welcome came within join_timeout. Not while draining: SIGTERM exits 0."""
        if self._joined is not None or self._stopping.is_set() or self._first_hello is None:
            return False
        address, timeout = self.settings.connect, self.settings.join_timeout
        hint = ("is it the daemon's workers address (daemon.workers, not daemon.clients) or "
                "a Scheduler's listen address, is that running, and does it accept this "
                "worker's CURVE key?")
        if rejected or self.refused:
            self._wrong_endpoint = (
                f"{address} did not answer as a shmrunner scheduler (it sent "
                f"{rejected + self.refused} message(s) that are not a scheduler's welcome): "
                f"{hint}")
        elif timeout is not None and time.monotonic() - self._first_hello > timeout:
            self._wrong_endpoint = (
                f"{address} did not answer as a shmrunner scheduler: no welcome within "
                f"{timeout:g} s of this worker's hello (worker.join_timeout): {hint}")
        return self._wrong_endpoint is not None

    def _handle(self, msg: Message, batch: list[Task]) -> bool:
        """Act on one message (tasks are appended to ``batch``); False on shutdown."""
        if self._slots is not None and msg.type in ("task", "tasks", "cancel"):
            if msg.type == "cancel" and self._session_id is not None and "slot" in msg.body:
                body = msg.body
                self._slots.stop(body["slot"], body.get("task_id", -1),
                                 "cancelled" if body.get("now") is True else "timeout",
                                 float(body.get("after", 0.0)), body.get("seq", 0),
                                 body.get("pid"))
            elif msg.type != "cancel" and self._session_id is not None:
                # A scheduler that knows slots deals to them, never here: this one
                # is older. Each task fails with the reason, rather than never returning.
                for body in (msg.body["tasks"] if msg.type == "tasks" else [msg.body]):
                    self._completed((self._session_id, body["task_id"]), None, False,
                                    ShmrunnerError(
                                        "this worker runs its tasks in its slots (--slots), "
                                        "which this scheduler does not know: upgrade it, or "
                                        "start the worker without --slots"))
        elif msg.type in ("task", "tasks") and self._session_id is None:
            self.refused += 1  # a scheduler always welcomes first: not one to trust
            log.warning("refused a %s message that came before the welcome", msg.type)
        elif msg.type == "task":
            self._accept(msg.body, batch)
        elif msg.type == "tasks":
            for body in msg.body["tasks"]:
                self._accept(body, batch)
        elif msg.type == "welcome":
            self._beat = (msg.body["heartbeat_interval"], msg.body["heartbeat_timeout"])
            self._join(msg.body["session"])
        elif msg.type == "cancel" and self._session_id is not None:
            # Only a task of this connection's session that is still running here:
            # task ids repeat across sessions, and a finished one has nothing to stop.
            key = (self._session_id, msg.body.get("task_id", -1))
            if key in self._running and msg.body.get("now") is True:  # Scheduler.cancel
                self._cancels[key] = (TaskCancelledError(
                    f"task {key[1]} was cancelled by its scheduler"), 0.0, 0)
                self._retry_cancels()
            elif key in self._running:
                self._cancels[key] = (TaskTimeoutError(
                    f"task {key[1]} ran past its timeout and was stopped"),
                    self._timeouts.get(key) or 0.0, 0)
                self._retry_cancels()
        elif msg.type == "shutdown":
            return False
        return True

    def _join(self, session: str) -> None:
        """The connection's welcome named ``session``. The scheduler holds none
        of what this worker ran before it: a different session than the last
        means that scheduler is gone (it restarted), and the same one has
        declared those tasks lost (a reconnect loses a worker's tasks there,
        and so does the silence that made this worker reconnect: a SIGSTOP, a
        network cut). Their results can never count, so their tasks are
        stopped, freeing the processes for the work to come (_send_results
        drops the results of another session)."""
        self._session_id = session
        if self._slots is not None:
            self._slots.start(session)
        if self._joined is not None and self._running:
            for key in list(self._running):
                why = (f"task {key[1]} belongs to scheduler session {key[0]}, which ended"
                       if key[0] != session else
                       f"task {key[1]} was lost by the scheduler when this worker reconnected")
                self._cancels[key] = (TaskCancelledError(why), 0.0, 0)
            log.info("joined scheduler session %s; dropped the work of session %s (%d tasks), "
                     "%s", session, self._joined, len(self._running),
                     "which ended" if session != self._joined else "which declared it lost")
            self._retry_cancels()
        self._joined = session

    def _retry_cancels(self) -> None:
        """ProcessEngine.kill refuses a task still queued behind another on its process
        ("ask again later"): ask again until it is running (then it is killed).
        Every round asks (a result may have started the task); ``_cancel_at``
        is the latest time to ask again: when the task will have run for its
        timeout, or after a backoff while it has not started."""
        if not self._cancels or self._core is None:
            self._cancel_at = None
            return
        now = time.monotonic()
        retry_at: float | None = None
        for key, (reason, timeout, tries) in list(self._cancels.items()):
            held = self._running.get(key)
            # The scheduler's clock started when it sent the task: the kill
            # waits until the task has *run* for its timeout here.
            if held is None or self._core.kill(held, reason, ran_for=timeout):
                del self._cancels[key]
                continue
            self._cancels[key] = (reason, timeout, tries + 1)
            started = held.started
            when = started + timeout if started is not None and started + timeout > now \
                else now + min(_CANCEL_RETRY_MAX, _CANCEL_RETRY * 2 ** min(tries, 16))
            retry_at = when if retry_at is None else min(retry_at, when)
        self._cancel_at = retry_at

    # --- slots ---------------------------------------------------------------------------

    def _tend_slots(self, channel: ZmqChannel) -> None:
        """A round of the slots' supervision; each end of one is told as ``lost``."""
        slots = self._slots
        assert slots is not None
        for ended in slots.tend():
            if ended.reason == "exited":
                continue  # drained (it said bye), or told to shut down
            if ended.reason == "died":
                log.warning("slot %d (pid %s) died while running task %s; a new one replaces it",
                            ended.index, ended.pid, ended.task_id)
            elif ended.reason == "oom":
                log.warning("slot %d (pid %s) was killed by the kernel's OOM killer (%s) while "
                            "running task %s; a new one replaces it", ended.index, ended.pid,
                            ended.evidence, ended.task_id)
            if self._session_id is not None and channel.writable():
                channel.send(Message("lost", lost_body(ended, slots.memory_limit)))

    def _accept(self, body: dict[str, Any], batch: list[Task]) -> None:
        assert self._core is not None and self._session_id is not None
        task_id = body["task_id"]
        key = (self._session_id, task_id)
        try:
            fn = body["fn"]
            self._allowed.check(fn, body["args"])  # before anything is imported
            if isinstance(fn, str):
                fn = resolve(fn)
            else:  # arrived pickled (cloudpickle): the engine's plain pickle may refuse it
                fn = functools.partial(call_pickled, _pickle_dumps(fn))
            reply = _Reply(self, key)
            task = reply.task = self._core.new_task(fn, tuple(body["args"]), body["kwargs"],
                                                    reply, report_start=bool(body.get("timeout")))
        except Exception as exc:
            self._completed(key, None, False, exc)
            return
        self._running[key] = task
        if body.get("timeout"):
            self._timeouts[key] = body["timeout"]
        batch.append(task)

    def _completed(self, key: _Key, task: Task | None, ok: bool | None, value: Any,
                   logs: list[Record] | None = None, *, wake: bool = True) -> None:
        """Queue a result for sending (``wake``: tell the agent loop); ``ok``
        None: only ``logs``, of a task that runs on (sent ahead of its result)."""
        self._done.append((key, task, ok, value, logs))
        if wake:
            self._wakeup.wake()

    def _flush(self) -> None:
        """The engine's ``on_results``, on its manager thread: send what
        finished, as one message, if the agent loop is asleep (the gate is
        free) and the send cannot wait (the socket has room); else wake the
        loop to send it. A send that raises ends the connection (the loop
        raises it), as it would have in the loop."""
        if not self._done:
            return
        gate, channel = self._gate, self._channel
        if gate is None or channel is None or not gate.try_enter():
            self._wakeup.wake()
            return
        try:
            if (self._gate is not gate or channel.closed or self._session_id is None
                    or len(self._done) > MAX_BATCH or not channel.writable()):
                self._wakeup.wake()
            else:
                self._send_results(channel)
        except Exception as exc:  # noqa: BLE001 (handed to the loop, which reconnects)
            self._flush_error = exc
            self._wakeup.wake()
        finally:
            gate.leave()

    def _send_results(self, channel: ZmqChannel) -> None:
        """Send what finished since the last round, as one message when several;
        only to the session that sent the task (others' results are dropped)."""
        session = self._session_id
        if session is None:  # not welcomed yet on this connection: keep them until then,
            for key, task, ok, _, _ in list(self._done):  # but they are no longer running
                if ok is not None and task is not None and self._running.get(key) is task:
                    del self._running[key]  # (a drain must not wait for a welcome)
                    self._timeouts.pop(key, None)
            return
        bodies: list[dict[str, Any]] = []
        while self._done and len(bodies) < MAX_BATCH:
            key, task, ok, value, logs = self._done.popleft()
            if ok is None:  # a running task's early log: ahead of its result, as it came
                if key[0] == session and logs and self._running.get(key) is task:
                    channel.send(Message("logs", {"session": session, "task_id": key[1],
                                                  "logs": logs}))
                continue
            if task is not None and self._running.get(key) is task:
                del self._running[key]  # not a newer attempt that reuses the id
                self._timeouts.pop(key, None)
            if key[0] != session:
                continue  # for a scheduler that is gone
            body = result_body(session, key[1], ok, value)
            if logs:
                body["logs"] = logs
            bodies.append(body)
        if bodies:
            send_results(channel, session, bodies)
        if self._done:
            self._wakeup.wake()  # more than one batch finished: go round again


def run_agent(settings: WorkerSettings) -> int:
    """Run an agent until SIGTERM/SIGINT (drains, then returns 0)."""
    if (settings.connect or "").startswith("tcp://") and settings.curve_server_key is None:
        # As the daemon refuses to serve tcp:// unauthenticated: here the risk
        # is the other way round, whoever answers at the address runs code.
        log.warning("connecting to %s without CURVE: whoever answers at that address can "
                    "run any function worker.allowed_functions allows, as this user; set "
                    "worker.curve_secret_key and worker.curve_server_key to authenticate "
                    "the scheduler", settings.connect)
    agent = Agent(settings)
    previous = {sig: signal.signal(sig, lambda *_: agent.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
