"""The daemon's watch over memfds that same-host clients deposited: when may
the client write into one again?

A client copies its plain arrays into recycled memfds (its ``_segcache``)
and lends them to its side connection; it takes one back only when the
daemon says that no process maps it any more and the job can no longer run.

Data flow (this process, the daemon; one entry per deposited inode)::

    side thread: deposited(conn, segments)    the deposit's own mappings
        -> entry {conn, maps += 1 per Segment (weakref.finalize), workers {}}
    dispatch (``_segcache.lend`` with the message's by-handle segments):
        sent(W, inodes)        -> workers[W] += 1 per send (before it is sent)
    manager thread (a worker's release report, ``_segcache.released``/``dropped``):
        released(W, inodes)    -> workers[W] -= 1
        dropped(W, inodes)     -> escaped, W no longer counted (W passed it
                                  on, or forked: it never reports it released)
    manager thread: forget(W)  -> W died or was reaped: escaped (a process it
                                  forked may still map it; as ``_segcache``)
    any thread: mapped(segment, inode) -> maps += 1 (a worker's reply handing
        the array back by handle, mapped here: ``_segcache.note_mapped``)
    front thread: exported(fds) -> a result handing the inode to the client
        by handle: escaped (the client maps it as a result)
    fork() of this process with the inode mapped -> escaped (the child keeps
        the mapping until it exits)
    every mapping collected (finalizers only queue: they may run inside any
    allocation, even one made under the lock) and no worker holding it
        -> settled: (conn, inode, released or dropped) queued for the side
           thread, which tells that connection (``_localclients``)

Why this is enough: the daemon's mappings hold the job's arguments; while
the job may still run (queued, running, retried, journaled frames not yet
written) its arrays, hence their segments, are referenced here, so a
settled entry is a job that can no longer run from this memfd. A remote
worker gets the bytes as frames, which reference the mapping until sent.
Each release report of a worker follows a moment when it mapped the inode
no more; counting sends against reports (not a set) keeps a report that
crossed a second send from settling it. Anything unclear is "dropped": the
client closes that memfd and never writes it again.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["DepositWatch"]

# Settled entries not yet sent (per connection they are bounded by
# ``_localclients``): (connection serial, inode, released?).
Settled = tuple[int, int, bool]


class _Entry:
    __slots__ = ("conn", "maps", "workers", "escaped")

    def __init__(self, conn: int) -> None:
        self.conn = conn
        self.maps = 0
        self.workers: dict[object, int] = {}
        self.escaped = False


class DepositWatch:
    """Thread-safe; ``wake`` is called (from any thread, even a finalizer)
    when something may have settled: the side thread then calls ``take``."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._unmapped: collections.deque[int] = collections.deque()  # from finalizers
        self._settled: collections.deque[Settled] = collections.deque()
        self._closed = False
        self.released_count = 0  # deposited memfds their client may reuse
        self.dropped_count = 0  # ... it must not
        _watches.add(self)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def deposited(self, conn: int, segments: list[Any]) -> None:
        """``segments`` (mapped here) were deposited by connection ``conn``."""
        with self._lock:
            for seg in segments:
                inode = os.fstat(seg.fd).st_ino
                entry = self._entries.get(inode)
                if entry is None:
                    entry = self._entries[inode] = _Entry(conn)
                elif entry.conn != conn:  # two connections, one memfd: nobody's to reuse
                    entry.escaped = True
                entry.maps += 1
                weakref.finalize(seg, self._collected, inode)

    def mapped(self, segment: Any, inode: int) -> None:
        """Another mapping of a deposited inode here (a worker handed it back)."""
        with self._lock:
            entry = self._entries.get(inode)
            if entry is None:
                return
            entry.maps += 1
        weakref.finalize(segment, self._collected, inode)

    def sent(self, worker: object, inodes: list[int]) -> None:
        with self._lock:
            for inode in inodes:
                entry = self._entries.get(inode)
                if entry is not None:
                    entry.workers[worker] = entry.workers.get(worker, 0) + 1

    def released(self, worker: object, inodes: list[int]) -> None:
        with self._lock:
            for inode in inodes:
                entry = self._entries.get(inode)
                if entry is None or worker not in entry.workers:
                    continue
                left = entry.workers[worker] - 1
                if left > 0:
                    entry.workers[worker] = left
                else:
                    del entry.workers[worker]
                    self._settle_locked(inode, entry)
        self._wake_if_settled()

    def dropped(self, worker: object, inodes: list[int]) -> None:
        # The worker never reports such an inode released: settled as escaped
        # (the client closes it) once the daemon's own mappings go.
        with self._lock:
            for inode in inodes:
                entry = self._entries.get(inode)
                if entry is not None and entry.workers.pop(worker, None) is not None:
                    entry.escaped = True
                    self._settle_locked(inode, entry)
        self._wake_if_settled()

    def forget(self, worker: object) -> None:
        """``worker`` is gone: whatever it was sent counts as passed on."""
        with self._lock:
            for inode, entry in list(self._entries.items()):
                if entry.workers.pop(worker, None) is not None:
                    entry.escaped = True
                    self._settle_locked(inode, entry)
        self._wake_if_settled()

    def exported(self, fds: list[int]) -> None:
        """These fds go to a client as a result: never reuse their inodes."""
        if not self._entries:
            return
        inodes = [os.fstat(fd).st_ino for fd in fds]
        with self._lock:
            for inode in inodes:
                entry = self._entries.get(inode)
                if entry is not None:
                    entry.escaped = True

    def take(self) -> list[Settled]:
        """Entries settled since the last call (side thread)."""
        self._take_unmapped()
        out: list[Settled] = []
        while self._settled:
            out.append(self._settled.popleft())
        return out

    def status(self) -> dict[str, int]:
        """``deposits_watched``: memfds some process may still map;
        ``deposits_released``/``deposits_dropped``: settled, reusable or not."""
        self._take_unmapped()
        self._wake_if_settled()
        with self._lock:
            return {"deposits_watched": len(self._entries),
                    "deposits_released": self.released_count,
                    "deposits_dropped": self.dropped_count}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._entries.clear()
        self._settled.clear()

    def _collected(self, inode: int) -> None:
        # A finalizer: any thread, maybe inside an allocation made under _lock.
        self._unmapped.append(inode)
        if not self._closed:
            self._wake()

    def _take_unmapped(self) -> None:
        with self._lock:
            while self._unmapped:
                inode = self._unmapped.popleft()
                entry = self._entries.get(inode)
                if entry is not None:
                    entry.maps -= 1
                    self._settle_locked(inode, entry)

    def _settle_locked(self, inode: int, entry: _Entry) -> None:
        if entry.maps <= 0 and not entry.workers:
            del self._entries[inode]
            if entry.escaped:
                self.dropped_count += 1
            else:
                self.released_count += 1
            if not self._closed:
                self._settled.append((entry.conn, inode, not entry.escaped))

    def _wake_if_settled(self) -> None:
        if self._settled and not self._closed:
            self._wake()

    def _forking(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                if entry.maps > 0:
                    entry.escaped = True


_watches: weakref.WeakSet[DepositWatch] = weakref.WeakSet()


def _forking() -> None:
    # A child of fork() maps what this process maps until it exits.
    for watch in list(_watches):
        watch._forking()


os.register_at_fork(before=_forking)
