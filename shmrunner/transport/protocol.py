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

import functools
import importlib
import math
import pickle
import re
import reprlib
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast, get_args

import msgpack
import numpy as np

from ..errors import ProtocolError, RemoteTaskError, attach_remote_traceback

if TYPE_CHECKING:
    import zmq

__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_HEADER_BYTES", "MAX_NESTING",
    "MESSAGE_TYPES", "MAX_BATCH", "MAX_CAPACITY", "MAX_FRAMES", "MessageType", "Message",
    "RemoteTaskError",
    "encode", "decode", "function_ref", "resolve_function",
    "exception_to_wire", "exception_from_wire",
]

PROTOCOL_VERSION = 2
DEFAULT_MAX_BYTES = 1 << 30           # a whole message, header and array frames
DEFAULT_MAX_HEADER_BYTES = 64 << 20   # frame 0: msgpack can grow ~64x into Python objects
MAX_NESTING = 32                      # ext inside ext: each level is a nested C unpacker
MAX_FRAMES = 8193                     # frames of one message: the header and 8192 arrays
# Why MAX_FRAMES: frames cost memory however small they are (~600 bytes each as
# zmq.Frame objects: 300,000 empty frames took 173 MiB), and a peer sends them freely.
# Why MAX_NESTING: msgpack's unpacker keeps a ~40 KiB stack on the C stack, and a
# tuple ext is unpacked by a nested call; a few thousand nested tuples in one
# header overflow the C stack and segfault the process (seen with msgpack 1.x).

EXT_ARRAY, EXT_TUPLE, EXT_PICKLE = 1, 2, 3
_ARRAY_KINDS = frozenset("biufcmMSUV")  # numpy kinds with a fixed-size raw layout

MessageType = Literal[
    "hello", "result", "results", "heartbeat", "bye",             # worker -> scheduler
    "welcome", "task", "tasks", "cancel", "shutdown",             # scheduler -> worker
    "submit", "accepted", "fetch", "status", "status_reply", "error",  # client <-> daemon
]
MESSAGE_TYPES: frozenset[str] = frozenset(get_args(MessageType))

Frame: TypeAlias = "bytes | bytearray | memoryview | zmq.Frame"


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message: its ``type`` and its ``body`` (string keys)."""

    type: MessageType
    body: dict[str, Any] = field(default_factory=dict)


# -- body schemas ---------------------------------------------------------------------

class _Invalid(Exception):
    """A body breaks its schema: ProtocolError on decode, ValueError on encode."""


_Check = tuple[str, Callable[[Any], bool]]   # (what the value must be, predicate)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _describe(value: object) -> str:
    return f"{type(value).__name__} {_short.repr(value)}"


def _reason(exc: BaseException) -> str:
    """A lower layer's exception in a few words (never the peer's whole payload)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _number(v: object) -> bool:
    return type(v) is int or (type(v) is float and math.isfinite(v))


def _is_ref(s: str) -> bool:
    """Whether ``s`` reads 'package.module:qualname' (cached: refs repeat)."""
    return _is_short_ref(s) if len(s) <= 200 else _ref_syntax(s)


def _ref_syntax(s: str) -> bool:
    module, sep, qualname = s.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) \
        and all(p.isidentifier() for p in qualname.split("."))


_is_short_ref = functools.lru_cache(maxsize=1024)(_ref_syntax)


def _str_map(v: object) -> bool:
    return type(v) is dict and all(type(k) is str for k in v)


def _options(v: Any) -> bool:
    return _str_map(v) and set(v) <= {"retries", "timeout"} \
        and ("retries" not in v or _ID[1](v["retries"])) \
        and ("timeout" not in v or _TIMEOUT[1](v["timeout"]))


def _wire_error(v: Any) -> bool:
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
_SESSION: _Check = ("a str of 1 to 64 characters", lambda v: type(v) is str and 0 < len(v) <= 64)
_OPT_JOB: _Check = ("a str or None", lambda v: v is None or type(v) is str)
MAX_BATCH = 1024  # messages one tasks/results message may carry
_BATCH: _Check = (f"a list of 1 to {MAX_BATCH} maps with str keys",
                  lambda v: type(v) is list and 0 < len(v) <= MAX_BATCH
                  and all(_str_map(item) for item in v))

MAX_CAPACITY = 4096  # tasks one worker may run at once: a scheduler sends it this many
# Why a bound: the scheduler sends a worker up to its advertised capacity of tasks;
# one claiming 2**62 slots took every task and returned none.
_CAPACITY: _Check = (f"an int from 1 to {MAX_CAPACITY} (tasks the worker runs at once)",
                     lambda v: type(v) is int and 1 <= v <= MAX_CAPACITY)

# type -> (required fields, optional fields); unknown fields are ignored (versioning rule).
_SCHEMAS: dict[str, tuple[dict[str, _Check], dict[str, _Check]]] = {
    "hello": ({"name": _STR, "host": _STR, "pid": _ID, "capacity": _CAPACITY}, {}),
    "result": ({"ok": _BOOL}, {"task_id": _ID, "job_id": _STR, "value": _ANY, "error": _ERROR,
                               "session": _SESSION}),
    "results": ({"results": _BATCH}, {}),
    "heartbeat": ({}, {}),
    "bye": ({}, {"reason": _STR}),
    "welcome": ({"heartbeat_interval": _POSITIVE, "heartbeat_timeout": _POSITIVE,
                 "session": _SESSION}, {}),
    "task": ({"task_id": _ID, "fn": _FN, "args": _ARGS, "kwargs": _MAP}, {"timeout": _TIMEOUT}),
    "tasks": ({"tasks": _BATCH}, {}),
    "cancel": ({}, {"task_id": _ID, "job_id": _STR}),
    "shutdown": ({}, {}),
    "submit": ({"fn": _FN, "args": _ARGS, "kwargs": _MAP},
               {"job_id": _OPT_JOB, "options": _OPTIONS}),
    "accepted": ({"job_id": _STR}, {}),
    "fetch": ({"job_id": _STR}, {"timeout": _WAIT}),
    "status": ({}, {}),
    "status_reply": ({"status": _MAP}, {}),
    "error": ({"reason": _STR}, {"job_id": _OPT_JOB}),
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
    if type_ in ("tasks", "results"):
        for item in body[type_]:
            _check_body(type_[:-1], item)  # each one as the single message would be
        return
    if type_ in ("result", "cancel") and ("task_id" in body) == ("job_id" in body):
        raise _Invalid(f"{type_} message needs exactly one of 'task_id' and 'job_id'")
    if type_ == "result" and "task_id" in body and "session" not in body:
        # Task ids restart with every scheduler: only the session tells an old
        # scheduler's task 3 from this one's.
        raise _Invalid("result of a task lacks field 'session' (the welcome's)")
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
                                         strict_types=True, datetime=True, buf_size=1024))

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
        self.frames.append(a.ravel(order="K").view(np.uint8).data)
        ref = [len(self.frames) - 1, np.lib.format.dtype_to_descr(a.dtype),
               list(a.shape), list(a.strides)]
        ext = self.refs[id(obj)] = msgpack.ExtType(EXT_ARRAY, msgpack.packb(ref, buf_size=256))
        self.keep.append(obj)   # keeps id(obj) from being reused within this encode
        return ext


def _pickle_dumps(obj: object) -> bytes:
    try:   # optional: cloudpickle pickles closures and lambdas by value
        dumps: Callable[..., bytes] = importlib.import_module("cloudpickle").dumps
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
    elif msg.type == "tasks" and type(body.get("tasks")) is list:
        body = {"tasks": [{**task, "fn": _wire_fn(task["fn"], allow_pickle)}
                          if isinstance(task, dict) and "fn" in task else task
                          for task in body["tasks"]]}
    try:
        _check_body(msg.type, body)
    except _Invalid as exc:
        raise ValueError(f"cannot encode: {exc}") from None
    encoder = _Encoder(allow_pickle)
    encoder.frames[0] = encoder.pack([PROTOCOL_VERSION, msg.type, body])
    if len(encoder.frames) > MAX_FRAMES:   # the peer would refuse it unread
        raise ValueError(f"cannot encode a {msg.type} message with {len(encoder.frames) - 1} "
                         f"arrays: the limit is {MAX_FRAMES - 1}; send fewer, larger arrays")
    return encoder.frames


# -- decode ---------------------------------------------------------------------------

def _container_budget(header_bytes: int) -> int:
    """Lists, maps and tuples a header of ``header_bytes`` may decode into.

    An empty list or map is one byte on the wire and ~70 bytes in Python: 1 MiB
    of them took 74 MiB. One container per 4 header bytes (a 1-tuple of a small
    int, the densest common case, is 4 bytes) bounds a header's decoded size to
    about 20x its bytes, as scalars are anyway."""
    return header_bytes // 4 + 4096


class _Decoder:
    """State of one decode: the frames, which of them arrays used, the ext depth,
    and how many more containers the header may hold."""

    __slots__ = ("views", "allow_pickle", "used", "depth", "budget", "limit")

    def __init__(self, views: list[memoryview], allow_pickle: bool) -> None:
        self.views = views
        self.allow_pickle = allow_pickle
        self.used: set[int] = set()
        self.depth = 0
        self.limit = self.budget = _container_budget(views[0].nbytes)

    def unpack(self, data: bytes | memoryview) -> Any:
        n = len(data)
        return msgpack.unpackb(data, ext_hook=self.ext, raw=False, strict_map_key=False,
                               timestamp=3, max_str_len=n, max_bin_len=n, max_ext_len=n,
                               max_array_len=n, max_map_len=n // 2,
                               list_hook=self.container, object_hook=self.container)

    def container(self, value: Any) -> Any:
        """Called by msgpack as each list or map is complete: stops a header that
        expands past its budget before it has used much more memory."""
        self.budget -= 1
        if self.budget < 0:
            raise ProtocolError(f"header holds more than {self.limit} lists, maps and tuples; "
                                "send bulk data as numpy arrays")
        return value

    def ext(self, code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            if self.depth >= MAX_NESTING:
                raise ProtocolError(f"tuples nested more than {MAX_NESTING} deep")
            self.depth += 1
            try:
                items = self.unpack(data)
            finally:
                self.depth -= 1
            if type(items) is not list:
                raise ProtocolError(f"tuple ext holds {_describe(items)}, not a list")
            return self.container(tuple(items))
        if code == EXT_ARRAY:
            return self.array(data)
        if code == EXT_PICKLE:
            if not self.allow_pickle:
                raise ProtocolError(f"pickled payload refused: the peer sent a {len(data)}-byte "
                                    "pickle and pickling is not allowed (allow_pickle=False)")
            try:
                return pickle.loads(data)
            except Exception as exc:
                raise ProtocolError(f"pickled payload failed to load: {_reason(exc)}") from exc
        raise ProtocolError(f"unknown ext type {code}")

    def array(self, data: bytes) -> np.ndarray[Any, Any]:
        try:
            ref = msgpack.unpackb(data, raw=False)   # no ext_hook: nested exts stay ExtType
        except Exception as exc:
            raise ProtocolError(f"array reference is not valid msgpack: {_reason(exc)}") from exc
        if type(ref) is not list or len(ref) != 4:
            raise ProtocolError(f"array reference must be [frame, dtype, shape, strides], "
                                f"got {_describe(ref)}")
        index, descr, shape, strides = ref
        last = len(self.views) - 1
        if type(index) is not int or not 1 <= index <= last:
            raise ProtocolError(f"array refers to frame {_short.repr(index)}, "
                                f"the message has array frames 1..{last}")
        if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape) \
                or len(shape) > 64:
            raise ProtocolError(f"array shape must be a list of ints >= 0, got {_describe(shape)}")
        if type(strides) is not list or len(strides) != len(shape) \
                or not all(type(s) is int for s in strides):
            raise ProtocolError(f"array strides must be {len(shape)} ints, got "
                                f"{_describe(strides)}")
        dtype = _parse_dtype(descr)
        size = self.views[index].nbytes
        span = _span(shape, strides, dtype.itemsize)
        # Both bounds: the view stays inside the frame, and it holds no more
        # elements than the frame has room for (zero strides could otherwise make
        # 2**62 elements of one byte: in bounds, but no one could ever sum them).
        if span is None or span > size or math.prod(shape) * dtype.itemsize > size:
            raise ProtocolError(
                f"array of shape {tuple(shape)}, dtype {dtype} and strides {tuple(strides)} "
                f"does not fit frame {index} ({size} bytes)")
        try:
            array: np.ndarray[Any, Any] = np.ndarray(tuple(shape), dtype, buffer=self.views[index],
                                                     strides=tuple(strides))
        except Exception as exc:
            raise ProtocolError(f"cannot view frame {index} as an array of shape "
                                f"{tuple(shape)} and dtype {dtype}: {_reason(exc)}") from exc
        self.used.add(index)
        return array


def _span(shape: list[int], strides: list[int], itemsize: int) -> int | None:
    """Bytes an array view reaches from its first byte; None if it reaches before it."""
    if 0 in shape:
        return 0
    low = high = 0
    for n, stride in zip(shape, strides, strict=True):
        if stride >= 0:
            high += stride * (n - 1)
        else:
            low += stride * (n - 1)
    return None if low < 0 else high + itemsize


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if type(value) is list else value


# dtype.str as numpy writes it: byte order, kind, item size, datetime unit. Only
# these reach np.dtype(), which accepts (and warns about) far more.
_DTYPE_STR = re.compile(r"[<>|][biufcmMSUVO][0-9]{0,9}(\[[0-9]{0,9}[A-Za-z]{1,2}\])?")


def _descr(descr: Any) -> Any:
    """A dtype descr checked, with the tuples msgpack made lists restored: a
    canonical dtype str, or a list of (name, descr[, shape]) fields."""
    if type(descr) is str:
        if not _DTYPE_STR.fullmatch(descr):
            raise ProtocolError(f"unparsable array dtype {_short.repr(descr)}")
        return descr
    if type(descr) is not list:
        raise ProtocolError(f"array dtype must be a str or a descr list, got {_describe(descr)}")
    return [(_tuplify(f[0]), _descr(f[1]), *(_tuplify(x) for x in f[2:])) for f in descr]


def _parse_dtype(descr: object) -> np.dtype[Any]:
    try:
        checked = _descr(descr)
        # a list is a structured dtype, as numpy's .npy format writes it
        dtype = np.dtype(checked) if type(checked) is str else \
            np.lib.format.descr_to_dtype(checked)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"unparsable array dtype {_short.repr(descr)}: {_reason(exc)}") from exc
    if dtype.hasobject or dtype.kind not in _ARRAY_KINDS or dtype.itemsize == 0:
        raise ProtocolError(f"array dtype {dtype} refused: only fixed-size dtypes without "
                            "Python objects travel as frames")
    return dtype


def _as_view(frame: object, i: int) -> memoryview:
    buffer = getattr(frame, "buffer", frame)   # zmq.Frame exposes its bytes as .buffer
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"frame {i} is not a contiguous byte buffer: "
                            f"{type(frame).__name__}") from exc
    return view


def _peek_version(header: memoryview) -> None:
    """Reject a header that is not a msgpack list, or whose first element (the
    version: the one rule no version may change) is not ours, before parsing it."""
    if header.nbytes == 0:
        raise ProtocolError("header frame is empty")
    first = header[0]
    pos = 1 if 0x90 <= first <= 0x9F else 3 if first == 0xDC else 5 if first == 0xDD else 0
    if pos == 0:
        raise ProtocolError("header is not a msgpack list [version, type, body]")
    if pos < header.nbytes:
        tag, width = header[pos], {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(header[pos], 0)
        version = tag if tag <= 0x7F else \
            int.from_bytes(header[pos + 1:pos + 1 + width], "big") if width else None
        if version is not None and version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")


def decode(frames: Sequence[Frame], *, max_bytes: int, allow_pickle: bool,
           max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
           max_frames: int = MAX_FRAMES) -> Message:
    """The message in ``frames`` (bytes, memoryviews or ``zmq.Frame``), validated.

    Arrays are views of the frames' buffers, writable when the buffers are (as
    ``zmq.Frame`` buffers are). Raises :class:`ProtocolError`, naming the
    problem, for anything that breaks the protocol, and nothing else.
    """
    if len(frames) == 0:
        raise ProtocolError("empty message: no frames")
    if len(frames) > max_frames:
        raise ProtocolError(f"message of {len(frames)} frames exceeds the limit of {max_frames}")
    views = [_as_view(frame, i) for i, frame in enumerate(frames)]
    total = sum(view.nbytes for view in views)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes}")
    header = views[0]
    if header.nbytes > max_header_bytes:
        raise ProtocolError(f"header of {header.nbytes} bytes exceeds the limit of "
                            f"{max_header_bytes}")
    _peek_version(header)
    decoder = _Decoder(views, allow_pickle)
    try:
        parsed = decoder.unpack(header)
    except ProtocolError:
        raise
    except Exception as exc:   # msgpack's, numpy's or a hostile value's: all one thing here
        raise ProtocolError(f"header is not valid msgpack: {_reason(exc)}") from exc
    if type(parsed) is not list or len(parsed) != 3:
        raise ProtocolError(f"header must be a 3-element list [version, type, body], "
                            f"got {_describe(parsed)}")
    version, type_, body = parsed
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_short.repr(version)}, "
                            f"expected {PROTOCOL_VERSION}")
    if type(type_) is not str or type_ not in _SCHEMAS:
        raise ProtocolError(f"unknown message type {_short.repr(type_)}")
    if not _str_map(body):
        raise ProtocolError(f"body of a {type_} message must be a map with str keys, "
                            f"got {_describe(body)}")
    try:
        _check_body(type_, body)
    except _Invalid as exc:
        raise ProtocolError(str(exc)) from None
    if len(decoder.used) != len(views) - 1:
        unused = sorted(set(range(1, len(views))) - decoder.used)
        raise ProtocolError(f"frames {unused} are not referenced by the header")
    return Message(cast(MessageType, type_), body)


# -- functions by reference -----------------------------------------------------------

def function_ref(fn: str | Callable[..., Any]) -> str:
    """The import reference ``"package.module:qualname"`` of ``fn``.

    A str is checked and returned. A callable must resolve back to itself from
    its module (module-level functions, classes, static and class methods);
    ``TypeError`` says why one does not (lambda, closure, ``__main__``, bound
    method), ``ValueError`` that a str is not a reference.
    """
    if isinstance(fn, str):
        if not _is_ref(fn):
            raise ValueError(f"{fn!r} is not a function reference 'package.module:qualname'")
        return fn
    try:
        return _refs[fn]
    except (KeyError, TypeError):   # not seen yet, or unhashable
        pass
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"{_short.repr(fn)} has no import reference (no __module__ and "
                        "__qualname__); pass a module-level function, or allow pickling")
    where = f"{module}.{qualname}"
    if module == "__main__" or "<" in qualname:
        why = "is defined in __main__" if module == "__main__" else "is a lambda or closure"
        raise TypeError(f"{where} {why}, so another host cannot import it; define it at the "
                        "top level of an importable module, or allow pickling on both ends")
    ref = f"{module}:{qualname}"
    try:
        found = resolve_function(ref)
    except (ImportError, TypeError) as exc:
        raise TypeError(f"{where} has no import reference: {exc}") from exc
    if found is not fn and found != fn:
        raise TypeError(f"{ref} resolves to {_short.repr(found)}, not to {_short.repr(fn)} "
                        "(a bound method or a shadowed name?); pass a module-level function")
    if len(_refs) < 4096:
        _refs[fn] = ref
    return ref


_refs: dict[Any, str] = {}   # callables that resolved back to themselves


def resolve_function(ref: str, *, strict: bool = False) -> Callable[..., Any]:
    """Import the callable named by ``ref``; ``ImportError`` naming ``ref`` if it
    cannot be found, ``TypeError`` if it is not callable. ``strict`` (an
    allow-list's check) refuses a path through another module
    (``pkg:os.system``): a pattern allowing ``pkg`` allows what ``pkg`` defines,
    not everything it imported."""
    if not _is_ref(ref):
        raise ValueError(f"{ref!r} is not a function reference 'package.module:qualname'")
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ImportError(f"cannot resolve function {ref!r}: importing {module_name!r} "
                          f"failed: {exc!r}", name=module_name) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(f"cannot resolve function {ref!r}: {module_name!r} has no "
                              f"attribute {qualname!r}", name=module_name) from exc
        if strict and isinstance(obj, types.ModuleType):
            raise TypeError(f"function reference {ref!r} goes through the module "
                            f"{obj.__name__!r}; name the function in its own module")
    if not callable(obj):
        raise TypeError(f"function reference {ref!r} names a {type(obj).__name__}, "
                        "not a callable")
    return cast(Callable[..., Any], obj)


# -- exceptions -----------------------------------------------------------------------

def _plain(value: object, depth: int = 0) -> bool:
    """Whether ``value`` travels without arrays, pickles or deep nesting."""
    t = type(value)
    if value is None or t in (bool, float, str, bytes):
        return True
    if t is int:
        return -(1 << 63) <= cast(int, value) < (1 << 64)
    if depth >= MAX_NESTING:
        return False
    if t in (list, tuple):
        return all(_plain(v, depth + 1) for v in cast(Sequence[Any], value))
    if t is dict:
        return all(type(k) is str and _plain(v, depth + 1)
                   for k, v in cast(dict[Any, Any], value).items())
    return False


def exception_to_wire(exc: BaseException, tb_text: str) -> dict[str, Any]:
    """``exc`` as the ``error`` map of a result: type, args (if plain), message, traceback."""
    if isinstance(exc, RemoteTaskError):   # forwarded: keep the original's identity
        return {"type": exc.type_name, "args": exc.remote_args, "message": exc.message,
                "traceback": exc.traceback or tb_text}
    cls = type(exc)
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {cls.__qualname__}>"
    return {"type": f"{cls.__module__}:{cls.__qualname__}",
            "args": list(exc.args) if _plain(exc.args) else None,
            "message": message, "traceback": tb_text}


def _exception_class(type_name: str) -> type[Exception] | None:
    """The class named ``type_name`` if its module is already imported here: a peer
    never makes this process import anything. Names are looked up in ``__dict__``,
    never with ``getattr``: a module ``__getattr__`` (numpy's, for one) imports
    submodules lazily, and a class's metaclass could run code."""
    module_name, _, qualname = type_name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if obj is not None else ():
        if not isinstance(obj, (types.ModuleType, type)):
            return None
        try:
            namespace = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            return None
        obj = namespace.get(part) if isinstance(namespace, Mapping) else None
    if isinstance(obj, type) and issubclass(obj, BaseException) and issubclass(obj, Exception):
        return obj
    return None


def exception_from_wire(error: Mapping[str, Any]) -> BaseException:
    """The exception an ``error`` map describes, with the remote traceback as its
    cause: the original class when it is imported here, an ``Exception`` and
    constructible from the args (or the message), else :class:`RemoteTaskError`."""
    type_name = str(error.get("type", "builtins:Exception"))
    message = str(error.get("message", ""))
    traceback = str(error.get("traceback", ""))
    raw_args = error.get("args")
    args = list(raw_args) if isinstance(raw_args, (list, tuple)) else None
    cls = _exception_class(type_name)
    exc: BaseException | None = None
    if cls is not None:
        try:
            exc = cls(*args) if args is not None else cls(message)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteTaskError(type_name, message, traceback, args)
    return attach_remote_traceback(exc, traceback)
