"""The error map: a task's exception on the wire and back.

::

    worker:   exception -> exception_to_wire -> {type, args, message, traceback}
    receiver: error map -> exception_from_wire -> the original class if it is
              imported here (else RemoteTaskError), remote traceback as __cause__

One helper, :func:`remote_traceback`, decides which traceback travels, for the
daemon and the remote worker alike. A peer never makes the receiver import
anything (docs/protocol.md, The error map).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping, Sequence
from traceback import format_exception
from typing import Any, cast

from ..errors import RemoteTaskError, attach_remote_traceback
from ._codec import MAX_NESTING

__all__ = ["remote_traceback", "exception_to_wire", "exception_from_wire", "rebuildable"]


def remote_traceback(exc: BaseException) -> str:
    """The traceback text to send with a task's exception ``exc``: the worker's
    own (attached as ``__cause__`` by :func:`attach_remote_traceback`) when it
    has one, else ``exc`` formatted here (an error of the runner itself: a
    refused function, a lost worker, a timeout)."""
    text = str(getattr(exc.__cause__, "tb", ""))
    return text or "".join(format_exception(exc))


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


def exception_to_wire(exc: BaseException, tb_text: str | None = None) -> dict[str, Any]:
    """``exc`` as the ``error`` map of a result: type, args (if plain), message,
    and ``tb_text`` as its traceback (by default :func:`remote_traceback`)."""
    if isinstance(exc, RemoteTaskError):   # forwarded: keep the original's identity
        return {"type": exc.type_name, "args": exc.remote_args, "message": exc.message,
                "traceback": exc.traceback or (remote_traceback(exc) if tb_text is None
                                               else tb_text)}
    if tb_text is None:
        tb_text = remote_traceback(exc)
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


def rebuildable(exc: BaseException, tb_text: str) -> BaseException:
    """``exc``, or a :class:`RemoteTaskError` naming it when the receiver's
    unpickler could not rebuild it: an exception pickles as its class and
    ``args``, and one whose ``__init__`` wants other arguments failed in the
    pool's process with a ``TypeError`` about ``__init__`` that named neither
    the task's exception nor where it was raised. Calls what the unpickler
    would call (the class, with the args), copying no data."""
    try:
        reduced = exc.__reduce_ex__(4)
        if isinstance(reduced, tuple) and len(reduced) >= 2 and callable(reduced[0]):
            reduced[0](*reduced[1])
        return exc
    except Exception:  # noqa: BLE001 (whatever it raises, the receiver would too)
        wire = exception_to_wire(exc, tb_text)
        return RemoteTaskError(wire["type"], wire["message"], tb_text, wire["args"])
