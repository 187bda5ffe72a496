"""Submits batched on the wire: many small submits as one "submits" message.

Data flow::

    Client.submit (caller thread): encode -> SubmitFrames -> ledger outbox
    client thread: next_message(outbox, batching): the front run of small
        single-frame submits -> one "submits" message (their header frames as
        bytes, unchanged; even a run of one); anything else goes as it is.
        A send that does not go puts them back (restore), in order.
    daemon front thread: unbatch(msg): each item decoded as the single
        "submit" it is (its own limits and schema check); the item's bytes are
        what the journal keeps for that job (no second encode)

A client batches only once its daemon said it takes "submits" (``submits:
true`` in an ``accepted``): an older daemon would reject the unknown type, so
the submits sent before that go singly. An item that is not a valid submit
is rejected alone (counted by the daemon); the others of its batch go on.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from .errors import ProtocolError
from .transport._schema import MAX_BATCH
from .transport.protocol import Message, decode, encode

__all__ = ["SubmitFrames", "next_message", "restore", "unbatch"]

_ITEM_BYTES = 64 << 10    # a submit larger than this goes alone
_BATCH_BYTES = 1 << 20    # one "submits" message carries at most this many item bytes


class SubmitFrames(list):  # type: ignore[type-arg]
    """The frames of one submit: the client thread may send it in a batch."""

    __slots__ = ()


def _batchable(frames: list[Any]) -> bool:
    return type(frames) is SubmitFrames and len(frames) == 1 and len(frames[0]) <= _ITEM_BYTES


def next_message(outbox: collections.deque[list[Any]],
                 batching: bool) -> tuple[list[Any], list[list[Any]]]:
    """Pop the outbox's next message: (its frames, the outbox entries it
    carries). Only the client thread pops; callers append meanwhile."""
    first = outbox.popleft()
    taken = [first]
    if not batching or not _batchable(first):
        return first, taken
    size = len(first[0])
    while (outbox and len(taken) < MAX_BATCH and _batchable(outbox[0])
           and size + len(outbox[0][0]) <= _BATCH_BYTES):
        entry = outbox.popleft()
        taken.append(entry)
        size += len(entry[0])
    # Even one goes as a batch: the daemon then journals its bytes as they are
    # (a single submit it would encode again).
    return encode(Message("submits", {"submits": [bytes(e[0]) for e in taken]})), taken


def restore(outbox: collections.deque[list[Any]], taken: list[list[Any]]) -> None:
    """Put back what :func:`next_message` took (the send did not go), in order."""
    outbox.extendleft(reversed(taken))


def unbatch(msg: Message, *, max_bytes: int,
            allow_pickle: bool) -> Iterator[tuple[Message, list[Any]] | ProtocolError]:
    """Each item of a "submits" message: (the submit, its frames as the journal
    keeps them), or why it is not a valid submit."""
    for item in msg.body["submits"]:
        try:
            inner = decode([item], max_bytes=max_bytes, allow_pickle=allow_pickle)
        except ProtocolError as exc:
            yield exc
            continue
        if inner.type != "submit":
            yield ProtocolError(f"a submits item holds a {inner.type} message")
            continue
        yield inner, [item]
