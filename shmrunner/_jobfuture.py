"""What a caller of :class:`~shmrunner.client.Client` holds while it waits.

A :class:`JobFuture` is settled by the client thread (the ``_ledger``): first
``set_accepted`` when the daemon has journaled the job, then its result or
exception. A :class:`WaitingCall` is one synchronous ``result(job_id)`` or
``status()`` call: the calling thread blocks on its event, the client thread
puts the daemon's reply in and sets it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .transport.protocol import Message

__all__ = ["JobFuture", "WaitingCall"]


class JobFuture(Future[Any]):
    """The Future of a job submitted to a daemon: ``job_id``, and whether the
    daemon has journaled it (from then on it survives a daemon restart)."""

    def __init__(self, job_id: str, owner: object = None) -> None:
        super().__init__()
        self.job_id = job_id
        self.owner = owner  # the Client that made it (its futures may be arguments)
        self._accepted = False
        # Set by the Client: sends the daemon a cancel of this job (never blocks).
        self.cancel_in_daemon: Callable[[str], None] | None = None
        self._decided = threading.Event()  # accepted, or settled without it
        self.add_done_callback(lambda _: self._decided.set())

    def cancel(self) -> bool:
        """Ask the daemon to cancel the job (without waiting for its answer): a
        job that has not started there settles with TaskCancelledError. Returns
        False as ``concurrent.futures`` does for a running future: the job is
        the daemon's from submit on (use ``Client.cancel(job_id)`` to learn the outcome)."""
        if not self.done() and self.cancel_in_daemon is not None:
            self.cancel_in_daemon(self.job_id)
        return super().cancel()

    def accepted(self) -> bool:
        """Whether the daemon said it journaled the job (durably accepted)."""
        return self._accepted

    def wait_accepted(self, timeout: float | None = None) -> bool:
        """Wait until the job is durably accepted (True), or until it settled
        without that or ``timeout`` seconds passed (False)."""
        self._decided.wait(timeout)
        return self._accepted

    def set_accepted(self) -> None:
        """For the client thread only (as ``set_result`` is for an Executor):
        the daemon journaled the job."""
        self._accepted = True
        self._decided.set()


class WaitingCall:
    """A synchronous request (fetch, status) waiting for its answer."""

    __slots__ = ("event", "reply", "deadline")

    def __init__(self, timeout: float | None = None) -> None:
        self.event = threading.Event()
        self.reply: Message | None = None
        self.deadline = float("inf") if timeout is None else time.monotonic() + timeout

    def settle(self, reply: Message) -> None:
        self.reply = reply
        self.event.set()
