"""Rebuilding a task's arguments with some of their leaves replaced.

Three walks share this shape: a same-host client takes its large arrays out
of a submit (``_samehost``), a Client takes its own futures out (job
references, ``_jobrefs``) and a Scheduler puts its dependencies' results in
(``_deps``). Each says what a leaf becomes (:meth:`Swap.leaf`); the walk
descends lists, tuples and dict values, rebuilds (with their type) only the
containers on a path where something was replaced, and hands back the very
object it was given everywhere else.

A path is the argument's position (int) or keyword (str), then list and
tuple positions (ints) and dict keys (strs).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Path", "Swap", "DESCEND", "MAX_DEPTH"]

MAX_DEPTH = 16  # container levels searched below the argument list

Path = list[int | str]

DESCEND: Any = object()  # Swap.leaf's answer for "not a leaf of this walk"


class Swap:
    """One walk over one task's arguments; subclasses define :meth:`leaf`.

    A class, not a recursive closure: a nested function that calls itself is
    a reference cycle, which would keep what the walk found (a submit's
    arrays, a dependency's result) alive until the garbage collector's next
    full pass.
    """

    max_visits: float = math.inf  # objects looked at, at most (the rest are kept as they are)
    sets = False  # descend sets and frozensets too (their members have no path on the wire)
    any_key = False  # descend dict values under any key, not only str keys

    def __init__(self) -> None:
        self.visits = 0

    def leaf(self, obj: Any, path: Path) -> Any:
        """What ``obj`` becomes, or :data:`DESCEND` if it is not a leaf this
        walk replaces (a container is then searched)."""
        raise NotImplementedError

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        new_args = tuple(self.swap(a, [i]) for i, a in enumerate(args))
        new_kwargs = {k: self.swap(v, [k]) for k, v in kwargs.items()}
        if all(new is old for new, old in zip(new_args, args, strict=True)):
            new_args = args
        if all(new_kwargs[k] is v for k, v in kwargs.items()):
            new_kwargs = kwargs
        return new_args, new_kwargs

    def swap(self, obj: Any, path: Path) -> Any:
        if self.visits >= self.max_visits:
            return obj
        self.visits += 1
        new = self.leaf(obj, path)
        if new is not DESCEND:
            return new
        if len(path) >= MAX_DEPTH:
            return obj
        kind = type(obj)
        if kind is dict:
            out = {k: self.swap(v, [*path, k]) if self.any_key or type(k) is str else v
                   for k, v in obj.items()}
            return out if any(out[k] is not v for k, v in obj.items()) else obj
        if kind is list or kind is tuple or (self.sets and kind in (set, frozenset)):
            items = [self.swap(item, [*path, i]) for i, item in enumerate(obj)]
            if all(new is old for new, old in zip(items, obj, strict=True)):
                return obj
            return kind(items)
        return obj
