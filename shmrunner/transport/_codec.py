"""The codec: protocol messages to ZeroMQ frames and back, within limits.

Pure functions, no sockets (the socket is :mod:`shmrunner.transport.zmqchannel`),
so every rule can be fuzzed without a network. A message is a list of frames::

    frame 0       msgpack header  [PROTOCOL_VERSION, type, body]
    frames 1..n   raw array bodies, one per distinct array in the body

Inside ``body`` values are msgpack types plus four ext types:

    ext 1  array   [frame index, dtype str or descr, shape, strides] -> frame (:mod:`._arrays`)
    ext 2  tuple   the msgpack list of its items (so tuples stay tuples)
    ext 3  pickle  cloudpickle/pickle bytes, only if both ends allow pickles
    ext 4  foreign [kind, ...]: torch, Arrow and pandas data as frames (:mod:`._foreignwire`)

A header is bounded before and while it is parsed: its bytes, the frames of
the message, the lists, maps and tuples it may expand into, the nesting of
tuples. Every way a peer can break these rules ends in
:class:`~shmrunner.errors.ProtocolError`; msgpack, numpy and pickle exceptions
are translated here and nowhere else. Bodies are checked against
:mod:`._schema` both ways.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import msgpack
import numpy as np

from ..errors import ProtocolError
from ._arrays import array_frame, array_from_ref, raw_layout
from ._foreignwire import EXT_FOREIGN, is_foreign
from ._foreignwire import decode as decode_foreign
from ._foreignwire import encode as encode_foreign
from ._funcref import function_ref
from ._schema import (
    _SCHEMAS,
    PROTOCOL_VERSION,
    Message,
    MessageType,
    _check_body,
    _describe,
    _Invalid,
    _reason,
    _short,
    _str_map,
)

if TYPE_CHECKING:
    import zmq

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_HEADER_BYTES", "MAX_NESTING", "MAX_FRAMES",
           "Frame", "encode", "decode"]

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

Frame: TypeAlias = "bytes | bytearray | memoryview | zmq.Frame"


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
        if is_foreign(t):   # torch, pyarrow, pandas: frames even when pickling is allowed
            try:
                payload = encode_foreign(obj, self.array)
            except TypeError:
                if not self.allow_pickle:
                    raise
            else:
                if payload is not None:
                    return msgpack.ExtType(EXT_FOREIGN, self.pack(payload))
        if self.allow_pickle:
            return msgpack.ExtType(EXT_PICKLE, _pickle_dumps(obj))
        if t is int:
            raise TypeError(f"cannot encode int {obj}: outside msgpack's 64-bit range")
        raise TypeError(
            f"cannot encode a {t.__module__}.{t.__qualname__} object: the wire carries None, "
            "bool, int, float, str, bytes, list, tuple, dict, tz-aware datetime, numpy "
            "arrays, torch tensors, Arrow and pandas data; other objects travel only as "
            "pickles, when both ends allow pickling")

    def array(self, obj: Any) -> msgpack.ExtType:
        ext = self.refs.get(id(obj))
        if ext is not None:   # the same array twice: one frame, two views on decode
            return ext
        a = np.asarray(obj)
        if not raw_layout(a.dtype):
            if self.allow_pickle:
                return msgpack.ExtType(EXT_PICKLE, _pickle_dumps(obj))
            raise TypeError(f"cannot encode a numpy array of dtype {a.dtype}: it holds Python "
                            "objects, not raw bytes; convert it, or allow pickling on both ends")
        frame, ref = array_frame(a, len(self.frames))
        self.frames.append(frame)
        ext = self.refs[id(obj)] = msgpack.ExtType(EXT_ARRAY, ref)
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
        return function_ref(cast("Callable[..., Any]", fn))  # a str: no alias built per call
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
        fn = _wire_fn(body["fn"], allow_pickle)
        if fn is not body["fn"]:   # a reference str is sent as it is: no copy of the body
            body = {**body, "fn": fn}
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

    __slots__ = ("views", "allow_pickle", "defer_foreign", "used", "depth", "budget", "limit",
                 "counted")

    def __init__(self, views: list[memoryview], allow_pickle: bool,
                 defer_foreign: bool = False) -> None:
        self.views = views
        self.allow_pickle = allow_pickle
        self.defer_foreign = defer_foreign
        self.used: set[int] = set()
        self.depth = 0
        n = views[0].nbytes
        self.limit = self.budget = _container_budget(n)
        # Each list, map or tuple takes at least one byte of the header (a tuple
        # three, and counts twice), so a header no longer than its budget cannot
        # break it: it is parsed with no Python call per container (3x faster
        # for a small message). Headers of more than 5461 bytes are counted.
        self.counted = n > self.limit

    def unpack(self, data: bytes | memoryview) -> Any:
        # The C unpacker's own bounds: each str, bin, ext, array and map no
        # longer than the bytes it is read from (so none is preallocated past
        # them), nesting of lists and maps 1024 deep (msgpack's fixed stack:
        # StackError, "nesting too deep"); exts nest by the ext hook, <= MAX_NESTING.
        n = len(data)
        if self.counted:
            return msgpack.unpackb(data, ext_hook=self.ext, raw=False, strict_map_key=False,
                                   timestamp=3, max_str_len=n, max_bin_len=n, max_ext_len=n,
                                   max_array_len=n, max_map_len=n // 2,
                                   list_hook=self.container, object_hook=self.container)
        return msgpack.unpackb(data, ext_hook=self.ext, raw=False, strict_map_key=False,
                               timestamp=3, max_str_len=n, max_bin_len=n, max_ext_len=n,
                               max_array_len=n, max_map_len=n // 2)

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
            return self.container(tuple(items)) if self.counted else tuple(items)
        if code == EXT_ARRAY:
            return self.array(data)
        if code == EXT_FOREIGN:
            if self.depth >= MAX_NESTING:
                raise ProtocolError(f"exts nested more than {MAX_NESTING} deep")
            self.depth += 1
            try:
                payload = self.unpack(data)
            finally:
                self.depth -= 1
            return decode_foreign(payload, self.defer_foreign)
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
        index, array = array_from_ref(data, self.views)
        self.used.add(index)
        return array


def _as_view(frame: object, i: int) -> memoryview:
    if type(frame) is bytes:   # a view of bytes is always flat bytes
        return memoryview(frame)
    buffer = getattr(frame, "buffer", frame)   # zmq.Frame exposes its bytes as .buffer
    try:
        view = buffer if type(buffer) is memoryview else memoryview(buffer)  # type: ignore[arg-type]
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
           max_frames: int = MAX_FRAMES, defer_foreign: bool = False) -> Message:
    """The message in ``frames`` (bytes, memoryviews or ``zmq.Frame``), validated.

    Arrays are views of the frames' buffers, writable when the buffers are (as
    ``zmq.Frame`` buffers are). Raises :class:`ProtocolError`, naming the
    problem, for anything that breaks the protocol, and nothing else.
    ``defer_foreign`` (a remote agent, which only forwards values): torch,
    Arrow and pandas values become :class:`._foreignwire.Deferred`, built
    where they are unpickled, so this process never imports those libraries.
    """
    count = len(frames)
    if count == 0:
        raise ProtocolError("empty message: no frames")
    if count > max_frames:
        raise ProtocolError(f"message of {count} frames exceeds the limit of {max_frames}")
    if count == 1:   # most messages: no arrays
        views = [_as_view(frames[0], 0)]
        total = views[0].nbytes
    else:
        views = [_as_view(frame, i) for i, frame in enumerate(frames)]
        total = sum(view.nbytes for view in views)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes}")
    header = views[0]
    if header.nbytes > max_header_bytes:
        raise ProtocolError(f"header of {header.nbytes} bytes exceeds the limit of "
                            f"{max_header_bytes}")
    if header.nbytes < 2 or header[0] != 0x93 or header[1] != PROTOCOL_VERSION:
        _peek_version(header)   # not the usual [2, ...]: find out what it is
    decoder = _Decoder(views, allow_pickle, defer_foreign)
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
    except Exception as exc:  # a check that trips on a hostile value is still a bad message
        raise ProtocolError(f"{type_} message breaks its schema: {_reason(exc)}") from exc
    if len(decoder.used) != len(views) - 1:
        unused = sorted(set(range(1, len(views))) - decoder.used)
        raise ProtocolError(f"frames {unused} are not referenced by the header")
    return Message(cast(MessageType, type_), body)

