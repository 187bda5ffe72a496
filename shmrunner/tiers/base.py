"""The interface between the Scheduler and the tiers that run its jobs.

The Scheduler places jobs; a tier runs them and reports back::

    Scheduler --room()/start(jobs)/stop(job, attempt, reason)--> Tier
    Scheduler <--on_done(job, ok, value) / on_room() / on_log()-- TierEvents

A tier is given its :class:`TierEvents` when it is built and never sees the
Scheduler itself, so neither imports the other and mypy checks both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .._job import Job
from .._tasklogs import Record

__all__ = ["Tier", "TierEvents"]


class TierEvents(Protocol):
    """What a tier tells the Scheduler. Callable from any thread; they take the
    Scheduler's lock, so a tier must not call them while holding a lock the
    Scheduler's own calls into the tier (``room``, ``start``) may need."""

    def on_done(self, job: Job, ok: bool, value: Any, *, batch: bool = False) -> None:
        """One attempt of ``job`` ended: ``value`` is its result when ``ok``,
        else the exception (the Scheduler retries a lost or timed-out job with
        retries left, else settles its future). ``batch``: more outcomes follow
        and the tier calls :meth:`on_room` after the last, so queued jobs are
        placed once per batch, not once per outcome."""

    def on_log(self, job: Job, records: list[Record], *, worker: str, host: str,
               pid: int | None = None) -> None:
        """An attempt of ``job`` logged or printed ``records`` (``_tasklogs.py``)
        on ``worker`` at ``host``; told before that attempt's :meth:`on_done`."""

    def on_room(self) -> None:
        """The tier can take more jobs now (a worker joined, a batch of
        outcomes was delivered), or must be given the queued ones to fail them
        (it broke). A tier must call it whenever it gains room: once every
        tier was found full, jobs submitted behind the queue wait for it."""


class Tier(Protocol):
    """Where jobs run. ``start`` hands jobs over; the tier later reports each
    exactly once through ``on_done``. ``stop`` stops one attempt of a job
    (``job.attempts`` when it was started), only while that attempt is the
    one running; False means "not running yet, ask again later"."""

    def room(self) -> int:
        """How many more jobs this tier would start now (a stale answer only
        delays or queues a job)."""

    def start(self, jobs: list[Job]) -> None:
        """Run these jobs (they travel together). Raises if the tier is gone:
        the Scheduler then fails them."""

    def stop(self, job: Job, attempt: int, reason: BaseException) -> bool:
        """Stop that attempt of ``job``; it is then reported failed with
        ``reason``. Nothing happens when the attempt is over."""

    def close(self, wait: bool) -> None:
        """Stop accepting jobs and release the tier's workers and sockets
        (``wait``: until they are gone)."""

    def terminate(self) -> None:
        """Stop at once: the running jobs are abandoned (the Scheduler fails
        them), local workers killed; return once they are gone."""

    def status(self) -> Mapping[str, object]:
        """A snapshot of the tier for :meth:`Scheduler.status`."""
