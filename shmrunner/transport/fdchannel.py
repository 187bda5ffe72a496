"""A message channel over an AF_UNIX stream socket that carries fds with bytes.

Frame: a 12-byte header ``<length: u64><nfds: u32>`` then ``length`` payload
bytes; the message's fds ride as ``SCM_RIGHTS`` on a ``sendmsg`` that carries
its first byte, and no ``sendmsg`` carries the fds of two messages. On Linux a
stream ``recvmsg`` never merges data past a segment that carries fds, so each
``recvmsg`` returns at most one message's fds, no later than its header and in
message order: the reader keeps them in a FIFO of batches and gives each
header announcing fds the next batch.

When the receiving process has no free fd slot (``RLIMIT_NOFILE``), the
kernel drops the fds it cannot install and flags the ``recvmsg``
``MSG_CTRUNC``. Since a batch belongs to exactly one message, only that
message is affected: it is returned with :data:`LOST_FD` in place of each
missing fd (the decoder fails that one message with a clear error), and the
channel stays in step.

Two ways to use one end:

* blocking (the worker side): :meth:`FdChannel.send` and :meth:`FdChannel.recv`;
* non-blocking (the pool's manager thread, which serves many workers from one
  ``selectors`` loop and so must never block on one of them):
  :meth:`FdChannel.send_nowait` queues what the socket does not take and
  :meth:`FdChannel.flush` sends more when it is writable; :meth:`FdChannel.read_ready`
  drains what has arrived and returns the complete messages.

Closed by the peer (EOF) is reported as :class:`PeerClosed`, distinct from
any message (and from :class:`~shmrunner.errors.ChannelClosedError`, which
means *you* closed a channel).
"""

from __future__ import annotations

import array
import collections
import os
import select
import socket
import struct
from collections.abc import Callable, Sequence

__all__ = ["PeerClosed", "FdChannel", "LOST_FD", "MAX_FDS", "channel_pair"]

_HEADER = struct.Struct("<QI")
#: The most fds one ``sendmsg`` may carry (Linux ``SCM_MAX_FD``); a message's
#: fds ride on one ``sendmsg``, so this is the most one message can carry.
MAX_FDS = 253
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RECV_CHUNK = 1 << 16
# Flags as plain ints: socket's are IntFlag members, and combining or testing
# those runs enum code in Python on every message (microseconds per message).
_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)

#: Stands in for an fd the kernel could not install here (no free fd slot).
LOST_FD = -1


class PeerClosed(EOFError):
    """The other end of the channel closed (or its process died), or sent a
    frame out of step (then ``args`` says how): nothing more can be read."""


def channel_pair() -> tuple[FdChannel, FdChannel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FdChannel(a), FdChannel(b)


class FdChannel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rbuf = bytearray()
        # One entry per recvmsg that brought fds: (the fds, truncated by the kernel).
        self._rfds: collections.deque[tuple[list[int], bool]] = collections.deque()
        # Queued output: (bytes left to send, fds to attach, callbacks once the
        # fds are sent, (tag, end offset in the bytes left) of each message not
        # yet wholly sent).
        self._pending: collections.deque[
            tuple[memoryview, list[int], list[Callable[[], None]], list[tuple[object, int]]]]
        self._pending = collections.deque()
        self._dropped: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and every fd received or queued but not handed out."""
        while self._rfds:
            for fd in self._rfds.popleft()[0]:
                _close(fd)
        self._drop_pending()
        self.sock.close()

    def _drop_pending(self) -> None:
        while self._pending:
            _, _, done, tags = self._pending.popleft()
            self._dropped += [tag for tag, _ in tags]
            for callback in done:
                callback()

    def undelivered(self) -> list[object]:
        """Tags of the messages not (fully) handed to the kernel: dropped because
        the peer was gone, or still queued. Their peer cannot have read them."""
        return self._dropped + [tag for entry in self._pending for tag, _ in entry[3]]

    # --- blocking side ----------------------------------------------------------

    def send(self, payload: bytes, fds: list[int] = []) -> None:  # noqa: B006 (never mutated)
        """Send one message, blocking until the socket has taken all of it."""
        self.send_batch([(payload, fds, None)])

    def send_batch(self, messages: list[tuple[bytes, list[int], Callable[[], None] | None]],
                   ) -> None:
        """Send several messages, coalesced, blocking until all are sent (or
        the peer is gone: then they are dropped and the next recv sees EOF)."""
        self.send_batch_nowait(messages)
        while self._pending:
            select.select([], [self.sock], [])
            self.flush()

    def recv(self) -> tuple[bytearray, list[int]]:
        """Receive one message, blocking; raise PeerClosed at EOF."""
        while True:
            message = self._next_message()
            if message is not None:
                return message
            missing = self._missing()
            if missing > _RECV_CHUNK:
                self._read_exact(missing)
            else:
                # A blocking recvmsg, not poll() then a read: a reader asleep in
                # recvmsg is also woken when the peer reads what this end sent
                # (the write-space wake-up is not filtered by event, as poll's
                # is). That spurious wake-up costs the peer's read ~5 us on a
                # VM (Pool.apply 4-9 us slower), but leaves a worker awake for
                # its next batch: the Scheduler's tiny tasks ran 5-8 % faster.
                self._receive_some(blocking=True)

    # --- non-blocking side ------------------------------------------------------

    @property
    def wants_write(self) -> bool:
        return bool(self._pending)

    def send_nowait(self, payload: bytes, fds: list[int],
                    done: Callable[[], None] | None = None) -> None:
        """Send what the socket takes now and queue the rest for :meth:`flush`.

        ``done`` runs once the message's fds have been handed to the kernel
        (or the message is dropped at close): the place to close owned fds.
        """
        self.send_batch_nowait([(payload, fds, done)])

    def send_batch_nowait(
            self, messages: Sequence[tuple[bytes, list[int], Callable[[], None] | None]],
            tags: Sequence[object] = ()) -> None:
        """:meth:`send_nowait` for several messages (never blocks), coalesced
        into as few ``sendmsg`` calls as the per-call fd limit allows. ``tags`` (one per
        message) name them in :meth:`undelivered`."""
        frames: list[bytes] = []
        group_fds: list[int] = []
        group_done: list[Callable[[], None]] = []
        group_tags: list[tuple[object, int]] = []
        group_len = 0
        for i, (payload, fds, done) in enumerate(messages):
            # A new sendmsg for each message with fds: the receiver then knows
            # whose fds the kernel dropped, if it drops any (MSG_CTRUNC).
            if group_fds and fds:
                self._pending.append((memoryview(b"".join(frames)), group_fds, group_done,
                                      group_tags))
                frames, group_fds, group_done, group_tags = [], [], [], []
                group_len = 0
            frames.append(_HEADER.pack(len(payload), len(fds)))
            frames.append(payload)
            group_len += _HEADER.size + len(payload)
            group_fds.extend(fds)
            if done is not None:
                group_done.append(done)
            if i < len(tags):
                group_tags.append((tags[i], group_len))
        self._pending.append((memoryview(b"".join(frames)), group_fds, group_done, group_tags))
        self.flush()

    def flush(self) -> None:
        """Send queued bytes until the socket would block."""
        while self._pending:
            frame, fds, done, tags = self._pending[0]
            try:
                sent = self.sock.sendmsg([frame], _rights(fds), _DONTWAIT)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError):
                # The peer is gone: nothing queued can be delivered any more.
                # Whoever watches the peer (a process sentinel) accounts for it.
                self._drop_pending()
                return
            if fds or done:
                # The fds went with the first byte; the rest of the frame carries none.
                self._pending[0] = (frame, [], [], tags)
                for callback in done:
                    callback()
            if sent < len(frame):
                # Messages wholly sent are delivered: the peer may have read them.
                tags = [(tag, end - sent) for tag, end in tags if end > sent]
                self._pending[0] = (frame[sent:], [], [], tags)
                return
            self._pending.popleft()

    def read_ready(self) -> list[tuple[bytearray, list[int]]]:
        """Drain the socket without blocking; return the complete messages.

        Raises PeerClosed at EOF, after the caller has had every complete
        message received before it (call again to collect them: see below).
        """
        messages = []
        closed = False
        try:
            # Bounded, so one chatty worker cannot starve the others; a short
            # read means the socket is (nearly) drained and epoll will say if not.
            for _ in range(16):
                if self._receive_some(blocking=False) < _RECV_CHUNK:
                    break
        except PeerClosed:
            closed = True
        while (message := self._next_message()) is not None:
            messages.append(message)
        if closed and not messages:
            raise PeerClosed
        return messages

    # --- internals ----------------------------------------------------------------

    def _receive_some(self, blocking: bool) -> int:
        """One recvmsg; the bytes received (0 if it would block). Raises
        PeerClosed at EOF."""
        flags = _CLOEXEC if blocking else _CLOEXEC | _DONTWAIT
        size = max(_RECV_CHUNK, min(self._missing(), 1 << 24))
        try:
            data, anc, msg_flags, _ = self.sock.recvmsg(size, _ANCBUF, flags)
        except BlockingIOError:
            return 0
        except ConnectionResetError:
            data, anc, msg_flags = b"", [], 0
        truncated = bool(msg_flags & _CTRUNC)
        if anc or truncated:  # most messages carry no fds
            fds = array.array("i")
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            if fds or truncated:
                self._rfds.append((fds.tolist(), truncated))
        if not data:
            raise PeerClosed
        self._rbuf += data
        return len(data)

    def _missing(self) -> int:
        """Bytes still to come for the message at the head of the buffer."""
        if len(self._rbuf) < _HEADER.size:
            return 0
        length: int = _HEADER.unpack_from(self._rbuf)[0]
        return _HEADER.size + length - len(self._rbuf)

    def _next_message(self) -> tuple[bytearray, list[int]] | None:
        buf = self._rbuf
        if len(buf) < _HEADER.size:
            return None
        length, nfds = _HEADER.unpack_from(buf)
        end = _HEADER.size + length
        if len(buf) < end:
            return None
        payload = buf[_HEADER.size:end]
        del buf[:end]
        if not nfds:
            return payload, []
        fds, truncated = self._rfds.popleft() if self._rfds else ([], False)
        if len(fds) != nfds and not truncated:
            for fd in fds:
                _close(fd)
            raise PeerClosed(f"message announced {nfds} fds but {len(fds)} arrived")
        for fd in fds[nfds:]:
            _close(fd)
        # Truncated: the kernel installed the first fds and dropped the rest.
        return payload, fds[:nfds] + [LOST_FD] * (nfds - len(fds))

    def _read_exact(self, missing: int) -> None:
        # A large payload goes straight into one buffer of the right size
        # instead of growing the bytearray 64 KiB at a time. Reading exactly
        # ``missing`` bytes never consumes the next message (nor its fds).
        chunk = bytearray(missing)
        view = memoryview(chunk)
        got = 0
        while got < missing:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise PeerClosed
            got += n
        self._rbuf += chunk


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
