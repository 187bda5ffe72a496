"""The daemon's result arrays for same-host clients, held as memfds until picked up.

Data flow::

    front thread (Intake.settle) -> export(value): the large arrays of a result
        -> one fd each segment (an ``os.dup`` of the segment a local worker's
        result already lives in: no copy; a copy into a new memfd for an array
        in private memory, e.g. from a remote worker) + specs, the value with
        None in their places
        -> HeldResults.offer(channel, fds): held under a random token, or
           refused (channel gone, over its bounds: the result goes as frames)
    thread "shmrunner-samehost" (the channel's connection):
        take(conn, token) -> the fds, sent once (SCM_RIGHTS) and closed here
        close_conn(conn) -> every fd it never picked up closed
    front thread: expire(ttl) -> fds held longer than result_ttl closed

A segment handed out is marked ``shared_out`` so this process never recycles
it (``_segcache``) while the client maps it. The fds held are the only thing
that keeps those pages alive here; ``status()`` counts them, so a test (or an
operator) sees them go back to zero.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any

import numpy as np

from ._memfd import close_copies, copy_to_memfd
from ._samehost import MAX_HELD_FDS, MAX_HELD_RESULTS, THRESHOLD, TOKEN, extract_arrays
from .shm import segment_of
from .transport.pickling import close_fds

__all__ = ["HeldResults", "export"]


def export(value: Any) -> tuple[Any, list[list[Any]], list[int]]:
    """(``value`` with its large arrays replaced by None, their specs, one owned
    fd per segment); no specs and no fds when it holds no large array."""
    (new,), _, found = extract_arrays((value,), {}, THRESHOLD)
    if not found:
        return value, [], []
    fds: list[int] = []
    index_of: dict[int, int] = {}
    specs: list[list[Any]] = []
    try:
        for path, a in found:
            seg = segment_of(a)
            if seg is not None and min(a.strides, default=0) >= 0:  # forwarded: no copy
                if id(seg) not in index_of:
                    seg.shared_out()  # never recycled here while the client maps it
                    index_of[id(seg)] = len(fds)
                    fds.append(os.dup(seg.fd))
                index = index_of[id(seg)]
                offset = seg.origin + a.ctypes.data - seg.address
                strides: tuple[int, ...] = a.strides
            else:
                fd, _, strides = copy_to_memfd(a)
                try:
                    index = len(fds)
                    fds.append(os.dup(fd))  # held past close_copies' bookkeeping
                finally:
                    close_copies([fd])
                offset = 0
            specs.append([path, index, np.lib.format.dtype_to_descr(a.dtype), list(a.shape),
                          list(strides), offset])
    except BaseException:
        close_fds(fds)
        raise
    return new, specs, fds


class _Channel:
    __slots__ = ("conn", "held", "fds", "nbytes")

    def __init__(self, conn: int) -> None:
        self.conn = conn
        self.held: dict[str, tuple[list[int], int, float]] = {}  # token -> (fds, bytes, when)
        self.fds = 0
        self.nbytes = 0


class HeldResults:
    """Result fds per results connection, bounded; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # bytes one connection may leave unclaimed
        self.sent = 0  # results handed over
        self.refused = 0  # results that went as frames instead (bounds, channel gone)
        self.expired = 0  # results never picked up (connection closed, result_ttl)
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._by_conn: dict[int, str] = {}

    def open(self, conn: int) -> str:
        """The channel id of connection ``conn`` (made on first ask)."""
        with self._lock:
            channel = self._by_conn.get(conn)
            if channel is None:
                channel = secrets.token_hex(TOKEN // 2)
                self._by_conn[conn] = channel
                self._channels[channel] = _Channel(conn)
            return channel

    def knows(self, option: Any) -> bool:
        """Whether a submit's ``shm_results`` option names an open channel here."""
        channel = option.get("channel") if type(option) is dict else None
        with self._lock:
            return type(channel) is str and channel in self._channels

    def offer(self, channel: str, fds: list[int]) -> str | None:
        """Hold ``fds`` for ``channel``: a token (they are owned here now), or
        None (the caller keeps them: the channel is gone or over its bounds)."""
        nbytes = sum(os.fstat(fd).st_size for fd in fds)
        with self._lock:
            held = self._channels.get(channel)
            if held is None or held.fds + len(fds) > MAX_HELD_FDS or \
                    len(held.held) >= MAX_HELD_RESULTS or \
                    held.nbytes + nbytes > self.max_bytes:
                self.refused += 1
                return None
            token = secrets.token_hex(TOKEN // 2)
            held.held[token] = (fds, nbytes, time.monotonic())
            held.fds += len(fds)
            held.nbytes += nbytes
            return token

    def take(self, conn: int, token: str) -> list[int] | None:
        """The fds of ``token`` held for connection ``conn`` (the caller sends
        and closes them), or None: not held for it (never, taken, expired)."""
        with self._lock:
            channel = self._by_conn.get(conn)
            held = self._channels.get(channel) if channel is not None else None
            entry = held.held.pop(token, None) if held is not None else None
            if held is None or entry is None:
                return None
            held.fds -= len(entry[0])
            held.nbytes -= entry[1]
            self.sent += 1
            return entry[0]

    def close_conn(self, conn: int) -> None:
        """Connection ``conn`` closed: what it never picked up is freed."""
        with self._lock:
            channel = self._by_conn.pop(conn, None)
            held = self._channels.pop(channel, None) if channel is not None else None
            entries = list(held.held.values()) if held is not None else []
            self.expired += len(entries)
        for fds, _, _ in entries:
            close_fds(fds)

    def expire(self, ttl: float) -> None:
        """Free results held for longer than ``ttl`` seconds."""
        limit = time.monotonic() - ttl
        gone: list[list[int]] = []
        with self._lock:
            for held in self._channels.values():
                for token in [t for t, (_, _, when) in held.held.items() if when < limit]:
                    fds, nbytes, _ = held.held.pop(token)
                    held.fds -= len(fds)
                    held.nbytes -= nbytes
                    gone.append(fds)
            self.expired += len(gone)
        for fds in gone:
            close_fds(fds)

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"results_held": sum(len(h.held) for h in self._channels.values()),
                    "result_fds_held": sum(h.fds for h in self._channels.values()),
                    "results_sent": self.sent, "results_as_frames": self.refused,
                    "results_expired": self.expired}

    def close(self) -> None:
        with self._lock:
            entries = [e for h in self._channels.values() for e in h.held.values()]
            self._channels.clear()
            self._by_conn.clear()
        for fds, _, _ in entries:
            close_fds(fds)
