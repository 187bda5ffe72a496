"""Functions by reference: ``"package.module:qualname"`` and back.

A task names its function instead of pickling it, so a worker runs only code
that is importable on its own host (and an allow-list can judge the name
before anything is imported). :func:`function_ref` makes a reference from a
callable that resolves back to itself; :func:`resolve_function` imports one.
Pickled functions (only when both ends allow pickles) are the codec's business.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any, cast

from ._schema import _is_ref, _short

__all__ = ["function_ref", "resolve_function"]

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
    allow-list's check): a pattern allowing ``pkg`` allows what ``pkg`` (or a
    module below it) defines, not everything it imported, so every object on
    the path must say so in its ``__module__`` (``pkg:run`` after ``from
    subprocess import run`` is refused, as are ``pkg:os.system`` and
    ``pkg:a_partial.func``), and names are looked up in a module's own
    ``__dict__``, never through a module ``__getattr__`` that could import
    modules the list does not allow."""
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
            if strict and isinstance(obj, types.ModuleType):
                obj = object.__getattribute__(obj, "__dict__")[part]
            else:
                obj = getattr(obj, part)
        except (AttributeError, KeyError) as exc:
            raise ImportError(f"cannot resolve function {ref!r}: {module_name!r} has no "
                              f"attribute {qualname!r}", name=module_name) from exc
        if strict:
            _defined_in(obj, module_name, ref)
    if not callable(obj):
        raise TypeError(f"function reference {ref!r} names a {type(obj).__name__}, "
                        "not a callable")
    return cast(Callable[..., Any], obj)


def _defined_in(obj: Any, module_name: str, ref: str) -> None:
    """TypeError unless ``obj`` was defined in ``module_name`` or below it."""
    if isinstance(obj, types.ModuleType):
        raise TypeError(f"function reference {ref!r} goes through the module "
                        f"{obj.__name__!r}; name the function in its own module")
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str) or (owner != module_name
                                      and not owner.startswith(module_name + ".")):
        where = f"comes from {owner!r}" if isinstance(owner, str) else "has no module"
        raise TypeError(f"function reference {ref!r} reaches a {type(obj).__name__} that "
                        f"{where}, not {module_name!r}; name it where it is defined")

