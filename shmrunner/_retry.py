"""Retry policy: which task exceptions are retried, and how long to wait first.

Data flow::

    settings.retry_on / submit(retry_on=...) --names()--> frozenset of
        'module:qualname' names (classes are named, names are never imported)
    a failed attempt --matches(exc, names)--> retry it? (the Scheduler's _finish)
    a retry --delay(backoff, cap, attempt)--> seconds before it is queued again

Matching is by name over the exception's class and its bases, so a setting
in a YAML file can name a class of a package the scheduler never imports, and
a remote task's exception that could not be rebuilt here
(:class:`~shmrunner.errors.RemoteTaskError`) still matches by its original
class's name. A name a module only re-exports (``json:JSONDecodeError``,
defined in ``json.decoder``) also matches by the class's own name, provided
that module is imported here when the name is read (looked up in the
module's ``__dict__``: never imported, no module ``__getattr__`` run).
Stateless.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from ._config_checks import exception_names
from .errors import RemoteTaskError

__all__ = ["names", "matches", "delay"]


def _canonical(name: str) -> str:
    """``name`` as 'module:qualname': a bare name is a builtin's, 'a.b.C' is C of a.b."""
    if ":" in name:
        return name
    module, dot, qualname = name.rpartition(".")
    return f"{module}:{qualname}" if dot else f"builtins:{name}"


def names(spec: Iterable[type[BaseException] | str]) -> frozenset[str]:
    """The 'module:qualname' names of ``spec``'s exception classes and class names
    (TypeError for anything else, ValueError for a string that is no class name)."""
    if isinstance(spec, (str, bytes, type)) or not isinstance(spec, Iterable):
        raise TypeError(f"retry_on must be a list or tuple of exception classes or names, "
                        f"got {spec!r}")
    out = set()
    for item in spec:
        if isinstance(item, type) and issubclass(item, BaseException):
            out.add(f"{item.__module__}:{item.__qualname__}")
        elif isinstance(item, str):
            if exception_names([item]) is not None:  # as the setting's names
                raise ValueError(f"retry_on: {item!r} is not an exception class name; use "
                                 "'module:qualname' (e.g. 'mypkg.errors:Flaky') or a "
                                 "builtin's name (e.g. 'ConnectionError')")
            name = _canonical(item)
            out.add(name)
            defined = _defined_as(name)
            if defined is not None:
                out.add(defined)
        else:
            raise TypeError(f"retry_on takes exception classes or their names "
                            f"('module:qualname'), got {item!r}")
    return frozenset(out)


def _defined_as(name: str) -> str | None:
    """The 'module:qualname' where the class ``name`` refers to is defined,
    if its module is imported already and it names an exception class."""
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        return None
    found: object = module
    for part in qualname.split("."):
        found = vars(found).get(part) if hasattr(found, "__dict__") else None
        if found is None:
            return None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        return None
    return f"{found.__module__}:{found.__qualname__}"


def matches(exc: BaseException, retry_on: frozenset[str]) -> bool:
    """Whether ``exc``'s class or one of its bases is named in ``retry_on``."""
    if not retry_on:
        return False
    if isinstance(exc, RemoteTaskError) and _canonical(exc.type_name) in retry_on:
        return True  # a remote class not rebuilt here: only its own name is known
    return any(f"{cls.__module__}:{cls.__qualname__}" in retry_on for cls in type(exc).__mro__)


def delay(backoff: float, cap: float, attempt: int) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt``
    (1 for the first): ``backoff`` doubled per earlier retry, at most ``cap``."""
    if backoff <= 0:
        return 0.0
    return min(cap, backoff * 2.0 ** min(attempt - 1, 64))
