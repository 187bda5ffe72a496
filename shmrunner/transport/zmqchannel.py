"""A ZeroMQ DEALER or ROUTER socket that speaks :mod:`~shmrunner.transport.protocol`.

::

    send(msg, peer)          -> encode -> send_multipart(copy=False)  ~~> peer
    send_frames(frames, peer)  (frames encoded once, e.g. kept to send again)
    recv(timeout)            <- decode <- recv_multipart(copy=False)  <~~ peer
                                     |
                                     +-> ProtocolError: counted in ``rejected``, one
                                         log line, and the channel waits for the next
    poll(timeout, wakeup=)   waits for a message, room to send, or the owner's
                             wake-up pipe, until a deadline (the owner's timers)

Every ZeroMQ call of the client, the daemon and the remote worker goes through
this class (the scheduler's hub too, except that it registers ``socket`` in
its own poller). The ``try_`` sends never wait: False means the peer's queue
is full, so one slow peer cannot stall whoever serves the others.

Guarantees: a peer cannot crash or stall the reader (bad messages are counted,
never raised; every wait has a deadline; inbound frames are capped by
``zmq.MAXMSGSIZE`` and whole messages by ``max_bytes``; a refused message of
very many frames, which libzmq delivers whole and must be read to the end, is
read a slice of ``_DROP_SLICE`` frames per ``recv`` call, so the owner's loop
goes on between slices, and ``drained()`` says how long refused messages
took, frames and decoding: a million empty frames, 2 MB on the wire, cost
seconds to read, a header of nested empty lists a quarter of a second to
refuse); ``ZMQError`` never
escapes (it becomes :class:`ChannelError`); ``close()`` always releases the
socket and is idempotent. One thread owns a channel: ZeroMQ sockets are not
thread-safe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import zmq

from ..errors import ChannelClosedError, ChannelError, ConfigError, ProtocolError
from .curve import CurveKeys, client_keys
from .protocol import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    MAX_FRAMES,
    MESSAGE_TYPES,
    Message,
    decode,
    encode,
)

if TYPE_CHECKING:
    from .._wakeup import Wakeup

__all__ = ["ChannelError", "ChannelClosedError", "CurveKeys", "ChannelOptions", "Received",
           "ZmqChannel", "client_keys"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ChannelOptions:
    """Limits and trust settings of a channel, validated once."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_frames: int = MAX_FRAMES          # frames of one message (header + arrays)
    allow_pickle: bool = False
    send_timeout: float = 10.0            # seconds a send may wait for queue space
    send_hwm: int | None = None           # messages queued per peer (None: ZeroMQ's 1000)
    curve: CurveKeys | None = None
    accept: frozenset[str] | None = None  # message types this end may receive
    defer_foreign: bool = False           # torch/Arrow/pandas values left unbuilt (_codec)

    def __post_init__(self) -> None:
        if type(self.max_bytes) is not int or self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be an int >= 1, got {self.max_bytes!r}")
        if type(self.max_header_bytes) is not int or self.max_header_bytes < 1:
            raise ConfigError(f"max_header_bytes must be an int >= 1, "
                              f"got {self.max_header_bytes!r}")
        if type(self.max_frames) is not int or self.max_frames < 1:
            raise ConfigError(f"max_frames must be an int >= 1, got {self.max_frames!r}")
        if self.send_hwm is not None and (type(self.send_hwm) is not int or self.send_hwm < 1):
            raise ConfigError(f"send_hwm must be None or an int >= 1, got {self.send_hwm!r}")
        if not isinstance(self.send_timeout, (int, float)) or not self.send_timeout > 0:
            raise ConfigError(f"send_timeout must be > 0 seconds, got {self.send_timeout!r}")
        if self.accept is not None and not self.accept <= MESSAGE_TYPES:
            raise ConfigError(f"accept names unknown message types "
                              f"{sorted(self.accept - MESSAGE_TYPES)}")


class Received(NamedTuple):
    peer: bytes | None   # the sender's identity on a ROUTER, None on a DEALER
    message: Message


# pyzmq's constants as plain ints: & and | on its enum flags run Python code
# (about a microsecond each) on every message.
_POLLIN, _POLLOUT, _NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN_OUT = _POLLIN | _POLLOUT
# Frames of a refused message read per recv() call (about 30-60 ms in pyzmq):
# the rest waits for the next call, so no one message holds the owner's thread.
_DROP_SLICE = 16_384


class _Refusing:
    """A refused message being read to its end: whose, and how far it got."""

    __slots__ = ("peer", "count", "total")

    def __init__(self, peer: bytes | None, count: int, total: int) -> None:
        self.peer, self.count, self.total = peer, count, total


class ZmqChannel:
    """One DEALER or ROUTER socket sending and receiving protocol messages."""

    def __init__(self, kind: Literal["dealer", "router"], options: ChannelOptions | None = None,
                 *, context: zmq.Context[Any] | None = None, identity: bytes | None = None) -> None:
        if kind not in ("dealer", "router"):
            raise ValueError(f"a channel is a 'dealer' or a 'router', not {kind!r}")
        self.kind = kind
        self.options = options = options or ChannelOptions()
        self.rejected = 0
        self._drained = 0.0  # seconds spent on refused messages since drained() was asked
        self._refusing: _Refusing | None = None
        self._closed = False
        self._poller: zmq.Poller | None = None
        self._polled_fd, self._polled_events = -1, 0   # what the poller has registered
        ctx = context if context is not None else zmq.Context.instance()
        socket_type = zmq.ROUTER if kind == "router" else zmq.DEALER
        try:
            self._socket: zmq.Socket[Any] = ctx.socket(socket_type)
        except zmq.ZMQError as exc:
            raise ChannelError(f"cannot create a {kind} socket: {exc}") from exc
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.MAXMSGSIZE, options.max_bytes)
            self._socket.setsockopt(zmq.SNDTIMEO, max(1, round(options.send_timeout * 1000)))
            if options.send_hwm is not None:  # per peer: each pipe gets its own queue
                self._socket.setsockopt(zmq.SNDHWM, options.send_hwm)
            if kind == "router":   # an unknown peer is an error, not a silent drop
                self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if identity is not None:
                self._socket.setsockopt(zmq.IDENTITY, identity)
            if options.curve is not None:
                self._set_curve(options.curve)
        except zmq.ZMQError as exc:
            self.close()
            raise ChannelError(f"cannot configure the {kind} socket: {exc}") from exc

    def _set_curve(self, keys: CurveKeys) -> None:
        if not zmq.has("curve"):
            raise zmq.ZMQError(zmq.EINVAL, "this libzmq was built without CURVE support")
        self._socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public_key)
        self._socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key)
        if keys.server_key is None:
            self._socket.setsockopt(zmq.CURVE_SERVER, 1)
            if keys.zap_domain is not None:
                self._socket.setsockopt_string(zmq.ZAP_DOMAIN, keys.zap_domain)
                # No authenticator answering must mean no entry, not any key.
                self._socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        else:
            self._socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key)

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The socket, for an owner's own ``zmq.Poller``; send, receive and
        poll through the channel."""
        return self._socket

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosedError(f"the {self.kind} channel is closed")

    def bind(self, endpoint: str) -> str:
        """Bind to ``endpoint`` (``tcp://127.0.0.1:*`` picks a free port); return
        the endpoint bound."""
        self._check_open()
        try:
            self._socket.bind(endpoint)
            return str(self._socket.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            raise ChannelError(f"cannot bind {endpoint}: {exc}") from exc

    def connect(self, endpoint: str) -> None:
        self._check_open()
        try:
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ChannelError(f"cannot connect to {endpoint}: {exc}") from exc

    def send(self, msg: Message, peer: bytes | None = None, *,
             track: bool = False) -> zmq.MessageTracker | None:
        """Send ``msg`` (to ``peer``, on a ROUTER) without copying its arrays:
        do not modify them until ZeroMQ is done with them (``track=True``
        returns a tracker that says when). Waits up to ``send_timeout`` for
        queue space. Raises ``TypeError`` or ``ValueError`` for a message the
        protocol cannot carry."""
        sent = self._send(msg, peer, track, 0)
        return sent if isinstance(sent, zmq.MessageTracker) else None

    def try_send(self, msg: Message, peer: bytes | None = None, *,
                 track: bool = False) -> zmq.MessageTracker | bool:
        """Like :meth:`send`, but never waits: False when the peer's queue is
        full (``send_hwm`` messages it has not taken), else True (or the tracker,
        with ``track=True``). Whoever must not be blocked by one slow peer (the
        scheduler's hub) sends this way."""
        return self._send(msg, peer, track, _NOBLOCK)

    def send_frames(self, frames: Sequence[Any], peer: bytes | None = None, *,
                    track: bool = False) -> zmq.MessageTracker | None:
        """Send frames :func:`~shmrunner.transport.protocol.encode` made
        (encoded once: a message kept to send again is not encoded again), as
        :meth:`send` does. ``frames`` is not modified."""
        self._check_open()
        sent = self._send_frames(frames, peer, track, 0, "prepared")
        return sent if isinstance(sent, zmq.MessageTracker) else None

    def try_send_frames(self, frames: Sequence[Any], peer: bytes | None = None, *,
                        track: bool = False) -> zmq.MessageTracker | bool:
        """:meth:`send_frames` that never waits, as :meth:`try_send`: False
        when the peer's queue is full. A peer a ROUTER does not know (gone)
        is a :class:`ChannelError`."""
        self._check_open()
        return self._send_frames(frames, peer, track, _NOBLOCK, "prepared")

    def writable(self) -> bool:
        """Whether a send would not wait now. A DEALER whose only connection
        failed its handshake (a CURVE key the server refused) has nowhere to
        send, and a send would wait the whole send timeout."""
        self._check_open()
        try:
            return bool(self._socket.poll(0, _POLLOUT))
        except zmq.ZMQError as exc:
            raise ChannelError(f"poll of the {self.kind} channel failed: {exc}") from exc

    def readable(self) -> bool:
        """Whether a message (or part of a refused one) waits now: cheaper than a
        ``recv(0)`` that finds nothing (pyzmq raises, and builds, ``zmq.Again``)."""
        self._check_open()
        try:
            return bool(int(self._socket.getsockopt(_EVENTS)) & _POLLIN)
        except zmq.ZMQError as exc:
            raise ChannelError(f"poll of the {self.kind} channel failed: {exc}") from exc

    def poll(self, timeout: float | None, *, wakeup: Wakeup | None = None,
             writable: bool = False) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) until a message can
        be received, ``wakeup`` is woken (it is drained here), or, with
        ``writable``, a send would not wait; True when a message waits
        (``recv(0)`` next). The owner passes the time to its next deadline:
        no wait polls on a fixed tick."""
        self._check_open()
        events = _POLLIN_OUT if writable else _POLLIN
        fd = -1 if wakeup is None else wakeup.fd
        poller = self._poller
        if poller is None or self._polled_fd != fd or self._polled_events != events:
            if poller is None or self._polled_fd != fd:
                poller = self._poller = zmq.Poller()
                if fd >= 0:
                    poller.register(fd, _POLLIN)
            poller.register(self._socket, events)   # a second register modifies
            self._polled_fd, self._polled_events = fd, events
        wait_ms = None if timeout is None else (
            0 if timeout <= 0 else math.ceil(timeout * 1000))
        try:
            ready = poller.poll(wait_ms)
        except zmq.ZMQError as exc:
            raise ChannelError(f"poll of the {self.kind} channel failed: {exc}") from exc
        readable = False
        for which, found in ready:
            if which is self._socket:
                readable = bool(found & _POLLIN)
            elif wakeup is not None:
                wakeup.drain()
        return readable

    def _send(self, msg: Message, peer: bytes | None, track: bool,
              flags: int) -> zmq.MessageTracker | bool:
        self._check_open()
        return self._send_frames(encode(msg, allow_pickle=self.options.allow_pickle), peer,
                                 track, flags, msg.type)

    def _send_frames(self, frames: Sequence[Any], peer: bytes | None, track: bool,
                     flags: int, what: str) -> zmq.MessageTracker | bool:
        if (peer is None) == (self.kind == "router"):
            raise ValueError("a router channel sends to a peer identity; a dealer takes none")
        if peer is not None:
            frames = [peer, *frames]
        try:
            tracker = self._socket.send_multipart(frames, flags, copy=False, track=track)
        except zmq.Again as exc:
            if flags & _NOBLOCK:
                return False
            raise ChannelError(f"send of a {what} message timed out after "
                               f"{self.options.send_timeout}s: no peer, or its queue is full"
                               ) from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise ChannelError(f"{_name(peer)} is not connected") from exc
            raise ChannelError(f"send of a {what} message failed: {exc}") from exc
        # pyzmq returns a tracker for any zero-copy frame: only one asked for counts.
        return tracker if track and tracker is not None else True

    def drained(self) -> float:
        """Seconds spent on refused messages since the last call (reading their
        frames, decoding a header that turned out invalid): an owner that judges
        peers by their silence does not count this time against them (no other
        peer's message can be read while one is being read)."""
        seconds, self._drained = self._drained, 0.0
        return seconds

    def recv(self, timeout: float) -> Received | None:
        """The next valid message, or None when ``timeout`` seconds pass without
        one. Invalid messages are counted, logged and skipped, never raised."""
        self._check_open()
        # recv(0), the busy loops' call once per message, does no clock arithmetic.
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while True:
            wait_ms = 0 if deadline is None else max(
                0, math.ceil((deadline - time.monotonic()) * 1000))
            try:
                # With no time left, a non-blocking read says the same as a poll,
                # without the Poller pyzmq builds for every poll() (the busy
                # loops call recv(0) once per message).
                if wait_ms and not self._socket.poll(wait_ms, _POLLIN):
                    return None
                peer, frames, problem = self._recv_frames()
                if frames is None:  # a refused message, read in part: others go on
                    if not wait_ms:
                        return None
                    continue
            except zmq.Again:
                if not wait_ms:
                    return None
                continue
            except zmq.ZMQError as exc:
                raise ChannelError(f"receive on the {self.kind} channel failed: {exc}") from exc
            decoding = time.monotonic()
            try:
                if problem is not None:
                    raise ProtocolError(problem)
                msg = decode(frames, max_bytes=self.options.max_bytes,
                             allow_pickle=self.options.allow_pickle,
                             max_header_bytes=self.options.max_header_bytes,
                             max_frames=self.options.max_frames,
                             defer_foreign=self.options.defer_foreign)
                if self.options.accept is not None and msg.type not in self.options.accept:
                    raise ProtocolError(f"unexpected {msg.type} message on this channel")
            except ProtocolError as exc:
                now = time.monotonic()
                # A hostile header can cost a quarter of a second to refuse
                # (its containers are built up to the decoder's budget).
                self._drained += now - decoding
                self._reject(peer, exc)
                # A flood of garbage cannot hold us here.
                if deadline is None or now >= deadline:
                    return None
                continue
            return Received(peer, msg)

    def _recv_frames(self) -> tuple[bytes | None, list[zmq.Frame] | None, str | None]:
        """One message, frame by frame, holding no more than the limits allow:
        past ``max_frames`` frames or ``max_bytes`` bytes the rest of it is read
        and dropped (libzmq delivers a multipart message whole, so it is all
        here), and the problem is returned instead of the frames; frames None:
        the message is being refused and more of it waits (``_refuse``)."""
        if self._refusing is not None:
            return self._refuse(True)
        sock, options = self._socket, self.options
        frame: zmq.Frame = sock.recv(_NOBLOCK, copy=False)
        peer: bytes | None = None
        if self.kind == "router":   # the identity ROUTER adds; not the peer's to spend
            peer = frame.bytes
            frame = sock.recv(copy=False) if frame.more else frame
        frames: list[zmq.Frame] = [frame]
        count, total = 1, len(frame)
        while frame.more:
            frame = sock.recv(copy=False)
            count += 1
            total += len(frame)
            if count <= options.max_frames and total <= options.max_bytes:
                frames.append(frame)
            else:  # keep reading to the end of the message, keeping nothing
                self._refusing = _Refusing(peer, count, total)
                return self._refuse(frame.more)
        return peer, frames, None

    def _refuse(self, more: bool) -> tuple[bytes | None, list[zmq.Frame] | None, str | None]:
        """Read on through the refused message, ``_DROP_SLICE`` frames at most;
        its problem once it has all been read, else frames None."""
        refusing = self._refusing
        assert refusing is not None
        started = time.monotonic()
        sock, count, total = self._socket, refusing.count, refusing.total
        for _ in range(_DROP_SLICE):
            if not more:
                break
            frame = sock.recv(copy=False)   # the message is all here: never waits
            count += 1
            total += len(frame)
            more = frame.more
        self._drained += time.monotonic() - started
        refusing.count, refusing.total = count, total
        if more:
            return refusing.peer, None, None
        self._refusing = None
        options = self.options
        if count > options.max_frames:
            return refusing.peer, [], (f"message of {count} frames exceeds the limit of "
                                       f"{options.max_frames}")
        return refusing.peer, [], (f"message of {total} bytes exceeds the limit of "
                                   f"{options.max_bytes}")

    def _reject(self, peer: bytes | None, exc: ProtocolError) -> None:
        self.rejected += 1
        # Why the cap: a peer flooding garbage must not flood the log as well.
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            logger.warning("rejected message #%d from %s: %s", self.rejected, _name(peer), exc)

    def close(self, linger: float = 0.0) -> None:
        """Close the socket; unsent messages are dropped, or get ``linger``
        seconds to leave (ZeroMQ's I/O thread sends them; close does not
        wait). Idempotent."""
        if not self._closed:
            self._closed = True
            self._socket.close(linger=round(linger * 1000))

    def __enter__(self) -> ZmqChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _name(peer: bytes | None) -> str:
    return "the peer" if peer is None else f"peer {peer.hex()}"
