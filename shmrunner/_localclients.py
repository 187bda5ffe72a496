"""The daemon's side of same-host clients: arrays arrive as memfds, not as bytes.

Data flow::

    same-host client --AF_UNIX SOCK_SEQPACKET (abstract name, _samehost.py)--> thread
    "shmrunner-samehost" (owns the listening socket and every side connection)
        accept: the peer's uid must be the daemon's (SO_PEERCRED), else closed at once
        b"put" + memfds: each fd checked (a memfd sealed against resizing:
            Segment.attach) and mapped; the deposit's bytes <= max_bytes, its
            fds <= MAX_FDS, a connection's unclaimed deposits <= MAX_DEPOSITS
            -> a random token -> reply {"token"}; anything wrong -> {"error"}
            and every fd of that datagram closed
        connection closed: its deposits no submit claimed are released
    front thread: claim(msg) for a submit whose options carry "shm": the
        deposit is taken (once), every array spec checked against its segment,
        numpy arrays over the mapped memfds put at their paths -> (the message
        to run: arrays by handle to the local workers, no copy; the message to
        journal)

Durability, per client (``durable``, in the submit's ``shm`` option):

* durable (the default): the message to journal carries the arrays, so the
  journal writes their bytes (one write from the mapping, fsynced: a spill
  file, ``_spill.py``) before the daemon acknowledges the job; a restarted
  daemon runs it from the journal.
* not durable: the message to journal keeps only the token; the ack waits
  for one small commit. A daemon killed before the job finished takes its
  arrays with it: after the restart the job fails with a ShmrunnerError
  saying so (:func:`lost`), never silently.

The same-uid check keeps strangers off the side channel, and it grants
nothing by itself: a deposit runs nothing; only a submit over the
authenticated ZeroMQ endpoint, naming its unguessable token, uses it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import selectors
import socket
import threading
from typing import Any

import msgpack
import numpy as np

from . import _jobrefs
from ._memfd import Segment
from ._samehost import MAX_ARRAYS, MAX_FDS, PUT, peer_uid, socket_address
from ._wakeup import Wakeup
from .errors import ProtocolError, ShmrunnerError
from .transport._arrays import _parse_dtype, _span
from .transport.protocol import Message

__all__ = ["LocalClients", "lost"]

log = logging.getLogger("shmrunner.daemon")

MAX_DEPOSITS = 4096  # unclaimed deposits one side connection may hold
_MAX_CONNECTIONS = 256
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * 4)
_TOKEN = 32  # hex digits of a token
_SPEC_KEYS = frozenset({"token", "durable", "arrays"})


def lost(job_id: str) -> ShmrunnerError:
    """The error of a non-durable same-host job replayed after a restart."""
    return ShmrunnerError(
        f"job {job_id} was accepted with durable=False: its arrays were handed over in the "
        "shared memory of a daemon that stopped before the job finished, and died with it; "
        "submit it again (or connect with durable=True to have arrays journaled)")


class LocalClients:
    """The side channel: a thread that takes memfds, and claim() for the front thread."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.name = "shmrunner-" + secrets.token_hex(16)
        self.refused = 0  # side connections or deposits refused
        self._uid = os.geteuid()
        self._lock = threading.Lock()
        self._deposits: dict[str, tuple[int, list[Segment]]] = {}  # token -> (conn, segments)
        self._held: dict[int, set[str]] = {}  # connection fd -> its unclaimed tokens
        self._stop = False
        self._wakeup = Wakeup()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._listener.bind(socket_address(self.name))
            self._listener.listen(64)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            self._wakeup.close()
            raise
        self._thread = threading.Thread(target=self._run, name="shmrunner-samehost",
                                        daemon=True)
        self._thread.start()

    def advert(self) -> dict[str, Any]:
        """What the daemon's status tells clients: the side channel's name."""
        return {"socket": self.name}

    # --- the front thread -----------------------------------------------------------

    def claim(self, msg: Message) -> tuple[Message, Message]:
        """(the message to run, the message to journal) for a submit; the same
        message twice when it names no deposit. ProtocolError for a bad spec
        or a token this daemon does not hold (the submit is refused)."""
        options = msg.body.get("options") or {}
        spec = options.get("shm")
        if spec is None:
            return msg, msg
        if type(spec) is not dict or not set(spec) <= _SPEC_KEYS or \
                type(spec.get("token")) is not str or len(spec["token"]) != _TOKEN or \
                type(spec.get("durable", True)) is not bool or \
                type(spec.get("arrays")) not in (list, tuple) or \
                not 0 < len(spec["arrays"]) <= MAX_ARRAYS:
            raise ProtocolError(f"options.shm must be {{token: {_TOKEN} hex digits, durable: "
                                f"bool, arrays: 1 to {MAX_ARRAYS} specs}}")
        with self._lock:
            deposit = self._deposits.pop(spec["token"], None)
            if deposit is not None:
                self._held.get(deposit[0], set()).discard(spec["token"])
        if deposit is None:
            raise ProtocolError("options.shm names a token this daemon does not hold (never "
                                "deposited on its side channel, used already, or its "
                                "connection closed)")
        segments = deposit[1]
        args, kwargs = msg.body["args"], msg.body["kwargs"]
        for item in spec["arrays"]:
            path, array = _array(item, segments)
            try:
                args, kwargs = _jobrefs.place(args, kwargs, path, array)
            except ValueError as exc:
                raise ProtocolError(f"options.shm: {exc}".replace("a ref's", "an array's")
                                    ) from None
        rest = {k: v for k, v in options.items() if k != "shm"}
        run = Message("submit", {**msg.body, "args": args, "kwargs": kwargs, "options": rest})
        return run, (run if spec.get("durable", True) else msg)

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"deposits": len(self._deposits), "refused": self.refused}

    def close(self) -> None:
        self._stop = True
        self._wakeup.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)
        with self._lock:
            self._deposits.clear()
            self._held.clear()

    # --- the side thread ------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        conns: dict[int, socket.socket] = {}
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wakeup.fd, selectors.EVENT_READ)
        try:
            while not self._stop:
                for key, _ in sel.select():
                    try:
                        if key.fileobj is self._listener:
                            self._accept(sel, conns)
                        elif key.fileobj == self._wakeup.fd:
                            self._wakeup.drain()
                        else:
                            conn = conns[key.fd]
                            if not self._serve(conn):
                                self._drop(sel, conns, conn)
                    except Exception as exc:  # noqa: BLE001 (one peer must not stop the thread)
                        log.error("same-host side channel: unexpected error, carrying on: %r",
                                  exc, exc_info=True)
        finally:
            for conn in list(conns.values()):
                self._drop(sel, conns, conn)
            sel.close()
            self._listener.close()
            self._wakeup.close()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[int, socket.socket]) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        uid = peer_uid(conn)
        if uid != self._uid or len(conns) >= _MAX_CONNECTIONS:
            log.warning("same-host side channel: refused a connection from uid %d (%s)", uid,
                        "not the daemon's user" if uid != self._uid else "too many")
            self.refused += 1
            conn.close()
            return
        conn.setblocking(False)
        conns[conn.fileno()] = conn
        sel.register(conn, selectors.EVENT_READ)

    def _drop(self, sel: selectors.BaseSelector, conns: dict[int, socket.socket],
              conn: socket.socket) -> None:
        fd = conn.fileno()
        with self._lock:
            for token in self._held.pop(fd, set()):
                self._deposits.pop(token, None)  # segments released with their last reference
        sel.unregister(conn)
        del conns[fd]
        conn.close()

    def _serve(self, conn: socket.socket) -> bool:
        """One datagram; False once the connection is closed or out of step."""
        try:
            data, ancdata, flags, _ = conn.recvmsg(64, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        fds = _fds(ancdata)
        if not data and not fds:
            return False  # EOF
        try:
            reply = {"token": self._deposit(conn.fileno(), data, fds, flags)}
        except ProtocolError as exc:
            self.refused += 1
            reply = {"error": str(exc)}
        try:
            conn.send(msgpack.packb(reply))
        except OSError:
            return False  # the client is gone or does not read: its deposit goes with it
        return True

    def _deposit(self, conn: int, data: bytes, fds: list[int], flags: int) -> str:
        segments: list[Segment] = []
        try:
            if data != PUT or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise ProtocolError("a side-channel message must be b'put' with 1 to "
                                    f"{MAX_FDS} memfds")
            if not fds:
                raise ProtocolError("a deposit carries no fd")
            total = 0
            while fds:
                size = _size(fds[0])
                total += size
                if total > self.max_bytes:
                    raise ProtocolError(f"a deposit holds more than {self.max_bytes} bytes "
                                        "(scheduler.max_message_bytes)")
                segments.append(Segment.attach(fds[0], max(size, 1)))
                fds.pop(0)  # owned by its segment now
            with self._lock:
                held = self._held.setdefault(conn, set())
                if len(held) >= MAX_DEPOSITS:
                    raise ProtocolError(f"more than {MAX_DEPOSITS} deposits not yet claimed "
                                        "by a submit on this connection")
                token = secrets.token_hex(_TOKEN // 2)
                held.add(token)
                self._deposits[token] = (conn, segments)
            return token
        finally:
            for fd in fds:  # those not mapped (refused): closed here
                os.close(fd)


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(np.frombuffer(payload[:usable], dtype=np.int32).tolist())
    return fds


def _size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise ProtocolError(f"a deposited fd cannot be read: {exc.strerror}") from None


def _array(item: Any, segments: list[Segment]) -> tuple[list[int | str], np.ndarray[Any, Any]]:
    """One array spec [path, index, descr, shape, strides, offset], checked, and its array."""
    if type(item) not in (list, tuple) or len(item) != 6:
        raise ProtocolError("an options.shm array must be [path, index, dtype, shape, "
                            "strides, offset]")
    path, index, descr, shape, strides, offset = item
    try:
        ((path, _),) = _jobrefs.parse([[path, "x"]])
    except ValueError as exc:
        raise ProtocolError(f"options.shm: {exc}".replace("a ref's", "an array's")) from None
    if type(index) is not int or not 0 <= index < len(segments):
        raise ProtocolError(f"an options.shm array names fd {index!r}; the deposit has "
                            f"{len(segments)}")
    if type(shape) not in (list, tuple) or len(shape) > 64 or \
            not all(type(n) is int and n >= 0 for n in shape) or \
            type(strides) not in (list, tuple) or len(strides) != len(shape) or \
            not all(type(s) is int for s in strides) or type(offset) is not int or offset < 0:
        raise ProtocolError("an options.shm array needs a shape (ints >= 0), as many strides "
                            "(ints) and an offset (int >= 0)")
    dtype = _parse_dtype(descr)
    seg = segments[index]
    room = len(seg) - offset
    span = _span(list(shape), list(strides), dtype.itemsize)
    if span is None or span > room or math.prod(shape) * dtype.itemsize > max(room, 0):
        raise ProtocolError(f"an options.shm array of shape {tuple(shape)} and dtype {dtype} "
                            f"does not fit its memfd ({len(seg)} bytes from offset {offset})")
    array: np.ndarray[Any, Any] = np.ndarray(tuple(shape), dtype, buffer=seg, offset=offset,
                                             strides=tuple(strides))
    return path, array
