"""torch, Arrow and pandas data as frames: the ext 4 ``[kind, ...]`` value both ways.

Across hosts these travel without pickle, their bulk bytes as array frames
(ext 1, :mod:`._arrays`: a view of the sender's memory, and on receipt a view
of the received frame), described by a small closed set of *kinds*::

    ["torch", dtype name, ext 1 array, requires_grad]
    [arrow kind, Arrow schema (IPC bytes), columns]    column: [chunk, ...]
                                                       chunk:  [length, null_count,
                                                                offset, [buffer, ...]]

with arrow kind one of ``arrow.array``, ``arrow.chunked``, ``arrow.batch``,
``arrow.table``, ``pandas.frame``, ``pandas.series`` and each buffer an ext 1
``uint8`` array or nil. A tensor is ``torch.from_numpy`` over its frame (an
integer view for dtypes numpy lacks); Arrow columns are
``pyarrow.Array.from_buffers`` over their frames, fully validated (offsets,
lengths, UTF-8) before anyone can read them; pandas objects are Arrow
tables made and read by pyarrow (``Table.from_pandas`` / ``to_pandas``).

Why not Arrow IPC streams: writing one copies every buffer into the stream,
and a stream may hold compressed bodies whose decompressed size the receiver
learns only by allocating it. Here only the schema is IPC (metadata, no
bodies), column types are limited to flat ones (numbers, booleans,
temporal, decimal, strings and binaries) whose lengths their buffers bound:
null, nested, dictionary (pandas categorical) and extension columns are
refused on encode with a
``TypeError`` (pickled instead when pickling is allowed).

The wire names nothing to import: a kind names one of the three fixed
optional libraries, imported only when such a value arrives (a receiver
without it refuses the message, naming the library). torch, pyarrow and
pandas exceptions are translated into :class:`ProtocolError` here.

A remote agent only forwards task arguments to its worker processes, and
importing torch or pandas can take longer than its heartbeat timeout, so it
decodes with ``defer=True``: each ext 4 value becomes a :class:`Deferred`
holding the payload, checked as far as numpy can check it (kind, dtype
allow-list, lengths, frames), whose pickle rebuilds the value (and imports
the library, and runs pyarrow's full validation) in the worker process that
runs the task. A payload that fails there fails that task with a
:class:`ProtocolError`. The wire is the same either way.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from ..errors import ProtocolError
from ._foreign import numpy_view
from ._schema import _describe, _reason, _short

__all__ = ["is_foreign", "encode", "decode", "Deferred"]

EXT_FOREIGN = 4

_LIBRARIES = frozenset(("torch", "pyarrow", "pandas"))

# torch dtypes that travel, and the numpy dtype of their frames (for dtypes
# numpy lacks, an integer of the same item size, as _foreign.numpy_view makes).
_TORCH_DTYPES: dict[str, str] = {
    "bool": "bool", "uint8": "uint8", "int8": "int8", "int16": "int16", "int32": "int32",
    "int64": "int64", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "float16": "float16", "float32": "float32", "float64": "float64",
    "complex64": "complex64", "complex128": "complex128",
    "bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8",
}

_ARROW_KINDS = frozenset(("arrow.array", "arrow.chunked", "arrow.batch", "arrow.table",
                          "pandas.frame", "pandas.series"))
_MAX_LENGTH = 1 << 62


def is_foreign(cls: type) -> bool:
    """Whether values of ``cls`` may be one of ours (cheap: by module name)."""
    module = getattr(cls, "__module__", None)
    return type(module) is str and module.partition(".")[0] in _LIBRARIES


# -- encode ---------------------------------------------------------------------------

def encode(obj: Any,
           array: Callable[[np.ndarray[Any, Any]], msgpack.ExtType]) -> list[Any] | None:
    """The ext 4 payload (before packing) of ``obj``, its frames added through
    ``array``; None when ``obj`` is none of ours, ``TypeError`` when it is
    but cannot travel without pickle."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _encode_tensor(obj, array)
    pa = sys.modules.get("pyarrow")
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(obj, (pd.DataFrame, pd.Series)):
        if pa is None:
            pa = _import_for_pandas()
        kind = "pandas.frame" if isinstance(obj, pd.DataFrame) else "pandas.series"
        frame = obj if kind == "pandas.frame" else obj.to_frame()
        try:
            table = pa.Table.from_pandas(frame)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise TypeError(f"cannot encode a pandas {kind[7:]} as Arrow: {_reason(exc)}; "
                            "convert its columns, or allow pickling on both ends") from exc
        return [kind, *_encode_columns(pa, table.schema, [c.chunks for c in table.columns],
                                       array)]
    if pa is not None:
        if isinstance(obj, pa.Table):
            return ["arrow.table", *_encode_columns(
                pa, obj.schema, [c.chunks for c in obj.columns], array)]
        if isinstance(obj, pa.RecordBatch):
            return ["arrow.batch", *_encode_columns(
                pa, obj.schema, [[c] for c in obj.columns], array)]
        if isinstance(obj, pa.ChunkedArray):
            return ["arrow.chunked", *_encode_columns(
                pa, pa.schema([pa.field("", obj.type)]), [obj.chunks], array)]
        if isinstance(obj, pa.Array):
            return ["arrow.array", *_encode_columns(
                pa, pa.schema([pa.field("", obj.type)]), [[obj]], array)]
    return None


def _import_for_pandas() -> Any:
    try:
        return importlib.import_module("pyarrow")
    except ImportError:
        raise TypeError("cannot encode a pandas object without pickle: it travels as Arrow "
                        "data, and pyarrow is not installed; install pyarrow, or allow "
                        "pickling on both ends") from None


def _encode_tensor(t: Any, array: Callable[[np.ndarray[Any, Any]], msgpack.ExtType]) -> list[Any]:
    name = str(t.dtype).removeprefix("torch.")
    view = numpy_view(t, shared=True) if name in _TORCH_DTYPES else None
    if view is None:
        raise TypeError(f"cannot encode a {t.device.type} {t.layout} tensor of dtype {t.dtype}"
                        f"{' (a non-leaf that requires grad)' if t.requires_grad else ''} "
                        "without pickle: only strided CPU tensors of numeric dtypes travel "
                        "as frames; move it to the CPU (.cpu(), .detach())")
    return ["torch", name, array(view), bool(t.requires_grad)]


def _encode_columns(pa: Any, schema: Any, columns: list[list[Any]],
                    array: Callable[[np.ndarray[Any, Any]], msgpack.ExtType]) -> list[Any]:
    for f in schema:
        if not _flat(pa, f.type):
            raise TypeError(f"cannot encode Arrow column {f.name!r} of type {f.type} without "
                            "pickle: only flat columns (numbers, booleans, temporal, decimal, "
                            "strings, binaries) travel as frames; allow pickling on both ends")
    wire_columns = [[[len(chunk), chunk.null_count, chunk.offset,
                      [None if b is None else array(np.frombuffer(b, dtype=np.uint8))
                       for b in chunk.buffers()]]
                     for chunk in chunks]
                    for chunks in columns]
    return [schema.serialize().to_pybytes(), wire_columns]


def _flat(pa: Any, t: Any) -> bool:
    types = pa.types
    # Not the null type: a null column has no buffers, so its length would be
    # bounded by nothing the receiver holds (to_pandas would then allocate it).
    return bool(types.is_boolean(t) or types.is_integer(t)
                or types.is_floating(t) or types.is_decimal(t) or types.is_temporal(t)
                or types.is_string(t) or types.is_large_string(t) or types.is_binary(t)
                or types.is_large_binary(t) or types.is_fixed_size_binary(t)) \
        and not isinstance(t, pa.ExtensionType)


# -- decode ---------------------------------------------------------------------------

class Deferred:
    """An ext 4 value not built yet: its payload, checked without the library
    (:func:`check`). Pickling it pickles the payload (its arrays by fd on the
    local tier) and :func:`decode` as the function that builds the value on
    unpickling, so the receiving process imports the library, not this one."""

    __slots__ = ("payload",)

    def __init__(self, payload: list[Any]) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return decode, (self.payload,)

    def __repr__(self) -> str:
        return f"<deferred {self.payload[0]} value>"


def decode(payload: Any, defer: bool = False) -> Any:
    """The value an ext 4 payload (already unpacked: its arrays are ndarrays
    over frames) describes, checked; ProtocolError for anything else. With
    ``defer``, a :class:`Deferred` checked as far as needs no library."""
    if defer:
        check(payload)
        return Deferred(payload)
    kind = check(payload)
    if kind == "torch":
        return _decode_tensor(payload)
    return _decode_arrow(kind, payload)


def check(payload: Any) -> str:
    """The kind of an ext 4 payload, its structure checked without importing
    torch, pyarrow or pandas; ProtocolError otherwise."""
    if type(payload) is not list or not payload or type(payload[0]) is not str:
        raise ProtocolError(f"ext 4 must be [kind, ...], got {_describe(payload)}")
    kind: str = payload[0]
    if kind == "torch":
        _check_tensor(payload)
    elif kind in _ARROW_KINDS:
        _check_arrow(kind, payload)
    else:
        raise ProtocolError(f"unknown ext 4 kind {_short.repr(kind)}")
    return kind


def _library(name: str, kind: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ProtocolError(f"received a {kind} value but {name} is not installed here; "
                            f"install {name} on this host") from None


def _check_tensor(payload: list[Any]) -> None:
    if len(payload) != 4:
        raise ProtocolError(f"torch value must be [kind, dtype, array, requires_grad], "
                            f"got {len(payload)} items")
    _, name, a, requires_grad = payload
    if type(name) is not str or name not in _TORCH_DTYPES:
        raise ProtocolError(f"torch dtype {_short.repr(name)} refused: not one of "
                            f"{sorted(_TORCH_DTYPES)}")
    if type(a) is not np.ndarray or type(requires_grad) is not bool:
        raise ProtocolError(f"torch value must hold an array and a bool, got "
                            f"{_describe(a)}, {_describe(requires_grad)}")
    expected = _TORCH_DTYPES[name]
    if a.dtype != np.dtype(expected):
        raise ProtocolError(f"torch {name} tensor carried as {a.dtype}, expected {expected}")


def _decode_tensor(payload: list[Any]) -> Any:
    _, name, a, requires_grad = payload
    torch = _library("torch", "torch")
    dtype = getattr(torch, name)
    if not a.flags.writeable:   # torch has no read-only tensors: own a copy
        a = a.copy()
    try:
        t = torch.from_numpy(a)
        if t.dtype != dtype:
            t = t.view(dtype)
        return t.requires_grad_(True) if requires_grad else t
    except Exception as exc:
        raise ProtocolError(f"cannot make a torch tensor of shape {a.shape} and strides "
                            f"{a.strides}: {_reason(exc)}") from exc


def _check_arrow(kind: str, payload: list[Any]) -> None:
    if len(payload) != 3 or type(payload[1]) is not bytes or type(payload[2]) is not list:
        raise ProtocolError(f"{kind} value must be [kind, schema bytes, columns]")
    if kind in ("arrow.array", "arrow.chunked", "pandas.series") and len(payload[2]) != 1:
        raise ProtocolError(f"{kind} has {len(payload[2])} columns, expected 1")
    for chunks in payload[2]:
        if type(chunks) is not list or \
                (kind in ("arrow.array", "arrow.batch") and len(chunks) != 1):
            raise ProtocolError(f"{kind} column must be a list of chunks"
                                f"{' (one)' if kind in ('arrow.array', 'arrow.batch') else ''}, "
                                f"got {_describe(chunks)}")
        for chunk in chunks:
            _check_chunk(chunk)


def _decode_arrow(kind: str, payload: list[Any]) -> Any:
    _, schema_bytes, columns = payload
    pa = _library("pyarrow", kind)
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    except Exception as exc:
        raise ProtocolError(f"{kind} schema is not a valid Arrow schema: {_reason(exc)}") from exc
    if len(columns) != len(schema):
        raise ProtocolError(f"{kind} has {len(columns)} columns, its schema {len(schema)}")
    if kind in ("arrow.array", "arrow.chunked", "pandas.series") and len(schema) != 1:
        raise ProtocolError(f"{kind} must have one column, got {len(schema)}")
    arrays = []
    for f, chunks in zip(schema, columns, strict=True):
        if not _flat(pa, f.type):
            raise ProtocolError(f"{kind} column type {_short.repr(str(f.type))} refused: "
                                "only flat Arrow types travel as frames")
        arrays.append([_decode_chunk(pa, f.type, chunk) for chunk in chunks])
    try:
        if kind == "arrow.array":
            return arrays[0][0]
        if kind == "arrow.batch":
            return pa.RecordBatch.from_arrays([c[0] for c in arrays], schema=schema)
        if kind == "arrow.chunked":
            return pa.chunked_array(arrays[0], type=schema[0].type)
        table = pa.Table.from_arrays([pa.chunked_array(c, type=f.type)
                                      for f, c in zip(schema, arrays, strict=True)],
                                     schema=schema)
        if kind == "arrow.table":
            return table
        frame = table.to_pandas()
        return frame if kind == "pandas.frame" else frame.iloc[:, 0]
    except Exception as exc:
        raise ProtocolError(f"cannot build a {kind} from its columns: {_reason(exc)}") from exc


def _check_chunk(chunk: Any) -> None:
    if type(chunk) is not list or len(chunk) != 4:
        raise ProtocolError(f"Arrow chunk must be [length, null_count, offset, buffers], "
                            f"got {_describe(chunk)}")
    length, null_count, offset, buffers = chunk
    if not (type(length) is int and 0 <= length <= _MAX_LENGTH
            and type(null_count) is int and -1 <= null_count <= length
            and type(offset) is int and 0 <= offset <= _MAX_LENGTH) \
            or type(buffers) is not list or len(buffers) > 4:
        raise ProtocolError(f"Arrow chunk has an invalid length, null count, offset or "
                            f"buffer list: {_short.repr(chunk)}")
    for b in buffers:
        if b is not None and not (type(b) is np.ndarray and b.dtype == np.uint8
                                  and b.ndim == 1 and b.flags.c_contiguous):
            raise ProtocolError(f"Arrow buffer must be a 1-d uint8 array or nil, "
                                f"got {_describe(b)}")


def _decode_chunk(pa: Any, type_: Any, chunk: list[Any]) -> Any:
    length, null_count, offset, buffers = chunk
    wrapped = [None if b is None else pa.py_buffer(b) for b in buffers]
    try:
        array = pa.Array.from_buffers(type_, length, wrapped, null_count, offset)
        array.validate(full=True)
    except Exception as exc:
        raise ProtocolError(f"invalid Arrow {type_} chunk of length {length}: "
                            f"{_reason(exc)}") from exc
    return array
