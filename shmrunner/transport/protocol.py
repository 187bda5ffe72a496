"""The wire protocol of the remote tier: messages to ZeroMQ frames and back.

Pure functions, no sockets (the socket is :mod:`shmrunner.transport.zmqchannel`),
so every rule below can be fuzzed without a network. A message is a list of
frames::

    frame 0       msgpack header  [PROTOCOL_VERSION, type, body]
    frames 1..n   raw array bodies, one per distinct array in the body

Inside ``body`` values are msgpack types plus three ext types:

    ext 1  array   [frame index, dtype str or descr, shape, strides] -> frame
    ext 2  tuple   the msgpack list of its items (so tuples stay tuples)
    ext 3  pickle  cloudpickle/pickle bytes, only if both ends allow pickles

``encode`` never copies a C- or Fortran-contiguous array: its frame is a
memoryview of the array itself (send it with ``copy=False``). ``decode`` never
copies either: each array is an ``np.ndarray`` over the received frame's
buffer, after checking that the view fits inside it. Every way a peer can
break these rules ends in :class:`~shmrunner.errors.ProtocolError`; msgpack,
numpy and pickle exceptions are translated here and nowhere else.

docs/protocol.md is the reference for the message types and the trust model.
"""

from __future__ import annotations

import importlib
import math
import pickle
import reprlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union, cast, get_args

import msgpack
import numpy as np

from ..errors import ProtocolError, ShmrunnerError, attach_remote_traceback

if TYPE_CHECKING:
    import zmq

__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_HEADER_BYTES", "MAX_NESTING",
    "MESSAGE_TYPES", "MessageType", "Message", "Frame", "RemoteTaskError",
    "encode", "decode", "function_ref", "resolve_function",
    "exception_to_wire", "exception_from_wire",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 1 << 30           # a whole message, header and array frames
DEFAULT_MAX_HEADER_BYTES = 64 << 20   # frame 0: msgpack can grow ~64x into Python objects
MAX_NESTING = 32                      # ext inside ext: each level is a nested C unpacker
# Why MAX_NESTING: msgpack's unpacker keeps a ~40 KiB stack on the C stack, and a
# tuple ext is unpacked by a nested call; a few thousand nested tuples in one
# header overflow the C stack and segfault the process (seen with msgpack 1.x).

EXT_ARRAY, EXT_TUPLE, EXT_PICKLE = 1, 2, 3
_ARRAY_KINDS = frozenset("biufcmMSUV")  # numpy kinds with a fixed-size raw layout

MessageType = Literal[
    "hello", "result", "heartbeat", "bye",                        # worker -> scheduler
    "welcome", "task", "cancel", "shutdown",                      # scheduler -> worker
    "submit", "accepted", "fetch", "status", "status_reply", "error",  # client <-> daemon
]
MESSAGE_TYPES: frozenset[str] = frozenset(get_args(MessageType))

if TYPE_CHECKING:
    Frame = Union[bytes, bytearray, memoryview, zmq.Frame]
else:
    Frame = Any


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message: its ``type`` and its ``body`` (string keys)."""

    type: MessageType
    body: dict[str, Any] = field(default_factory=dict)


class RemoteTaskError(ShmrunnerError):
    """Raised in place of a remote task's exception whose class cannot be rebuilt
    here (not imported in this process, not an ``Exception``, or not
    constructible from its args); carries the remote type name, message and
    traceback."""

    def __init__(self, type_name: str, message: str, traceback: str = "",
                 remote_args: list[Any] | None = None) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.remote_args = remote_args

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.traceback, self.remote_args))


# -- body schemas ---------------------------------------------------------------------

class _Invalid(Exception):
    """A body breaks its schema: ProtocolError on decode, ValueError on encode."""


_Check = tuple[str, Callable[[Any], bool]]   # (what the value must be, predicate)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _describe(value: object) -> str:
    return f"{type(value).__name__} {_short.repr(value)}"


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(cast(float, v))


def _is_ref(s: str) -> bool:
    module, sep, qualname = s.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) \
        and all(p.isidentifier() for p in qualname.split("."))


def _str_map(v: object) -> bool:
    return type(v) is dict and all(type(k) is str for k in v)


def _options(v: object) -> bool:
    return _str_map(v) and set(cast(dict, v)) <= {"retries", "timeout"} \
        and ("retries" not in v or _ID[1](v["retries"])) \
        and ("timeout" not in v or _TIMEOUT[1](v["timeout"]))


def _wire_error(v: object) -> bool:
    return _str_map(v) and all(type(v.get(k)) is str for k in ("type", "message", "traceback")) \
        and (v.get("args") is None or type(v["args"]) in (list, tuple))


_ID: _Check = ("an int >= 0", lambda v: type(v) is int and v >= 0)
_STR: _Check = ("a str", lambda v: type(v) is str)
_BOOL: _Check = ("a bool", lambda v: type(v) is bool)
_POSITIVE: _Check = ("a number > 0", lambda v: _number(v) and v > 0)
_TIMEOUT: _Check = ("None or a number > 0", lambda v: v is None or (_number(v) and v > 0))
_WAIT: _Check = ("None or a number >= 0", lambda v: v is None or (_number(v) and v >= 0))
_FN: _Check = ("a function reference 'package.module:qualname'",
               lambda v: (type(v) is str and _is_ref(v)) or (type(v) is not str and callable(v)))
_ARGS: _Check = ("a list or tuple", lambda v: type(v) in (list, tuple))
_MAP: _Check = ("a map with str keys", _str_map)
_OPTIONS: _Check = ("a map of retries (int >= 0) and timeout (None or number > 0)", _options)
_ERROR: _Check = ("an error map {type, message, traceback: str; args: list or None}",
                  _wire_error)
_ANY: _Check = ("anything", lambda v: True)

# type -> (required fields, optional fields); unknown fields are ignored (versioning rule).
_SCHEMAS: dict[str, tuple[dict[str, _Check], dict[str, _Check]]] = {
    "hello": ({"name": _STR, "host": _STR, "pid": _ID,
               "capacity": ("an int >= 1", lambda v: type(v) is int and v >= 1)}, {}),
    "result": ({"ok": _BOOL}, {"task_id": _ID, "job_id": _STR, "value": _ANY, "error": _ERROR}),
    "heartbeat": ({}, {}),
    "bye": ({}, {"reason": _STR}),
    "welcome": ({"heartbeat_interval": _POSITIVE, "heartbeat_timeout": _POSITIVE}, {}),
    "task": ({"task_id": _ID, "fn": _FN, "args": _ARGS, "kwargs": _MAP}, {"timeout": _TIMEOUT}),
    "cancel": ({}, {"task_id": _ID, "job_id": _STR}),
    "shutdown": ({}, {}),
    "submit": ({"fn": _FN, "args": _ARGS, "kwargs": _MAP},
               {"job_id": ("a str or None", lambda v: v is None or type(v) is str),
                "options": _OPTIONS}),
    "accepted": ({"job_id": _STR}, {}),
    "fetch": ({"job_id": _STR}, {"timeout": _WAIT}),
    "status": ({}, {}),
    "status_reply": ({"status": _MAP}, {}),
    "error": ({"reason": _STR}, {"job_id": ("a str or None", lambda v: v is None or type(v) is str)}),
}
assert set(_SCHEMAS) == MESSAGE_TYPES


def _check_body(type_: str, body: dict[str, Any]) -> None:
    required, optional = _SCHEMAS[type_]
    for name, (what, ok) in required.items():
        if name not in body:
            raise _Invalid(f"{type_} message lacks field {name!r}")
        if not ok(body[name]):
            raise _Invalid(f"{type_} field {name!r} must be {what}, got {_describe(body[name])}")
    for name, (what, ok) in optional.items():
        if name in body and not ok(body[name]):
            raise _Invalid(f"{type_} field {name!r} must be {what}, got {_describe(body[name])}")
    if type_ in ("result", "cancel") and ("task_id" in body) == ("job_id" in body):
        raise _Invalid(f"{type_} message needs exactly one of 'task_id' and 'job_id'")
    if type_ == "result" and ("value" if body["ok"] else "error") not in body:
        raise _Invalid(f"result with ok={body['ok']} lacks field "
                       f"{'value' if body['ok'] else 'error'!r}")


# -- encode ---------------------------------------------------------------------------

class _Encoder:
    """State of one encode: the frames so far, and which array owns which frame."""

    __slots__ = ("allow_pickle", "frames", "refs", "keep", "depth")

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.frames: list[bytes | memoryview] = [b""]
        self.refs: dict[int, msgpack.ExtType] = {}
        self.keep: list[object] = []
        self.depth = 0

    def pack(self, obj: object) -> bytes:
        return cast(bytes, msgpack.packb(obj, default=self.default, use_bin_type=True,
                                         strict_types=True, datetime=True))

    def default(self, obj: Any) -> Any:
        t = type(obj)
        if t is tuple:
            if self.depth >= MAX_NESTING:
                raise ValueError(f"cannot encode tuples nested more than {MAX_NESTING} deep")
            self.depth += 1
            try:
                return msgpack.ExtType(EXT_TUPLE, self.pack(list(obj)))
            finally:
                self.depth -= 1
        if t is np.ndarray or t is np.memmap:
            return self.array(obj)
        if isinstance(obj, np.generic):   # Python scalar if msgpack has one, else a 0-d array
            item = obj.item()
            return item if type(item) in (bool, int, float, str, bytes) else self.array(obj)
        if self.allow_pickle:
            return msgpack.ExtType(EXT_PICKLE, _pickle_dumps(obj))
        if t is int:
            raise TypeError(f"cannot encode int {obj}: outside msgpack's 64-bit range")
        raise TypeError(
            f"cannot encode a {t.__module__}.{t.__qualname__} object: the wire carries None, "
            "bool, int, float, str, bytes, list, tuple, dict, tz-aware datetime and numpy "
            "arrays; other objects travel only as pickles, when both ends allow pickling")

    def array(self, obj: Any) -> msgpack.ExtType:
        ext = self.refs.get(id(obj))
        if ext is not None:   # the same array twice: one frame, two views on decode
            return ext
        a = np.asarray(obj)
        if a.dtype.hasobject or a.dtype.kind not in _ARRAY_KINDS or a.dtype.itemsize == 0:
            if self.allow_pickle:
                return msgpack.ExtType(EXT_PICKLE, _pickle_dumps(obj))
            raise TypeError(f"cannot encode a numpy array of dtype {a.dtype}: it holds Python "
                            "objects, not raw bytes; convert it, or allow pickling on both ends")
        if not (a.flags.c_contiguous or a.flags.f_contiguous):
            a = np.ascontiguousarray(a)   # the one copy: a frame is one flat buffer
        self.frames.append(memoryview(a.ravel(order="K").view(np.uint8)))
        ref = [len(self.frames) - 1, np.lib.format.dtype_to_descr(a.dtype),
               list(a.shape), list(a.strides)]
        ext = self.refs[id(obj)] = msgpack.ExtType(EXT_ARRAY, msgpack.packb(ref))
        self.keep.append(obj)   # keeps id(obj) from being reused within this encode
        return ext


def _pickle_dumps(obj: object) -> bytes:
    try:
        import cloudpickle  # optional: pickles closures and lambdas by value
        dumps: Callable[..., bytes] = cloudpickle.dumps
    except ImportError:
        dumps = pickle.dumps
    try:
        return dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"cannot pickle {_describe(obj)}: {exc}") from exc


def _wire_fn(fn: object, allow_pickle: bool) -> object:
    if type(fn) is str:
        return function_ref(fn)
    try:
        return function_ref(cast(Callable[..., Any], fn))
    except TypeError:
        if allow_pickle and callable(fn):
            return fn   # the encoder pickles it
        raise


def encode(msg: Message, *, allow_pickle: bool = False) -> list[bytes | memoryview]:
    """Frames for ``msg``: the header, then one buffer per distinct array.

    Contiguous arrays are not copied: their frames view the arrays' own memory,
    so do not modify them until ZeroMQ has sent them. Raises ``TypeError`` for a
    value the wire cannot carry, ``ValueError`` for a body that breaks its
    type's schema (the peer would reject it).
    """
    if msg.type not in _SCHEMAS:
        raise ValueError(f"unknown message type {msg.type!r}")
    if not _str_map(msg.body):
        raise TypeError(f"a message body must be a dict with str keys, got {_describe(msg.body)}")
    body = msg.body
    if msg.type in ("task", "submit") and "fn" in body:
        body = {**body, "fn": _wire_fn(body["fn"], allow_pickle)}
    try:
        _check_body(msg.type, body)
    except _Invalid as exc:
        raise ValueError(f"cannot encode: {exc}") from None
    encoder = _Encoder(allow_pickle)
    encoder.frames[0] = encoder.pack([PROTOCOL_VERSION, msg.type, body])
    return encoder.frames
