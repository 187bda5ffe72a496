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
"""

from __future__ import annotations

import re
import socket
import struct

__all__ = ["MAX_ARRAYS", "MAX_FDS", "NAME", "PUT", "peer_uid", "socket_address"]

PUT = b"put"
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
