"""A client's side of the same-host path: its arrays go to the daemon as memfds.

Data flow (the submitting thread, under one lock)::

    Client.submit(fn, *args) -> SameHost.prepare(args, kwargs)
        the plain and shared numpy arrays of at least ``threshold`` bytes among
        the arguments (lists, tuples, dict values, as _jobrefs looks) -> None
        placeholders + their paths
        first time (waiting) and after a failure (not waiting; at most every
        _RETRY s): the daemon's status names its side channel (_samehost.py);
        connect, check that the daemon runs as this user (SO_PEERCRED)
        release datagrams the daemon sent meanwhile (not waiting): the memfds
        it says no process maps any more go back to this process's segment
        cache (_segcache.released), the others are closed (dropped)
        each array -> a memfd: a shared array's own segment (no copy), a plain
        contiguous one copied once into a recycled segment (fill_slot: pages
        that exist already) lent to this connection (_segcache.lend), any
        other copied into a fresh memfd (copy_to_memfd, sealed)
        one datagram b"put" + the fds -> the daemon's token (a blocking exchange
        bounded by _TIMEOUT, release datagrams on the way taken as above); the
        fresh copies are closed here once sent; the lent ones are kept, or
        closed at once if the daemon does not say "recycles" (an older one)
        the connection failing or closed: every memfd lent to it is closed
        (_segcache.forget), never reused
        -> options["shm"] = {token, durable, arrays: [[path, index, descr,
           shape, strides, offset]]}
    anything failing (no side channel advertised, another host, another user,
    a daemon restarted or gone) -> the arguments as they were: the arrays
    travel as frames on the ZeroMQ socket, as without this path.

The client thread, after it received messages (results): reclaim() takes
the release datagrams waiting, if no submit holds the lock (never waiting).

Results (the client thread)::

    with the side channel, a second connection says b"results" and gets its
    channel id -> every submit says options["shm_results"] = {channel, durable}
    result with ``shm`` -> collect(): b"get " + token on that connection ->
        {"fds": n} + n memfds, each checked (a memfd sealed against resizing,
        as large as its specs need: Segment.attach, array_at) and mapped; the
        arrays put at their paths in ``value`` (a blocking exchange bounded by
        _TIMEOUT: the daemon's side thread answers at once)
    anything failing (garbage, a closed channel, a bad fd) -> ValueError/OSError:
        the results connection is closed (later results come as frames) and
        the caller fetches the job again (the journal's copy, or a clear error)
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from . import _jobrefs, _segcache
from ._jobfuture import WaitingCall
from ._memfd import Segment, close_copies, copy_to_memfd, fill_slot
from ._samehost import (
    GET,
    MAX_ARRAYS,
    MAX_FDS,
    MAX_RELEASED,
    NAME,
    PUT,
    RELEASED,
    RESULTS,
    TOKEN_RE,
    array_at,
    extract_arrays,
    peer_uid,
    socket_address,
)
from .errors import ProtocolError
from .shm import DEFAULT_THRESHOLD, segment_of

__all__ = ["SameHost"]

log = logging.getLogger("shmrunner.client")

_TIMEOUT = 10.0  # longest wait for the daemon's answer on the side channel
_RETRY = 5.0  # after a failure, look for the side channel again this much later
_RECV = len(RELEASED) + _segcache.REPORT.size + 8 * MAX_RELEASED + 1  # one datagram (+1: too long)

Path = list[int | str]


class SameHost:
    def __init__(self, ask: Callable[[], WaitingCall], forget: Callable[[WaitingCall], None],
                 *, durable: bool, enabled: bool, on_client_thread: Callable[[], bool],
                 threshold: int = DEFAULT_THRESHOLD) -> None:
        self.durable = durable
        self.enabled = enabled
        self.threshold = threshold
        self.sent = 0  # submits whose arrays went as memfds (an observation)
        self.received = 0  # results whose arrays came as memfds (an observation)
        self.results_failed = 0  # results whose memfds could not be taken (fetched again)
        self.recycles = False  # the daemon said it tells which deposited memfds are free
        # The results connection and its channel id (set under _lock; the client
        # thread reads them and uses the socket alone).
        self._results: tuple[socket.socket, str] | None = None
        self._advert: str | None = None  # the side channel's name, once known
        self._pending: socket.socket | None = None  # a results connection not yet answered
        self._results_next = 0.0  # when to try opening the results connection again
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
        new_args, new_kwargs, found = extract_arrays(args, kwargs, self.threshold)
        if not found:
            return unchanged
        with self._lock:
            sock = self._connected()
            if sock is None:
                return unchanged
            try:
                self._take_releases(sock)
                token, specs = self._deposit(sock, found)
            except (OSError, ValueError) as exc:
                log.info("same-host side channel failed (%s); arrays go on the socket", exc)
                self._close()
                self._next_try = 0.0  # a restarted daemon has a new one: ask at once
                return unchanged
        self.sent += 1
        return (new_args, new_kwargs, {"token": token, "durable": self.durable, "arrays": specs},
                sum(a.nbytes for _, a in found))

    def advertised(self, name: str) -> None:
        """The daemon named its side channel (in an "accepted"; client thread):
        a later submit opens it (results_option)."""
        if self.enabled and NAME.fullmatch(name) and name != self._advert:
            self._advert = name  # (another: the daemon was restarted)
            results = self._results
            if results is not None:
                self._drop_results(results)
            self._results_next = 0.0

    def results_option(self) -> dict[str, Any] | None:
        """The ``shm_results`` option of a submit: results as memfds on this
        client's results connection; None (frames) without one. Without one
        but with the side channel's name known (a status, an "accepted"), it
        is opened here, at most every _RETRY s (never on the client thread)."""
        results = self._results
        if results is None and self.enabled and self._advert is not None and \
                not self._on_client_thread() and self._lock.acquire(blocking=False):
            try:  # never waits: a busy lock (a put) or no answer yet -> frames this time
                self._poll_results(self._advert)
                results = self._results
            finally:
                self._lock.release()
        return None if results is None else {"channel": results[1], "durable": self.durable}

    def _poll_results(self, advert: str) -> None:
        """Under the lock: open the results connection (once every _RETRY s),
        or take the daemon's answer to it if it came; never waiting."""
        if self._pending is None:
            if time.monotonic() < self._results_next:
                return
            self._results_next = time.monotonic() + _RETRY
            self._pending = _start_results(advert)
            if self._pending is None:
                return
        try:
            channel = _channel_of(self._pending, wait=False)
        except (OSError, ValueError) as exc:
            log.info("results come as frames (%s)", exc)
            self._pending.close()
            self._pending = None
            return
        if channel is not None:
            self._results = (self._pending, channel)
            self._pending = None

    def collect(self, body: dict[str, Any]) -> dict[str, Any]:
        """A result body naming memfds (``shm``) with its arrays in place, on
        the client thread; ValueError/OSError when they cannot be taken (the
        results connection is then closed: later results come as frames)."""
        results = self._results
        try:
            if results is None:
                raise ValueError("a result names memfds, but no results connection is open")
            value = _collect(results[0], body)
        except (OSError, ValueError) as exc:
            self.results_failed += 1
            log.warning("the result of job %s could not be taken from the side channel (%s); "
                        "fetching it again", body.get("job_id"), exc)
            if results is not None:
                self._drop_results(results)
            raise
        self.received += 1
        rest = {k: v for k, v in body.items() if k != "shm"}
        return {**rest, "value": value}

    def reclaim(self) -> None:
        """Take the daemon's release datagrams now, unless a submit is using
        the connection (the client thread, after it received messages): a
        client that stops submitting gives the memfds of its finished jobs
        back to the cache, within its budget, instead of keeping them lent."""
        if self._sock is None or not self.recycles or not self._lock.acquire(blocking=False):
            return
        try:
            if self._sock is not None:
                self._take_releases(self._sock)
        except (OSError, ValueError) as exc:
            log.info("same-host side channel failed (%s); arrays go on the socket", exc)
            self._close()
            self._next_try = 0.0
        finally:
            self._lock.release()

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "durable": self.durable,
                "connected": self._sock is not None, "recycles": self.recycles,
                "submits": self.sent,
                "results": self.received, "results_failed": self.results_failed}

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:  # what the daemon released already goes back to the cache
                    self._take_releases(self._sock)
                except (OSError, ValueError):
                    pass
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            _segcache.forget(self._sock)  # lent to a connection that is gone: never reused
            self._sock.close()
            self._sock = None
        if self._results is not None:
            self._results[0].close()
            self._results = None
        if self._pending is not None:
            self._pending.close()
            self._pending = None

    def _drop_results(self, results: tuple[socket.socket, str]) -> None:
        if self._results is results:
            self._results = None  # (a submit reading it meanwhile names a closed channel:
        results[0].close()        # the daemon then sends frames)

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
        self._advert = advert
        return self._open(advert)

    def _open(self, advert: str) -> socket.socket | None:
        """Under the lock: connect to the side channel (and its results connection)."""
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
        if self._results is not None:  # opened before (results_option): maybe the old daemon's
            self._drop_results(self._results)
        self._results = _open_results(advert)
        return sock

    def _deposit(self, sock: socket.socket, found: list[tuple[Path, np.ndarray[Any, Any]]]
                 ) -> tuple[str, list[list[Any]]]:
        fds: list[int] = []
        owned: list[int] = []
        lent: list[int] = []  # inodes of recycled segments lent to this connection
        index_of: dict[int, int] = {}
        specs: list[list[Any]] = []
        try:
            try:
                for path, a in found:
                    seg = segment_of(a)
                    if seg is not None and min(a.strides, default=0) >= 0:  # by handle: no copy
                        fd = seg.fd
                        offset = seg.origin + a.ctypes.data - seg.address
                        strides = a.strides
                    elif (a.flags.c_contiguous or a.flags.f_contiguous) and \
                            (slot := fill_slot(a)) is not None:
                        _segcache.lend([slot], sock)  # (closed with the connection on failure)
                        lent.append(slot.inode)
                        fd, offset, strides = slot.fd, 0, a.strides
                    else:
                        fd, _, strides = copy_to_memfd(a)
                        owned.append(fd)
                        offset = 0
                    if fd not in index_of:
                        index_of[fd] = len(fds)
                        fds.append(fd)
                    specs.append([path, index_of[fd], np.lib.format.dtype_to_descr(a.dtype),
                                  list(a.shape), list(strides), offset])
                socket.send_fds(sock, [PUT], fds)
            finally:
                close_copies(owned)  # in flight, the kernel holds them
            data = self._answer(sock)
        except BaseException:
            _segcache.dropped(sock, lent)  # sent or not: never written again
            raise
        try:
            reply = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # noqa: BLE001 (whatever msgpack makes of bad bytes)
            raise ValueError(f"the side channel answered garbage ({exc})") from None
        if type(reply) is not dict or type(reply.get("token")) is not str or \
                reply.get("recycles") is not True:
            # Refused, out of step, or a daemon that never says which memfds
            # are free again: those lent for this deposit are closed now.
            _segcache.dropped(sock, lent)
        else:
            self.recycles = True
        if type(reply) is not dict:
            raise ValueError("the side channel answered out of step")
        if type(reply.get("token")) is not str:
            raise ValueError(f"the daemon refused the arrays: {reply.get('error')!r}")
        return reply["token"], specs

    def _answer(self, sock: socket.socket) -> bytes:
        """The daemon's answer to a put; release datagrams before it are taken."""
        while True:
            data = sock.recv(_RECV)
            if not data:
                raise OSError("the daemon closed the side channel")
            if not data.startswith(RELEASED):
                return data
            self._released(sock, data)

    def _take_releases(self, sock: socket.socket) -> None:
        """Under the lock, not waiting: the release datagrams the daemon sent."""
        sock.settimeout(0.0)  # (a timeout would wait despite DONTWAIT)
        try:
            while True:
                try:
                    data = sock.recv(_RECV)
                except (BlockingIOError, InterruptedError):
                    return
                if not data:
                    raise OSError("the daemon closed the side channel")
                if not data.startswith(RELEASED):
                    raise ValueError("the side channel sent something out of step")
                self._released(sock, data)
        finally:
            sock.settimeout(_TIMEOUT)

    @staticmethod
    def _released(sock: socket.socket, data: bytes) -> None:
        """A release datagram: of the memfds lent to ``sock`` (others are
        ignored), those released go back to the cache, the dropped are closed."""
        try:
            if len(data) >= _RECV:
                raise ValueError("too long")
            free, gone = _segcache.decode_report(data, len(RELEASED))
        except (ValueError, struct.error) as exc:
            raise ValueError(f"the side channel sent a malformed release ({exc})") from None
        _segcache.dropped(sock, gone)
        _segcache.released(sock, free)


def _open_results(advert: str) -> tuple[socket.socket, str] | None:
    """A results connection and its channel id (waiting up to _TIMEOUT), or
    None: an older daemon (it refuses b"results"), or any failure: frames."""
    sock = _start_results(advert)
    if sock is None:
        return None
    try:
        channel = _channel_of(sock, wait=True)
        assert channel is not None
    except (OSError, ValueError) as exc:
        log.info("results come as frames (%s)", exc)
        sock.close()
        return None
    return sock, channel


def _start_results(advert: str) -> socket.socket | None:
    """Connect a results connection and ask for its channel (not waiting)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(_TIMEOUT)
        sock.connect(socket_address(advert))
        if peer_uid(sock) != os.geteuid():
            raise OSError(f"the side channel {advert} is served by another user")
        sock.send(RESULTS)
    except OSError as exc:
        log.info("results come as frames (%s)", exc)
        sock.close()
        return None
    return sock


def _channel_of(sock: socket.socket, wait: bool) -> str | None:
    """The daemon's answer to b"results": its channel id; None if not there yet
    (``wait`` False); OSError/ValueError for a refusal (an older daemon) or garbage."""
    try:
        sock.settimeout(_TIMEOUT if wait else 0.0)  # (a timeout would wait despite DONTWAIT)
        data = sock.recv(4096)
    except (BlockingIOError, InterruptedError):
        return None
    if not data:
        raise OSError("the daemon closed the results connection")
    try:
        reply = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001 (whatever msgpack makes of bad bytes)
        raise ValueError(f"the side channel answered garbage ({exc})") from None
    channel = reply.get("channel") if type(reply) is dict else None
    if type(channel) is not str or not TOKEN_RE.fullmatch(channel):
        raise ValueError(f"the daemon offers no results channel ({reply!r:.200})")
    return channel


def _collect(sock: socket.socket, body: dict[str, Any]) -> Any:
    """The value of a result body whose ``shm`` names memfds, arrays in place."""
    spec = body.get("shm")
    if type(spec) is not dict or type(spec.get("token")) is not str or \
            not TOKEN_RE.fullmatch(spec["token"]) or type(spec.get("arrays")) not in (list, tuple) \
            or not 0 < len(spec["arrays"]) <= MAX_ARRAYS:
        raise ValueError("a result's shm must be {token: 32 hex digits, arrays: 1 to "
                         f"{MAX_ARRAYS} specs}}")
    sock.settimeout(_TIMEOUT)
    sock.send(GET + spec["token"].encode())
    data, fds, flags, _ = socket.recv_fds(sock, 4096, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    segments: list[Segment] = []
    try:
        if not data:
            raise OSError("the daemon closed the results connection")
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise ValueError("the side channel's answer was truncated")
        try:
            reply = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # noqa: BLE001 (whatever msgpack makes of bad bytes)
            raise ValueError(f"the side channel answered garbage ({exc})") from None
        if type(reply) is not dict or type(reply.get("fds")) is not int:
            raise ValueError(f"the daemon did not hand over the result: {reply!r:.200}")
        if reply["fds"] != len(fds) or not fds:
            raise ValueError(f"the daemon said {reply['fds']} fds and sent {len(fds)}")
        while fds:
            size = os.fstat(fds[0]).st_size
            segments.append(Segment.attach(fds[0], max(size, 1)))  # memfd, sealed: checked
            fds.pop(0)  # owned by its segment now
        value = body.get("value")
        holder: Any = (value,)
        for item in spec["arrays"]:
            path, array = array_at(item, segments, "result's shm")
            holder, _ = _jobrefs.place(holder, {}, path, array)
        return holder[0]
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    finally:
        for fd in fds:  # those not mapped (refused): closed here
            os.close(fd)
