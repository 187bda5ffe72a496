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
import mmap
import os
import pickle
import threading
from collections.abc import Hashable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np

from .. import _segcache, _spares
from .._memfd import fill_slot
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

    __slots__ = ("data", "fds", "owned", "borrowed", "leases")

    def __init__(self, data: bytes, fds: list[int], owned: list[int],
                 borrowed: list[Segment], leases: list[_segcache.Slot] | None = None) -> None:
        self.data = data
        self.fds = fds
        self.owned = owned
        self.borrowed = borrowed
        # Recycled segments (``_segcache``) carrying plain arrays: the sender
        # lends them to the receiving worker, or gives them back unsent.
        self.leases = leases if leases is not None else []

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

    __slots__ = ("threshold", "fds", "owned", "borrowed", "index_of_fd", "lease", "leases",
                 "by_handle")

    def __init__(self, threshold: int, lease: bool, by_handle: bool = False) -> None:
        self.threshold = threshold
        self.lease = lease
        self.by_handle = by_handle
        self.leases: list[_segcache.Slot] = []
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
        if full and seg.fd not in state.index_of_fd:  # (one already in costs no new fd)
            if state.by_handle:
                # A copy would silently drop the task's writes into it.
                raise SharedMemoryError(
                    f"a task's message carries at most {MAX_FDS} file descriptors (one "
                    f"per distinct shared array and per large plain array), and this "
                    f"one needs more; pass views of fewer, larger shared arrays "
                    f"(shmrunner.empty((n, ...))), or split the task")
            return array.__reduce__()  # a result: a copy is what the caller gets anyway
        _segcache.note_escaped(seg)
        seg.shared_out()
        index = state.add_fd(seg.fd, owned=False)
        state.borrowed.append(seg)
        origin, size, offset = _window(array, seg)
        return _rebuild_array, (index, size, offset, array.shape, array.strides, array.dtype,
                                False, origin, not array.flags.writeable)
    if full or array.nbytes < state.threshold:
        return array.__reduce__()
    if state.lease and (array.flags.c_contiguous or array.flags.f_contiguous):
        try:
            slot = fill_slot(array)
        except SharedMemoryError:
            raise
        except OSError as exc:
            warn_fallback(exc)
            return array.__reduce__()
        if slot is not None:
            state.leases.append(slot)
            index = state.add_fd(slot.fd, owned=False)
            strides = array.strides
            return _rebuild_array, (index, max(array.nbytes, 1), 0, array.shape, strides,
                                    array.dtype)
    try:
        fd, size, strides = copy_to_memfd(array)
    except SharedMemoryError:
        raise  # the array cannot fit: pickling it would not fit either
    except OSError as exc:
        warn_fallback(exc)
        return array.__reduce__()
    index = state.add_fd(fd, owned=True)
    return _rebuild_array, (index, size, 0, array.shape, strides, array.dtype, True)


_PAGE = mmap.ALLOCATIONGRANULARITY


def _window(array: np.ndarray[Any, Any], seg: Segment) -> tuple[int, int, int]:
    """The part of ``seg``'s file that ``array`` views, as ``(origin, size,
    offset)``: map ``size`` bytes from the page-aligned file offset ``origin``;
    the array starts ``offset`` bytes in. A worker handed one row of a large
    array maps (and populates) that row, not the whole array."""
    start = seg.origin + array.ctypes.data - seg.address  # file offset of element 0
    if array.size == 0:
        return seg.origin, len(seg), start - seg.origin
    lo = hi = start
    for dim, stride in zip(array.shape, array.strides, strict=True):
        if stride < 0:
            lo += stride * (dim - 1)
        else:
            hi += stride * (dim - 1)
    hi += array.itemsize
    origin = lo - lo % _PAGE
    return origin, hi - origin, start - origin


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


def dumps(obj: object, threshold: int, lease: bool = False,
          spares_for: tuple[int, Hashable | None] | None = None,
          plain: bool = False, by_handle: bool = False) -> Encoded:
    """Pickle ``obj``, moving arrays of ``threshold`` bytes or more by fd.

    ``lease``: copy plain arrays into recycled segments (``_segcache``); the
    caller then lends ``Encoded.leases`` to the receiver or gives them back.
    ``spares_for``: (task id, its function): add spare segments for the
    task's results (``_spares``), lent likewise. ``plain``: the caller knows
    ``obj`` holds only functions and scalars (no array, nothing our reducers
    handle): pickled as the standard pickler does, in a quarter of the time
    (the tiny task's and its result's way). ``by_handle``: every shared array
    must travel by handle (a task's arguments, which it may write into):
    past :data:`MAX_FDS` segments raise SharedMemoryError rather than copy."""
    state = _Sending(threshold, lease, by_handle)
    data = _plain(obj) if plain else None
    if data is None:
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = _dispatch_table()
        outer = getattr(_sending, "state", None)  # a dumps() from inside a __reduce__
        _sending.state = state
        try:
            pickler.dump(obj)
        except BaseException:
            close_copies(state.owned)
            _segcache.give_back(state.leases)
            raise
        finally:
            _sending.state = outer
        data = buf.getvalue()
    if lease and spares_for is not None and len(state.fds) + _spares.MAX_SPARES <= MAX_FDS \
            and (spares := _spares.grant(*spares_for)):
        # Beside the task: populated segments for the worker's results.
        state.leases += spares
        data += _spares.trailer([state.add_fd(spare.fd, owned=False) for spare in spares])
    return Encoded(data, state.fds, state.owned, state.borrowed, state.leases)


def _plain(obj: object) -> bytes | None:
    """``obj`` pickled by the standard pickler, or None if it refuses it (a
    function it cannot name: the full pickler then raises the error)."""
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 (dumps() does it again, and raises)
        return None


_receiving = threading.local()


def loads(data: bytes | bytearray | memoryview, fds: list[int],
          copies: dict[int, int] | None = None) -> Any:
    """Unpickle a message whose arrays arrived as ``fds``; every fd is consumed
    (owned by a segment, or closed) whatever happens. ``copies``: filled with
    how many arrays of each byte size arrived as copies made for this message."""
    if not fds:
        return pickle.loads(data)
    _receiving.fds = fds
    _receiving.segments = {}
    _receiving.copies = copies if copies is not None else {}
    spares: list[int] = []
    try:
        # A task may carry spare segments for its result (``_spares``).
        spares = _spares.split_trailer(memoryview(data), len(fds))
        return pickle.loads(data)
    finally:
        segments: dict[int, Segment] = _receiving.segments
        for i in spares:
            if i not in segments and fds[i] != LOST_FD:
                if _segcache.adopting():  # not a worker: nothing to write results into
                    close_fds([fds[i]])
                else:
                    _spares.stash(fds[i])
        unmapped = [fd for i, fd in enumerate(fds) if i not in segments
                    and not (i in spares and fd != LOST_FD)]
        for fd in unmapped:
            _segcache.note_unmapped_fd(fd)
        close_fds(unmapped)
        _receiving.fds = _receiving.segments = _receiving.copies = None


def _rebuild_array(index: int, size: int, offset: int, shape: tuple[int, ...],
                   strides: tuple[int, ...], dtype: np.dtype[Any],
                   sole: bool = False, origin: int = 0,
                   readonly: bool = False) -> np.ndarray[Any, Any]:
    """``sole``: the sender kept nothing of this segment (a copy it made);
    ``origin``, ``size``: the window of the file to map (see :func:`_window`);
    ``readonly``: the sender's view of these shared pages was read-only, and
    so is this one (the receiver must not write where the sender may not)."""
    segments: dict[int, Segment] = _receiving.segments
    seg = segments.get(index)
    if seg is None or not (seg.origin <= origin and origin + size <= seg.origin + len(seg)):
        fd = _receiving.fds[index]
        if fd == LOST_FD:
            raise fd_limit_error("a shared array's file descriptor was dropped on arrival")
        try:
            # Another window of a segment mapped already: a mapping of its own.
            fd = fd if seg is None else os.dup(fd)
            slot = None
            if sole is not True and _segcache.adopting() and _segcache.lending():
                slot = _segcache.returned(os.fstat(fd).st_ino)
            try:
                new = Segment.attach(fd, size, sole is True, origin, slot)
            except BaseException:
                if slot is not None:
                    _segcache.unmap_returned(slot, os.dup(fd), False)
                if seg is not None:
                    os.close(fd)
                raise
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise fd_limit_error("a shared array could not be mapped") from exc
            raise
        if seg is None:
            segments[index] = new
        seg = new
        _segcache.note_mapped(seg, fd)
        if sole is True:
            copies: dict[int, int] = _receiving.copies
            copies[size] = copies.get(size, 0) + 1
    array: np.ndarray[Any, Any] = np.ndarray(shape, dtype, buffer=seg,
                                             offset=offset + origin - seg.origin,
                                             strides=strides)
    if readonly:
        array.flags.writeable = False
    return array
