"""Result objects of the Pool, with ``multiprocessing.pool``'s semantics.

``ApplyResult`` (apply_async), ``MapResult`` (map_async, starmap_async),
``IMapIterator`` and ``IMapUnorderedIterator`` (imap, imap_unordered). The
manager thread delivers outcomes with ``settle(index, ok, value)`` (each is a
:class:`~shmrunner._sink.ResultSink`). A result with a callback for that
outcome hands it to the Pool's callback thread (``_callbackthread.py``), which
runs the callback and then wakes the waiters, as in ``multiprocessing``: so a
slow callback never keeps the manager thread from refilling the workers. A
callback that raises (``SystemExit`` too) is logged, never allowed to kill
the thread that runs it.
"""

from __future__ import annotations

import _thread
import collections
import logging
import threading
from collections.abc import Callable, Iterator
from multiprocessing import TimeoutError
from typing import Any

from ._callbackthread import CallbackThread

__all__ = ["ApplyResult", "MapResult", "IMapIterator", "IMapUnorderedIterator"]

log = logging.getLogger("shmrunner.pool")

Callback = Callable[[Any], object] | None


def _call(callback: Callable[[Any], object], value: Any) -> None:
    try:
        callback(value)
    except (Exception, SystemExit):  # sys.exit() would end the manager thread, not the program
        log.exception("a pool callback raised")


class ApplyResult:
    """The pending result of one task (``multiprocessing.pool.AsyncResult``)."""

    def __init__(self, callback: Callback = None, error_callback: Callback = None,
                 callbacks: CallbackThread | None = None) -> None:
        # A gate rather than a threading.Event (whose Condition costs a few
        # microseconds each side of every apply): held until settled; each
        # waiter passes it (acquire, release) and lets the next through.
        self._gate = _thread.allocate_lock()
        self._gate.acquire()
        self._done = False
        self._callback = callback
        self._error_callback = error_callback
        self._callbacks = callbacks  # where they run (None: there are none)
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._done

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        if timeout is None:
            passed = self._gate.acquire()
        else:
            passed = self._gate.acquire(True, max(timeout, 0.0))
        if passed:
            self._gate.release()

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def settle(self, index: int, ok: bool, value: Any) -> None:
        callback = self._callback if ok else self._error_callback
        if callback is None:  # most results: settled here, without a call more
            self._success, self._value = ok, value
            self._done = True
            self._gate.release()
        else:
            assert self._callbacks is not None  # the Pool gives one with every callback
            self._callbacks.run(self._finish, callback, ok, value)

    def _finish(self, callback: Callable[[Any], object], ok: bool, value: Any) -> None:
        self._success, self._value = ok, value
        try:
            _call(callback, value)
        finally:  # whatever a callback did, the result is ready
            self._done = True
            self._gate.release()


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The pending result of a map: ``length`` items in chunks of ``chunksize``."""

    def __init__(self, length: int, chunksize: int, callback: Callback = None,
                 error_callback: Callback = None,
                 on_chunk: Callable[[int], object] | None = None,
                 callbacks: CallbackThread | None = None) -> None:
        super().__init__(callback, error_callback, callbacks)
        # Told each chunk's length once it is in (or -1 when the map failed):
        # how map(progress=) follows the work from the caller's thread.
        self._on_chunk = on_chunk
        self._lock = threading.Lock()
        self._chunksize = chunksize
        self._value = [None] * length
        self._success = True
        self._left = -(-length // chunksize) if chunksize else 0
        self._ended = self._left == 0  # under the lock: only one chunk settles the map
        # Chunks not settled yet, failed map or not (see wait_all_settled).
        self._unsettled = self._left
        self._all_settled = threading.Event()
        if self._left == 0:
            self._all_settled.set()
            super().settle(0, True, self._value)

    def wait_all_settled(self) -> None:
        """Wait until every chunk has settled, even after the map failed
        (``map(out=...)``: the chunks still running write into ``out``)."""
        self._all_settled.wait()

    def settle(self, index: int, ok: bool, value: Any) -> None:
        with self._lock:
            self._unsettled -= 1
            if self._unsettled == 0:
                self._all_settled.set()
            if self._ended:
                return  # already failed: later chunks are dropped, as in multiprocessing
            if ok:
                start = index * self._chunksize
                self._value[start:start + len(value)] = value
                self._left -= 1
                done = self._left == 0
            else:
                done = True
            self._ended = done
        if done:
            super().settle(index, ok, self._value if ok else value)
        if self._on_chunk is not None:
            self._on_chunk(len(value) if ok else -1)


class IMapIterator:
    """Results of ``imap`` in input order; ``next(timeout)`` as in multiprocessing."""

    def __init__(self, on_consumed: Callable[[], None] | None = None) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque[tuple[bool, Any]] = collections.deque()
        self._unsorted: dict[int, tuple[bool, Any]] = {}
        self._index = 0
        self._length: int | None = None
        self._on_consumed = on_consumed
        self._ended = False  # by end(): whatever settles later is dropped

    def __iter__(self) -> Iterator[Any]:
        return self

    def next(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._items:
                if self._index == self._length:
                    raise StopIteration
                self._cond.wait(timeout)
                if not self._items:
                    if self._index == self._length:
                        raise StopIteration
                    raise TimeoutError
            ok, value = self._items.popleft()
        if self._on_consumed is not None:
            self._on_consumed()
        if ok:
            return value
        try:
            raise value
        finally:
            # The traceback keeps this frame: holding ``self`` and ``value`` it
            # would make a cycle only the garbage collector breaks (and an
            # exception the caller keeps would pin the iterator), so a dropped
            # imap's feeder would wait for room forever and join() with it.
            del self, value

    __next__ = next

    def settle(self, index: int, ok: bool, value: Any) -> None:
        with self._cond:
            if self._ended:
                return
            if index == self._index:
                self._items.append((ok, value))
                self._index += 1
                while self._index in self._unsorted:
                    self._items.append(self._unsorted.pop(self._index))
                    self._index += 1
                self._cond.notify()
            else:
                self._unsorted[index] = (ok, value)
            if self._index == self._length:
                self._cond.notify_all()

    def _set_length(self, length: int) -> None:
        with self._cond:
            if self._ended:
                return
            self._length = length
            if self._index == self._length:
                self._cond.notify_all()

    def end(self, error: BaseException) -> None:
        """The pool was terminated: after the results already in (in order),
        next() raises ``error``, then StopIteration. Not left to the feeder,
        which may be blocked reading the caller's input for as long as that
        stalls (a queue nobody feeds any more), next() waiting with it."""
        with self._cond:
            if self._ended or self._index == self._length:
                return  # complete: nothing is waited for
            self._ended = True
            self._unsorted.clear()  # behind a result that will never come
            self._items.append((False, error))
            self._index += 1
            self._length = self._index
            self._cond.notify_all()


class IMapUnorderedIterator(IMapIterator):
    """Results of ``imap_unordered`` in completion order."""

    def settle(self, index: int, ok: bool, value: Any) -> None:
        with self._cond:
            if self._ended:
                return
            self._items.append((ok, value))
            self._index += 1
            self._cond.notify()
            if self._index == self._length:
                self._cond.notify_all()
