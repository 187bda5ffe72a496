"""A client's side of the same-host path: its arrays go to the daemon as memfds.

Data flow (the submitting thread, under one lock)::

    Client.submit(fn, *args) -> SameHost.prepare(args, kwargs)
        the plain and shared numpy arrays of at least ``threshold`` bytes among
        the arguments (lists, tuples, dict values, as _jobrefs looks) -> None
        placeholders + their paths
        first time (waiting) and after a failure (not waiting; at most every
        _RETRY s): the daemon's status names its side channel (_samehost.py);
        connect, check that the daemon runs as this user (SO_PEERCRED)
        each array -> a memfd: a shared array's own segment (no copy), a plain
        one copied once (copy_to_memfd, sealed)
        one datagram b"put" + the fds -> the daemon's token (a blocking exchange
        bounded by _TIMEOUT); the copies are closed here once sent
        -> options["shm"] = {token, durable, arrays: [[path, index, descr,
           shape, strides, offset]]}
    anything failing (no side channel advertised, another host, another user,
    a daemon restarted or gone) -> the arguments as they were: the arrays
    travel as frames on the ZeroMQ socket, as without this path.

Results still come back as frames on the ZeroMQ socket.
"""

from __future__ import annotations

import array as _array
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from ._deps import MAX_DEPTH
from ._jobfuture import WaitingCall
from ._memfd import close_copies, copy_to_memfd
from ._samehost import MAX_ARRAYS, MAX_FDS, NAME, PUT, peer_uid, socket_address
from .shm import DEFAULT_THRESHOLD, segment_of
from .transport._arrays import raw_layout

__all__ = ["SameHost"]

log = logging.getLogger("shmrunner.client")

_TIMEOUT = 10.0  # longest wait for the daemon's answer on the side channel
_RETRY = 5.0  # after a failure, look for the side channel again this much later
_VISITS = 10_000  # objects looked at per submit

Path = list[int | str]


class SameHost:
    def __init__(self, ask: Callable[[], WaitingCall], forget: Callable[[WaitingCall], None],
                 *, durable: bool, enabled: bool, on_client_thread: Callable[[], bool],
                 threshold: int = DEFAULT_THRESHOLD) -> None:
        self.durable = durable
        self.enabled = enabled
        self.threshold = threshold
        self.sent = 0  # submits whose arrays went as memfds (an observation)
        self._ask = ask  # a status request to the daemon, answered on the client thread
        self._forget = forget
        self._call: WaitingCall | None = None  # the status request not yet answered
        self._asked = 0.0
        self._first = True
        self._on_client_thread = on_client_thread
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._next_try = 0.0

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any] | None, int]:
        """The arguments with large arrays taken out, the ``shm`` option that
        names them, and their bytes; the arguments unchanged (None, 0) when
        they go as frames."""
        unchanged = args, kwargs, None, 0
        if not self.enabled:
            return unchanged
        new_args, new_kwargs, found = _extract(args, kwargs, self.threshold)
        if not found:
            return unchanged
        with self._lock:
            sock = self._connected()
            if sock is None:
                return unchanged
            try:
                token, specs = self._deposit(sock, found)
            except (OSError, ValueError) as exc:
                log.info("same-host side channel failed (%s); arrays go on the socket", exc)
                self._close()
                self._next_try = 0.0  # a restarted daemon has a new one: ask at once
                return unchanged
        self.sent += 1
        return (new_args, new_kwargs, {"token": token, "durable": self.durable, "arrays": specs},
                sum(a.nbytes for _, a in found))

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "durable": self.durable,
                "connected": self._sock is not None, "submits": self.sent}

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connected(self) -> socket.socket | None:
        """The side channel, or None (this submit's arrays go as frames). The
        first submit waits up to _TIMEOUT for the daemon's status; after a
        failure (a daemon restarted: a new name) the status is asked without
        waiting, and a later submit uses its answer."""
        if self._sock is not None:
            return self._sock
        now = time.monotonic()
        if self._call is None:
            if now < self._next_try or self._on_client_thread():
                return None  # (a done-callback cannot wait for a status answer)
            try:
                self._call = self._ask()
            except Exception:  # noqa: BLE001 (a broken client: its submit says so)
                return None
            self._asked = now
            self._next_try = now + _RETRY
        call = self._call
        if not call.event.wait(_TIMEOUT if self._first else 0):
            self._first = False
            if now - self._asked > _TIMEOUT:  # unanswered (lost in a restart): ask again
                self._forget(call)
                self._call = None
            return None
        self._first = False
        self._call = None
        status = call.reply.body.get("status") if call.reply is not None else None
        advert = ((status or {}).get("same_host") or {}).get("socket")
        if type(advert) is not str or not NAME.fullmatch(advert):
            return None  # an older daemon, or one without the side channel
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(_TIMEOUT)
            sock.connect(socket_address(advert))  # refused: another host (or netns)
            if peer_uid(sock) != os.geteuid():
                raise OSError(f"the side channel {advert} is served by another user")
        except OSError as exc:
            log.info("no same-host side channel (%s); arrays go on the socket", exc)
            sock.close()
            return None
        self._sock = sock
        return sock

    def _deposit(self, sock: socket.socket, found: list[tuple[Path, np.ndarray[Any, Any]]]
                 ) -> tuple[str, list[list[Any]]]:
        fds: list[int] = []
        owned: list[int] = []
        index_of: dict[int, int] = {}
        specs: list[list[Any]] = []
        try:
            for path, a in found:
                seg = segment_of(a)
                if seg is not None and min(a.strides, default=0) >= 0:  # by handle: no copy
                    fd = seg.fd
                    offset = seg.origin + a.ctypes.data - seg.address
                    strides = a.strides
                else:
                    fd, _, strides = copy_to_memfd(a)
                    owned.append(fd)
                    offset = 0
                if fd not in index_of:
                    index_of[fd] = len(fds)
                    fds.append(fd)
                specs.append([path, index_of[fd], np.lib.format.dtype_to_descr(a.dtype),
                              list(a.shape), list(strides), offset])
            sock.sendmsg([PUT], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  _array.array("i", fds))])
        finally:
            close_copies(owned)  # in flight, the kernel holds them
        data = sock.recv(4096)
        if not data:
            raise OSError("the daemon closed the side channel")
        try:
            reply = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # noqa: BLE001 (whatever msgpack makes of bad bytes)
            raise ValueError(f"the side channel answered garbage ({exc})") from None
        if type(reply) is not dict:
            raise ValueError("the side channel answered out of step")
        if type(reply.get("token")) is not str:
            raise ValueError(f"the daemon refused the arrays: {reply.get('error')!r}")
        return reply["token"], specs


def _extract(args: tuple[Any, ...], kwargs: dict[str, Any], threshold: int
             ) -> tuple[tuple[Any, ...], dict[str, Any], list[tuple[Path, np.ndarray[Any, Any]]]]:
    """The arguments with each large array replaced by None, and where each was
    (at most MAX_ARRAYS arrays in MAX_FDS memfds; the rest stay as they are)."""
    walk = _Extraction(threshold)
    new_args = tuple(walk.swap(a, [i]) for i, a in enumerate(args))
    new_kwargs = {k: walk.swap(v, [k]) for k, v in kwargs.items()}
    return new_args, new_kwargs, walk.found


class _Extraction:
    # A class, not a recursive closure: a nested function that calls itself
    # is a reference cycle, which kept every submitted array alive until the
    # garbage collector's next full pass (a stream of 16 MiB arrays grew the
    # client by hundreds of MiB).
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.found: list[tuple[Path, np.ndarray[Any, Any]]] = []
        self.fds: set[int] = set()
        self.visits = 0

    def swap(self, obj: Any, path: Path) -> Any:
        self.visits += 1
        kind = type(obj)
        if kind is np.ndarray:
            if (obj.nbytes < self.threshold or not raw_layout(obj.dtype)
                    or len(self.found) >= MAX_ARRAYS):
                return obj
            seg = segment_of(obj)
            key = seg.fd if seg is not None else -len(self.found) - 1
            if key not in self.fds and len(self.fds) >= MAX_FDS:
                return obj
            self.fds.add(key)
            self.found.append((list(path), obj))
            return None
        if self.visits > _VISITS or len(path) > MAX_DEPTH:
            return obj
        if kind is dict:
            out = {k: self.swap(v, [*path, k]) if type(k) is str else v for k, v in obj.items()}
            return out if any(out[k] is not v for k, v in obj.items()) else obj
        if kind in (list, tuple):
            items = [self.swap(item, [*path, i]) for i, item in enumerate(obj)]
            if all(new is old for new, old in zip(items, obj, strict=True)):
                return obj
            return kind(items)
        return obj
