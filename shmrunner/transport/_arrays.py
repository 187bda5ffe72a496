"""Arrays as frames: the ext 1 reference ``[frame, dtype, shape, strides]`` both ways.

An array travels as a small reference in the header plus its raw bytes as a
frame of its own (pyzmq's serialization habit), never through msgpack. Sending
never copies a C- or Fortran-contiguous array; receiving never copies at all:
the array is an ``np.ndarray`` over the received frame, built only after
checking that the view fits inside the frame (docs/protocol.md, ext 1).
"""

from __future__ import annotations

import math
import re
from typing import Any, cast

import msgpack
import numpy as np

from ..errors import ProtocolError
from ._schema import _describe, _reason, _short

__all__ = ["raw_layout", "array_frame", "array_from_ref"]

_ARRAY_KINDS = frozenset("biufcmMSUV")  # numpy kinds with a fixed-size raw layout


def raw_layout(dtype: np.dtype[Any]) -> bool:
    """Whether arrays of ``dtype`` are plain bytes that can travel as a frame."""
    return not dtype.hasobject and dtype.kind in _ARRAY_KINDS and dtype.itemsize != 0


def array_frame(a: np.ndarray[Any, Any], index: int) -> tuple[memoryview, bytes]:
    """The frame of array ``a`` (``raw_layout`` checked by the caller) and its
    packed reference naming frame ``index``: a view of the array's memory, or
    one copy into C order for an array that is not contiguous."""
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = np.ascontiguousarray(a)   # the one copy: a frame is one flat buffer
    ref = [index, np.lib.format.dtype_to_descr(a.dtype), list(a.shape), list(a.strides)]
    packed = cast(bytes, msgpack.packb(ref, buf_size=256))
    return a.ravel(order="K").view(np.uint8).data, packed


def array_from_ref(data: bytes, views: list[memoryview]) -> tuple[int, np.ndarray[Any, Any]]:
    """The frame index an array reference names and the array viewing that
    frame, checked; :class:`ProtocolError` for anything that does not fit."""
    try:
        ref = msgpack.unpackb(data, raw=False)   # no ext_hook: nested exts stay ExtType
    except Exception as exc:
        raise ProtocolError(f"array reference is not valid msgpack: {_reason(exc)}") from exc
    if type(ref) is not list or len(ref) != 4:
        raise ProtocolError(f"array reference must be [frame, dtype, shape, strides], "
                            f"got {_describe(ref)}")
    index, descr, shape, strides = ref
    last = len(views) - 1
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
    size = views[index].nbytes
    span = _span(shape, strides, dtype.itemsize)
    # Both bounds: the view stays inside the frame, and it holds no more
    # elements than the frame has room for (zero strides could otherwise make
    # 2**62 elements of one byte: in bounds, but no one could ever sum them).
    if span is None or span > size or math.prod(shape) * dtype.itemsize > size:
        raise ProtocolError(
            f"array of shape {tuple(shape)}, dtype {dtype} and strides {tuple(strides)} "
            f"does not fit frame {index} ({size} bytes)")
    try:
        array: np.ndarray[Any, Any] = np.ndarray(tuple(shape), dtype, buffer=views[index],
                                                 strides=tuple(strides))
    except Exception as exc:
        raise ProtocolError(f"cannot view frame {index} as an array of shape "
                            f"{tuple(shape)} and dtype {dtype}: {_reason(exc)}") from exc
    return index, array


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

