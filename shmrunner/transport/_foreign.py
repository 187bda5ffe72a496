"""torch tensors and Arrow buffers through shared memory on the local tier.

:mod:`.pickling` moves numpy arrays by fd; this module adds reducers to its
dispatch table that turn the other libraries' data into numpy arrays for
that same path, so thresholds, memfd copies, fd limits and the fallback to
plain pickling stay in one place:

* ``torch.Tensor`` / ``torch.nn.Parameter`` (CPU, strided) reduce to
  ``(rebuild, (tensor.numpy() view, dtype, requires_grad))``: the numpy view
  shares the tensor's memory, so a large tensor is copied once, straight into
  a memfd, and the receiver gets ``torch.from_numpy`` over the mapping (value
  semantics, like pickling: the caller's tensor is never touched; a tensor
  that arrived that way goes on by handle, as a received numpy array does,
  see ``_origins``). Dtypes
  numpy lacks (bfloat16, float8, complex32) travel as an integer view of the
  same item size. A tensor the user placed in shared memory with
  ``share_memory_()`` keeps torch's own reducer and its meaning (the worker
  sees the same memory; torch passes the fd through multiprocessing's
  resource sharer thread), as do tensors this path cannot express (not on
  the CPU, sparse, quantized, non-leaf with ``requires_grad``).
* ``pyarrow.Buffer`` reduces to ``(rebuild, (numpy uint8 view,))``: every
  Arrow array, chunked array, record batch and table pickles down to its
  buffers, and so does a pandas column backed by Arrow (pandas' default
  string columns), so all of those travel by memfd; the receiver wraps the
  mapping with ``pyarrow.py_buffer`` (no copy). pandas' numpy-backed blocks
  already pickle as numpy arrays.

Why reducers and not pickle protocol 5's ``buffer_callback``: the only
libraries here that emit ``PickleBuffer`` objects are numpy and pyarrow, and
taking their buffers out of band would need the message to carry a second
list (which buffer is which fd); reducers reuse the message as it is.

Nothing here imports torch or pyarrow: reducers are added only for the
libraries already in ``sys.modules`` (the user's objects can only be theirs
if they were imported), and :func:`libraries` is part of the dispatch
table's cache key so a library imported later is picked up.
"""

from __future__ import annotations

import importlib
import sys
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["libraries", "reducers"]

_Reducer = Callable[[Any], Any]


def libraries() -> int:
    """Which optional libraries are imported, as a bit mask (a cache key)."""
    modules = sys.modules
    return ("torch" in modules) | ("pyarrow" in modules) << 1


def reducers(table: dict[Any, Any]) -> dict[Any, _Reducer]:
    """Reducers for the imported libraries' types; ``table`` holds the
    reducers they replace (torch's own, kept for what this path cannot do)."""
    out: dict[Any, _Reducer] = {}
    torch = sys.modules.get("torch")
    tensor = getattr(torch, "Tensor", None)
    if tensor is not None:
        fallback = table.get(tensor)
        out[tensor] = _tensor_reducer(fallback)
        parameter = getattr(getattr(torch, "nn", None), "Parameter", None)
        if parameter is not None:
            out[parameter] = _tensor_reducer(table.get(parameter, fallback))
    pyarrow = sys.modules.get("pyarrow")
    buffer = getattr(pyarrow, "Buffer", None)
    if buffer is not None:
        for cls in (buffer, *buffer.__subclasses__()):
            out[cls] = _reduce_arrow_buffer
    return out


# -- torch ----------------------------------------------------------------------------

# The integer types a tensor of a dtype numpy lacks travels as, by item size.
_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _tensor_reducer(fallback: _Reducer | None) -> _Reducer:
    def reduce(t: Any) -> Any:
        view = numpy_view(t)
        if view is None:
            return fallback(t) if fallback is not None else t.__reduce_ex__(5)
        return _rebuild_tensor, (view, t.dtype, bool(t.requires_grad), type(t))
    return reduce


def numpy_view(t: Any, shared: bool = False) -> np.ndarray[Any, Any] | None:
    """A numpy array sharing the memory of CPU tensor ``t`` (an integer view for
    dtypes numpy lacks), or None when ``t`` must go another way: shared by
    the user (``share_memory_()``, unless ``shared``), not a plain strided
    CPU tensor, or a non-leaf that requires grad (torch refuses to send those)."""
    torch = sys.modules["torch"]
    if t.device.type != "cpu" or t.layout is not torch.strided or t.is_quantized \
            or t.is_nested or (t.is_shared() and not shared) \
            or (t.requires_grad and not t.is_leaf):
        return None
    origin = _origins.get(id(t))
    if origin is not None and origin.ctypes.data == t.data_ptr() \
            and origin.shape == tuple(t.shape) \
            and origin.strides == tuple(s * t.element_size() for s in t.stride()):
        return origin   # a tensor rebuilt here: its array still knows its segment
    t = t.detach().resolve_conj().resolve_neg()
    try:
        view: np.ndarray[Any, Any] = t.numpy()
    except TypeError:   # no numpy dtype: send the bits as integers of the same size
        int_dtype = getattr(torch, _INT_OF_SIZE.get(t.element_size(), ""), None)
        if int_dtype is None:
            return None
        view = t.view(int_dtype).numpy()
    return view


def _rebuild_tensor(array: np.ndarray[Any, Any], dtype: Any, requires_grad: bool,
                    cls: Any) -> Any:
    torch = importlib.import_module("torch")   # the sender had it; so must we

    t = torch.from_numpy(array)
    if t.dtype != dtype:
        t = t.view(dtype)
    if cls is torch.nn.Parameter:
        t = torch.nn.Parameter(t, requires_grad=requires_grad)
    elif requires_grad:
        t.requires_grad_(True)
    _origins[id(t)] = array
    weakref.finalize(t, _origins.pop, id(t), None)
    return t


# Tensors rebuilt over a shared segment -> the array they were made from. A
# tensor's own numpy view no longer reaches the segment (its base is the
# tensor), so without this a worker returning the tensor it was sent, or the
# caller passing on a tensor a worker returned, would copy it again; with
# it, such a tensor travels by handle, as a received numpy array does. Keyed
# by id (a tensor's == is elementwise), forgotten when the tensor dies.
_origins: dict[int, np.ndarray[Any, Any]] = {}


# -- pyarrow --------------------------------------------------------------------------

def _reduce_arrow_buffer(buf: Any) -> Any:
    if not buf.is_cpu:   # device memory: pyarrow's own way
        return buf.__reduce_ex__(5)
    return _rebuild_arrow_buffer, (np.frombuffer(buf, dtype=np.uint8),)


def _rebuild_arrow_buffer(array: np.ndarray[Any, Any]) -> Any:
    return importlib.import_module("pyarrow").py_buffer(array)
