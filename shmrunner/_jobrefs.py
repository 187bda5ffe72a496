"""Job references: a Client's futures among a job's arguments, resolved by the
daemon from its own jobs, so a result never travels back through the client.

Data flow::

    Client.submit(fn, fut_a, {"x": [fut_b]})
      --extract()--> the arguments with None where each future was, and
                     refs [[path, job_id], ...] (the submit's options["refs"]);
                     the client sends the job once its dependencies are
                     accepted (journaled), so the daemon always knows them
    daemon Intake.feed --parse()--> refs checked (count, path shape, job ids)
      each dependency --> the Scheduler future of a job running here (the
                          Scheduler then waits for it, _deps.py), or the
                          journaled result of a finished one
      --place()--> the value (or future) put back at its path; a path that
                   does not lead to a None placeholder fails the job

A path is the argument's position (int) or keyword (str), then list/tuple
positions (ints) and dict keys (strs), as many as ``MAX_PATH`` steps.
Futures are looked for as the Scheduler looks for them (lists, tuples, dict
values with str keys), but not in sets: a set does not travel on the wire.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from ._argtree import DESCEND, MAX_DEPTH, Path, Swap
from ._deps import MAX_VISITS, futures_in
from ._jobfuture import JobFuture
from ._jobid import job_id_problem

__all__ = ["MAX_REFS", "MAX_PATH", "extract", "parse", "place"]

MAX_REFS = 1024  # job references in one submit, at most
MAX_PATH = MAX_DEPTH + 1  # steps in one reference's path (the argument itself, then levels)
_KEY_MAX = 256  # characters of a str step (a keyword or a dict key)


def extract(args: tuple[Any, ...], kwargs: dict[str, Any], owner: object
            ) -> tuple[tuple[Any, ...], dict[str, Any], list[tuple[Path, JobFuture]]]:
    """The arguments with each JobFuture of ``owner`` replaced by None, and
    where each was. TypeError for any other future (another Client's, a
    Scheduler's), for futures in a set, and past ``MAX_REFS`` of them."""
    if next(futures_in(args, kwargs), None) is None:
        return args, kwargs, []  # the common case: a bounded look, nothing rebuilt
    walk = _Extraction(owner)
    new_args, new_kwargs = walk.arguments(args, kwargs)
    return new_args, new_kwargs, walk.refs


class _Extraction(Swap):
    """Each JobFuture of ``owner`` becomes None, noted with its path."""

    max_visits = MAX_VISITS

    def __init__(self, owner: object) -> None:
        super().__init__()
        self.owner = owner
        self.refs: list[tuple[Path, JobFuture]] = []

    def leaf(self, obj: Any, path: Path) -> Any:
        if isinstance(obj, Future):
            if not isinstance(obj, JobFuture) or obj.owner is not self.owner:
                raise TypeError(
                    f"{obj!r} among the arguments is a future of another executor; a "
                    "Client resolves only its own futures (pass its result() instead)")
            if len(self.refs) >= MAX_REFS:
                raise TypeError(f"more than {MAX_REFS} futures among one job's arguments")
            self.refs.append((list(path), obj))
            return None
        if type(obj) in (set, frozenset) and any(isinstance(x, Future) for x in obj):
            raise TypeError("a Client cannot send futures inside a set (sets do not travel "
                            "on the wire); use a list")
        return DESCEND


def parse(refs: Any) -> list[tuple[Path, str]]:
    """``options["refs"]`` from a peer, checked: ValueError naming the problem."""
    if type(refs) not in (list, tuple) or len(refs) > MAX_REFS:
        raise ValueError(f"refs must be a list of at most {MAX_REFS} [path, job_id] pairs")
    parsed = []
    for ref in refs:
        if type(ref) not in (list, tuple) or len(ref) != 2:
            raise ValueError("each ref must be a [path, job_id] pair")
        path, job_id = ref
        if type(path) not in (list, tuple) or not 1 <= len(path) <= MAX_PATH or not all(
                (type(s) is int and s >= 0) or (type(s) is str and len(s) <= _KEY_MAX)
                for s in path):
            raise ValueError(f"a ref's path must be 1 to {MAX_PATH} ints >= 0 or strs")
        problem = job_id_problem(job_id)
        if problem is not None:
            raise ValueError(f"a ref names no valid job: {problem}")
        parsed.append((list(path), job_id))
    return parsed


def place(args: Any, kwargs: dict[str, Any], path: Path, value: Any
          ) -> tuple[Any, dict[str, Any]]:
    """The arguments with ``value`` at ``path``, where a None placeholder must
    be; ValueError for a path that leads anywhere else."""
    head, rest = path[0], path[1:]
    if type(head) is int:
        if head >= len(args):
            raise ValueError(f"a ref's path {path} points past the arguments")
        items = list(args)
        items[head] = _put(items[head], rest, value, path)
        return (tuple(items) if type(args) is tuple else items), kwargs
    if head not in kwargs:
        raise ValueError(f"a ref's path {path} names no keyword argument")
    return args, {**kwargs, head: _put(kwargs[head], rest, value, path)}


def _put(obj: Any, rest: Path, value: Any, path: Path) -> Any:
    if not rest:
        if obj is not None:
            raise ValueError(f"a ref's path {path} does not lead to a placeholder")
        return value
    step, more = rest[0], rest[1:]
    kind = type(obj)
    if kind in (list, tuple) and type(step) is int and step < len(obj):
        items = list(obj)
        items[step] = _put(items[step], more, value, path)
        return kind(items)
    if kind is dict and type(step) is str and step in obj:
        return {**obj, step: _put(obj[step], more, value, path)}
    raise ValueError(f"a ref's path {path} does not lead into the arguments")
