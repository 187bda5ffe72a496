"""How the daemon's front thread answers its clients: never waiting.

Data flow::

    reply(peer, msg) --> try_send (ZeroMQ's per-peer queue) --> the client
           | the peer's queue is full (a burst: it is busy sending)
           v
    that peer's backlog (bounded: _BACKLOG_BYTES) --flush() each round--> ZeroMQ
           | over the bound, or the peer is gone
           v
    dropped, counted (``dropped_replies``)

Results of one settle round (``reply_results``): to a client that said
``batch_results`` in a submit, the small ones for it go as one ``results``
message (one send instead of one per job); everything else as single
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

from .errors import ChannelError
from .transport._schema import MAX_BATCH
from .transport.protocol import Message, encode
from .transport.zmqchannel import ZmqChannel

__all__ = ["Replier", "refusal"]

log = logging.getLogger("shmrunner.daemon")

_BACKLOG_BYTES = 32 << 20  # replies held for one client whose queue is full, at most
_BATCHED_PEERS = 4096      # clients remembered as understanding "results" (then forgotten)
_SMALL_RESULT = 64 << 10   # a result larger than this always goes alone


class _Backlog:
    __slots__ = ("frames", "nbytes")

    def __init__(self) -> None:
        self.frames: collections.deque[tuple[list[Any], int]] = collections.deque()
        self.nbytes = 0


class Replier:
    """Sends replies on the front thread's channel; counts the dropped ones."""

    def __init__(self, channel: ZmqChannel, *, allow_pickle: bool) -> None:
        self._channel = channel
        self._allow_pickle = allow_pickle
        self.dropped = 0  # replies dropped: the peer's backlog was full, or it was gone
        self._backlogs: dict[bytes, _Backlog] = {}
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
        grouped: dict[bytes, list[Message]] = {}
        for peer, frames, msg in replies:
            if peer in self._batch_peers and \
                    sum(memoryview(f).nbytes for f in frames) <= _SMALL_RESULT:
                grouped.setdefault(peer, []).append(msg)
            else:
                self.reply_frames(peer, frames)
        for peer, msgs in grouped.items():
            for start in range(0, len(msgs), MAX_BATCH):
                chunk = msgs[start:start + MAX_BATCH]
                if len(chunk) == 1:
                    self.reply(peer, chunk[0])
                else:
                    self.reply(peer, Message("results", {"results": [m.body for m in chunk]}))

    @property
    def waiting(self) -> bool:
        """Whether replies wait in a backlog (ZeroMQ does not say when a peer's
        queue has room again: the front thread flushes them every few ms)."""
        return bool(self._backlogs)

    def reply(self, peer: bytes, msg: Message) -> None:
        try:
            frames = encode(msg, allow_pickle=self._allow_pickle)
        except (TypeError, ValueError) as exc:
            log.warning("could not encode a %s reply: %s", msg.type, exc)
            return
        self.reply_frames(peer, frames)

    def reply_frames(self, peer: bytes, frames: list[Any]) -> None:
        """Send without ever waiting (see the module's docstring)."""
        backlog = self._backlogs.get(peer)
        if backlog is None:  # in order: nothing of this peer's waits
            try:
                if self._channel.try_send_frames(frames, peer):
                    return
            except ChannelError as exc:  # "peer … is not connected" (gone), or the socket failed
                self._drop(1, str(exc))
                return
            backlog = self._backlogs[peer] = _Backlog()
        nbytes = sum(memoryview(frame).nbytes for frame in frames)
        if backlog.nbytes + nbytes > _BACKLOG_BYTES:
            self._drop(1, f"peer {peer.hex()}: over {_BACKLOG_BYTES >> 20} MiB of replies wait "
                          "for it (not reading?)")
            return
        backlog.frames.append((frames, nbytes))
        backlog.nbytes += nbytes

    def flush(self) -> None:
        """Send what waits in the backlogs, as far as each peer takes it."""
        for peer, backlog in list(self._backlogs.items()):
            while backlog.frames:
                frames, nbytes = backlog.frames[0]
                try:
                    if not self._channel.try_send_frames(frames, peer):
                        break
                except ChannelError as exc:  # gone: what waits for it can never go
                    self._drop(len(backlog.frames), str(exc))
                    backlog.frames.clear()
                    break
                backlog.frames.popleft()
                backlog.nbytes -= nbytes
            if not backlog.frames:
                del self._backlogs[peer]

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self.dropped <= 10 or self.dropped % 1000 < count:
            log.info("%d reply(ies) dropped (%d in all): %s", count, self.dropped, why)


def refusal(reason: str, job_id: str | None, code: str) -> Message:
    """An error about one submit or fetch; ``code`` says which kind (docs/protocol.md).
    A client's own id comes back so it can settle that job; an absurdly long one
    (only a hostile peer sends those) does not."""
    echo = job_id if job_id is None or len(job_id) <= 1024 else None
    return Message("error", {"reason": reason, "job_id": echo, "code": code})
