"""Recycled segments: the pool's cache of memfds whose pages are already
populated, lent out for plain arrays and taken back once no worker maps them.

Why: copying a plain array into a *fresh* memfd makes the kernel allocate
(and account, and later free) every page of it; that costs about twice the
copy itself. A memfd that a previous array already filled has its pages:
writing the next array of a fitting size into it is one memcpy.

Data flow (parent side, this process)::

    pickling (encode a task, lease=True)
        acquire(nbytes) --> a free slot of the size class (or a new memfd)
        pwrite the array into it; the message borrows its fd
    _dispatch.send: the task goes to worker W
        lend(slots, W)       (not sent after all: give_back(slots))
    worker W, after the task: "released: inodes ..." / "dropped: inodes ..."
        released(W, ...)  --> the slot is free again (within the byte budget,
                              else its fd is closed and the pages go back)
        dropped(W, ...)   --> the slot is closed, never reused
    worker W dies / is reaped: forget(W) --> every slot lent to it is closed
    W returns a lent slot by handle (a task handing back its argument):
        returned(inode)   --> the parent maps it too; it is freed only once W
                              released it *and* the parent's mappings are
                              collected (unmap_returned), never if either
                              side passed it on
    spares (``_spares.py``): free slots lent beside a task for its results
        acquire_free(size); W writes a result into one and reports it dropped

Worker side (:func:`track_releases`): every segment a worker maps is
counted per inode; when the last mapping of an inode is gone the inode is
reported released. A segment the worker sends on by handle (to a process
other than the parent it replies to) or that is mapped while it forks is
reported dropped instead: another process may map it, so it must never be
written again. A segment returned to the parent in the reply
(:func:`replying`) is not passed on: the parent holds it as returned (above).
The parent only ever reuses a slot that the one process it was lent to said
it released, and only once its own mappings of it (a returned slot, an
adopted result) are collected, so a recycled segment is never handed out
while any process still maps it. The parent writes slots only with
``pwrite``, and keeps only their fds while they are free.

Watchers (:func:`watch`): a daemon also learns the fate of segments it did
not make, the memfds same-host clients deposit (``_depositwatch``): the
by-handle segments of each message :func:`lend` records, the reports and
deaths above, and this process's own mappings (:func:`note_mapped`) are
passed on to it; without a watcher nothing more is done.

Budget: the free slots' bytes never exceed :func:`shm_cache_limit` (default:
an eighth of the memory available when first used; ``SHMRUNNER_SHM_CACHE``
or :func:`set_shm_cache` override, 0 disables), nor their number an eighth
of the soft ``RLIMIT_NOFILE`` (each holds an fd). Slots lent out are not
counted: they are the arrays in flight, as without a cache.
"""

from __future__ import annotations

import collections
import os
import resource
import struct
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from ._shmlimits import available_memory
from .errors import ConfigError

__all__ = ["Slot", "acquire", "lend", "give_back", "released", "dropped", "forget",
           "set_shm_cache", "shm_cache_info", "shm_cache_limit", "size_class",
           "track_releases", "note_mapped", "new_slot", "discard", "note_escaped",
           "pending_reports", "encode_report", "decode_report", "acquire_free", "report_released",
           "report_dropped", "returned", "lending", "unmap_returned", "replying", "Watcher",
           "watch", "unwatch", "check_env"]


@dataclass(eq=False)
class Slot:
    fd: int
    size: int
    inode: int
    spare: bool = False  # lent beside a task for its result (``_spares.py``)
    # Returned by its worker by handle (a task handing back the array it got):
    # the parent's own mappings of it, whether the worker released it since,
    # and whether either side passed it on (then it is never reused).
    parent_maps: int = 0
    worker_done: bool = False
    escaped: bool = False


_lock = threading.Lock()
_free: dict[int, list[Slot]] = collections.defaultdict(list)  # size class -> slots
_order: collections.OrderedDict[int, Slot] = collections.OrderedDict()  # inode -> free slot, LRU
_free_bytes = 0
_lent: dict[object, dict[int, Slot]] = {}  # holder -> inode -> slot
# (fd, size) adopt() queued, and their bytes (under _adopted_lock, never
# waited for by adopt: it runs in finalizers).
_adopted: collections.deque[tuple[int, int]] = collections.deque()
_adopted_bytes = 0
_adopted_lock = threading.Lock()
_out: dict[int, Slot] = {}  # inode -> slot being filled or sent: neither free nor lent yet
# Returned slots: the worker released them, the parent still maps them.
_awaiting: dict[int, Slot] = {}
_unreturned: collections.deque[tuple[Slot, bool]] = collections.deque()  # finalizers queue
_limit: int | None = None
_stats = {"hits": 0, "misses": 0, "evicted": 0, "recycled": 0, "dropped": 0,
          "spares_granted": 0, "spares_used": 0}


class Watcher(Protocol):
    """Segments this process did not make but must know the fate of (a
    daemon's deposits from same-host clients, ``_depositwatch``): told what
    workers are sent and report, and the mappings made here; true while it
    watches anything."""

    def __bool__(self) -> bool: ...
    def sent(self, worker: object, inodes: list[int]) -> None: ...
    def released(self, worker: object, inodes: list[int]) -> None: ...
    def dropped(self, worker: object, inodes: list[int]) -> None: ...
    def forget(self, worker: object) -> None: ...
    def mapped(self, segment: Any, inode: int) -> None: ...


_watchers: tuple[Watcher, ...] = ()  # replaced, never changed in place: read without a lock


def watch(watcher: Watcher) -> None:
    global _watchers
    with _lock:
        _watchers = (*_watchers, watcher)


def unwatch(watcher: Watcher) -> None:
    global _watchers
    with _lock:
        _watchers = tuple(w for w in _watchers if w is not watcher)


def _watching() -> tuple[Watcher, ...]:
    return tuple(w for w in _watchers if w) if _watchers else ()


def size_class(nbytes: int) -> int:
    """The segment size an array of ``nbytes`` is copied into: whole pages, and
    past 1 MiB rounded up to 1/8 of a power of two, so that arrays of nearly
    the same size share slots (at most 12.5 % of a slot unused)."""
    page = 4096
    size = max(-(-nbytes // page) * page, page)
    if size > (1 << 20):
        step = 1 << (size.bit_length() - 4)
        size = -(-size // step) * step
    return size


def shm_cache_limit() -> int:
    """The byte budget of free cached segments (see the module docstring)."""
    global _limit
    if _limit is None:
        env = _env_limit()
        _limit = env if env is not None else available_memory() // 8
    return _limit


def check_env() -> None:
    """Raise ConfigError for a malformed ``SHMRUNNER_SHM_CACHE`` now (a pool
    or scheduler is made), not later from inside a task's pickling or the
    manager thread, where it fails tasks instead of the program's setup."""
    if _limit is None:
        _env_limit()


def _env_limit() -> int | None:
    env = os.environ.get("SHMRUNNER_SHM_CACHE")
    if not env:
        return None
    try:
        limit = int(env)
    except ValueError:
        limit = -1
    if limit < 0:  # as set_shm_cache: a negative budget is a mistake, not "off"
        raise ConfigError(
            f"SHMRUNNER_SHM_CACHE={env!r} is not a whole number of bytes >= 0; "
            "set it to e.g. 1073741824, 0 to disable the cache, or unset it")
    return limit


def set_shm_cache(max_bytes: int | None) -> None:
    """Set the byte budget of recycled shared-memory segments kept for reuse
    (0 disables the cache and gives its pages back now; None: the default)."""
    global _limit
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool)
                                  or max_bytes < 0):
        raise ValueError(f"max_bytes must be a whole number >= 0 or None, not {max_bytes!r}")
    with _lock:
        _limit = max_bytes
    _take_in_adopted()
    limit = shm_cache_limit()
    with _lock:
        closing = _evict_locked(limit)
    _close(closing)


def shm_cache_info() -> dict[str, int]:
    """Counters of the segment cache: ``limit``, ``free_bytes``,
    ``free_segments``, ``lent_segments``, ``hits``, ``misses``, ``recycled``,
    ``evicted``, ``dropped``, ``spares_granted``, ``spares_used`` (free segments
    lent beside tasks for the workers' results, and how many held one)."""
    _take_in_adopted()
    with _lock:
        lent = sum(len(held) for held in _lent.values())
        return {"limit": _limit if _limit is not None else -1, "free_bytes": _free_bytes,
                "free_segments": len(_order), "lent_segments": lent, **_stats}


def acquire(nbytes: int) -> Slot | None:
    """A free slot for ``nbytes`` (removed from the cache: the caller lends or
    gives it back), or None when none fits (the caller makes a new one)."""
    _take_in_adopted()
    size = size_class(nbytes)
    with _lock:
        slots = _free.get(size)
        if not slots:
            _stats["misses"] += 1
            return None
        slot = slots.pop()
        _take_locked(slot)
        _out[slot.inode] = slot
        _stats["hits"] += 1
        return slot


def acquire_free(size: int) -> Slot | None:
    """A free slot of exactly ``size`` bytes, or None (not counted as a miss:
    the caller, ``_spares.grant``, makes no new memfd without one)."""
    _take_in_adopted()
    with _lock:
        slots = _free.get(size)
        if not slots:
            return None
        slot = slots.pop()
        _take_locked(slot)
        _out[slot.inode] = slot
        _stats["spares_granted"] += 1
        return slot


def new_slot(fd: int, size: int) -> Slot:
    """A slot for a new memfd of ``size`` (the caller fills, then lends it)."""
    slot = Slot(fd, size, os.fstat(fd).st_ino)
    with _lock:
        _out[slot.inode] = slot
    return slot


def discard(slot: Slot) -> None:
    """A slot that could not be filled: close it."""
    with _lock:
        _out.pop(slot.inode, None)
    _close([slot])


def adopting() -> bool:
    """Whether segments received here may be recycled (not in a worker, whose
    recycled segments belong to its parent's cache)."""
    return not _tracking


def adopt(fd: int) -> None:
    """``fd`` is a segment nobody maps any more (a result its receiver let go):
    keep it as a free slot, or close it (wrong size, no room in the budget).

    Called by a garbage collector's finalizer, which may run inside any
    allocation, even one made under ``_lock``: only queued here, taken in by
    the next :func:`acquire` (or info, or budget change). Closed at once
    when the cache could not keep it anyway: queued, it would hold an fd
    and its pages until the pool's next task, however many arrays the
    program drops, so the queue's bytes count against the budget too."""
    size = _class_size(fd)
    # Never waits: a finalizer may run while this thread counts the queue;
    # then this one segment is not recycled.
    if size is None or not _adopted_lock.acquire(blocking=False):
        _close([Slot(fd, 0, 0)])
        return
    global _adopted_bytes
    try:
        keep = (len(_adopted) + len(_order) < _max_free_segments()
                and _free_bytes + _adopted_bytes + size <= shm_cache_limit())
        if keep:
            _adopted.append((fd, size))
            _adopted_bytes += size
    finally:
        _adopted_lock.release()
    if not keep:
        _close([Slot(fd, 0, 0)])


def _class_size(fd: int) -> int | None:
    """The size of segment ``fd`` if the cache could hold it (a size class)."""
    try:
        size = os.fstat(fd).st_size
    except OSError:
        return None
    return size if size == size_class(size) else None


def _take_in_adopted() -> None:
    global _adopted_bytes
    while _adopted:
        try:
            fd, size = _adopted.popleft()
        except IndexError:
            return
        with _adopted_lock:
            _adopted_bytes -= size
        _adopt(fd)
    while _unreturned:
        try:
            slot, kept = _unreturned.popleft()
        except IndexError:
            return
        _parent_unmapped(slot, kept)


def returned(inode: int) -> Slot | None:
    """A worker's reply maps ``inode`` here by handle: if it is a slot lent to
    a worker (a task returning the array it was given), the slot is freed only
    once the worker released it *and* every such mapping here is gone
    (:func:`unmap_returned`); None for any other segment."""
    with _lock:
        for held in _lent.values():
            slot = held.get(inode)
            if slot is not None:
                slot.parent_maps += 1
                return slot
    return None


def lending() -> bool:
    """Whether any slot is lent out (else no received segment can be one)."""
    return bool(_lent) and any(_lent.values())


def unmap_returned(slot: Slot, fd: int, kept: bool) -> None:
    """A mapping of a returned slot here is collected (its own ``fd``);
    ``kept``: it was neither sent on by handle nor mapped across a fork.
    Called by a finalizer: only queued (see :func:`adopt`), its fd closed now."""
    _close([Slot(fd, 0, 0)])
    _unreturned.append((slot, kept))


def _parent_unmapped(slot: Slot, kept: bool) -> None:
    with _lock:
        slot.parent_maps -= 1
        slot.escaped = slot.escaped or not kept
        settled = slot.parent_maps == 0 and slot.worker_done
        if settled:
            _awaiting.pop(slot.inode, None)
    if settled:
        if slot.escaped:
            _close([slot])
        else:
            with _lock:
                _stats["recycled"] += 1
            _free_slots([slot])


def _adopt(fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError:
        return
    if st.st_size != size_class(st.st_size) or st.st_size > shm_cache_limit():
        _close([Slot(fd, st.st_size, st.st_ino)])
        return
    _free_slots([Slot(fd, st.st_size, st.st_ino)])


def lend(slots: list[Slot], holder: object, borrowed: list[Any] | None = None) -> None:
    """``slots`` were sent to ``holder`` (a worker); they come back with
    :func:`released` or :func:`forget`. ``borrowed``: the segments the same
    message sends by handle (a :class:`Watcher` may want to know)."""
    if borrowed and (watchers := _watching()):
        inodes = [os.fstat(seg.fd).st_ino for seg in borrowed]
        for watcher in watchers:
            watcher.sent(holder, inodes)
    if not slots:
        return
    with _lock:
        held = _lent.setdefault(holder, {})
        for slot in slots:
            _out.pop(slot.inode, None)
            held[slot.inode] = slot


def give_back(slots: list[Slot]) -> None:
    """``slots`` were never sent (the message was dropped): free again."""
    _free_slots(slots)


def released(holder: object, inodes: list[int]) -> None:
    """``holder`` no longer maps these inodes: their slots may be reused."""
    for watcher in _watching():
        watcher.released(holder, inodes)
    with _lock:
        held = _lent.get(holder, {})
        slots = [slot for slot in (held.pop(inode, None) for inode in inodes) if slot is not None]
        for slot in slots:
            if slot.parent_maps:  # returned: this process still maps it
                slot.worker_done = True
                _awaiting[slot.inode] = slot
        closing = [slot for slot in slots if slot.escaped and not slot.parent_maps]
        slots = [slot for slot in slots if not slot.escaped and not slot.parent_maps]
        _stats["recycled"] += len(slots)
    _close(closing)
    _free_slots(slots)


def dropped(holder: object, inodes: list[int]) -> None:
    """``holder`` passed these inodes on (or forked): never reuse them."""
    for watcher in _watching():
        watcher.dropped(holder, inodes)
    with _lock:
        held = _lent.get(holder, {})
        slots = [slot for slot in (held.pop(inode, None) for inode in inodes) if slot is not None]
        used = sum(slot.spare for slot in slots)  # a spare is dropped when it carries a result
        for slot in slots:
            slot.escaped = True  # a mapping here must not bring it back (unmap_returned)
        _stats["spares_used"] += used
        _stats["dropped"] += len(slots) - used
    _close(slots)


def forget(holder: object) -> None:
    """``holder`` is gone: close what it was lent (a process it forked may
    still map those pages, so they are never reused)."""
    for watcher in _watching():
        watcher.forget(holder)
    with _lock:
        slots = list(_lent.pop(holder, {}).values())
        for slot in slots:
            slot.escaped = True
        _stats["dropped"] += len(slots)
    _close(slots)


def _free_slots(slots: list[Slot]) -> None:
    if not slots:
        return
    limit = shm_cache_limit()
    global _free_bytes
    closing: list[Slot] = []
    with _lock:
        for slot in slots:
            _out.pop(slot.inode, None)
            slot.spare = slot.worker_done = slot.escaped = False
            slot.parent_maps = 0
            if slot.size > limit:
                closing.append(slot)
                continue
            _free[slot.size].append(slot)
            _order[slot.inode] = slot
            _free_bytes += slot.size
        closing += _evict_locked(limit)
    _close(closing)


def _take_locked(slot: Slot) -> None:
    global _free_bytes
    del _order[slot.inode]
    _free_bytes -= slot.size


def _max_free_segments() -> int:
    """How many free slots may be kept: each holds an fd, and a byte budget
    alone would let a cache of small segments take most of a low
    ``RLIMIT_NOFILE`` (4096 on some clusters), leaving none for the arrays
    the program holds. An eighth of the soft limit, as the byte budget is of
    memory."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(soft // 8, 16)


def _evict_locked(limit: int) -> list[Slot]:
    """Drop the least recently freed slots until the free bytes fit ``limit``
    and their fds :func:`_max_free_segments`."""
    global _free_bytes
    out = []
    most = _max_free_segments()
    while (_free_bytes > limit or len(_order) > most) and _order:
        _, slot = _order.popitem(last=False)
        _free_bytes -= slot.size
        _free[slot.size].remove(slot)
        out.append(slot)
    _stats["evicted"] += len(out)
    return out


def _close(slots: list[Slot]) -> None:
    for slot in slots:
        try:
            os.close(slot.fd)
        except OSError:
            pass


def _reset_in_child() -> None:
    """A fork() child holds copies of the cache's fds: close them, start empty."""
    global _lock, _free_bytes, _watchers, _adopted_lock, _adopted_bytes
    _lock = threading.Lock()
    _adopted_lock = threading.Lock()
    _adopted_bytes = 0
    _watchers = ()
    slots = (list(_order.values()) + list(_out.values())
             + [s for held in _lent.values() for s in held.values()])
    slots += [Slot(fd, 0, 0) for fd, _ in _adopted]
    slots += list(_awaiting.values())
    _adopted.clear()
    _awaiting.clear()
    _unreturned.clear()
    _out.clear()
    _free.clear()
    _order.clear()
    _lent.clear()
    _free_bytes = 0
    _close(slots)


os.register_at_fork(after_in_child=_reset_in_child)


# --- worker side: which inodes this process still maps --------------------------

_tracking = False
_maps: dict[int, int] = {}  # inode -> live segments mapping it
_escaped: set[int] = set()
# deques: appended by finalizers on any thread, taken with popleft (atomic).
_to_release: collections.deque[int] = collections.deque()
_to_drop: collections.deque[int] = collections.deque()
REPORT = struct.Struct("<II")
_MAX_REPORT = 1 << 16  # inodes per report, each way (a worker's report is bounded)


def track_releases() -> None:
    """Count this process's mappings per inode (a worker calls this once)."""
    global _tracking
    _tracking = True
    os.register_at_fork(before=_escape_all)


def note_mapped(segment: Any, fd: int) -> None:
    """``segment`` maps the file of ``fd``: count it until it is collected."""
    if not _tracking:
        for watcher in _watching():
            watcher.mapped(segment, os.fstat(fd).st_ino)
        return
    inode = os.fstat(fd).st_ino
    _maps[inode] = _maps.get(inode, 0) + 1
    weakref.finalize(segment, _unmapped, inode)


def note_unmapped_fd(fd: int) -> None:
    """An fd received but closed without being mapped (its message failed)."""
    if not _tracking:
        return
    try:
        inode = os.fstat(fd).st_ino
    except OSError:
        return
    if not _maps.get(inode):
        _to_release.append(inode)


_replying = False


def replying(on: bool) -> None:
    """A worker encodes its reply to the parent: a segment returned by handle
    is not passed on (the parent frees it only once this process released it
    and its own mappings are gone, :func:`returned`)."""
    global _replying
    _replying = on


def note_escaped(segment: Any) -> None:
    """``segment`` is being sent on by handle: its inode must never be reused."""
    if _tracking and not _replying:
        inode = os.fstat(segment.fd).st_ino
        if inode in _maps and inode not in _escaped:
            _escaped.add(inode)
            _to_drop.append(inode)


def report_released(inode: int) -> None:
    """A lent segment this process never mapped is done with (``_spares``)."""
    _to_release.append(inode)


def report_dropped(inode: int) -> None:
    """A lent segment this process sends on: never to be reused (``_spares``)."""
    _to_drop.append(inode)


def _unmapped(inode: int) -> None:
    left = _maps.get(inode, 1) - 1
    if left > 0:
        _maps[inode] = left
        return
    _maps.pop(inode, None)
    if inode in _escaped:
        _escaped.discard(inode)  # reported dropped already
    else:
        _to_release.append(inode)


def _escape_all() -> None:
    for inode in _maps:
        if inode not in _escaped:
            _escaped.add(inode)
            _to_drop.append(inode)


def pending_reports() -> tuple[list[int], list[int]] | None:
    """(released, dropped) inodes not yet reported, or None; clears them."""
    if not _to_release and not _to_drop:
        return None
    rel, drop = _take(_to_release), _take(_to_drop)
    # Report a dropped inode only once; it can be mapped again (a parent's
    # shared array sent twice) but its slot is gone already.
    return rel, drop


def _take(queue: collections.deque[int]) -> list[int]:
    out: list[int] = []
    while queue and len(out) < _MAX_REPORT:
        try:
            out.append(queue.popleft())
        except IndexError:
            break
    return out


def encode_report(rel: list[int], drop: list[int]) -> bytes:
    return REPORT.pack(len(rel), len(drop)) + struct.pack(f"<{len(rel) + len(drop)}Q",
                                                          *rel, *drop)


def decode_report(payload: bytes | bytearray | memoryview,
                  offset: int) -> tuple[list[int], list[int]]:
    """Inverse of :func:`encode_report`; raises ValueError on a malformed report."""
    nrel, ndrop = REPORT.unpack_from(payload, offset)
    if nrel > _MAX_REPORT or ndrop > _MAX_REPORT:
        raise ValueError("report too long")
    offset += REPORT.size
    if len(payload) - offset != 8 * (nrel + ndrop):
        raise ValueError("report length mismatch")
    values = list(struct.unpack_from(f"<{nrel + ndrop}Q", payload, offset))
    return values[:nrel], values[nrel:]
