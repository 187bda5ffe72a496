"""Pickling that moves numpy arrays by handle instead of by bytes.

``dumps(obj)`` pickles ``obj`` with multiprocessing's ``ForkingPickler``, except
that every numpy array found anywhere inside it (tuples, lists, dicts,
dataclass and object attributes: pickle's own traversal reaches them all) is
replaced by a small handle naming one of the file descriptors that travel
beside the bytes:

* an array viewing a shared :class:`~shmrunner.shm.Segment` sends that
  segment's fd: O(1), and the receiver sees the same memory;
* a plain array of at least ``threshold`` bytes is copied once into a fresh
  memfd (value semantics, like pickling); the fd is owned by the message and
  closed once sent;
* anything else (small arrays, object dtypes, subclasses) pickles as usual.

``loads(data, fds)`` rebuilds the arrays over new mappings of those fds. A
segment referenced twice in one message is mapped once. It maps only memfds
sealed against resizing and as large as their handle says (see ``shm.py``),
and an fd the channel could not receive (:data:`~.fdchannel.LOST_FD`: this
process had no free fd) fails the message with a SharedMemoryError naming
the limit.
"""

from __future__ import annotations

import copyreg
import errno
import io
import os
import pickle
import threading
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np

from ..errors import SharedMemoryError
from ..shm import (
    Segment,
    close_copies,
    copy_to_memfd,
    fd_limit_error,
    segment_of,
    warn_fallback,
)
from . import _foreign
from .fdchannel import LOST_FD, MAX_FDS

__all__ = ["Encoded", "MAX_FDS", "dumps", "loads", "close_fds"]

# Arrays past the channel's MAX_FDS in one message are pickled inline.


class Encoded:
    """A pickled message: its bytes, the fds to send with it, which of those
    fds the message owns (closed after sending, or when dropped unsent), and
    the shared segments whose fds it borrows (kept alive until it is sent:
    the arrays that held them may be gone by then)."""

    __slots__ = ("data", "fds", "owned", "borrowed")

    def __init__(self, data: bytes, fds: list[int], owned: list[int],
                 borrowed: list[Segment]) -> None:
        self.data = data
        self.fds = fds
        self.owned = owned
        self.borrowed = borrowed

    def release(self) -> None:
        """Close the fds this message owns; call once it is sent or dropped."""
        close_copies(self.owned)
        self.owned = []
        self.borrowed = []


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Sending:
    """Per-message state of a dump: the fds collected so far."""

    __slots__ = ("threshold", "fds", "owned", "borrowed", "index_of_fd")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.fds: list[int] = []
        self.owned: list[int] = []
        self.borrowed: list[Segment] = []
        self.index_of_fd: dict[int, int] = {}

    def add_fd(self, fd: int, owned: bool) -> int:
        index = self.index_of_fd.get(fd)
        if index is None:
            index = self.index_of_fd[fd] = len(self.fds)
            self.fds.append(fd)
            if owned:
                self.owned.append(fd)
        return index


_sending = threading.local()


def _reduce_array(array: np.ndarray[Any, Any]) -> Any:
    state: _Sending = _sending.state
    if array.dtype.hasobject:
        return array.__reduce__()
    full = len(state.fds) >= MAX_FDS
    seg = segment_of(array)
    if seg is not None:
        if full and seg.fd not in state.index_of_fd:
            return array.__reduce__()  # a segment already in the message costs no new fd
        offset = array.ctypes.data - seg.address
        index = state.add_fd(seg.fd, owned=False)
        state.borrowed.append(seg)
        return _rebuild_array, (index, len(seg), offset, array.shape, array.strides, array.dtype)
    if full or array.nbytes < state.threshold:
        return array.__reduce__()
    try:
        fd, size, strides = copy_to_memfd(array)
    except SharedMemoryError:
        raise  # the array cannot fit: pickling it would not fit either
    except OSError as exc:
        warn_fallback(exc)
        return array.__reduce__()
    index = state.add_fd(fd, owned=True)
    return _rebuild_array, (index, size, 0, array.shape, strides, array.dtype)


_table: dict[Any, Any] = {}
_table_sources = (0, 0, 0)


def _dispatch_table() -> dict[Any, Any]:
    """copyreg's and multiprocessing's reducers, plus ours for ndarray (and for
    torch tensors and Arrow buffers once those libraries are imported:
    ``_foreign.py``); rebuilt only when one of those registries grew (building
    it per message costs more than pickling a small task)."""
    global _table, _table_sources
    extra = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    sources = (len(copyreg.dispatch_table), len(extra), _foreign.libraries())
    if sources != _table_sources:
        table = dict(copyreg.dispatch_table)
        table.update(extra)
        table[np.ndarray] = _reduce_array
        table.update(_foreign.reducers(table))
        _table, _table_sources = table, sources
    return _table


def dumps(obj: object, threshold: int) -> Encoded:
    """Pickle ``obj``, moving arrays of ``threshold`` bytes or more by fd."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _dispatch_table()
    outer = getattr(_sending, "state", None)  # a dumps() from inside a __reduce__
    state = _sending.state = _Sending(threshold)
    try:
        pickler.dump(obj)
    except BaseException:
        close_copies(state.owned)
        raise
    finally:
        _sending.state = outer
    return Encoded(buf.getvalue(), state.fds, state.owned, state.borrowed)


_receiving = threading.local()


def loads(data: bytes | bytearray | memoryview, fds: list[int]) -> Any:
    """Unpickle a message whose arrays arrived as ``fds``; every fd is consumed
    (owned by a segment, or closed) whatever happens."""
    if not fds:
        return pickle.loads(data)
    _receiving.fds = fds
    _receiving.segments = {}
    try:
        return pickle.loads(data)
    finally:
        segments: dict[int, Segment] = _receiving.segments
        close_fds([fd for i, fd in enumerate(fds) if i not in segments])
        _receiving.fds = _receiving.segments = None


def _rebuild_array(index: int, size: int, offset: int, shape: tuple[int, ...],
                   strides: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    segments: dict[int, Segment] = _receiving.segments
    seg = segments.get(index)
    if seg is None:
        fd = _receiving.fds[index]
        if fd == LOST_FD:
            raise fd_limit_error("a shared array's file descriptor was dropped on arrival")
        try:
            seg = segments[index] = Segment.attach(fd, size)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise fd_limit_error("a shared array could not be mapped") from exc
            raise
    array: np.ndarray[Any, Any] = np.ndarray(shape, dtype, buffer=seg, offset=offset,
                                             strides=strides)
    return array
