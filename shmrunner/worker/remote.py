"""The remote worker agent: ``shmrunner worker --connect ADDR``.

Data flow::

    scheduler ROUTER <== DEALER socket (this thread only) ==> agent loop
        task   -> resolve the function -> Pool engine (_poolcore.Core) on this
                  host: shared-memory workers, the same lifecycle as the Pool
                  (a dead process is reaped, replaced, its task reported lost)
        cancel -> Core.kill: the process running the task is killed, the task
                  fails with TaskTimeoutError
        results <- the engine's thread appends to a deque and writes a wake-up
                   byte; this loop sends them (only this thread uses the socket)
        heartbeats both ways; no word from the scheduler for heartbeat_timeout
        -> the agent drops the connection and says hello again (the scheduler
        restarted, or the network was cut): it reconnects by itself.

SIGTERM or SIGINT: the agent says ``bye`` (the scheduler stops sending work),
finishes the tasks it holds, sends their results and exits 0.
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from typing import Any

import zmq

from .._allowlist import AllowList
from .._poolcore import Core, Task
from .._wakeup import Wakeup
from ..config import WorkerSettings
from ..errors import ShmrunnerError, TaskTimeoutError
from ..transport.protocol import (
    MAX_BATCH,
    Message,
    _pickle_dumps,
    exception_to_wire,
    resolve_function,
)
from ..transport.zmqchannel import ChannelError, ChannelOptions, ZmqChannel, client_keys

__all__ = ["Agent", "run_agent"]

log = logging.getLogger("shmrunner.worker")

_ACCEPT = frozenset({"welcome", "task", "tasks", "heartbeat", "cancel", "shutdown"})
_DRAIN_GRACE = 0.2  # seconds without new work before a draining agent exits


class _Reply:
    """The result object the engine settles: queues (task_id, ok, value)."""

    __slots__ = ("agent", "task_id")

    def __init__(self, agent: Agent, task_id: int) -> None:
        self.agent = agent
        self.task_id = task_id

    def _set(self, index: int, ok: bool, value: Any) -> None:
        self.agent._completed(self.task_id, ok, value)


class Agent:
    def __init__(self, settings: WorkerSettings,
                 context: multiprocessing.context.BaseContext | None = None) -> None:
        if settings.connect is None:
            raise ShmrunnerError("a worker needs the scheduler's address: --connect ADDR")
        self.settings = settings
        self.processes = settings.processes or os.cpu_count() or 1
        self.name = settings.name or f"{socket.gethostname()}-{os.getpid()}"
        self._ctx = context or multiprocessing.get_context()
        self._done: collections.deque[tuple[int, bool, Any]] = collections.deque()
        self._running: dict[int, Task] = {}
        self._timeouts: dict[int, float] = {}  # the running tasks' timeouts (those with one)
        self._cancels: dict[int, tuple[BaseException, float]] = {}  # cancels Core.kill put off
        self._beat = (settings.heartbeat_interval, settings.heartbeat_timeout)
        self._wakeup = Wakeup()
        self._stopping = threading.Event()
        self._core: Core | None = None
        self._allowed = AllowList(settings.allowed_functions, "worker.allowed_functions")

    def stop(self) -> None:
        """Drain and exit: safe from a signal handler or another thread."""
        self._stopping.set()
        self._wakeup.wake()

    def run(self) -> int:
        self._core = Core(self.processes, None, (), None, self._ctx, self.settings.shm_threshold)
        try:
            while True:
                if self._session():
                    return 0
        finally:
            if self._running:
                self._core.terminate()
            else:
                self._core.close()
            self._core.join()
            self._wakeup.close()

    # --- one connection ------------------------------------------------------------------

    def _session(self) -> bool:
        """Serve one connection; True when the agent should exit, False to reconnect."""
        settings = self.settings
        channel = ZmqChannel("dealer", ChannelOptions(
            max_bytes=settings.max_message_bytes, allow_pickle=settings.allow_pickle,
            accept=_ACCEPT, curve=client_keys(settings.curve_secret_key,
                                              settings.curve_server_key)))
        try:
            channel.connect(settings.connect or "")
            hello = Message("hello", {"name": self.name, "host": socket.gethostname(),
                                      "pid": os.getpid(), "capacity": self.processes,
                                      "allow_pickle": settings.allow_pickle})
            said_hello = False
            # Until the welcome says otherwise (the scheduler's settings win).
            self._beat = (settings.heartbeat_interval, settings.heartbeat_timeout)
            poller = zmq.Poller()
            poller.register(channel.socket, zmq.POLLIN)
            poller.register(self._wakeup.fd, zmq.POLLIN)
            last_heard = time.monotonic()
            next_beat = last_heard + self._beat[0]
            said_bye = False
            idle_since: float | None = None
            while True:
                # Sent once the connection is up: a send with no pipe blocks for
                # the whole send timeout (a refused CURVE key), deaf to SIGTERM.
                if not said_hello and _writable(channel):
                    channel.send(hello)
                    said_hello = True
                wait = max(0.0, next_beat - time.monotonic())
                if self._cancels or not said_hello:  # check often until then
                    wait = min(wait, 0.02)
                events = dict(poller.poll(round(wait * 1000)))
                if self._wakeup.fd in events:
                    self._wakeup.drain()
                if channel.socket in events:
                    batch: list[Task] = []
                    while (received := channel.recv(0)) is not None:
                        last_heard = time.monotonic()
                        if not self._handle(received.message, batch):
                            self._stopping.set()
                    if batch:  # one hand-over to the engine: they travel together
                        assert self._core is not None
                        self._core.submit(batch)
                    # A welcome may have shortened the interval.
                    next_beat = min(next_beat, last_heard + self._beat[0])
                self._retry_cancels()
                self._send_results(channel)
                now = time.monotonic()
                if self._stopping.is_set():
                    if not said_bye:
                        if _writable(channel):
                            channel.send(Message("bye", {"reason": "draining"}))
                        said_bye = True
                    if self._running:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = now
                    elif now - idle_since > _DRAIN_GRACE:
                        return True
                if now >= next_beat:
                    if _writable(channel):  # no pipe: e.g. the scheduler refused our key
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
        finally:
            channel.close()

    def _handle(self, msg: Message, batch: list[Task]) -> bool:
        """Act on one message (tasks are appended to ``batch``); False on shutdown."""
        assert self._core is not None
        if msg.type == "task":
            self._accept(msg.body, batch)
        elif msg.type == "tasks":
            for body in msg.body["tasks"]:
                self._accept(body, batch)
        elif msg.type == "welcome":
            self._beat = (msg.body["heartbeat_interval"], msg.body["heartbeat_timeout"])
        elif msg.type == "cancel":
            task_id = msg.body.get("task_id", -1)
            if task_id in self._running:
                self._cancels[task_id] = (TaskTimeoutError(
                    f"task {task_id} ran past its timeout and was stopped"),
                    self._timeouts.get(task_id) or 0.0)
                self._retry_cancels()
        elif msg.type == "shutdown":
            return False
        return True

    def _retry_cancels(self) -> None:
        """Core.kill refuses a task still queued behind another on its process
        ("ask again later"): ask again until it is running (then it is killed)."""
        assert self._core is not None
        for task_id, (reason, timeout) in list(self._cancels.items()):
            held = self._running.get(task_id)
            # The scheduler's clock started when it sent the task: the kill
            # waits until the task has *run* for its timeout here.
            if held is None or self._core.kill(held, reason, ran_for=timeout):
                del self._cancels[task_id]

    def _accept(self, body: dict[str, Any], batch: list[Task]) -> None:
        assert self._core is not None
        task_id = body["task_id"]
        try:
            fn = body["fn"]
            self._allowed.check(fn, body["args"])  # before anything is imported
            if isinstance(fn, str):
                fn = _resolve(fn)
            else:  # arrived pickled (cloudpickle): the engine's plain pickle may refuse it
                fn = functools.partial(_call_pickled, _pickle_dumps(fn))
            task = self._core.new_task(fn, tuple(body["args"]), body["kwargs"],
                                       _Reply(self, task_id))
        except Exception as exc:
            self._completed(task_id, False, exc)
            return
        self._running[task_id] = task
        if body.get("timeout"):
            self._timeouts[task_id] = body["timeout"]
        batch.append(task)

    def _completed(self, task_id: int, ok: bool, value: Any) -> None:
        """Called on the engine's thread: hand the result to the agent loop."""
        self._done.append((task_id, ok, value))
        self._wakeup.wake()

    def _send_results(self, channel: ZmqChannel) -> None:
        """Send what finished since the last round, as one message when several."""
        bodies: list[dict[str, Any]] = []
        while self._done and len(bodies) < MAX_BATCH:
            task_id, ok, value = self._done.popleft()
            self._running.pop(task_id, None)
            self._timeouts.pop(task_id, None)
            bodies.append(_result_body(task_id, ok, value))
        if len(bodies) > 1:
            try:
                channel.send(Message("results", {"results": bodies}))
                bodies = []
            except (TypeError, ValueError):
                pass  # one result cannot travel: send them one by one below
        for body in bodies:
            try:
                channel.send(Message("result", body))
            except (TypeError, ValueError) as exc:
                channel.send(Message("result", _result_body(body["task_id"], False, TypeError(
                    f"the result of task {body['task_id']} cannot be sent back: {exc}"))))
        if self._done:
            self._wakeup.wake()  # more than one batch finished: go round again


_resolve = functools.lru_cache(maxsize=1024)(resolve_function)


def _call_pickled(blob: bytes, /, *args: Any, **kwargs: Any) -> Any:
    return pickle.loads(blob)(*args, **kwargs)


def _writable(channel: ZmqChannel) -> bool:
    """Whether a send would not block. After a failed handshake (a CURVE key the
    scheduler refused) libzmq drops the socket's only pipe and a send would wait
    the whole send timeout; the heartbeat timeout then reconnects instead."""
    return bool(channel.socket.poll(0, zmq.POLLOUT))


def _result_body(task_id: int, ok: bool, value: Any) -> dict[str, Any]:
    if ok:
        return {"task_id": task_id, "ok": True, "value": value}
    cause = value.__cause__
    tb = str(getattr(cause, "tb", "")) if cause is not None else ""
    return {"task_id": task_id, "ok": False, "error": exception_to_wire(value, tb)}


def run_agent(settings: WorkerSettings) -> int:
    """Run an agent until SIGTERM/SIGINT (drains, then returns 0)."""
    agent = Agent(settings)
    previous = {sig: signal.signal(sig, lambda *_: agent.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
