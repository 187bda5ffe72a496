"""How the daemon's front thread answers its clients: never waiting.

The front thread serves every client from one ROUTER socket, so a reply that
cannot go at once (the peer stopped reading and its queue is at the high-water
mark, or it has gone) is dropped and counted (``dropped``, the status field
``dropped_replies``) instead of stalling the others. Nothing is lost for good:
a client asks about its running jobs again every ``refetch_interval``.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import ChannelError
from .transport.protocol import Message, encode
from .transport.zmqchannel import ZmqChannel

__all__ = ["Replier", "refusal"]

log = logging.getLogger("shmrunner.daemon")


class Replier:
    """Sends replies on the front thread's channel; counts the dropped ones."""

    def __init__(self, channel: ZmqChannel, *, allow_pickle: bool) -> None:
        self._channel = channel
        self._allow_pickle = allow_pickle
        self.dropped = 0  # replies dropped: the peer's queue was full, or it was gone

    def reply(self, peer: bytes, msg: Message) -> None:
        try:
            frames = encode(msg, allow_pickle=self._allow_pickle)
        except (TypeError, ValueError) as exc:
            log.warning("could not encode a %s reply: %s", msg.type, exc)
            return
        self.reply_frames(peer, frames)

    def reply_frames(self, peer: bytes, frames: list[Any]) -> None:
        """Send without ever waiting (see the module's docstring)."""
        try:
            if self._channel.try_send_frames(frames, peer):
                return
            why = f"peer {peer.hex()}: its queue is full (not reading?)"
        except ChannelError as exc:  # "peer … is not connected" (gone), or the socket failed
            why = str(exc)
        self.dropped += 1
        if self.dropped <= 10 or self.dropped % 1000 == 0:
            log.info("reply #%d dropped: %s", self.dropped, why)


def refusal(reason: str, job_id: str | None, code: str) -> Message:
    """An error about one submit or fetch; ``code`` says which kind (docs/protocol.md).
    A client's own id comes back so it can settle that job; an absurdly long one
    (only a hostile peer sends those) does not."""
    echo = job_id if job_id is None or len(job_id) <= 1024 else None
    return Message("error", {"reason": reason, "job_id": echo, "code": code})
