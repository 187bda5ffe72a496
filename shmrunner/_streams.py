"""Lazy, bounded streams of tasks over any executor's ``submit``.

Data flow::

    caller's iterables --zip, chunk--> calls (read on demand, never ahead of
                                             `buffersize` unconsumed tasks)
        |  submit(*call) -> Future        (the executor's own backpressure applies)
        v
    ordered:   a deque of futures in input order; the head's result is yielded
    unordered: futures report to a queue as they finish; yielded in that order
        |  each result taken -> one more call submitted (before the yield, so
        v  workers stay busy while the consumer works)
    consumer (map / imap / imap_unordered) <- results; progress(done, total)

Why: ``Executor.map`` submits its whole input before it yields anything, so
``map(f, (np.load(p) for p in paths))`` loads every file at once. Here the
input is read as results are consumed: memory is bounded by ``buffersize``
tasks (and by the executor's byte budget), whatever the input's length.
Closing the generator early (``break``) cancels the tasks it had submitted and
not yet started. An exception the input raises (or submit, once the executor
is shut down) comes in its place, after the results of the items read before
it (as in ``multiprocessing``'s imap).
"""

from __future__ import annotations

import collections
import itertools
import queue
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

__all__ = ["Progress", "Meter", "stream", "chunked_calls", "check_sizes", "total_of", "Metered"]

# What ``progress=`` accepts: True (a tqdm bar when tqdm is installed), False
# or None (nothing), or a callable(done, total) with total None when unknown.
Progress = bool | Callable[[int, int | None], object] | None


def chunked_calls(iterables: tuple[Iterable[Any], ...], chunksize: int) -> Iterator[Any]:
    """The argument tuples of each call (``chunksize`` 1) or lists of them."""
    items = zip(*iterables, strict=False)
    if chunksize == 1:
        return items
    return _chunks(items, chunksize)


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items; when the input raises, the items read before
    it still make a (short) chunk, then the exception follows."""
    while True:
        chunk: list[Any] = []
        try:
            chunk.extend(itertools.islice(items, size))
        except Exception:
            if chunk:
                yield chunk
            raise
        if not chunk:
            return
        yield chunk


class _Input:
    """The calls, read on demand. An exception the caller's input raises is
    kept, and raised once the results of the items read before it have been
    yielded (where ``multiprocessing``'s imap raises it): raised at once, it
    would drop the results of the tasks already submitted."""

    def __init__(self, calls: Iterator[tuple[Any, ...]]) -> None:
        self._calls = calls
        self.error: Exception | None = None

    def take(self, n: int) -> Iterator[tuple[Any, ...]]:
        """Up to ``n`` more calls, one at a time (each is submitted before the
        next is read: the executor's backpressure applies to the reading)."""
        for _ in range(n):
            if self.error is not None:
                return
            try:
                call = next(self._calls)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 (the caller's input: re-raised in its place)
                self.error = exc
                return
            yield call

    def submit_next(self, submit: Callable[..., Future[Any]],
                    add: Callable[[Future[Any]], object]) -> None:
        """Submit the next call, if any, and ``add`` its future. An error of
        ``submit`` itself (the executor was shut down while the stream was
        read) is kept and raised in that item's place, like the input's own:
        raised now, it would drop the results of the tasks that did run."""
        for call in self.take(1):
            try:
                future = submit(*call)
            except Exception as exc:  # noqa: BLE001 (re-raised in its place)
                self.error = exc
                if isinstance(exc, RuntimeError) and "after shutdown" in str(exc):
                    # (the executors' "cannot schedule new futures after shutdown")
                    self.error = RuntimeError(
                        f"{exc}: map/imap read their input only as results are consumed "
                        "(at most buffersize items ahead); consume the results before "
                        "shutdown() (inside the with block), or pass a buffersize as "
                        "large as the input")
                    self.error.__cause__ = exc
                return
            add(future)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

def total_of(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many items ``zip(*iterables)`` yields, when every input knows its length."""
    if not iterables:
        return 0  # map(fn) with no iterables: zip() yields nothing, as Executor.map does
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


class Meter:
    """Counts results for ``progress=``; tqdm is imported only when asked for."""

    def __init__(self, progress: Progress, total: int | None) -> None:
        self.done = 0
        self.total = total
        self._callback: Callable[[int, int | None], object] | None = None
        self._bar: Any = None
        if callable(progress):
            self._callback = progress
        elif progress not in (True, False, None):  # (5 or "yes" once meant a bar)
            raise TypeError(f"progress must be True (a tqdm bar), False/None, or a "
                            f"callable(done, total), got {progress!r}")
        elif progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass  # optional: no bar without tqdm (pip install "shmrunner[progress]")
            else:
                self._bar = tqdm(total=total, unit="task")

    def add(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Metered(Iterator[Any]):
    """``items``, counting each one the consumer takes on ``meter``, a failed
    one included. An iterator, not a generator: a generator ends at the first
    exception it passes on, and Pool.imap, as multiprocessing's, goes on
    after a failed item (the results after it were lost)."""

    def __init__(self, items: Iterator[Any], meter: Meter) -> None:
        self._items = items
        self._meter = meter
        # The bar is closed when the stream ends, or when it is dropped unfinished.
        weakref.finalize(self, meter.close)

    def __next__(self) -> Any:
        try:
            item = next(self._items)
        except StopIteration:
            self._meter.close()
            raise
        except Exception:
            self._meter.add(1)  # a failed item is done too
            raise
        self._meter.add(1)
        return item



def check_sizes(chunksize: object, buffersize: object) -> None:
    """TypeError or ValueError, in one line, unless both are whole numbers >= 1
    (buffersize may be None: the caller's default)."""
    for name, value in (("chunksize", chunksize), ("buffersize", buffersize)):
        if value is None and name == "buffersize":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be a whole number >= 1, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")


def stream(submit: Callable[..., Future[Any]], calls: Iterator[tuple[Any, ...]], *,
           ordered: bool, buffersize: int, timeout: float | None = None,
           chunked: bool = False, progress: Progress = None,
           total: int | None = None) -> Iterator[Any]:
    """Results of ``submit(*call)`` for each call, at most ``buffersize`` calls
    ahead of the consumer; in input order when ``ordered``, else as they
    finish. ``chunked``: each result is a list, yielded item by item.

    As ``Executor.map``: the first ``buffersize`` calls are submitted now,
    not at the first ``next()``; ``timeout`` counts from this call, for the
    whole stream (past it, :class:`TimeoutError`)."""
    check_sizes(1, buffersize)
    deadline = None if timeout is None else time.monotonic() + timeout
    meter = Meter(progress, total)
    source = _Input(calls)
    if ordered:
        # (a submit raising here raises from the call, as Executor.map's do)
        window: collections.deque[Future[Any]] = collections.deque(
            submit(*call) for call in source.take(buffersize))
        return _deliver(_ordered(submit, source, window, deadline), window, chunked, meter)
    finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    running: set[Future[Any]] = set()
    for call in source.take(buffersize):
        _launch(submit, call, running, finished)
    return _deliver(_unordered(submit, source, running, finished, deadline), running, chunked,
                    meter)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _ordered(submit: Callable[..., Future[Any]], source: _Input,
             pending: collections.deque[Future[Any]],
             deadline: float | None) -> Iterator[Any]:
    while pending:
        head = pending.popleft()
        try:
            value = head.result(_remaining(deadline))
        except BaseException:
            # Out of ``pending`` now, so _deliver's cleanup would miss it: a
            # head still queued when the timeout ran out would run later
            # (Executor.map cancels it too).
            head.cancel()
            raise
        source.submit_next(submit, pending.append)
        yield value
    source.raise_error()


def _launch(submit: Callable[..., Future[Any]], call: tuple[Any, ...],
            running: set[Future[Any]], finished: queue.SimpleQueue[Future[Any]]) -> None:
    _track(submit(*call), running, finished)


def _track(future: Future[Any], running: set[Future[Any]],
           finished: queue.SimpleQueue[Future[Any]]) -> None:
    running.add(future)
    future.add_done_callback(finished.put)


def _unordered(submit: Callable[..., Future[Any]], source: _Input,
               pending: set[Future[Any]], finished: queue.SimpleQueue[Future[Any]],
               deadline: float | None) -> Iterator[Any]:
    while pending:
        try:
            future = finished.get(timeout=_remaining(deadline))
        except queue.Empty:
            raise TimeoutError(f"the stream's timeout ran out with {len(pending)} "
                               "tasks unfinished") from None
        pending.discard(future)
        source.submit_next(submit, lambda new: _track(new, pending, finished))
        yield future.result()
    source.raise_error()


def _deliver(results: Iterator[Any], pending: Collection[Future[Any]], chunked: bool,
             meter: Meter) -> Iterator[Any]:
    """Each task's result (a chunk's items one by one), counted on ``meter``;
    when the consumer stops early, the tasks not started are cancelled."""
    try:
        for value in results:
            meter.add(len(value) if chunked else 1)
            if chunked:
                yield from value
            else:
                yield value
    finally:
        meter.close()
        for future in list(pending):
            future.cancel()
