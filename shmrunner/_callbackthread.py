"""The Pool's callback thread: runs ``callback`` and ``error_callback`` off the
manager thread, as ``multiprocessing``'s result-handler thread does.

Data flow::

    manager thread (or any thread settling a result that has a callback)
        CallbackThread.run(fn, *args) --> SimpleQueue --> shmrunner-pool-callbacks
                                                             fn(*args), one at a time,
                                                             in the order handed in

A slow callback (writing a file, drawing a plot) then delays the callbacks
behind it, never the manager thread that reads results and refills idle
workers. The thread starts with the first result that has a callback and
ends when :meth:`stop` is called (the Pool's ``join``/``terminate``, or the
Pool being collected), after running everything handed in before.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from . import _pid
from ._atexit import stop_at_exit

__all__ = ["CallbackThread"]

log = logging.getLogger("shmrunner.pool")

_STOP = None

#: Seconds the interpreter's exit waits for the callbacks due: long enough for
#: slow ones (as it waited for the manager thread that ran them before), never
#: forever for one blocked for good.
EXIT_GRACE = 10.0


class CallbackThread:
    """One thread running the callables handed to :meth:`run`, in order."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._owner = _pid.current()

    def start(self) -> None:
        """Start the thread unless it runs already (the caller's thread does
        this when it asks for a callback, so the manager thread never has to)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            thread = threading.Thread(target=self._serve, name="shmrunner-pool-callbacks",
                                      daemon=True)
            thread.start()
            self._thread = thread
        # A daemon thread (a callback blocked for good must not hang the exit),
        # so the exit itself runs the callbacks due: else it killed them unrun.
        stop_at_exit(self)

    def run(self, fn: Callable[..., object], *args: Any) -> None:
        """Have the thread call ``fn(*args)`` after what was handed in before;
        called here and now once the thread is stopped (or never started)."""
        # Made before the lock: nothing is allocated under it, so no garbage
        # collection (whose finalizers may call stop() on this very thread)
        # runs while it is held.
        call = (fn, args)
        with self._lock:  # not after stop()'s sentinel, where it would never run
            if self._thread is not None and not self._stopped:
                self._calls.put(call)
                return
        fn(*args)

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Run what was handed in, then end the thread; ``wait``: return once it
        has ended (not when called from a callback on the thread itself), or
        after ``timeout`` seconds."""
        if _pid.current() != self._owner:
            return  # a fork() child's copy: no thread there (and the lock may be held)
        with self._lock:
            thread, self._stopped = self._thread, True
            if thread is not None:
                self._calls.put(_STOP)
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def shutdown_at_exit(self) -> None:
        """The interpreter exits (``_atexit``): run the callbacks due first."""
        self.stop(wait=True, timeout=EXIT_GRACE)

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is _STOP:
                return
            fn, args = call
            try:
                fn(*args)
            except BaseException:  # never silently: a dead thread would leave results pending
                log.exception("shmrunner's callback thread caught an unexpected error")
            del call, fn, args  # not held while waiting for the next
