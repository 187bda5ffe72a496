"""The process engine's task: what a caller hands over, how it travels to a
worker process and how its outcome comes back.

A :class:`Task` carries the call and the result object that settles it.
:func:`encode_task` pickles it (arrays as memfd fds, ``transport/pickling.py``)
into ``<task id: u64><pickle>`` for the worker's channel, and
:func:`decode_outcome` turns a worker's reply back into ``(task id, ok,
value)``, with a task's exception carrying its remote traceback. The task
id travels outside the pickle both ways (``worker/loop.py``), so a call
that cannot be pickled or unpickled still fails against the right task.
"""

from __future__ import annotations

import itertools
import os
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _spares
from ._payload import only_scalars
from ._sink import ResultSink
from .errors import ConfigError, attach_remote_traceback
from .shm import DEFAULT_THRESHOLD
from .transport.pickling import Encoded, dumps, loads
from .worker.loop import REPORT_START, TASK_ID

__all__ = ["Task", "run_chunk", "encode_task", "frame", "decode_outcome", "deliver",
           "resolve_threshold"]

# Functions the standard pickler names as our reducers would (by reference).
_FUNCTIONS = frozenset({types.FunctionType, types.BuiltinFunctionType})


class Task:
    __slots__ = ("id", "fn", "args", "kwargs", "result", "index", "kill_reason", "started",
                 "report_start")

    def __init__(self, task_id: int, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: Mapping[str, Any], result: ResultSink | None, index: int,
                 report_start: bool = False) -> None:
        self.id = task_id
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result = result
        self.index = index
        # Set when the engine kills this task's worker on purpose (a timeout):
        # reported instead of WorkerLostError.
        self.kill_reason: BaseException | None = None
        # When its worker started it (monotonic), as the engine sees it: the task
        # at the head of a worker's queue is the one running; with report_start
        # (a task with a timeout), when the worker said it starts it.
        self.started: float | None = None
        self.report_start = report_start

    def describe(self) -> str:
        fn = self.args[0] if self.fn is run_chunk else self.fn
        name = getattr(fn, "__qualname__", None) or repr(fn)
        return f"{self.id} ({name})"


def run_chunk(fn: Callable[..., Any], chunk: list[Any], star: bool) -> list[Any]:
    if star:
        return list(itertools.starmap(fn, chunk))
    return list(map(fn, chunk))


def run_chunk_into(fn: Callable[..., Any], chunk: list[Any], star: bool, out: Any,
                   first: int) -> list[None]:
    """``run_chunk`` writing each result into ``out[i]`` (a view of the shared
    array given to ``map(out=...)``; item ``first + i`` of the map) instead of
    returning it: the gather costs no copy back to the caller."""
    for i, item in enumerate(chunk):
        value = fn(*item) if star else fn(item)
        row = out[i, ...]  # a view even of a 1-d out (out[i] would be a scalar copy)
        shape = getattr(value, "shape", None)
        if shape is None:
            shape = np.shape(value)
        if tuple(shape) != row.shape:
            raise ValueError(
                f"map(out=...): result {first + i} has shape {tuple(shape)}, but "
                f"out[{first + i}] has shape {row.shape}; make out's shape "
                f"(len(items), *result shape)")
        try:
            np.copyto(row, value, casting="same_kind")
        except TypeError as exc:  # numpy's message names neither the result nor out
            raise TypeError(
                f"map(out=...): result {first + i} (dtype {np.asarray(value).dtype}) cannot "
                f"be written into out (dtype {row.dtype}) under numpy's same_kind rule; "
                "allocate out with the results' dtype") from exc
    return [None] * len(chunk)


def encode_task(task: Task, threshold: int) -> Encoded:
    """Pickle ``task``'s call; raises whatever user ``__reduce__`` code raises."""
    # Spares for its results are keyed by the user's function (``_spares``).
    key = _spares.key_of(task.args[0] if task.fn is run_chunk and task.args else task.fn)
    return dumps((task.fn, task.args, task.kwargs), threshold, lease=True, by_handle=True,
                 spares_for=(task.id, key),
                 plain=type(task.fn) in _FUNCTIONS and only_scalars(task.args, task.kwargs))


def frame(task: Task, message: Encoded) -> tuple[bytes, list[int], Callable[[], None]]:
    """``message`` as the worker channel's frame: id, pickle, fds, release."""
    task_id = task.id | REPORT_START if task.report_start else task.id
    return TASK_ID.pack(task_id) + message.data, message.fds, message.release


def decode_outcome(payload: bytearray, fds: list[int]) -> tuple[int, bool, Any]:
    """A worker's reply (not a control message) as ``(task id, ok, value)``;
    ``value`` is the result or the exception, with its remote traceback."""
    (task_id,) = TASK_ID.unpack_from(payload)
    copies: dict[int, int] = {}
    try:
        ok, value = loads(memoryview(payload)[TASK_ID.size:], fds, copies)
    except BaseException as exc:  # noqa: BLE001 (user code in __setstate__: this task fails)
        ok, value = False, (exc, "")
    _spares.learned(task_id, copies)
    if not ok:
        error, tb = value
        value = attach_remote_traceback(error, tb) if tb else error
    return task_id, ok, value


def deliver(task: Task, ok: bool, value: Any) -> None:
    """Settle ``task``'s result object; the task lets go of the call (its
    arrays are unmapped as soon as nobody else holds them)."""
    result, index = task.result, task.index
    task.fn = task.args = task.kwargs = task.result = None  # type: ignore[assignment]
    if result is not None:  # None: delivered already
        result.settle(index, ok, value)


def resolve_threshold(threshold: int | None) -> int:
    """The Pool's ``shm_threshold``, or ``SHMRUNNER_SHM_THRESHOLD``: a whole
    number of bytes >= 0 (as ``scheduler.shm_threshold``), else one clear line."""
    if threshold is not None:
        if not isinstance(threshold, (int, np.integer)) or isinstance(threshold, bool) \
                or threshold < 0:
            raise ValueError(f"shm_threshold must be a whole number of bytes >= 0 or None, "
                             f"not {threshold!r}")
        return int(threshold)
    env = os.environ.get("SHMRUNNER_SHM_THRESHOLD")
    if env:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(
                f"SHMRUNNER_SHM_THRESHOLD={env!r} is not a whole number of bytes >= 0; "
                "set it to e.g. 65536 or unset it")
        return value
    return DEFAULT_THRESHOLD
