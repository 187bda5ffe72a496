"""A ``concurrent.futures.Future`` that costs less to make and settle.

Data flow (the states and rules are ``Future``'s own)::

    made PENDING ----------------------------- an RLock; no Condition, no lists yet
    set_running_or_notify_cancel, set_result, set_exception, add_done_callback,
    done(), result() and exception() of a settled future: under that lock, or a plain read
    a thread that must wait (result/exception of an unsettled future), and
    concurrent.futures.wait / as_completed: ``_condition``, made then, on the
    same lock, so every path still serializes on one lock and is woken by
    set_result / set_exception / cancel; ``_waiters`` (what wait and
    as_completed append to) and the done-callbacks list are made on first
    use too, under that lock

Why: ``Future.__init__`` builds a ``threading.Condition`` (a Python object
and several bound methods) and every state change enters and notifies it in
Python: from creation to result a future here costs about a third of one
of those (bench/RESULTS.md, "Lighter futures"). For an Executor of tiny
tasks the difference was a fifth of its per-task cost, paid even by the
futures nobody waits on one by one. The two lists are made lazily because
thousands of futures held at once, each with two lists, made the garbage
collector's passes a tenth of a tiny-task burst. The public behaviour is
``Future``'s; only the private ``_condition`` and ``_waiters`` are made on
first use (``wait`` and ``as_completed`` read them, and get real ones).
The state constants come from ``concurrent.futures._base``, unchanged since
Python 3.2; tests/test_lightfuture.py checks the behaviour against a plain
``Future`` on the running Python.
"""

from __future__ import annotations

import _thread
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, TypeVar

__all__ = ["LightFuture", "notify_cancelled"]

T = TypeVar("T")

_SETTLED = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
# The logger Future's own callbacks report to: a failing callback is logged
# where a user of concurrent.futures looks for it.
_LOGGER = logging.getLogger("concurrent.futures")
# The C lock itself: threading.RLock is a Python function around it.
_RLock = getattr(_thread, "RLock", threading.RLock)


class LightFuture(Future[T]):
    """A :class:`concurrent.futures.Future` whose Condition is made only when
    a thread waits for it."""

    def __init__(self) -> None:  # not Future's: it makes the Condition up front
        self._lock = _RLock()
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiter_list: list[Any] | None = None
        self._callbacks: list[Callable[[Future[T]], object]] | None = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with self._lock:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition(self._lock)
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        waiters = self._waiter_list
        if waiters is None:
            with self._lock:
                waiters = self._waiter_list
                if waiters is None:
                    waiters = self._waiter_list = []
        return waiters

    @property
    def _done_callbacks(self) -> list[Callable[[Future[T]], object]]:
        # Read by Future.cancel (through _invoke_callbacks).
        with self._lock:
            if self._callbacks is None:
                self._callbacks = []
            return self._callbacks

    def done(self) -> bool:
        return self._state in _SETTLED

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def result(self, timeout: float | None = None) -> T:
        if self._state == FINISHED and self._exception is None:
            # Set before the state, under the lock. (No typing.cast: a call per result.)
            return self._result  # type: ignore[no-any-return]
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception  # set before the state, under the lock
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        with self._lock:
            if self._state not in _SETTLED:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            _LOGGER.exception("exception calling callback for %r", self)

    def set_running_or_notify_cancel(self) -> bool:
        with self._lock:
            if self._state == PENDING:
                self._state = RUNNING
                return True
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiter_list or ():
                    waiter.add_cancelled(self)
                return False
        _LOGGER.critical("Future %s in unexpected state: %s", id(self), self._state)
        raise RuntimeError("Future in unexpected state")

    def notify_cancelled(self) -> None:
        """For an executor dropping this cancelled future from its queue (it
        will never pick it up): tell ``wait`` and ``as_completed``, as
        ``set_running_or_notify_cancel`` does for one it picks up. Without
        this they never count the future as done. Nothing if not cancelled,
        or told already."""
        with self._lock:
            if self._state != CANCELLED:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiter_list or ():
                waiter.add_cancelled(self)

    def set_result(self, result: T) -> None:
        self._settle(result, None, failed=False)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(None, exception, failed=True)

    def _settle(self, result: Any, exception: BaseException | None, failed: bool) -> None:
        with self._lock:
            if self._state in _SETTLED:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result, self._exception = result, exception
            self._state = FINISHED
            if self._waiter_list:
                for waiter in self._waiter_list:
                    if failed:
                        waiter.add_exception(self)
                    else:
                        waiter.add_result(self)
            if self._cond is not None:
                self._cond.notify_all()
        if self._callbacks:
            self._run_callbacks(self._callbacks)

    def _run_callbacks(self, callbacks: list[Callable[[Future[T]], object]]) -> None:
        for callback in callbacks:
            try:
                callback(self)
            except (Exception, SystemExit):  # sys.exit() would end an engine thread
                _LOGGER.exception("exception calling callback for %r", self)


def notify_cancelled(future: Future[Any]) -> None:
    """:meth:`LightFuture.notify_cancelled` for a future of any type (the
    Scheduler's jobs hold theirs as plain ``Future``; all are LightFutures)."""
    if isinstance(future, LightFuture):
        future.notify_cancelled()
