"""Timers: one thread that calls callbacks at their deadlines.

Data flow::

    call_at(deadline, callback) --> heap (deadline, seq, callback) --notify-->
        timer thread: waits on a Condition until the earliest deadline is due,
        pops it, runs its callback outside the lock

The Scheduler arms one timer per attempt of a task with a timeout. The thread
starts with the first timer (``import shmrunner`` starts nothing) and waits on
a condition with the next deadline as its timeout, so nothing polls. A
callback that raises is logged and the thread goes on: every later timeout
would otherwise silently never fire. ``close`` drops the pending timers and
joins the thread (unless a callback closes it from the thread itself).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Timers"]

# The Scheduler's logger: the timers are its own, and its users filter on that name.
log = logging.getLogger("shmrunner.scheduler")


class Timers:
    """One thread that calls callbacks at deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._heap, (deadline, next(self._seq), callback))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shmrunner-timers",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._closed:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:
                # One failed callback must not end the thread: every later
                # timeout would then silently never fire.
                log.exception("a scheduler timer callback failed; timers keep running")
