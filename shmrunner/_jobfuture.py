"""What a caller of :class:`~shmrunner.client.Client` holds while it waits.

A :class:`JobFuture` is settled by the client thread (the ``_ledger``): first
``set_accepted`` when the daemon has journaled the job (PENDING -> RUNNING),
then its result or exception. The caller may cancel it while PENDING: the
Client then withdraws the job (``withdraw``). A :class:`WaitingCall` is one
synchronous ``result(job_id)`` or ``status()`` call: the calling thread
blocks on its event, the client thread puts the daemon's reply in and sets it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from concurrent.futures._base import CANCELLED, PENDING
from typing import Any

from ._lightfuture import LightFuture
from .transport.protocol import Message

__all__ = ["JobFuture", "WaitingCall"]


class JobFuture(LightFuture[Any]):
    """The Future of a job submitted to a daemon: ``job_id``, and whether the
    daemon has journaled it (from then on it survives a daemon restart).

    It is PENDING until the daemon accepts the job, then RUNNING, as a
    ``concurrent.futures`` future is until its executor starts the call: so
    ``cancel()`` withdraws a job not accepted yet (True) and is False once it
    was accepted (``Client.cancel(future)`` stops an accepted or running job)."""

    def __init__(self, job_id: str, owner: object = None) -> None:
        super().__init__()
        self.job_id = job_id
        self.owner = owner  # the Client that made it (its futures may be arguments)
        self._accepted = False
        self._withdrawn = False
        # Set by the Client (each never blocks): withdraw a job the user cancelled
        # before it was accepted (drop its submit; the daemon cancels it if the
        # submit had left), and ask the daemon to drop an accepted job that has
        # not started.
        self.withdraw: Callable[[str], None] | None = None
        self.cancel_in_daemon: Callable[[str], None] | None = None
        # Set once accepted, or settled without it; made by the first
        # wait_accepted (most futures are never asked: no Event and
        # done-callback per job).
        self._decided: threading.Event | None = None

    def cancel(self) -> bool:
        """Before the daemon accepted the job: cancel this future (True) and
        withdraw the job (never sent, or cancelled in the daemon, even if it had
        started there, when the submit had already left). Once accepted: False,
        as ``concurrent.futures`` says of a running future; the daemon is
        still asked to drop the job if it has not started (then the future
        fails with TaskCancelledError). To stop an accepted job, running or
        not, and learn the outcome: ``Client.cancel(future)``."""
        if super().cancel():
            if not self._withdrawn and self.withdraw is not None:
                self._withdrawn = True
                self.withdraw(self.job_id)
            # Withdrawn: no "accepted" will move it on, so wait() and
            # as_completed() are told now (they never saw it done otherwise).
            self.notify_cancelled()
            return True
        if not self.done() and self.cancel_in_daemon is not None:
            self.cancel_in_daemon(self.job_id)
        return False

    def accepted(self) -> bool:
        """Whether the daemon said it journaled the job (durably accepted)."""
        return self._accepted

    def wait_accepted(self, timeout: float | None = None) -> bool:
        """Wait until the job is durably accepted (True), or until it settled
        without that or ``timeout`` seconds passed (False)."""
        with self._lock:  # the future's own lock: set_accepted reads _decided under it
            if self._accepted or self.done():
                return self._accepted
            if self._decided is None:
                decided = self._decided = threading.Event()
                self.add_done_callback(lambda _: decided.set())
            event = self._decided
        event.wait(timeout)
        return self._accepted

    def set_accepted(self) -> None:
        """For the client thread only (as ``set_result`` is for an Executor):
        the daemon journaled the job; the future is RUNNING from now on (unless
        it was cancelled, or settled, meanwhile)."""
        if self._accepted:
            return
        self._accepted = True
        with self._lock:  # (reentrant) no cancel or result between the look and the move
            # Settled already (a result can come before the "accepted"), or
            # cancelled and told: set_running_or_notify_cancel would log a
            # "Future in unexpected state" at CRITICAL and raise.
            if self._state in (PENDING, CANCELLED):
                self.set_running_or_notify_cancel()
        with self._lock:
            event = self._decided
        if event is not None:
            event.set()

    # A future the user cancelled stays cancelled: what the daemon says of the
    # job afterwards is not this future's any more.

    def set_result(self, result: Any) -> None:
        try:
            super().set_result(result)
        except InvalidStateError:
            if not self.cancelled():
                raise

    def set_exception(self, exception: BaseException | None) -> None:
        try:
            super().set_exception(exception)
        except InvalidStateError:
            if not self.cancelled():
                raise


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
