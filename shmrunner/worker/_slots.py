"""Slots: an agent's worker processes each talk to the hub themselves
(``shmrunner worker --slots``); the agent only supervises them.

Data flow::

    hub ROUTER <== DEALER of slot i (its own connection, the agent's CURVE key)
        hello {slot: {group, index}} -> the hub files it under its agent
        task(s) -> run here, in order, in this process's main thread
                   (TaskWords: what it runs, for the agent to read)
        results <- straight back; several at once when the next queued
                   call's function is known to take under _BATCH_TASK
        logs    <- what a task running over a second logs, as it logs (the
                   capture's sender, _tasklogs.py); the rest with its result
        no heartbeats of its own: its agent's cover it
    agent (worker/remote.py) over its own connection, off the task path:
        Slots.start(session) forks one process per slot after each new welcome
        hub's cancel {slot, seq, after} -> Slots.stop; each round of the agent's
        loop, Slots.tend (by Slots.wake_at at the latest):
            a stop whose task TaskWords shows running (for ``after``) -> kill
            memory_limit -> over_memory() -> kill
            a slot's end (the watch thread wakes the loop) -> reap() -> the
                agent says "lost {slot, task_id, reason}"; re-forked
                (a SIGKILL not sent here: "oom" with the evidence when the
                OOM-kill counter read before its fork rose, _memwatch.py)

Per task this removes the agent loop's wake, decode and encode, the hop to a
pool process and the agent manager's wake (docs/scaling.md, "Fewer hops").
A slot dies with its agent (PR_SET_PDEATHSIG); SIGTERM drains it (bye, the
tasks it holds, exit 0).
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from .._allowlist import AllowList
from .._wakeup import Wakeup
from ..config import WorkerSettings
from ..transport.protocol import MAX_CAPACITY, MAX_CPUS, MAX_EVIDENCE, Message
from ..transport.zmqchannel import ChannelOptions, CurveKeys, ZmqChannel
from . import _memwatch
from ._ended import EndWatch
from ._taskcall import call_task, result_body, send_results
from ._taskwords import TaskWords
from .loop import _die_with_owner, prepare_fork, sigterm_blocked

__all__ = ["Slots", "SlotSpec"]

log = logging.getLogger("shmrunner.worker")

_ACCEPT = frozenset({"welcome", "task", "tasks", "heartbeat", "shutdown"})
_DRAIN_GRACE = 0.2  # seconds without new work before a draining slot exits
# A result waits to travel with the next ones only while the next queued call's
# function last ran under this (so tiny calls come back many per message).
_BATCH_TASK = 0.5e-3
_BATCH_MAX = 256  # results in one message at most
_KINDS = 256  # functions whose last duration a slot remembers
_SIGNAL_CHECK = 0.5  # seconds an idle slot waits before it looks at its SIGTERM flag
# A slot that ends within _QUICK_DEATH of its start is re-forked after a delay
# that doubles with each such end (from _REFORK_DELAY, up to _REFORK_DELAY_MAX):
# one that cannot start (no memory, no file descriptors) must not fork in a loop.
_QUICK_DEATH = 1.0
_REFORK_DELAY, _REFORK_DELAY_MAX = 0.05, 5.0
# How soon to look again at a stop whose task has not started yet: the first
# retry, doubled up to the cap (as the agent's pool path does).
_STOP_RETRY, _STOP_RETRY_MAX = 0.02, 1.0
# Seconds a timed-out task gets beyond its timeout: a preemption between the
# slot's stamp and the function's first line must not stop it short of its time.
_KILL_MARGIN = 0.005
# Seconds a slot waits for its welcome: only a hub that restarted since its
# agent was welcomed never answers (then the agent reconnects and re-forks).
_WELCOME_WAIT = 10.0


@dataclass(frozen=True)
class SlotSpec:
    """What every slot of one agent is started with (forked: never pickled)."""

    settings: WorkerSettings
    curve: CurveKeys | None
    name: str
    owner_pid: int
    logs: tuple[int, int] | None  # (level, limit) of the task log capture, or None


# --- the slot process ------------------------------------------------------------------

def slot_main(spec: SlotSpec, group: str, index: int, session: str, words: TaskWords) -> None:
    """Serve the hub as slot ``index`` of ``group`` for ``session``."""
    _die_with_owner(spec.owner_pid, direct_child=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    # Started with SIGTERM blocked (Slots.refill): one sent meanwhile is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    settings = spec.settings
    capture = None
    if spec.logs is not None:
        from .._tasklogs import Capture

        capture = Capture(*spec.logs)
        capture.install(list(logging.getLogger().handlers))
    allowed = AllowList(settings.allowed_functions, "worker.allowed_functions")
    channel = ZmqChannel("dealer", ChannelOptions(
        max_bytes=settings.max_message_bytes, allow_pickle=settings.allow_pickle,
        accept=_ACCEPT, curve=spec.curve))
    try:
        channel.connect(settings.connect or "")
        _Slot(spec, group, index, session, words, channel, allowed, capture, stopping).serve()
    finally:
        channel.close(linger=1.0)


class _Slot:
    def __init__(self, spec: SlotSpec, group: str, index: int, session: str, words: TaskWords,
                 channel: ZmqChannel, allowed: AllowList, capture: Any,
                 stopping: threading.Event) -> None:
        self.spec, self.group, self.index, self.session = spec, group, index, session
        self.words = words
        self.channel, self.allowed, self.capture, self.stopping = (channel, allowed, capture,
                                                                   stopping)
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        # Function reference -> how long its last call ran (the newest _KINDS).
        self.took: dict[Any, float] = {}
        self.welcomed = False
        self.shutdown = False
        if capture is not None:  # a long task's records go out as it logs (_tasklogs.py)
            capture.sender = self._send_logs

    def _send_logs(self, task_id: int, records: list[Any]) -> None:
        # On this process's main thread (the capture's rule), which owns the socket.
        self.channel.send(Message("logs", {"session": self.session, "task_id": task_id,
                                           "logs": records}))

    def serve(self) -> None:
        settings, channel = self.spec.settings, self.channel
        hello = Message("hello", {
            "name": f"{self.spec.name}/{self.index}", "host": socket.gethostname(),
            "pid": os.getpid(), "capacity": 1, "cpus": min(os.cpu_count() or 1, MAX_CPUS),
            "allow_pickle": settings.allow_pickle,
            "slot": {"group": self.group, "index": self.index}})
        while not channel.writable():  # the connection is up: the hello cannot block
            if self.stopping.wait(0.01):
                return
        channel.send(hello)
        # Not welcomed in time: the hub does not know our agent (it restarted
        # meanwhile); the agent forks a new slot after its own new welcome.
        welcome_by: float | None = time.monotonic() + max(_WELCOME_WAIT,
                                                           settings.heartbeat_timeout)
        said_bye = False
        idle_since: float | None = None
        while not self.shutdown:
            if self.queue:
                self._run_queued()
                idle_since = None
                continue
            now = time.monotonic()
            if self.stopping.is_set():
                if not said_bye:
                    if channel.writable():  # no scheduler (gone): nobody to tell
                        channel.send(Message("bye", {"reason": "draining"}))
                    said_bye = True
                idle_since = idle_since or now
                if now - idle_since > _DRAIN_GRACE:
                    return
                wait = idle_since + _DRAIN_GRACE - now
            elif welcome_by is not None:
                if now > welcome_by:
                    log.warning("slot %d: no welcome from %s; exiting", self.index,
                                settings.connect)
                    os._exit(1)
                wait = welcome_by - now
            else:
                wait = _SIGNAL_CHECK
            # pyzmq's poll resumes after a signal's handler ran: SIGTERM is seen
            # when it returns, so it never waits long.
            if channel.poll(min(wait, _SIGNAL_CHECK)):
                self._receive()
                if welcome_by is not None and self.welcomed:
                    welcome_by = None

    def _receive(self) -> None:
        """Take every message waiting (the first is there: poll or readable said so)."""
        while (received := self.channel.recv(0)) is not None:
            msg = received.message
            if msg.type == "task" and self.welcomed:
                self.queue.append(msg.body)
            elif msg.type == "tasks" and self.welcomed:
                self.queue.extend(msg.body["tasks"])
            elif msg.type == "welcome":
                if msg.body["session"] != self.session:
                    log.warning("slot %d: welcomed by another scheduler session; exiting",
                                self.index)
                    os._exit(1)  # our agent re-forks us for its own session
                self.welcomed = True
            elif msg.type == "shutdown":
                self.shutdown = True
            if not self.channel.readable():
                return

    def _run_queued(self) -> None:
        """Run what is queued, in order; results go back at once, or many per
        message while the next call is known to be tiny."""
        bodies: list[dict[str, Any]] = []
        while self.queue:
            body = self.queue.popleft()
            fn = body.get("fn")
            started = time.monotonic()
            if self.capture is not None:
                self.capture.begin(body["task_id"])
            # Its clock starts just before its function is called (a timeout is
            # the time it ran), and the kill waits that long from here.
            ok, value = call_task(self.allowed, body, functools.partial(
                self.words.begin, self.index, body["task_id"]))
            took = self.took
            took[_kind(fn)] = time.monotonic() - started
            if len(took) > _KINDS:
                del took[next(iter(took))]  # the oldest
            result = result_body(self.session, body["task_id"], ok, value)
            if self.capture is not None and (records := self.capture.take()):
                result["logs"] = records
            del value
            bodies.append(result)
            if not self.queue and self.channel.readable():
                self._receive()  # tasks that came meanwhile keep the batch going
            if (not self.queue or len(bodies) >= _BATCH_MAX
                    or self.took.get(_kind(self.queue[0].get("fn")), 1.0) >= _BATCH_TASK):
                send_results(self.channel, self.session, bodies)
                bodies = []
            self.words.end(self.index)
        if bodies:
            send_results(self.channel, self.session, bodies)


def _kind(fn: Any) -> Any:
    """A call's function as ``took`` keys it: its reference, or "a pickled one"
    (each message decodes a new object, so no identity carries over)."""
    return fn if isinstance(fn, str) else None


# --- the agent's side --------------------------------------------------------------------

@dataclass
class Ended:
    """A slot process that ended: killed here (``reason``) or died by itself."""

    index: int
    pid: int | None
    task_id: int | None  # the task it was running, by its TaskWords
    # "died", "oom" (the kernel's OOM killer), "exited" (status 0: drained), or
    # why it was killed here: "timeout", "cancelled", "memory"
    reason: str
    size: int | None = None  # the private memory it used, for "memory"
    evidence: str | None = None  # how we know, for "oom"


class Slots:
    """The agent's slot processes: forked per scheduler session, watched,
    killed on request, re-forked when they end (unless draining)."""

    def __init__(self, spec: SlotSpec, count: int, context: multiprocessing.context.BaseContext,
                 wakeup: Wakeup, memory_limit: int | None) -> None:
        self.spec = spec
        self.count = count
        self._ctx: Any = context
        self._wakeup = wakeup
        self.memory_limit = memory_limit
        self.words = TaskWords(count)
        self.group = secrets.token_hex(16)  # new for each connection of the agent (reset)
        self.session: str | None = None
        self.draining = False
        self._procs: list[BaseProcess | None] = [None] * count
        self._ends: list[EndWatch | None] = [None] * count  # what the watch thread waits on
        self._retired: list[EndWatch] = []  # of joined processes: the watch thread closes them
        self._started = [0.0] * count  # when each slot's process was forked
        self._quick_deaths = [0] * count  # its ends in a row within _QUICK_DEATH of a start
        self._refork_at = [0.0] * count  # not before (monotonic s)
        self._next_refill: float | None = None  # when refill has a slot to fork again
        # Stops still to act on: (slot, task id) -> (reason, seconds it must have
        # run, its place in the slot's order, the slot's pid, times looked at).
        self._stops: dict[tuple[int, int], tuple[str, float, int, int | None, int]] = {}
        self._stop_at: float | None = None  # when to look at them again at the latest
        self._next_memory_check = 0.0
        self._killed: dict[int, Ended] = {}  # pid -> why it was killed here
        # Each slot's OOM-kill counter as read before its fork, and the counts
        # already put down to a death (one OOM kill explains one death only).
        self._oom: list[_memwatch.OomSnapshot | None] = [None] * count
        self._oom_claimed: dict[str, int] = {}
        self._lock = threading.Lock()  # the process list, for the watch thread
        self._reload_r, self._reload_w = os.pipe()
        self._watch = threading.Thread(target=self._watch_deaths, name="shmrunner-slot-watch",
                                       daemon=True)
        self._closed = False
        self._watch.start()

    def pid(self, index: int) -> int | None:
        proc = self._procs[index]
        return proc.pid if proc is not None else None

    def alive(self) -> int:
        return sum(1 for proc in self._procs if proc is not None)

    def reset(self) -> None:
        """The agent opens a new connection: its slots end, and the next ones
        join under a new group (the hub forgets the old one with the old
        connection; a late hello of an old slot is refused)."""
        self.kill_all()
        self._stops.clear()
        self.session = None
        self.group = secrets.token_hex(16)

    def start(self, session: str) -> None:
        """The agent's connection was welcomed into ``session``: fork the slots."""
        self.session = session
        self.refill()

    def stop(self, index: int, task_id: int, reason: str, after: float, seq: int,
             pid: int | None) -> None:
        """The scheduler stops ``task_id``, the ``seq``-th task sent to slot
        ``index`` (process ``pid``): ``reason`` "cancelled" at once, "timeout"
        once it has run ``after`` seconds. Acted on by :meth:`tend`."""
        if index < self.count and (len(self._stops) < self.count * MAX_CAPACITY
                                   or (index, task_id) in self._stops):
            self._stops[(index, task_id)] = (reason, after, seq, pid, 0)
        # else: more stops than the slots could hold tasks (only a hostile scheduler
        # names that many): they could never all be due, and must not grow without end.

    def wake_at(self) -> float | None:
        """When :meth:`tend` has something to do at the latest (None: on events only)."""
        times = [t for t in (self._stop_at, self._next_refill) if t is not None]
        if self.memory_limit is not None:
            times.append(self._next_memory_check)
        return min(times, default=None)

    def tend(self) -> list[Ended]:
        """One round of supervision: memory, stops due, ends, re-forks; the
        slot processes that ended since the last round (for ``lost``)."""
        now = time.monotonic()
        if self.memory_limit is not None and now >= self._next_memory_check:
            self.over_memory()
            self._next_memory_check = now + _memwatch.WATCH_INTERVAL
        self._apply_stops(now)
        ended = self.reap()
        for gone in ended:  # its process took its tasks with it
            for key in [key for key in self._stops if key[0] == gone.index]:
                del self._stops[key]
        self.refill()
        return ended

    def _apply_stops(self, now: float) -> None:
        """Kill a slot only while its task word shows the task named running (and,
        for a timeout, for long enough); fewer started than ``seq``: not yet."""
        retry_at: float | None = None
        for key, (reason, after, seq, pid, tries) in list(self._stops.items()):
            index, task_id = key
            if pid is not None and self.pid(index) != pid:
                del self._stops[key]  # that process is gone: its tasks with it
                continue
            started, running, since = self.words.read(index)
            if started < seq:  # not started yet: look again
                when = now + min(_STOP_RETRY_MAX, _STOP_RETRY * 2 ** min(tries, 16))
                self._stops[key] = (reason, after, seq, pid, tries + 1)
            elif started == seq and running == task_id:
                if reason == "cancelled" or now - since >= after + _KILL_MARGIN:
                    self.kill(index, reason, task_id)
                    del self._stops[key]
                    continue
                when = since + after + _KILL_MARGIN
            else:  # over: its result is on its way
                del self._stops[key]
                continue
            retry_at = when if retry_at is None else min(retry_at, when)
        self._stop_at = retry_at

    def refill(self) -> None:
        """Fork a process for every empty slot whose delay is over (not while
        draining)."""
        self._next_refill = None
        if self.session is None or self.draining or self._closed:
            return
        now = time.monotonic()
        for index, proc in enumerate(self._procs):
            if proc is None and self._refork_at[index] > now:
                at = self._refork_at[index]
                self._next_refill = at if self._next_refill is None else min(self._next_refill,
                                                                             at)
            elif proc is None:
                self._started[index] = now
                self.words.reset(index)
                # Read here, not in the child: it starts in this process's cgroup.
                self._oom[index] = _memwatch.oom_snapshot(os.getpid())
                proc = self._ctx.Process(target=slot_main, name=f"shmrunner-slot-{index}",
                                         args=(self.spec, self.group, index, self.session,
                                               self.words),
                                         daemon=True)
                prepare_fork()
                # A fork child runs the agent's SIGTERM handler until slot_main
                # installs its own: a drain's SIGTERM in that window was lost and
                # the slot lingered until its welcome wait ran out (10 s).
                with sigterm_blocked():
                    proc.start()
                with self._lock:
                    self._procs[index] = proc
                    self._ends[index] = EndWatch(proc)
        self._reload()

    def reap(self) -> list[Ended]:
        """The slot processes that ended since the last call (their slots empty)."""
        ended = []
        for index, proc in enumerate(self._procs):
            if proc is None or proc.is_alive():
                continue
            proc.join()
            self._forget(index)
            why = self._killed.pop(proc.pid or -1, None)
            now = time.monotonic()
            if why is not None or now - self._started[index] >= _QUICK_DEATH:
                self._quick_deaths[index] = 0  # killed here, or it ran a while: at once
            else:
                self._refork_at[index] = now + min(
                    _REFORK_DELAY_MAX, _REFORK_DELAY * 2 ** min(self._quick_deaths[index], 16))
                self._quick_deaths[index] += 1
            if why is None:
                _, task_id, _ = self.words.read(index)
                evidence = (_memwatch.oom_evidence(self._oom[index], self._oom_claimed)
                            if proc.exitcode == -signal.SIGKILL else None)
                reason = ("exited" if proc.exitcode == 0
                          else "died" if evidence is None else "oom")
                why = Ended(index, proc.pid, task_id, reason, evidence=evidence)
            ended.append(why)
        if ended:
            self._reload()  # the watch thread waits on the slots left
        return ended

    def _forget(self, index: int) -> None:
        """Slot ``index``'s process is joined: empty the slot; its watch is closed
        by the watch thread, never while that thread may be waiting on it."""
        with self._lock:
            self._procs[index] = None
            watch, self._ends[index] = self._ends[index], None
            if watch is not None:
                self._retired.append(watch)

    def kill(self, index: int, reason: str, task_id: int | None,
             size: int | None = None) -> None:
        """SIGKILL slot ``index`` for ``task_id`` (reap reports its end, with
        ``reason`` and that task: if the slot moved on to another meanwhile,
        that one is not blamed; the hub runs it again)."""
        proc = self._procs[index]
        if proc is None or proc.pid in self._killed:
            return
        self._killed[proc.pid or -1] = Ended(index, proc.pid, task_id, reason, size)
        proc.kill()

    def over_memory(self) -> None:
        """Kill the slots over ``memory_limit`` (reap reports them)."""
        limit = self.memory_limit
        if limit is None:
            return
        for index, proc in enumerate(self._procs):
            if proc is None or proc.pid is None or proc.pid in self._killed:
                continue
            bound = _memwatch.anonymous_memory(proc.pid)
            if bound is None or bound <= limit:
                continue
            _, task_id, _ = self.words.read(index)
            size = _memwatch.private_memory(proc.pid)
            if size is not None and size > limit:
                log.info("slot %d (pid %d) uses %d bytes of private memory, over its "
                         "memory_limit of %d: killed", index, proc.pid, size, limit)
                self.kill(index, "memory", task_id, size)

    def drain(self) -> None:
        """SIGTERM every slot: each finishes what it holds and exits."""
        self.draining = True
        for proc in self._procs:
            if proc is not None:
                proc.terminate()

    def kill_all(self) -> None:
        self._refork_at = [0.0] * self.count  # a new session starts them at once
        self._quick_deaths = [0] * self.count
        for index, proc in enumerate(self._procs):
            if proc is not None:
                proc.kill()
                proc.join()
                self._forget(index)
                self._killed.pop(proc.pid or -1, None)
        self._reload()

    def close(self) -> None:
        self._closed = True
        self.kill_all()
        self._reload()
        self._watch.join()
        self._close_retired()
        os.close(self._reload_r)
        os.close(self._reload_w)

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().close()

    # --- the watch thread: wakes the agent loop when a slot process ends ------------------

    def _reload(self) -> None:
        os.write(self._reload_w, b"\0")

    def _watch_deaths(self) -> None:
        while not self._closed:
            with self._lock:
                self._close_retired()
                ends = {watch.fd for watch in self._ends if watch is not None}
            ready = multiprocessing.connection.wait([*ends, self._reload_r])
            if self._reload_r in ready:
                os.read(self._reload_r, 4096)
            if any(fd in ends for fd in ready):
                self._wakeup.wake()
                # Seen: wait for a reload (the loop reaps and re-forks) before
                # watching these again, so a reaped sentinel cannot spin here.
                os.read(self._reload_r, 4096)


def lost_body(ended: Ended, limit: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"slot": ended.index, "reason": ended.reason}
    if ended.task_id is not None:
        body["task_id"] = ended.task_id
    if ended.pid is not None:
        body["pid"] = ended.pid
    if ended.size is not None:
        body["size"] = ended.size
    if limit is not None and ended.reason in ("memory", "oom"):
        body["limit"] = limit
    if ended.evidence is not None:
        body["evidence"] = ended.evidence[:MAX_EVIDENCE]  # a cgroup path could be longer
    return body

