"""Job: one call submitted to the Scheduler, as the Scheduler and its tiers
share it.

The Scheduler creates a job per ``submit`` and owns its bookkeeping
(``retries``, ``retry_on``, ``attempts``, ``nbytes``, ``cancelled``); a tier
reads the call (``fn``, ``args``, ``kwargs``, ``timeout``), may keep its own
handle of the current attempt in ``handle``, and names the worker it gave the
attempt to in ``worker`` (what ``Scheduler.describe`` reports). Kept apart
from ``scheduler.py`` so the tiers need not import the Scheduler.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ._payload import payload_bytes

__all__ = ["Job"]


class Job:
    """One submitted call and its bookkeeping."""

    __slots__ = ("id", "future", "fn", "args", "kwargs", "retries", "timeout", "attempts",
                 "handle", "nbytes", "retry_on", "worker", "cancelled", "queued")

    def __init__(self, job_id: int, future: Future[Any], fn: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any], retries: int, timeout: float | None,
                 retry_on: frozenset[str] = frozenset(), nbytes: int | None = None) -> None:
        self.id = job_id
        self.future = future
        self.fn = fn  # a callable or a 'module:function' reference; None once settled
        self.args = args
        self.kwargs = kwargs
        self.retries = retries
        self.timeout = timeout
        self.attempts = 0
        self.handle: Any = None  # the tier's own record of the current attempt
        # Counted in the byte budget until settled (given: the caller knows it).
        self.nbytes = payload_bytes(args, kwargs) if nbytes is None else nbytes
        self.retry_on = retry_on  # 'module:qualname' of the exceptions it is retried on
        self.worker: str | None = None  # set by the tier: 'name@host' of the latest attempt's
        # Set by Scheduler.cancel (under the Backlog's lock): the job is never
        # retried, a tier stops it at once (not after its timeout's running
        # time), and it settles with this error whatever its attempt reports.
        self.cancelled: BaseException | None = None
        self.queued = False  # in the Backlog's queue, waiting to be placed (under its lock)
