"""Pool: a drop-in ``multiprocessing.Pool`` that moves arrays by handle and
never hangs when a worker dies.

This module is the facade with ``multiprocessing.Pool``'s API and the imap
feeder threads; the engine (queue, workers, manager thread) and its data flow
are in ``_engine.py``.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import operator
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

from . import _segcache
from ._callbackthread import CallbackThread
from ._engine import CLOSE, RUN, TERMINATE, Budget, EngineSettings, ProcessEngine
from ._results import ApplyResult, IMapIterator, IMapUnorderedIterator, MapResult
from ._streams import Meter, Metered, Progress, total_of
from ._tasklogs import DEFAULT_LIMIT, HOST, emit, engine_setting, local_worker
from ._tasks import Task, resolve_threshold, run_chunk, run_chunk_into
from .errors import TaskCancelledError
from .shm import is_shared

__all__ = ["Pool"]


class _Forward:
    """The engine's ``on_logs``: a task's records on the logger ``shmrunner.task``."""

    __slots__ = ("level",)

    def __init__(self, level: int) -> None:
        self.level = level

    def __call__(self, task: Task, pid: int | None, records: list[Any], final: bool) -> None:
        emit(records, level=self.level, worker=local_worker(pid), host=HOST, task_id=task.id,
             pid=pid)


class Pool:
    """A process pool with the API and semantics of ``multiprocessing.Pool``.

    Numpy arrays in arguments and results travel through shared memory:
    arrays from :func:`shmrunner.empty`/``zeros``/``share`` by handle (workers
    see the same memory), plain arrays of at least ``shm_threshold`` bytes by
    one copy. A worker that dies fails only the task it was running, with
    :class:`~shmrunner.WorkerLostError`, and is replaced. ``memory_limit``
    (bytes, ``"512MiB"``, or a fraction of the host's memory: ``0.5``,
    ``"50%"``): a worker whose private memory exceeds it is killed and
    replaced, its task failing with :class:`~shmrunner.MemoryLimitError`.
    ``task_logs``: a level name (e.g. "INFO") to have what tasks log and
    print re-emitted here on the logger ``shmrunner.task``, at most
    ``task_log_bytes`` characters per task (default None: off, workers print
    on the inherited terminal).
    """

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: BaseContext | None = None, *, shm_threshold: int | None = None,
                 memory_limit: int | float | str | None = None,
                 task_logs: str | None = None,
                 task_log_bytes: int = DEFAULT_LIMIT) -> None:
        self._state = "INIT"  # __del__ warns only about a pool that started
        # Off by default: multiprocessing's workers print on the inherited terminal.
        logs = engine_setting(task_logs, task_log_bytes, "Pool task_logs")
        if processes is None:
            processes = os.cpu_count() or 1
        # A whole number, as multiprocessing's range(processes) insists: 2.5
        # made a pool whose map() failed later, on its chunk size.
        processes = operator.index(processes)
        _segcache.check_env()
        settings = EngineSettings(  # validates, as multiprocessing.Pool does
            processes=processes, initializer=initializer, initargs=tuple(initargs),
            maxtasksperchild=maxtasksperchild,
            context=context if context is not None else multiprocessing.get_context(),
            shm_threshold=resolve_threshold(shm_threshold), memory_limit=memory_limit,
            task_logs=logs)
        self._processes = processes
        self._engine = ProcessEngine(
            settings, on_logs=None if logs is None else _Forward(logs[0]))
        # Callbacks run there, not on the manager thread (which would leave
        # workers idle while one runs); it ends with join/terminate or the pool.
        self._callbacks = CallbackThread()
        weakref.finalize(self, self._callbacks.stop, False)
        # The imap iterators still consumed: terminate() ends them (IMapIterator.end).
        self._imaps: weakref.WeakSet[IMapIterator] = weakref.WeakSet()
        self._state = RUN

    # --- multiprocessing.Pool's API --------------------------------------------------------

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] = {}) -> Any:  # noqa: B006 (multiprocessing's signature)
        self._check_running()
        result = ApplyResult()
        # The calling thread reads the reply itself when a worker is idle.
        self._engine.call(func, tuple(args), dict(kwds), result)
        return result.get()

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] = {},  # noqa: B006
                    callback: Callable[[Any], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    ) -> ApplyResult:
        self._check_running()
        result = ApplyResult(callback, error_callback, self._callback_thread(callback,
                                                                              error_callback))
        self._engine.submit([self._engine.new_task(func, tuple(args), dict(kwds), result)])
        return result

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any],
            chunksize: int | None = None, *, progress: Progress = None,
            out: np.ndarray[Any, Any] | None = None) -> Any:
        """``multiprocessing.Pool.map``; with ``out=`` (a shared array from
        :func:`shmrunner.empty` of shape ``(len(items), *result shape)``) each
        worker writes result ``i`` into ``out[i]`` and ``out`` is returned:
        no result travels back, nothing is stacked."""
        return self._map(func, iterable, False, chunksize, progress, out)

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                  chunksize: int | None = None,
                  callback: Callable[[Any], object] | None = None,
                  error_callback: Callable[[BaseException], object] | None = None) -> MapResult:
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None, *, progress: Progress = None,
                out: np.ndarray[Any, Any] | None = None) -> Any:
        """``multiprocessing.Pool.starmap``; ``out=`` as in :meth:`map`."""
        return self._map(func, iterable, True, chunksize, progress, out)

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[Any], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None,
                      ) -> MapResult:
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1,
             buffersize: int | None = None, *, progress: Progress = None) -> Iterator[Any]:
        results = self._imap(IMapIterator, func, iterable, chunksize, buffersize)
        return Metered(results, Meter(progress, total_of((iterable,)))) if progress else results

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: int = 1, buffersize: int | None = None, *,
                       progress: Progress = None) -> Iterator[Any]:
        results = self._imap(IMapUnorderedIterator, func, iterable, chunksize, buffersize)
        return Metered(results, Meter(progress, total_of((iterable,)))) if progress else results

    def close(self) -> None:
        """Accept no more tasks; workers exit once every submitted task is done."""
        if self._state == RUN:
            self._state = CLOSE
        self._engine.close()

    def terminate(self) -> None:
        """Stop the workers now and wait until they are gone (as multiprocessing
        does); tasks not finished fail with TaskCancelledError. Callbacks
        already due run before it returns."""
        self._state = TERMINATE
        self._engine.terminate(wait=True)
        for results in list(self._imaps):
            results.end(TaskCancelledError("the pool was terminated"))
        self._callbacks.stop()

    def join(self) -> None:
        """Wait for the workers to exit and the last callbacks to run; call
        close() or terminate() first."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        self._engine.join()
        self._callbacks.stop()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()  # as multiprocessing.Pool does

    def __repr__(self) -> str:
        return (f"<{type(self).__module__}.{type(self).__qualname__} "
                f"state={self._state} pool_size={self._processes}>")

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and not engine.in_owner():
            return  # a fork() child's copy: the pool is the parent's to stop
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)
            engine = getattr(self, "_engine", None)
            if engine is not None:
                engine.terminate()

    # --- what multiprocessing's own tests reach into ---------------------------------------

    @property
    def _pool(self) -> list[BaseProcess]:
        return self._engine.processes()

    def _repopulate_pool(self) -> None:
        """Wait (up to 5 s) until every worker slot holds a process again."""
        self._engine.wait_for_workers(5.0)

    # --- internals -----------------------------------------------------------------------------

    def _callback_thread(self, callback: Callable[..., object] | None,
                         error_callback: Callable[..., object] | None,
                         ) -> CallbackThread | None:
        """The thread to run the callbacks on, started (None: there are none)."""
        if callback is None and error_callback is None:
            return None
        self._callbacks.start()
        return self._callbacks

    def _check_running(self) -> None:
        self._engine.check_process()
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _map(self, func: Callable[..., Any], iterable: Iterable[Any], star: bool,
             chunksize: int | None, progress: Progress,
             out: np.ndarray[Any, Any] | None = None) -> Any:
        if not progress:
            result = self._map_async(func, iterable, star, chunksize, out=out)
            return self._map_value(result, out)
        # The caller waits anyway: it follows the chunks as they come in.
        chunks: queue.SimpleQueue[int] = queue.SimpleQueue()
        items = list(iterable)
        result = self._map_async(func, items, star, chunksize, on_chunk=chunks.put, out=out)
        meter = Meter(progress, len(items))
        try:
            while meter.done < len(items):
                count = chunks.get()
                if count < 0:
                    break  # the map failed: get() raises why
                meter.add(count)
        except Exception:
            # The progress callback raised: as for a failed map (_map_value),
            # return only once no chunk still writes into ``out``.
            if out is not None:
                result.wait_all_settled()
            raise
        finally:
            meter.close()
        return self._map_value(result, out)

    @staticmethod
    def _map_value(result: MapResult, out: np.ndarray[Any, Any] | None) -> Any:
        """What map returns; with ``out``, once none of its tasks writes into
        ``out`` any more, even when it fails: the caller may reuse ``out`` at
        once, and a straggler of a failed map would overwrite the next map's rows."""
        try:
            value = result.get()
        except Exception:
            if out is not None:
                result.wait_all_settled()
            raise
        return out if out is not None else value

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], star: bool,
                   chunksize: int | None,
                   callback: Callable[[Any], object] | None = None,
                   error_callback: Callable[[BaseException], object] | None = None,
                   on_chunk: Callable[[int], object] | None = None,
                   out: np.ndarray[Any, Any] | None = None) -> MapResult:
        self._check_running()
        items = iterable if hasattr(iterable, "__len__") else list(iterable)
        if type(items) is not range:  # a range's slices are ranges: a chunk travels as 3 ints
            items = list(items)
        rows = None
        if out is not None:
            _check_out(out, len(items))
            # The workers get plain ndarray rows: pickling moves only exact
            # ndarrays by handle, and a subclass's rows (a masked array's, a
            # recarray's) would travel as copies that drop every result.
            rows = out.view(np.ndarray)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize}")
        if not items:
            chunksize = 0
        result = MapResult(len(items), chunksize, callback, error_callback, on_chunk,
                           self._callback_thread(callback, error_callback))
        engine = self._engine
        engine.submit([
            engine.new_task(run_chunk, (func, items[start:start + chunksize], star), {},
                            result, index) if rows is None else
            engine.new_task(run_chunk_into, (func, items[start:start + chunksize], star,
                                             rows[start:start + chunksize], start), {},
                            result, index)
            for index, start in enumerate(range(0, len(items), chunksize or 1))
        ])
        return result

    def _imap(self, kind: type[IMapIterator], func: Callable[[Any], Any],
              iterable: Iterable[Any], chunksize: int, buffersize: int | None) -> Iterator[Any]:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        engine = self._engine
        budget = engine.new_budget(buffersize)
        result = kind(functools.partial(engine.give_back, budget) if buffersize is not None
                      else None)
        # Dropped by its consumer (and its tasks settled): the feeder stops
        # reading the input, so close() + join() end.
        weakref.finalize(result, engine.abandon, budget)
        self._imaps.add(result)
        feeder = threading.Thread(target=_feed,
                                  args=(engine, weakref.ref(result), func, iter(iterable),
                                        chunksize, budget),
                                  name="shmrunner-imap-feeder", daemon=True)
        engine.add_feeder(feeder)
        feeder.start()
        if chunksize == 1:
            return result
        return (item for chunk in result for item in chunk)


def _check_out(out: object, length: int) -> None:
    """map(out=...): one clear error for an array the workers cannot fill."""
    if not is_shared(out):
        raise TypeError(f"map(out=...) needs a shared array (shmrunner.empty, zeros or share) "
                        f"the workers can write into, not {type(out).__name__}"
                        + (" in private memory" if isinstance(out, np.ndarray) else ""))
    assert isinstance(out, np.ndarray)
    if out.ndim == 0 or len(out) != length:
        raise ValueError(f"map(out=...): out has shape {out.shape} but there are {length} "
                         f"items; make out's shape ({length}, *result shape)")
    if not out.flags.writeable:
        raise ValueError("map(out=...): out is read-only")


def _feed(engine: ProcessEngine, results: weakref.ref[IMapIterator],
          func: Callable[[Any], Any], items: Iterator[Any], chunksize: int,
          budget: Budget) -> None:
    """An imap's feeder thread: read the input lazily, at the pace the pool
    runs it. It holds its results only while it submits (``results`` is a
    weak reference), so a consumer that drops them ends it."""
    index = 0
    try:
        while True:
            room = engine.wait_for_room(budget)
            result = results()
            if result is None:
                return  # abandoned
            if not room:
                # Terminated: end the iterator rather than leave next() waiting.
                result.settle(index, False, TaskCancelledError("the pool was terminated"))
                result._set_length(index + 1)
                return
            try:
                chunk = list(itertools.islice(items, chunksize))
            except Exception as exc:
                result.settle(index, False, exc)
                result._set_length(index + 1)
                return
            if not chunk:
                result._set_length(index)
                return
            fn, args = (func, (chunk[0],)) if chunksize == 1 else (run_chunk, (func, chunk, False))
            engine.submit([engine.new_task(fn, args, {}, result, index)])
            index += 1
            if engine.broken is not None:
                # The pool cannot run anything any more (submit failed this item):
                # end the iterator instead of draining the input.
                result._set_length(index)
                return
            del result, chunk, fn, args  # not held while waiting for room
    finally:
        engine.remove_feeder(threading.current_thread())
