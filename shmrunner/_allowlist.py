"""Which functions a peer may have run: ``allowed_functions`` patterns.

A pattern is ``module`` (any callable that module defines) or
``module:qualname``, either part with ``fnmatch`` wildcards (``mypkg.*``,
``mypkg.jobs:render_*``). A reference is checked as a string before anything is
imported, then resolved strictly: no dunder attribute and no path through
another module, so ``mypkg`` does not allow ``mypkg:os.system``. Shmrunner's own
trampolines (``map(chunksize=)``'s chunk runner) are allowed exactly when the
function they carry in their arguments is. A pickled callable cannot be
checked, so it is refused whenever a list is set.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Sequence
from typing import Any

from .errors import FunctionNotAllowedError

__all__ = ["AllowList"]

# Trampolines: the reference -> the index in its args of the function it runs.
_CARRIERS = {"shmrunner.scheduler:_run_chunk": 0}


class AllowList:
    """``patterns`` None: everything is allowed (no check at all)."""

    def __init__(self, patterns: Sequence[str] | None, setting: str) -> None:
        self.setting = setting
        self._patterns: tuple[tuple[str, str | None], ...] | None = None
        if patterns is not None:
            self._patterns = tuple(
                (module, qualname or None)
                for module, _, qualname in (p.partition(":") for p in patterns))
        # Resolution imports: cache the verdict per reference (refs repeat).
        self._resolved: Callable[[str], None] = functools.lru_cache(maxsize=1024)(
            self._resolve)

    @property
    def active(self) -> bool:
        return self._patterns is not None

    def allows(self, ref: str) -> bool:
        """Whether the string ``ref`` matches a pattern (nothing is imported)."""
        if self._patterns is None:
            return True
        module, sep, qualname = ref.partition(":")
        if not sep or any(part.startswith("__") and part.endswith("__")
                          for part in qualname.split(".")):
            return False  # dunders reach globals, classes, builtins: never by pattern
        return any(fnmatch.fnmatchcase(module, mod_pattern) and (
            qual_pattern is None or fnmatch.fnmatchcase(qualname, qual_pattern))
            for mod_pattern, qual_pattern in self._patterns)

    def check(self, fn: object, args: Sequence[Any] = ()) -> None:
        """Raise FunctionNotAllowedError unless calling ``fn(*args)`` is allowed;
        imports only modules the list allows."""
        if self._patterns is None:
            return
        if not isinstance(fn, str):
            raise FunctionNotAllowedError(
                f"a function sent by value ({type(fn).__name__}) cannot be checked against "
                f"{self.setting}; send it by reference 'module:qualname'")
        carried = _CARRIERS.get(fn)
        if carried is not None:
            inner = args[carried] if len(args) > carried else None
            if not isinstance(inner, str) or inner in _CARRIERS:
                raise FunctionNotAllowedError(
                    f"{fn} must carry a function reference 'module:qualname' checked against "
                    f"{self.setting}, got {type(inner).__name__}")
            fn = inner
        if not self.allows(fn):
            raise FunctionNotAllowedError(
                f"{fn[:200]} is not in {self.setting}; add a pattern for it "
                "('module' or 'module:qualname') to let peers run it")
        self._resolved(fn)

    def _resolve(self, ref: str) -> None:
        from .transport.protocol import resolve_function

        try:
            resolve_function(ref, strict=True)
        except TypeError as exc:
            raise FunctionNotAllowedError(f"{exc} ({self.setting})") from None
