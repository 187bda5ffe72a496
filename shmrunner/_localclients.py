"""The daemon's side of same-host clients: arrays arrive as memfds, not as bytes.

Data flow::

    same-host client --AF_UNIX SOCK_SEQPACKET (abstract name, _samehost.py)--> thread
    "shmrunner-samehost" (owns the listening socket and every side connection)
        accept: the peer's uid must be the daemon's (SO_PEERCRED), else closed at once
        b"put" + memfds: each fd checked (a memfd sealed against resizing:
            Segment.attach) and mapped; the deposit's bytes <= max_bytes, its
            fds <= MAX_FDS, a connection's unclaimed deposits <= MAX_DEPOSITS
            -> a random token, the memfds watched (_depositwatch) -> reply
            {"token", "recycles": true}; anything wrong -> {"error"} and every
            fd of that datagram closed
        a deposited memfd settled (no mapping here, no local worker holding
            it: _depositwatch wakes this thread) -> b"released" + report on
            the connection that deposited it (sent without blocking; what does
            not fit waits, bounded, for the connection's next event)
        connection closed: its deposits no submit claimed are released
        b"results": this connection becomes a results channel -> {"channel"}
        b"get " + token: the fds of a result held for this connection, sent
            once with {"fds": n} (_resultfds.py), else {"error"}
        connection closed: the results it never picked up are freed
    front thread: offer_result(channel, msg) for a job whose submit said
        options.shm_results: its large result arrays held as fds for that
        channel -> the result message naming them, or None (frames)
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

The same for results handed back as memfds (``shm_results``): for a durable
client the journal keeps the whole result (its arrays written, as for any
client) and the submitting client gets the memfds; for a non-durable one the
journal keeps only :func:`result_lost`, an error that a ``fetch`` (after a
restart, or by another client) answers: the arrays lived in memfds only.

The same-uid check keeps strangers off the side channel, and it grants
nothing by itself: a deposit runs nothing; only a submit over the
authenticated ZeroMQ endpoint, naming its unguessable token, uses it.
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import socket
import threading
from typing import Any

import msgpack

from . import _jobrefs, _segcache
from ._depositwatch import DepositWatch
from ._memfd import Segment
from ._resultfds import HeldResults, export
from ._samehost import (
    GET,
    MAX_ARRAYS,
    MAX_FDS,
    MAX_RELEASED,
    PUT,
    RELEASED,
    RESULTS,
    TOKEN_RE,
    array_at,
    peer_uid,
    socket_address,
)
from ._wakeup import Wakeup
from .errors import ProtocolError, ShmrunnerError
from .transport.protocol import Message

__all__ = ["LocalClients", "lost", "result_lost", "results_option"]

log = logging.getLogger("shmrunner.daemon")

MAX_DEPOSITS = 4096  # unclaimed deposits one side connection may hold
_MAX_CONNECTIONS = 256
_MAX_UNSENT = 1 << 16  # settled memfds one connection has not been told of (the rest: never)
_TOKEN = 32  # hex digits of a token
_SPEC_KEYS = frozenset({"token", "durable", "arrays"})
_RESULTS_KEYS = frozenset({"channel", "durable"})


def results_option(options: dict[str, Any]) -> tuple[str, bool] | None:
    """(channel, durable) of a submit's ``shm_results`` option, None without
    one; ProtocolError for a malformed one."""
    spec = options.get("shm_results")
    if spec is None:
        return None
    if type(spec) is not dict or not set(spec) <= _RESULTS_KEYS or \
            type(spec.get("channel")) is not str or not TOKEN_RE.fullmatch(spec["channel"]) or \
            type(spec.get("durable", True)) is not bool:
        raise ProtocolError("options.shm_results must be {channel: 32 hex digits, "
                            "durable: bool}")
    return spec["channel"], spec.get("durable", True)


def lost(job_id: str) -> ShmrunnerError:
    """The error of a non-durable same-host job replayed after a restart."""
    return ShmrunnerError(
        f"job {job_id} was accepted with durable=False: its arrays were handed over in the "
        "shared memory of a daemon that stopped before the job finished, and died with it; "
        "submit it again (or connect with durable=True to have arrays journaled)")


def result_lost(job_id: str) -> Message:
    """What the journal keeps of a non-durable client's result handed over as
    memfds: the answer to any later fetch of it (a final error)."""
    return Message("error", {
        "reason": f"the result of job {job_id} is lost: it was handed to its client as "
                  "shared memory (durable=False), and not journaled; connect with "
                  "durable=True to have results journaled",
        "job_id": job_id, "fetch": True, "code": "journal"})


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
        self.results = HeldResults(max_bytes)  # result fds not yet picked up
        self._stop = False
        self._wakeup = Wakeup()
        # Deposited memfds until their client may reuse them; the side thread's
        # own: each connection's serial (fd numbers are reused), and what it
        # has not been told yet.
        self._watch = DepositWatch(self._wakeup.wake)
        self._serials: dict[int, int] = {}  # connection fd -> serial
        self._by_serial: dict[int, socket.socket] = {}
        self._unsent: dict[int, list[tuple[int, bool]]] = {}
        self._next_serial = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._listener.bind(socket_address(self.name))
            self._listener.listen(64)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            self._wakeup.close()
            raise
        _segcache.watch(self._watch)
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
        results_option(options)  # checked here: a bad one refuses the submit
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
            path, array = array_at(item, segments)
            try:
                args, kwargs = _jobrefs.place(args, kwargs, path, array)
            except ValueError as exc:
                raise ProtocolError(f"options.shm: {exc}".replace("a ref's", "an array's")
                                    ) from None
        rest = {k: v for k, v in options.items() if k != "shm"}
        run = Message("submit", {**msg.body, "args": args, "kwargs": kwargs, "options": rest})
        return run, (run if spec.get("durable", True) else msg)

    def offer_result(self, channel: str, msg: Message) -> Message | None:
        """The result message ``msg`` with its large arrays held as fds for
        results channel ``channel`` (named by a token in ``shm``); None when it
        holds none, or they cannot be held (channel gone, bounds): frames."""
        if not msg.body.get("ok"):
            return None
        value, specs, fds = export(msg.body["value"])
        if not fds:
            return None
        self._watch.exported(fds)  # a deposit handed back by handle: the client maps it
        token = None
        try:
            token = self.results.offer(channel, fds)
        finally:
            if token is None:
                for fd in fds:
                    os.close(fd)
        if token is None:
            return None
        return Message("result", {"job_id": msg.body["job_id"], "ok": True, "value": value,
                                  "shm": {"token": token, "arrays": specs}})

    def expire(self, ttl: float) -> None:
        self.results.expire(ttl)

    def status(self) -> dict[str, int]:
        with self._lock:
            deposits = len(self._deposits)
        return {"deposits": deposits, "refused": self.refused, **self._watch.status(),
                **self.results.status()}

    def close(self) -> None:
        self._stop = True
        self._wakeup.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)
        with self._lock:
            self._deposits.clear()
            self._held.clear()
        self.results.close()
        _segcache.unwatch(self._watch)
        self._watch.close()

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
                try:
                    self._flush()
                except Exception as exc:  # noqa: BLE001 (as above)
                    log.error("same-host side channel: releasing deposits failed, carrying "
                              "on: %r", exc, exc_info=True)
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
        self._next_serial += 1
        self._serials[conn.fileno()] = self._next_serial
        self._by_serial[self._next_serial] = conn
        sel.register(conn, selectors.EVENT_READ)

    def _drop(self, sel: selectors.BaseSelector, conns: dict[int, socket.socket],
              conn: socket.socket) -> None:
        fd = conn.fileno()
        with self._lock:
            for token in self._held.pop(fd, set()):
                self._deposits.pop(token, None)  # segments released with their last reference
        self.results.close_conn(fd)
        serial = self._serials.pop(fd, None)
        if serial is not None:
            del self._by_serial[serial]
            self._unsent.pop(serial, None)
        sel.unregister(conn)
        del conns[fd]
        conn.close()

    def _serve(self, conn: socket.socket) -> bool:
        """One datagram; False once the connection is closed or out of step."""
        try:
            data, fds, flags, _ = socket.recv_fds(conn, 64, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data and not fds:
            return False  # EOF
        if not fds and (data == RESULTS or data.startswith(GET)):
            return self._results(conn, data)
        try:
            reply = {"token": self._deposit(conn.fileno(), data, fds, flags), "recycles": True}
        except ProtocolError as exc:
            self.refused += 1
            reply = {"error": str(exc)}
        try:
            conn.send(msgpack.packb(reply))
        except OSError:
            return False  # the client is gone or does not read: its deposit goes with it
        return True

    def _results(self, conn: socket.socket, data: bytes) -> bool:
        """Open a results channel, or send a held result's fds (then closed here)."""
        fds: list[int] | None = None
        if data == RESULTS:
            reply: dict[str, Any] = {"channel": self.results.open(conn.fileno())}
        else:
            token = data[len(GET):].decode("ascii", "replace")
            fds = self.results.take(conn.fileno(), token) if TOKEN_RE.fullmatch(token) else None
            if fds is None:
                self.refused += 1
                reply = {"error": "no result is held for this token on this connection "
                                  "(never, picked up already, or expired)"}
            else:
                reply = {"fds": len(fds)}
        try:
            if fds:
                socket.send_fds(conn, [msgpack.packb(reply)], fds)
            else:
                conn.send(msgpack.packb(reply))
        except OSError:
            return False  # the client is gone or does not read
        finally:
            for fd in fds or ():
                os.close(fd)  # the client has its own now (or never will)
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
                try:
                    segments.append(Segment.attach(fds[0], max(size, 1)))
                except OSError as exc:  # e.g. sealed against writes: no shared mapping
                    raise ProtocolError(f"a deposited memfd cannot be mapped: {exc.strerror}"
                                        ) from None
                fds.pop(0)  # owned by its segment now
            with self._lock:
                held = self._held.setdefault(conn, set())
                if len(held) >= MAX_DEPOSITS:
                    raise ProtocolError(f"more than {MAX_DEPOSITS} deposits not yet claimed "
                                        "by a submit on this connection")
                token = secrets.token_hex(_TOKEN // 2)
                held.add(token)
                self._deposits[token] = (conn, segments)
            self._watch.deposited(self._serials[conn], segments)
            return token
        finally:
            for fd in fds:  # those not mapped (refused): closed here
                os.close(fd)


    def _flush(self) -> None:
        """Tell each connection which of its deposited memfds settled (side thread)."""
        for serial, inode, ok in self._watch.take():
            if serial in self._by_serial:
                pending = self._unsent.setdefault(serial, [])
                if len(pending) < _MAX_UNSENT:  # (beyond: never reused, closed with the connection)
                    pending.append((inode, ok))
        for serial, pending in list(self._unsent.items()):
            conn = self._by_serial[serial]
            while pending:
                chunk = pending[:MAX_RELEASED]
                report = _segcache.encode_report([i for i, ok in chunk if ok],
                                                 [i for i, ok in chunk if not ok])
                try:
                    conn.send(RELEASED + report)
                except (BlockingIOError, InterruptedError):
                    break  # its buffer is full: at its next event
                except OSError:
                    pending.clear()  # gone: _serve sees the EOF
                    break
                del pending[:len(chunk)]
            if not pending:
                del self._unsent[serial]


def _size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise ProtocolError(f"a deposited fd cannot be read: {exc.strerror}") from None

