"""Spare segments for workers' results: a populated memfd from the pool's
cache travels beside a task, unmapped, so that the worker copies an array it
returns into pages that already exist instead of a fresh memfd.

Why: a fresh memfd makes the kernel allocate every page of a result (about
70 ms per 64 MiB here, against 16 ms to ``pwrite`` the same bytes into a
populated one). A worker cannot reuse its own results' segments: once sent,
the caller maps them, and only the pool's process learns when the caller lets
go (its cache adopts them, ``_segcache.adopt``). So the pool lends them back.

Data flow::

    a worker's reply arrives (parent, _tasks.decode_outcome)
        learned(task, copies) --> its function's replies hold N arrays of
                                  size class S copied for them
    encode a task of that function (parent, dumps(lease=True))
        grant(task, fn)    --> up to N *free* cached slots of class S, or
                               fewer (never a new memfd, never a cache miss);
                               lent with the task like its arrays, their fd
                               indices ride in the message's trailer
    worker, loads:   stash(fd)          (checked: sealed memfd of a size class)
    worker, result:  take(nbytes)       --> copy_to_memfd writes into it; its
                                            inode is reported dropped (the
                                            parent closes its lent fd; the
                                            result's own fd is adopted later)
    worker, after the reply: give_back_unused() --> closed, reported released
    parent, released: an unused spare is free again

Safety is the cache's: a spare is a slot no process maps (free in the cache),
lent to exactly one worker, and the worker never maps it; it writes it only
for the result it then sends, and keeps no fd of it afterwards.
"""

from __future__ import annotations

import collections
import fcntl
import os
import struct
import threading
from collections.abc import Hashable

from . import _segcache

__all__ = ["key_of", "grant", "learned", "TRAILER", "trailer", "split_trailer", "stash", "take",
           "give_back_unused"]

# --- the pool's side -----------------------------------------------------------

# What the last reply of a task function held: size class -> arrays copied for
# it (a map chunk holds several). Keyed by the function the user gave (its
# chunks run through ``run_chunk``; :func:`key_of`), bounded, least recently
# used first out.
_MAX_KEYS = 256
_MAX_IN_FLIGHT = 1 << 16
_lock = threading.Lock()
_wants: collections.OrderedDict[Hashable, dict[int, int]] = collections.OrderedDict()
_keys: collections.OrderedDict[int, Hashable] = collections.OrderedDict()  # task id -> key


def key_of(fn: object) -> Hashable | None:
    """What spares are learned by for tasks of ``fn``: its module and
    qualified name (no reference to it, so nothing is kept alive; two
    functions of one name share what they learn, at worst a spare unused)."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return (module, name) if type(module) is str and type(name) is str else None


def grant(task_id: int, key: Hashable | None) -> list[_segcache.Slot]:
    """Free cached slots for the results of task ``task_id`` (whose function
    is ``key``), as many of each size class as its function's last reply
    held copies of; the caller lends them. [] when none is wanted or free:
    a spare is never a new memfd, nor a cache miss."""
    if key is None:
        return []
    with _lock:
        _keys[task_id] = key
        if len(_keys) > _MAX_IN_FLIGHT:  # tasks lost without a reply
            _keys.popitem(last=False)
        want = _wants.get(key)
    slots: list[_segcache.Slot] = []
    for size, count in (want or {}).items():
        for _ in range(count):
            if len(slots) >= MAX_SPARES or (slot := _segcache.acquire_free(size)) is None:
                break
            slot.spare = True
            slots.append(slot)
    return slots


def learned(task_id: int, copies: dict[int, int]) -> None:
    """Task ``task_id``'s reply held ``copies[nbytes]`` arrays of ``nbytes``
    copied into segments for it (fresh or spare): its function's next tasks
    get spares of those classes; none once a reply holds no copy."""
    with _lock:
        key = _keys.pop(task_id, None)
        if key is None:
            return
        if not copies:
            _wants.pop(key, None)
            return
        want: dict[int, int] = {}
        for nbytes, count in copies.items():
            size = _segcache.size_class(max(nbytes, 1))
            want[size] = min(want.get(size, 0) + count, MAX_SPARES)
        _wants[key] = want
        _wants.move_to_end(key)
        if len(_wants) > _MAX_KEYS:
            _wants.popitem(last=False)


# The trailer after a task's pickle: the indices (in the message's fds) of its
# spares, their count, and a marker byte. A pickle always ends with STOP
# (``.``), so a message ending in the marker has a trailer; pickle.loads
# ignores bytes past STOP.
TRAILER = b"S"
_INDEX = struct.Struct("<H")
MAX_SPARES = 4


def trailer(indices: list[int]) -> bytes:
    return b"".join(_INDEX.pack(i) for i in indices) + _INDEX.pack(len(indices)) + TRAILER


def split_trailer(data: memoryview, nfds: int) -> list[int]:
    """The spare fd indices a message's trailer names ([] without one);
    ValueError for a malformed trailer."""
    if len(data) < 3 or data[-1:] != TRAILER:
        return []
    (count,) = _INDEX.unpack_from(data, len(data) - 3)
    if count > MAX_SPARES or len(data) < 3 + 2 * count:
        raise ValueError("malformed spare trailer")
    start = len(data) - 3 - 2 * count
    indices = [_INDEX.unpack_from(data, start + 2 * k)[0] for k in range(count)]
    if len(set(indices)) != count or any(i >= nfds for i in indices):
        raise ValueError("spare trailer names fds the message does not have")
    return indices


# --- the worker's side ---------------------------------------------------------

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_stash: list[tuple[int, int, int]] = []  # (fd, size, inode), held only while a task runs


def stash(fd: int) -> None:
    """Keep a spare received with a task (this process owns ``fd`` now). One
    that is not a size-sealed memfd of a size class is closed, unused."""
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        _close(fd)
        return
    if seals & _SEALS != _SEALS or st.st_size != _segcache.size_class(st.st_size) \
            or len(_stash) >= MAX_SPARES:
        _close(fd)
        _segcache.report_released(st.st_ino)
        return
    _stash.append((fd, st.st_size, st.st_ino))


def take(size: int) -> int | None:
    """The fd of a spare of exactly ``size`` bytes for a result (the caller
    owns and sends it; its inode is reported dropped), or None."""
    for k, (fd, have, inode) in enumerate(_stash):
        if have == size:
            del _stash[k]
            _segcache.report_dropped(inode)
            return fd
    return None


def give_back_unused() -> None:
    """After a task's reply: the spares it did not use go back (released)."""
    while _stash:
        fd, _, inode = _stash.pop()
        _close(fd)
        _segcache.report_released(inode)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _forget_in_child() -> None:
    # A fork() child of a worker must neither write nor report its parent's spares.
    global _lock
    for fd, _, _ in _stash:
        _close(fd)
    _stash.clear()
    # A fork() child of a pool's process: the copy of the lock may be held
    # forever (a thread of the parent held it at the fork), and the tasks
    # in flight are the parent's pools'.
    _lock = threading.Lock()
    _keys.clear()


os.register_at_fork(after_in_child=_forget_in_child)
