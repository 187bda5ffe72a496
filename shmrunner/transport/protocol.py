"""The wire protocol of the remote tier: the one import point for its parts.

docs/protocol.md is the reference (message types, values, limits, the trust
model); the code is split by concept into private siblings, re-exported here:

- :mod:`._schema`    message types, the fields each carries, the version;
- :mod:`._codec`     ``encode(msg) -> frames`` and ``decode(frames) -> msg``,
                     with the limits a peer cannot exceed (arrays as frames:
                     :mod:`._arrays`);
- :mod:`._funcref`   functions by reference, ``"package.module:qualname"``;
- :mod:`._errormap`  a task's exception on the wire and back, and the one
                     helper that picks the traceback sent with it.

All pure functions, no sockets (the socket is
:mod:`shmrunner.transport.zmqchannel`), so every rule can be fuzzed without a
network. Import from here, not from the siblings.
"""

from __future__ import annotations

from ..errors import RemoteTaskError
from ._codec import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    EXT_ARRAY,
    EXT_PICKLE,
    EXT_TUPLE,
    MAX_FRAMES,
    MAX_NESTING,
    Frame,
    decode,
    encode,
)
from ._codec import _pickle_dumps as _pickle_dumps
from ._errormap import exception_from_wire, exception_to_wire, rebuildable, remote_traceback
from ._funcref import function_ref, resolve_function
from ._schema import (
    MAX_BATCH,
    MAX_CAPACITY,
    MAX_CPUS,
    MAX_EVIDENCE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Message,
    MessageType,
)

__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_HEADER_BYTES", "MAX_NESTING",
    "MESSAGE_TYPES", "MAX_BATCH", "MAX_CAPACITY", "MAX_CPUS", "MAX_EVIDENCE", "MAX_FRAMES",
    "MessageType", "Message",
    "RemoteTaskError", "Frame", "EXT_ARRAY", "EXT_TUPLE", "EXT_PICKLE",
    "encode", "decode", "function_ref", "resolve_function",
    "exception_to_wire", "exception_from_wire", "remote_traceback", "rebuildable",
]
