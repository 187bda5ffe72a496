"""How the daemon's front thread answers its clients: never waiting.

Data flow::

    reply(peer, msg) --> try_send (ZeroMQ's per-peer queue) --> the client
           | the peer's queue is full (a burst: it is busy sending)
           v
    that peer's backlog (bounded: _BACKLOG_BYTES) --flush() each round--> ZeroMQ
           | over the bound, or the peer is gone
           v
    dropped, counted (``dropped_replies``)

A fetched result of _TRACKED bytes or more is tracked until ZeroMQ has sent
it (``reply_result``): a peer that asks for it again meanwhile
(``result_pending``) is not sent it again. ZeroMQ bounds a peer's queue in
messages (1000), not bytes: a peer that fetched a 4 MiB result 500 times
without reading once had 2 GB queued for it in the daemon.

Results of one settle round (``reply_results``): to a client that said
``batch_results`` in a submit, the small ones for it (one frame: no arrays)
go as one ``results`` message (one send instead of one per job), made of the
results' encoded bodies, not encoded again; everything else as single
``result`` messages, already encoded (the journal's own frames).

The front thread serves every client from one ROUTER socket, so it never
blocks on one of them. A client that submits thousands of jobs at once is not
reading while it sends: its replies wait in its backlog, in order, and go as
soon as it reads again. Only a client that stops reading for good (or has
gone) loses replies, which are dropped and counted instead of stalling the
others or filling the daemon's memory. Nothing is lost for good: a client asks
about its running jobs again every ``refetch_interval``.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import msgpack
import zmq

from .errors import ChannelError
from .transport._schema import MAX_BATCH, PROTOCOL_VERSION
from .transport.protocol import Message, encode
from .transport.zmqchannel import ZmqChannel

__all__ = ["Replier", "refusal"]

log = logging.getLogger("shmrunner.daemon")

_BACKLOG_BYTES = 32 << 20  # replies held for one client whose queue is full, at most
_BATCHED_PEERS = 4096      # clients remembered as understanding "results" (then forgotten)
_SMALL_RESULT = 64 << 10   # a result larger than this always goes alone
_TRACKED = 64 << 10        # a fetched result this large is not queued twice for a peer
_BACKLOGGED = None         # a tracked result that waits in its peer's backlog


_Key = tuple[bytes, str]  # (peer, job id) of a tracked result


class _Backlog:
    __slots__ = ("frames", "nbytes")

    def __init__(self) -> None:
        # (frames, bytes, the tracked result's key or None)
        self.frames: collections.deque[tuple[list[Any], int, _Key | None]] = \
            collections.deque()
        self.nbytes = 0


class Replier:
    """Sends replies on the front thread's channel; counts the dropped ones."""

    def __init__(self, channel: ZmqChannel, *, allow_pickle: bool) -> None:
        self._channel = channel
        self._allow_pickle = allow_pickle
        self.dropped = 0  # replies dropped: the peer's backlog was full, or it was gone
        self._backlogs: dict[bytes, _Backlog] = {}
        # Large fetched results not sent yet: their ZeroMQ tracker, or _BACKLOGGED.
        self._tracked: dict[_Key, zmq.MessageTracker | None] = {}
        self._batch_peers: set[bytes] = set()

    def batches_for(self, peer: bytes) -> None:
        """``peer`` understands a batched ``results`` (its submit said so). Bounded:
        past _BATCHED_PEERS they are all forgotten (they hear single results
        until their next submit), which is always safe."""
        if peer not in self._batch_peers:
            if len(self._batch_peers) >= _BATCHED_PEERS:
                self._batch_peers.clear()
            self._batch_peers.add(peer)

    def reply_results(self, replies: list[tuple[bytes, list[Any], Message]]) -> None:
        """Send a settle round's results: (peer, the result's frames, the result)."""
        grouped: dict[bytes, list[bytes]] = {}
        for peer, frames, _ in replies:
            body = _packed_body(frames) if peer in self._batch_peers else None
            if body is not None:
                grouped.setdefault(peer, []).append(body)
            else:
                self.reply_frames(peer, frames)
        for peer, bodies in grouped.items():
            for start in range(0, len(bodies), MAX_BATCH):
                chunk = bodies[start:start + MAX_BATCH]
                if len(chunk) == 1:
                    self.reply_frames(peer, [_RESULT_HEAD + chunk[0]])
                else:
                    self.reply_frames(peer, [_RESULTS_HEAD + _ARRAY.pack_array_header(len(chunk))
                                             + b"".join(chunk)])

    @property
    def waiting(self) -> bool:
        """Whether replies wait in a backlog, or tracked ones in ZeroMQ (which
        does not say when a peer's queue has room again, nor when it sent a
        message: the front thread flushes every few ms meanwhile)."""
        return bool(self._backlogs) or bool(self._tracked)

    def result_pending(self, peer: bytes, job_id: str) -> bool:
        """Whether a large result of ``job_id`` still waits to go to ``peer``
        (a fetch of it again needs no reply: the peer gets that one)."""
        key = (peer, job_id)
        if key not in self._tracked:
            return False
        tracker = self._tracked[key]
        if tracker is not _BACKLOGGED and tracker.done:
            del self._tracked[key]
            return False
        return True

    def reply_result(self, peer: bytes, job_id: str, frames: list[Any]) -> None:
        """A fetched job's result, tracked until sent if it is large."""
        key = (peer, job_id) if _size(frames) >= _TRACKED else None
        self._reply(peer, frames, key)

    def reply(self, peer: bytes, msg: Message) -> None:
        try:
            frames = encode(msg, allow_pickle=self._allow_pickle)
        except (TypeError, ValueError) as exc:
            log.warning("could not encode a %s reply: %s", msg.type, exc)
            return
        self.reply_frames(peer, frames)

    def reply_frames(self, peer: bytes, frames: list[Any]) -> None:
        """Send without ever waiting (see the module's docstring)."""
        self._reply(peer, frames, None)

    def _reply(self, peer: bytes, frames: list[Any], key: _Key | None) -> None:
        backlog = self._backlogs.get(peer)
        if backlog is None:  # in order: nothing of this peer's waits
            try:
                if self._send(peer, frames, key):
                    return
            except ChannelError as exc:  # "peer … is not connected" (gone), or the socket failed
                self._drop(1, str(exc))
                return
            backlog = self._backlogs[peer] = _Backlog()
        nbytes = _size(frames)
        if backlog.nbytes + nbytes > _BACKLOG_BYTES:
            self._drop(1, f"peer {peer.hex()}: over {_BACKLOG_BYTES >> 20} MiB of replies wait "
                          "for it (not reading?)")
            return
        backlog.frames.append((frames, nbytes, key))
        backlog.nbytes += nbytes
        if key is not None:
            self._tracked[key] = _BACKLOGGED

    def _send(self, peer: bytes, frames: list[Any], key: _Key | None) -> bool:
        if key is None:
            return bool(self._channel.try_send_frames(frames, peer))
        sent = self._channel.try_send_frames(frames, peer, track=True)
        if sent is False:
            return False
        if isinstance(sent, zmq.MessageTracker):
            self._tracked[key] = sent
        else:
            self._tracked.pop(key, None)
        return True

    def flush(self) -> None:
        """Send what waits in the backlogs, as far as each peer takes it."""
        for peer, backlog in list(self._backlogs.items()):
            while backlog.frames:
                frames, nbytes, key = backlog.frames[0]
                try:
                    if not self._send(peer, frames, key):
                        break
                except ChannelError as exc:  # gone: what waits for it can never go
                    self._drop(len(backlog.frames), str(exc))
                    for _, _, gone in backlog.frames:
                        self._tracked.pop(gone, None)  # type: ignore[arg-type]
                    backlog.frames.clear()
                    break
                backlog.frames.popleft()
                backlog.nbytes -= nbytes
            if not backlog.frames:
                del self._backlogs[peer]
        if self._tracked:  # a done tracker still holds its message's buffers
            for key in [k for k, t in self._tracked.items() if t is not None and t.done]:
                del self._tracked[key]

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self.dropped <= 10 or self.dropped % 1000 < count:
            log.info("%d reply(ies) dropped (%d in all): %s", count, self.dropped, why)


# A "results" message is built from its results' encoded bodies, not encoded
# again: msgpack concatenates, so [VERSION, "results", {"results": [b1, b2]}] is
# this head, an array header and the bodies as each "result" frame holds them.
_RESULT_HEAD = b"\x93" + msgpack.packb([PROTOCOL_VERSION, "result"])[1:]
_RESULTS_HEAD = (b"\x93" + msgpack.packb([PROTOCOL_VERSION, "results"])[1:]
                 + b"\x81" + msgpack.packb("results"))
_ARRAY = msgpack.Packer()


def _size(frames: list[Any]) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


def _packed_body(frames: list[Any]) -> bytes | None:
    """The packed body of a small single-frame "result" message (no arrays: their
    frame indices are the message's own), else None: it goes alone."""
    if len(frames) != 1:
        return None
    frame = bytes(frames[0])
    if len(frame) > _SMALL_RESULT or not frame.startswith(_RESULT_HEAD):
        return None
    return frame[len(_RESULT_HEAD):]


def refusal(reason: str, job_id: str | None, code: str) -> Message:
    """An error about one submit or fetch; ``code`` says which kind (docs/protocol.md).
    A client's own id comes back so it can settle that job; an absurdly long one
    (only a hostile peer sends those) does not."""
    echo = job_id if job_id is None or len(job_id) <= 1024 else None
    return Message("error", {"reason": reason, "job_id": echo, "code": code})
