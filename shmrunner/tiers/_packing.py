"""Packing: which remote worker takes the next call, when calls are tiny.

Data flow (the hub thread only)::

    result of a job -> learn(job, fast): the pacing verdict (Lifecycle.pace)
                       of the message it came in, kept per function
    _assign         -> tiny(job): its function's last verdict was fast
                    -> pick(tiny) -> the worker to fill, or None: wait

Why: dealt evenly (Lifecycle.pick: an idle worker first, then the most
room), a stream of tiny calls wakes every connected agent, each for a
task or two. On a host that runs more agents than it has cores, each
wake-up costs more than the task, and throughput falls with every agent
added (bench_scale.py: 64 one-process agents on 2 cores gave 56 % of 4).
So a call of a function known to be tiny goes

1. to a busy worker that is turning tasks over (its oldest task started
   within ``_HEAD_WINDOW``, stretched like the pacing on an oversubscribed
   host) and is not topped up (``Peers.topped_up``: it takes a batch, not
   a task or two), the one with the most room; else
2. to an idle worker, a fast one first, unless its host already has
   ``_BUSY_PER_CPU`` busy worker processes per core (``hello.cpus``; one
   worker per host is always allowed); else
3. nowhere while an idle worker was refused in 2: the call waits in the
   hub for room on the busy ones (they are fast, and the hub looks again
   within ``_HEAD_WINDOW``); with no idle worker at all, Lifecycle.pick.

Any other call -- a function never seen, or last seen slow -- is dealt as
before, so slow tasks spread over idle agents and never wait behind a
batch while one idles (the head-of-line rule of the local engine,
``worker/lifecycle.py``). A tiny function's call that turns out long
holds back what was packed behind it for one task, and nothing more is
packed behind it once it has run past the window.
"""

from __future__ import annotations

import time
from typing import Any

from .._job import Job
from ..worker.lifecycle import Worker
from ._peers import Peer, Peers

__all__ = ["Packer"]

# Busy worker processes per core of a host that tiny calls are spread over: an
# agent is two processes (its loop and its pool process), and beyond this the
# host's cores switch between processes more than they run tasks (bench_scale.py).
_BUSY_PER_CPU = 2
# A busy worker whose oldest task started longer ago than this (stretched by its
# host's processes per core) is not packed behind: that task may be a long one.
_HEAD_WINDOW = 10e-3
_KINDS = 256  # functions whose verdict is remembered (the oldest is forgotten)


def _kind(fn: Any) -> Any:
    """The key of a call's function: its 'module:function' reference, or the
    callable's identity (an id reused after it is gone misleads one verdict)."""
    return fn if isinstance(fn, str) else id(fn)


class Packer:
    """The packing rule over ``peers`` (see the module docstring)."""

    def __init__(self, peers: Peers) -> None:
        self._peers = peers
        self._fast: dict[Any, bool] = {}  # function -> its last pacing verdict
        self.recheck = _HEAD_WINDOW  # seconds before the hub looks again at held calls

    def learn(self, job: Job, fast: bool) -> None:
        """A result of ``job`` came in a message the pacing rule found ``fast``."""
        kinds = self._fast
        kinds[_kind(job.fn)] = fast
        if len(kinds) > _KINDS:
            del kinds[next(iter(kinds))]

    def tiny(self, job: Job) -> bool:
        return self._fast.get(_kind(job.fn), False)

    def pick(self, tiny: bool) -> Worker[Job] | None:
        """The worker to fill with the next calls (see the module docstring)."""
        lifecycle = self._peers.lifecycle
        if not tiny:
            return lifecycle.pick()
        now = time.monotonic()
        busy: dict[str, int] = {}  # host -> processes of its workers turning tasks over
        best: Worker[Job] | None = None
        best_free = 0
        idle: list[Worker[Job]] = []
        for worker in lifecycle.workers.values():
            free = worker.free
            peer: Peer = worker.endpoint
            if worker.tasks:
                if now - worker.head_since < _HEAD_WINDOW * self._peers.stretch(peer):
                    busy[peer.host] = busy.get(peer.host, 0) + peer.capacity
                    if free > best_free and not Peers.topped_up(worker):
                        best, best_free = worker, free
            elif free:
                idle.append(worker)
        if best is not None:
            return best
        slow: Worker[Job] | None = None
        for worker in idle:
            peer = worker.endpoint
            used = busy.get(peer.host, 0)
            if (peer.cpus is None or not used
                    or used + peer.capacity <= _BUSY_PER_CPU * peer.cpus):
                if worker.capacity == worker.fast_capacity:
                    return worker
                slow = slow or worker
        if slow is not None or idle:
            return slow  # None: every idle worker is on a host busy enough
        return lifecycle.pick()
