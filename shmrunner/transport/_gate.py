"""A ZeroMQ socket shared by its owner thread and helper threads, one at a time.

Data flow::

    owner thread (holds the gate, except while it sleeps)
        round: recv / send / bookkeeping ... -> sleep(): EVENTS says nothing
        waits? release the gate, OS poll on the socket's ZMQ_FD and the owner's
        wake-up pipe, take the gate back
    helper thread (a Scheduler caller, an engine's manager thread)
        try_enter() -- never waits --> sends itself (no thread hop, no wake-up)
                                       leave(): a message waiting? wake the owner
        gate taken -> it hands the work over as before (deque + wake-up pipe)

Why: handing a message to the owner thread through a wake-up pipe costs a
thread wake-up on the latency path (tens of µs on a busy host); a helper
that finds the owner asleep can use the socket itself. ZeroMQ sockets are
not thread-safe but may change threads across a full memory barrier: the
gate's lock is that barrier, and only its holder touches the socket.

ZMQ_FD is not "a message waits": it signals socket *commands*, and whoever
processes them (any send, recv or EVENTS read, in any thread) consumes the
signal. So the owner reads EVENTS before it sleeps, and a helper reads it
before it leaves and wakes the owner if a message arrived meanwhile.
"""

from __future__ import annotations

import math
import select
import threading
from typing import Any

import zmq

from .._wakeup import Wakeup

__all__ = ["SocketGate"]

# pyzmq's constants as plain ints: & and | on its enum flags run Python code
# (about a microsecond each), several times a round on the hub's hot path.
_POLLIN, _POLLOUT, _EVENTS = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.EVENTS)


class SocketGate:
    """Who may use ``socket`` now: the owner, or a helper that got in without waiting."""

    def __init__(self, socket: zmq.Socket[Any], wakeup: Wakeup) -> None:
        self._socket = socket
        self._wakeup = wakeup
        self._lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(int(socket.getsockopt(zmq.FD)), select.POLLIN)
        self._poll.register(wakeup.fd, select.POLLIN)

    # --- the owner ---------------------------------------------------------------------

    def enter(self) -> None:
        """The owner takes the gate (waits for a helper's send at most)."""
        self._lock.acquire()

    def exit(self) -> None:
        self._lock.release()

    def sleep(self, timeout: float | None, *, writable: bool = False) -> bool:
        """The owner, holding the gate, waits up to ``timeout`` seconds (None:
        no limit) for a message, a wake-up or, with ``writable``, room to send;
        helpers may use the socket meanwhile. True when a message waits.
        Raises ``zmq.ZMQError`` if the socket is gone."""
        want = _POLLIN | (_POLLOUT if writable else 0)
        events = self._events()
        if events & want or (timeout is not None and timeout <= 0):
            return bool(events & _POLLIN)
        wait_ms = -1 if timeout is None else math.ceil(timeout * 1000)
        self._lock.release()
        try:
            ready = self._poll.poll(wait_ms)
        finally:
            self._lock.acquire()
        if any(fd == self._wakeup.fd for fd, _ in ready):
            self._wakeup.drain()
        return bool(self._events() & _POLLIN)

    def _events(self) -> int:
        """ZMQ_EVENTS: what the socket could do now (reading it processes the
        socket's pending commands, which consumes ZMQ_FD's signal)."""
        return int(self._socket.getsockopt(_EVENTS))

    # --- helpers -----------------------------------------------------------------------

    def try_enter(self) -> bool:
        """A helper takes the gate if free (never waits); then it must ``leave``."""
        return self._lock.acquire(blocking=False)

    def leave(self) -> None:
        """A helper is done: wake the owner if a message now waits (the helper's
        socket calls may have consumed the signal the owner sleeps on)."""
        try:
            if self._events() & _POLLIN:
                self._wakeup.wake()
        except zmq.ZMQError:
            self._wakeup.wake()  # the owner finds out what happened
        finally:
            self._lock.release()
