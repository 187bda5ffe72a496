"""The remote tier's roster: the workers that said hello, and what the hub
knows of each.

Data flow (on the hub thread; only ``free`` and ``status`` are read from
others, over a copy, where a stale answer is harmless)::

    hello         -> join: a Peer (identity, advertised capacity, clocks) in the
                     shared Lifecycle bookkeeping (capacity + prefetch slots)
    any message   -> last_seen (results also go through Lifecycle.pace, the
                     one pacing rule, which gives a fast worker more slots;
                     timed from its last result or, if it idled since, from
                     when it was given work again; stretched on a host that
                     runs more worker processes than its hello said it has
                     cores: there a tiny task's turnaround is mostly waiting
                     for a core)
    send          -> track: a big message ZeroMQ has not taken yet
    heartbeat     -> verdict: silent too long, or stopped reading -> lose
                     (time the hub spent reading a refused message: excused)
    lose/forget   -> out of the roster; lose hands back every job it held
    slots         -> an agent that supervises slot processes (hello "slots")
                     holds no task itself (capacity 0) and is found by its
                     group; each slot (hello "slot") is a worker of capacity 1
                     linked to it: alive while its agent is (slots send no
                     heartbeats), out of the roster with it

Which jobs a worker holds, who has room and which job a lost worker was
running are :class:`~shmrunner.worker.lifecycle.Lifecycle`'s, as for local
processes; this module adds what only a network peer has.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import Any, TypedDict

import zmq

from .._job import Job
from ..worker.lifecycle import Lifecycle, Worker

__all__ = ["Peer", "Peers", "WorkerStatus"]

_FAST_TASK = 2e-3  # seconds between results under which a worker counts as fast
_FAST_PREFETCH = 32  # tasks a fast worker may hold beyond its capacity

class WorkerStatus(TypedDict):
    """One connected worker in :meth:`Scheduler.status`."""

    id: int  # its registration: a worker that rejoins gets a new one
    name: str
    host: str
    pid: int
    capacity: int
    busy: int  # tasks it holds (running or queued on it)
    draining: bool  # it said bye: it finishes what it holds and gets nothing new
    last_heartbeat: float  # seconds since it was last heard from


class Peer:
    """A remote worker as the hub knows it."""

    __slots__ = ("identity", "name", "host", "pid", "capacity", "cpus", "last_seen",
                 "allow_pickle", "outbox", "busy_since", "group", "slot_count", "slots",
                 "supervisor", "slot_index", "delivered", "ended", "ended_slots", "logged")

    def __init__(self, identity: bytes, body: dict[str, Any]) -> None:
        self.identity = identity
        self.name: str = body["name"]
        self.host: str = body["host"]
        self.pid: int = body["pid"]
        self.capacity: int = body["capacity"]
        self.cpus: int | None = body.get("cpus")  # optional (checked by the schema)
        self.last_seen = time.monotonic()
        self.allow_pickle = body.get("allow_pickle") is True  # optional: older agents
        # Big messages sent, not yet taken by ZeroMQ's I/O thread (tracker, when
        # sent): one stuck at the head for heartbeat_timeout means the peer stopped
        # reading. Small ones are copied by pyzmq and never tracked.
        self.outbox: collections.deque[tuple[zmq.MessageTracker, float]] = collections.deque()
        self.busy_since = 0.0  # when it was last sent a task while it held none
        # An agent with slots: its group, how many, and the slot workers by index.
        self.group: str | None = None
        self.slot_count = 0
        self.slots: dict[int, Worker[Job]] = {}
        # Its slots whose process ended, by pid, until its "lost" report on them.
        self.ended_slots: dict[int, Worker[Job]] = {}
        # A slot: the agent that supervises it, and its index there.
        self.supervisor: Worker[Job] | None = None
        self.slot_index = 0
        self.delivered = 0  # tasks sent to this slot (a task's place: Job.handle)
        self.ended = False  # a send found its connection gone: its agent's report is due
        # Characters of early log ("logs" messages) per (task id, attempt) it holds.
        self.logged: dict[tuple[int, int], int] = {}


class Peers:
    """The connected workers, by registration (``lifecycle``) and by ZeroMQ
    identity; ``lost`` counts the workers declared lost."""

    def __init__(self, prefetch: int) -> None:
        self._prefetch = prefetch
        # The pacing rule (Lifecycle.pace) lets a worker that turns tasks around
        # fast hold many more, so tiny tasks are pipelined over the network.
        self.lifecycle: Lifecycle[Job] = Lifecycle(None, 0, fast_task=_FAST_TASK)
        self._by_identity: dict[bytes, Worker[Job]] = {}
        self._per_host: dict[str, int] = {}  # host -> processes of its connected workers
        self._groups: dict[str, Worker[Job]] = {}  # slot group -> the agent supervising it
        self.lost = 0
        # Kept as the roster changes (every change goes through this class), so
        # that the Scheduler's room() and busy() cost O(1), not O(workers), per
        # submit; recounted at each heartbeat (recount) all the same.
        self._free = 0  # sum of the workers' free slots
        self.held = 0  # tasks the workers hold

    def __iter__(self) -> Iterator[Worker[Job]]:
        return iter(self.lifecycle)

    def free(self) -> int:
        """Jobs the workers can take now (read from any thread: a stale answer
        only delays or queues a job)."""
        return self._free

    def recount(self) -> None:
        """Count ``free`` and ``held`` afresh (the hub thread, at heartbeats)."""
        workers = list(self.lifecycle.workers.values())
        self._free = sum(worker.free for worker in workers)
        self.held = sum(len(worker.tasks) for worker in workers)

    def assign(self, worker: Worker[Job], job: Job) -> None:
        if not worker.tasks:
            worker.endpoint.busy_since = time.monotonic()
        before = worker.free
        self.lifecycle.assign(worker, job)
        self.held += 1
        self._free += worker.free - before

    def finish(self, worker: Worker[Job], task_id: int) -> Job | None:
        """Take ``task_id`` off what ``worker`` holds: the job, or None if it
        does not hold it."""
        before = worker.free
        job = self.lifecycle.finish(worker, task_id)
        if job is not None:
            self.held -= 1
            self._free += worker.free - before
        return job

    def retire(self, worker: Worker[Job]) -> None:
        """It said bye: no new jobs."""
        self._free -= worker.free
        self.lifecycle.retire(worker)

    def get(self, identity: bytes) -> Worker[Job] | None:
        return self._by_identity.get(identity)

    def group(self, group: str) -> Worker[Job] | None:
        """The agent whose slots join under ``group``, if connected."""
        return self._groups.get(group)

    def join(self, identity: bytes, body: dict[str, Any],
             supervisor: Worker[Job] | None = None) -> Worker[Job]:
        """Register a worker from its (validated) hello; a slot's with the
        agent that ``supervisor``s it (found by ``group``)."""
        peer = Peer(identity, body)
        slots = body.get("slots")
        if slots is not None:  # it runs no task itself: its slots do
            peer.capacity = 0
            peer.group, peer.slot_count = slots["group"], slots["count"]
            worker = self.lifecycle.add(peer, 0, fast_capacity=0)
            self._groups[peer.group] = worker
        else:
            worker = self.lifecycle.add(peer, peer.capacity + self._prefetch,
                                        fast_capacity=peer.capacity + _FAST_PREFETCH)
        if supervisor is not None:
            peer.supervisor, peer.slot_index = supervisor, body["slot"]["index"]
            supervisor.endpoint.slots[peer.slot_index] = worker
        self._by_identity[identity] = worker
        self._per_host[peer.host] = self._per_host.get(peer.host, 0) + peer.capacity
        self._free += worker.free
        return worker

    def pace(self, worker: Worker[Job], results: int) -> None:
        """``results`` arrived together from ``worker``: the pacing rule, with
        the turnaround stretched by its host's processes per core."""
        before = worker.free
        # Its turnaround counts from when it was last given work, not from a
        # result before it idled: after an idle spell, tiny tasks are still tiny.
        worker.last_result = max(worker.last_result, worker.endpoint.busy_since)
        self.lifecycle.pace(worker, results, stretch=self.stretch(worker.endpoint))
        self._free += worker.free - before

    def stretch(self, peer: Peer) -> float:
        """How much longer than its own time a task's turnaround is expected
        to take on ``peer``'s host: its connected processes per core, at least 1."""
        if peer.cpus is None:
            return 1.0
        return max(1.0, self._per_host.get(peer.host, 0) / peer.cpus)

    def _gone(self, worker: Worker[Job]) -> None:
        """Before ``worker`` leaves the lifecycle: out of the counts and maps."""
        self._free -= worker.free
        self.held -= len(worker.tasks)
        peer: Peer = worker.endpoint
        self._by_identity.pop(peer.identity, None)
        if peer.group is not None and self._groups.get(peer.group) is worker:
            del self._groups[peer.group]
        if peer.supervisor is not None:
            agent: Peer = peer.supervisor.endpoint
            if agent.slots.get(peer.slot_index) is worker:
                del agent.slots[peer.slot_index]
            if agent.ended_slots.get(peer.pid) is worker:
                del agent.ended_slots[peer.pid]
        left = self._per_host.get(peer.host, 0) - peer.capacity
        if left > 0:
            self._per_host[peer.host] = left
        else:
            self._per_host.pop(peer.host, None)

    def lose(self, worker: Worker[Job]) -> list[Job] | None:
        """Declare ``worker`` lost: the jobs it held (None if it was gone already)."""
        if worker.id not in self.lifecycle.workers:
            return None
        self.lost += 1
        self._gone(worker)
        loss = self.lifecycle.lose(worker)
        # A remote worker runs many tasks at once: any of them may have started.
        return ([loss.running] if loss.running is not None else []) + loss.unstarted

    def set_aside(self, slot: Worker[Job]) -> None:
        """``slot``'s process ended (its connection is gone, or a new process
        took its index): no new jobs; it keeps what it held until its agent's
        ``lost`` report (found by pid) says what became of it, or it is lost
        (``verdict``: its agent's heartbeats no longer cover it)."""
        peer: Peer = slot.endpoint
        if peer.ended or peer.supervisor is None:
            return
        peer.ended = True
        # Judged from now on by its own clock (verdict): a slot quiet while it
        # ran a long task must not be lost before its agent had a whole
        # heartbeat_timeout to report its end (its tasks would fail, unstarted).
        peer.last_seen = max(peer.last_seen, time.monotonic())
        self.retire(slot)
        agent: Peer = peer.supervisor.endpoint
        if agent.slots.get(peer.slot_index) is slot:
            del agent.slots[peer.slot_index]
        agent.ended_slots[peer.pid] = slot

    def drop(self, worker: Worker[Job]) -> list[Job]:
        """Take ``worker`` out of the roster, not counted as lost (its agent
        said why it ended): the jobs it held, in the order it was sent them."""
        if worker.id not in self.lifecycle.workers:
            return []
        jobs = list(worker.tasks)
        self._gone(worker)
        self.lifecycle.lose(worker)
        return jobs

    def forget(self, worker: Worker[Job]) -> None:
        """A drained worker that holds nothing leaves quietly."""
        if worker.id in self.lifecycle.workers:
            self._gone(worker)
        self.lifecycle.lose(worker)

    def drop_all(self) -> list[Job]:
        """The tier is ending: every job any worker held."""
        jobs: list[Job] = []
        for worker in self.lifecycle:
            self._gone(worker)
            loss = self.lifecycle.lose(worker)
            jobs += ([loss.running] if loss.running is not None else []) + loss.unstarted
        return jobs

    @staticmethod
    def topped_up(worker: Worker[Job]) -> bool:
        """A fast worker whose processes each have a task queued and that has
        room for less than half its prefetch: refilled once more results free
        half of it, so tiny tasks travel many per message and its agent wakes
        fewer times (it never runs dry: it still holds a queue)."""
        peer: Peer = worker.endpoint
        prefetch = worker.capacity - peer.capacity
        return (worker.capacity == worker.fast_capacity and len(worker.tasks) >= 2 * peer.capacity
                and worker.free < prefetch // 2)

    @staticmethod
    def track(worker: Worker[Job], sent: zmq.MessageTracker) -> None:
        """``sent`` is a big message ZeroMQ has not taken yet: watch it."""
        peer: Peer = worker.endpoint
        while peer.outbox and peer.outbox[0][0].done:
            peer.outbox.popleft()
        peer.outbox.append((sent, time.monotonic()))

    def excuse(self, seconds: float) -> None:
        """The hub spent ``seconds`` reading a message it refused: nobody else's
        could be read meanwhile, so that time is no peer's silence."""
        now = time.monotonic()
        for worker in self.lifecycle:
            peer: Peer = worker.endpoint
            peer.last_seen = min(now, peer.last_seen + seconds)

    @staticmethod
    def verdict(worker: Worker[Job], timeout: float, deadline: float) -> str | None:
        """Why ``worker`` is lost, at a heartbeat: silent for ``timeout`` (since
        before ``deadline``), or it took nothing it was sent for as long; None
        while it is alive."""
        peer: Peer = worker.endpoint
        while peer.outbox and peer.outbox[0][0].done:
            peer.outbox.popleft()
        # A slot sends no heartbeats: its agent's cover it (not once it has
        # ended and the agent's report on it is awaited).
        last_seen = peer.last_seen if peer.supervisor is None or peer.ended else max(
            peer.last_seen, peer.supervisor.endpoint.last_seen)
        if last_seen < deadline:
            return f"silent for over {timeout} s"
        if peer.outbox and peer.outbox[0][1] < deadline:
            return f"it took nothing of what it was sent for over {timeout} s: it stopped reading"
        return None

    def status(self) -> list[WorkerStatus]:
        now = time.monotonic()
        return [{"id": w.id, "name": w.endpoint.name, "host": w.endpoint.host,
                 "pid": w.endpoint.pid, "capacity": w.endpoint.capacity, "busy": len(w.tasks),
                 "draining": w.retiring, "last_heartbeat": round(now - w.endpoint.last_seen, 3)}
                for w in list(self.lifecycle.workers.values())]
