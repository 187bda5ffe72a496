"""memfd segments: create, seal, reserve, attach (verified), copy into.

A :class:`Segment` is one anonymous ``memfd`` and its ``MAP_SHARED`` mapping,
the buffer behind every shared numpy array (see ``shm.py`` for why memfd).
Data flow: the sender either allocates a segment for an array made in shared
memory (:meth:`Segment.allocate`) or copies a private array into a fresh
memfd whose fd it owns until the message carrying it is sent
(:func:`copy_to_memfd`, :func:`close_copies`); the fd crosses over an AF_UNIX
socket and the receiver maps it with :meth:`Segment.attach` once it has
checked the seals and size.

Lifetimes: a :class:`Segment` owns one fd and one mapping; both are released
when the last numpy array viewing the mapping is garbage collected
(``weakref.finalize``). Under the ``fork`` start method a worker inherits, as
fork does, every segment its parent held at that moment (a task may use a
module-level shared array), and keeps those alive until it exits; ``spawn``
and ``forkserver`` workers hold only what they are sent. An fd is kept open
while the mapping lives so the array can be passed on again by handle (a
worker returning the array it received costs no copy). Segments are created ``MFD_CLOEXEC``.

Sealed size: every memfd is sealed against shrinking and growing (and against
further seals) as soon as it is sized, and a receiver maps only a segment
that carries those seals and is as large as its handle says. Without them,
any process holding the fd could ``ftruncate`` it and every process mapping
it would die of SIGBUS on its next access; with them the ``ftruncate`` fails
(EPERM). Contents stay writable by design: shared arrays are shared.

Recycling (``_segcache.py``): plain arrays a pool sends go into recycled
segments (:func:`fill_slot`); a segment received as a copy its sender kept
nothing of (``sole``) goes to the cache instead of being closed once its
arrays are collected, unless it was sent on by handle or this process forked
while it was mapped; a view of part of a large segment maps only its window
(``origin``).

State: the fds :func:`copy_to_memfd` made and no message has closed yet
(``_copies``), which a forked child closes at once.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _hugepages, _segcache, _spares
from ._shmlimits import check_fits, mib, raise_fd_limit
from .errors import ProtocolError, SharedMemoryError

__all__ = ["Segment", "close_copies", "copy_to_memfd", "fill_slot"]

# Set on every segment once sized; required of every segment received.
_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class Segment(mmap.mmap):
    """One memfd and its shared mapping; numpy arrays use it as their buffer.

    The fd stays open as long as the mapping is referenced, so the segment can
    be sent on by handle; both are released by the garbage collector.
    """

    fd: int
    address: int
    origin: int = 0  # the file offset this mapping starts at

    @classmethod
    def attach(cls, fd: int, size: int, sole: bool = False, origin: int = 0,
               slot: _segcache.Slot | None = None) -> Segment:
        """Map an fd received from another process; once this returns, the
        segment owns ``fd`` (on failure the caller still does).

        Refuses (ProtocolError) an fd that is not a memfd sealed against
        resizing, or smaller than ``size``: mapping it would let its sender
        crash this process with SIGBUS by shrinking it later.

        ``sole``: its sender kept nothing of it (a private array's copy), so
        once this process lets go of it, nobody maps it: its fd goes to the
        segment cache for reuse instead of being closed, unless it was sent
        on by handle (:meth:`shared_out`) or this process forked meanwhile.
        ``origin``: map only ``size`` bytes from this page-aligned file offset
        (a view of part of a large array). ``slot``: a recycled slot a worker
        returned by handle (``_segcache.returned``), told when this is collected."""
        if origin < 0 or origin % mmap.ALLOCATIONGRANULARITY:
            raise ProtocolError(f"refused a shared array: its window starts at {origin}, "
                                "not a page boundary; it was not sent by shmrunner")
        _check_sealed(fd, origin + size)
        raise_fd_limit()  # each segment held costs two fds (this one and mmap's)
        # Mapped lazily, never with MAP_POPULATE: a caller may read a result
        # in part or not at all (populating and unmapping cost it 3.4 ms per
        # 64 MiB whatever it reads), and even a worker that reads or writes
        # its whole argument spends less CPU faulting it in (a read fault maps
        # 16 pages, fault-around) than populating it: 230 vs 340 ms of worker
        # CPU for a W2s map, 315 vs 335 for W2, 305 vs 340 for W4 (bench
        # RESULTS.md, "W6, W3 and W2s, evening of 2026-12-02").
        seg = cls(fd, size, flags=mmap.MAP_SHARED, offset=origin)
        seg.origin = origin
        seg._own(fd, sole, slot)
        return seg

    @classmethod
    def allocate(cls, nbytes: int) -> Segment:
        """A new zero-filled segment of ``nbytes`` whose pages are reserved up front."""
        size = max(nbytes, 1)  # mmap refuses an empty file
        fd = _new_memfd(size, size)
        try:
            _reserve(fd, size)
            seg = cls(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        seg._own(fd)
        return seg

    def _own(self, fd: int, sole: bool = False, slot: _segcache.Slot | None = None) -> None:
        self.fd = fd
        probe = np.ndarray((1,), np.uint8, buffer=self)
        self.address = probe.ctypes.data
        del probe
        self._sole = [(sole or slot is not None) and _segcache.adopting()]
        if self._sole[0]:
            _sole_segments.add(self)
        weakref.finalize(self, _finish, fd, self._sole, slot)

    def shared_out(self) -> None:
        """This segment is being sent to another process by handle."""
        self._sole[0] = False


# Segments whose fd may be recycled once collected (Segment.attach ``sole``).
_sole_segments: weakref.WeakSet[Segment] = weakref.WeakSet()


def _finish(fd: int, sole: list[bool], slot: _segcache.Slot | None) -> None:
    if slot is not None:
        _segcache.unmap_returned(slot, fd, sole[0])
    elif sole[0]:
        _segcache.adopt(fd)
    else:
        os.close(fd)


def _fork_shares_all() -> None:
    """A forked child maps every segment this process maps: none is sole any more."""
    for seg in list(_sole_segments):
        seg._sole[0] = False
    _sole_segments.clear()


os.register_at_fork(before=_fork_shares_all)


def _new_memfd(size: int, fill: int) -> int:
    """A memfd of ``size`` bytes whose size is sealed (see the module docstring),
    about to be filled from its start with ``fill`` bytes (their pages are made
    huge ones first where the host asks programs to opt in: ``_hugepages``)."""
    # Every segment made or received holds fds: the first lifts the soft limit
    # (a program may never call shm.empty, which does it too).
    raise_fd_limit()
    create: Callable[[str, int], int] | None = getattr(os, "memfd_create", None)
    if create is None:
        # A Python built against a libc without it (glibc < 2.27): an OSError,
        # as on a kernel without memfds, so that transfers fall back to pickling.
        raise OSError(errno.ENOSYS, "this Python has no os.memfd_create")
    fd = create("shmrunner", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS)
        _hugepages.populate(fd, fill, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reserve(fd: int, size: int) -> None:
    """Allocate the pages now: a full tmpfs or memory cgroup then fails here
    with a SharedMemoryError instead of a SIGBUS on a later write through a map."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise SharedMemoryError(
                f"cannot reserve {mib(size)} of shared memory: {exc.strerror}; "
                "free memory, release arrays you no longer use, or use smaller arrays"
            ) from exc
        raise


def _check_sealed(fd: int, size: int) -> None:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        actual = os.fstat(fd).st_size
    except OSError as exc:  # EINVAL: not a memfd (a file, a pipe, a socket)
        raise ProtocolError(
            f"refused a shared array: its fd is not a shared memory segment ({exc.strerror}); "
            "it was not sent by shmrunner"
        ) from exc
    if seals & _SIZE_SEALS != _SIZE_SEALS:
        raise ProtocolError(
            "refused a shared array: its segment is not sealed against resizing, so its "
            "sender could crash this process (SIGBUS); it was not sent by shmrunner"
        )
    if actual < size:
        raise ProtocolError(
            f"refused a shared array: its segment holds {actual} bytes but its handle "
            f"says {size}; it was not sent by shmrunner"
        )


# --- transfer: plain arrays copied into a fresh segment ------------------------


def copy_to_memfd(array: np.ndarray[Any, Any]) -> tuple[int, int, tuple[int, ...]]:
    """Copy a private array into a new memfd; return ``(fd, size, strides)``.

    The caller owns the fd and closes it once it has been sent. Raises OSError
    when shared memory cannot be used (the caller falls back to pickling) and
    SharedMemoryError when the array cannot fit.
    """
    nbytes = array.nbytes
    check_fits(nbytes)
    size = max(nbytes, 1)
    # Sized to its cache size class: once its receiver lets go, the segment
    # can serve any array of that class (``_segcache.adopt``); the tail stays
    # a hole that costs nothing.
    fd = _spares.take(_segcache.size_class(size))  # a worker's result: pages that exist
    if fd is None:
        fd = _new_memfd(_segcache.size_class(size), size)
    _copies.add(fd)
    try:
        if array.flags.c_contiguous or array.flags.f_contiguous:
            # Same memory order on both sides; pwrite is one kernel copy and
            # reports ENOSPC instead of faulting.
            flat = (array if array.flags.c_contiguous else array.T).reshape(-1)
            _pwrite_all(fd, memoryview(flat.view(np.uint8)))  # type: ignore[arg-type]
            strides = array.strides
        else:
            _reserve(fd, size)  # a write through the map would SIGBUS on a full tmpfs
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as mapping:
                dst = np.ndarray(array.shape, array.dtype, buffer=mapping)
                np.copyto(dst, array, casting="no")
                strides = dst.strides
                del dst
    except BaseException:
        close_copies([fd])
        raise
    return fd, size, tuple(strides)


def fill_slot(array: np.ndarray[Any, Any]) -> _segcache.Slot | None:
    """Copy a contiguous private array into a recycled segment (``_segcache``),
    or a new one that will be recycled; None when the cache is off or the
    array is larger than its budget (the caller uses :func:`copy_to_memfd`).

    A recycled segment already has its pages: the copy is one memcpy in the
    kernel, without allocating (or later freeing) a page."""
    nbytes = array.nbytes
    size = _segcache.size_class(nbytes)
    if size > _segcache.shm_cache_limit():
        return None
    slot = _segcache.acquire(nbytes)
    if slot is None:
        check_fits(size)
        fd = _new_memfd(size, nbytes)
        try:
            slot = _segcache.new_slot(fd, size)
        except BaseException:
            os.close(fd)
            raise
    try:
        flat = (array if array.flags.c_contiguous else array.T).reshape(-1)
        _pwrite_all(slot.fd, memoryview(flat.view(np.uint8)))  # type: ignore[arg-type]
    except BaseException:
        _segcache.discard(slot)
        raise
    return slot


# Fds made by copy_to_memfd and not yet closed by their message. Pickling runs
# outside the pool's lock, so the pool may fork a worker meanwhile: the child
# closes these at once instead of holding a copy of each array until it exits.
_copies: set[int] = set()


def close_copies(fds: list[int]) -> None:
    """Close fds returned by :func:`copy_to_memfd` (once sent, or dropped)."""
    for fd in fds:
        # Forgotten before closed: a fork in between leaks one fd into the
        # child, where the other order could close an unrelated reused fd.
        _copies.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass


def _close_copies_in_child() -> None:
    for fd in _copies:
        try:
            os.close(fd)
        except OSError:
            pass
    _copies.clear()


os.register_at_fork(after_in_child=_close_copies_in_child)


def _pwrite_all(fd: int, data: memoryview) -> None:
    offset = 0
    try:
        while offset < len(data):
            offset += os.pwrite(fd, data[offset:], offset)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise SharedMemoryError(
                f"cannot copy {mib(len(data))} into shared memory: {exc.strerror}; "
                "free memory, release arrays you no longer use, or use smaller arrays"
            ) from exc
        raise
