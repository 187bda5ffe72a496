"""What a same-host client and the daemon agree on for arrays handed over as memfds.

The side channel is an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket in the abstract
namespace (nothing on disk, so nothing is left behind by a ``kill -9``),
named ``shmrunner-`` + 32 random hex digits; the daemon tells its name only
in its ``status`` answer, that is to clients that passed the ZeroMQ
endpoint's own authentication. Each side checks the other's uid
(``SO_PEERCRED``): only this user's processes talk on it.

One exchange per submit: the client sends one datagram ``b"put"`` carrying
up to ``MAX_FDS`` memfds (``SCM_RIGHTS``); the daemon answers one datagram,
msgpack ``{"token": 32 hex}`` or ``{"error": why}``. The submit over ZeroMQ
then names the token in ``options["shm"]`` = ``{"token", "durable",
"arrays": [[path, fd index, dtype descr, shape, strides, offset], ...]}``;
each array's place in the arguments holds None (a path as in ``_jobrefs``).

Results by memfd (negotiated: only a daemon that knows it answers): the
client opens a second connection and sends ``b"results"``; the daemon answers
``{"channel": 32 hex}``, naming that connection. Each submit then carries
``options["shm_results"]`` = ``{"channel", "durable"}``. A finished job's
array results of at least ``THRESHOLD`` bytes are *held* by the daemon for
that connection (bounded per connection: ``MAX_HELD_FDS`` fds,
``MAX_HELD_RESULTS`` results, and bytes; released when the connection
closes or after ``result_ttl``), and the ``result`` message names them:
``shm`` = ``{"token", "arrays": [[path, fd index, descr, shape, strides,
offset], ...]}``, each array's place in ``value`` holding None (paths start
with 0: the value is argument 0). The client sends ``b"get " + token`` on its
results connection; the daemon answers one datagram ``{"fds": n}`` with the
n memfds (``SCM_RIGHTS``), or ``{"error": why}``, and closes its own copies.
The client checks each fd and spec as the daemon checks a deposit's.

Recycled deposits (negotiated per deposit): a daemon that watches its
deposits answers ``{"token", "recycles": true}``. The client then keeps the
memfds it copied plain arrays into (its segment cache, ``_segcache``) and
writes into one again only once the daemon says so, in a datagram it sends
on the deposit's connection when it likes: ``b"released"`` + a release report
(``_segcache.encode_report``: two little-endian u32 counts, then as many u64
inodes: released, then dropped; at most ``MAX_RELEASED``). *Released*: the
job can no longer run (settled, never retried), the daemon maps it no more,
and every local worker it went to reported it unmapped; *dropped*: anything
else (a worker that died, passed it on or forked while mapping it, a result
handing it back to the client by handle, a fork of the daemon): the client
closes it and never reuses it. The client reads these datagrams before each
deposit, while it waits for a put's answer, and after it received messages
from the daemon (results: an idle client takes back what its finished jobs
used), acts only on
inodes it lent to that connection, and closes every memfd lent to a
connection that fails or closes. A daemon that never says ``recycles`` (one
older than this) gets fresh memfds, closed once sent, as before.
"""

from __future__ import annotations

import math
import re
import socket
import struct
from typing import Any

import numpy as np

from . import _jobrefs
from ._argtree import DESCEND, Path, Swap
from ._memfd import Segment
from ._payload import only_scalars
from .errors import ProtocolError
from .shm import DEFAULT_THRESHOLD, segment_of
from .transport._arrays import _parse_dtype, _span, raw_layout

__all__ = ["GET", "MAX_ARRAYS", "MAX_FDS", "MAX_HELD_FDS", "MAX_HELD_RESULTS", "MAX_RELEASED",
           "NAME", "PUT", "RELEASED", "RESULTS", "THRESHOLD", "TOKEN", "array_at",
           "extract_arrays", "peer_uid", "socket_address"]

PUT = b"put"
RESULTS = b"results"  # open a results channel (this connection)
GET = b"get "  # + a token: the fds of a held result
RELEASED = b"released"  # + a release report: deposited memfds the client may reuse
MAX_RELEASED = 1024  # inodes one release datagram names
TOKEN = 32  # hex digits of a token or a channel id
TOKEN_RE = re.compile(r"[0-9a-f]{32}")
THRESHOLD = DEFAULT_THRESHOLD  # result arrays at least this large go as memfds
MAX_HELD_FDS = 1024  # result fds one results connection may leave unclaimed
MAX_HELD_RESULTS = 4096  # results one results connection may leave unclaimed
_VISITS = 10_000  # objects looked at per value
MAX_FDS = 253  # SCM_MAX_FD: the fds of one datagram
MAX_ARRAYS = 1024  # array specs in one submit (several may view one memfd)
NAME = re.compile(r"shmrunner-[0-9a-f]{32}")
_UCRED = struct.Struct("3i")  # pid, uid, gid


def socket_address(name: str) -> str:
    """The abstract-namespace address of an advertised side-channel name."""
    return "\0" + name


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (as the kernel saw it connect)."""
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              _UCRED.size))
    return int(uid)


Found = list[tuple[Path, np.ndarray[Any, Any]]]


def extract_arrays(args: tuple[Any, ...], kwargs: dict[str, Any], threshold: int
                   ) -> tuple[tuple[Any, ...], dict[str, Any], Found]:
    """The arguments with each large array replaced by None, and where each was
    (at most MAX_ARRAYS arrays in MAX_FDS memfds; the rest stay as they are)."""
    if only_scalars(args, kwargs):  # the common tiny call (or result): nothing to walk
        return args, kwargs, []
    walk = _Walk(threshold)
    new_args, new_kwargs = walk.arguments(args, kwargs)
    return new_args, new_kwargs, walk.found


class _Walk(Swap):
    """Each large plain array becomes None, noted with its path, while the
    bounds allow (MAX_ARRAYS arrays in MAX_FDS memfds; the rest stay)."""

    max_visits = _VISITS

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.found: Found = []
        self.fds: set[int] = set()

    def leaf(self, obj: Any, path: Path) -> Any:
        if type(obj) is not np.ndarray:
            return DESCEND
        found = self.found
        if obj.nbytes < self.threshold or not raw_layout(obj.dtype) or \
                len(found) >= MAX_ARRAYS:
            return obj
        seg = segment_of(obj)
        key = seg.fd if seg is not None else -len(found) - 1
        if key not in self.fds and len(self.fds) >= MAX_FDS:
            return obj
        self.fds.add(key)
        found.append((list(path), obj))
        return None


def array_at(item: Any, segments: list[Segment], what: str = "options.shm"
             ) -> tuple[Path, np.ndarray[Any, Any]]:
    """One array spec [path, index, descr, shape, strides, offset], checked
    against its segment, and the array it describes (ProtocolError if bad)."""
    if type(item) not in (list, tuple) or len(item) != 6:
        raise ProtocolError(f"an {what} array must be [path, index, dtype, shape, "
                            "strides, offset]")
    path, index, descr, shape, strides, offset = item
    try:
        ((path, _),) = _jobrefs.parse([[path, "x"]])
    except ValueError as exc:
        raise ProtocolError(f"{what}: {exc}".replace("a ref's", "an array's")) from None
    if type(index) is not int or not 0 <= index < len(segments):
        raise ProtocolError(f"an {what} array names fd {index!r}; the deposit has "
                            f"{len(segments)}")
    if type(shape) not in (list, tuple) or len(shape) > 64 or \
            not all(type(n) is int and n >= 0 for n in shape) or \
            type(strides) not in (list, tuple) or len(strides) != len(shape) or \
            not all(type(s) is int for s in strides) or type(offset) is not int or offset < 0:
        raise ProtocolError(f"an {what} array needs a shape (ints >= 0), as many strides "
                            "(ints) and an offset (int >= 0)")
    dtype = _parse_dtype(descr)
    seg = segments[index]
    room = len(seg) - offset
    span = _span(list(shape), list(strides), dtype.itemsize)
    if span is None or span > room or math.prod(shape) * dtype.itemsize > max(room, 0):
        raise ProtocolError(f"an {what} array of shape {tuple(shape)} and dtype {dtype} "
                            f"does not fit its memfd ({len(seg)} bytes from offset {offset})")
    try:  # numpy's own limits (e.g. a dimension past 2**63 beside a 0) are the peer's fault
        array: np.ndarray[Any, Any] = np.ndarray(tuple(shape), dtype, buffer=seg,
                                                 offset=offset, strides=tuple(strides))
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"an {what} array of shape {tuple(shape)[:8]} cannot be made: "
                            f"{str(exc)[:200]}") from None
    return path, array
