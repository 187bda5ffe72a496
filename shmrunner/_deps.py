"""Dependencies: futures of a Scheduler passed in another task's arguments.

Data flow::

    submit(fn, fut_a, [fut_b]) --find()--> the futures of this Scheduler in the
        arguments (a future of another executor: TypeError, nothing queued)
      --> Backlog.admit(job, deferred=True): counted against max_pending, but
          not queued; job.future stays PENDING (it can be cancelled)
      --> each dependency's done-callback (on the thread that settled it: a
          tier's thread, or submit's own for one already done)
            all succeeded  --substitute()--> the results in place of the
                           futures --Backlog.ready()--> queue --> _pump()
            one failed     --> the dependent fails with DependencyError,
                           ``__cause__`` = the dependency's exception
            one cancelled  --> the dependent is cancelled (also when it was
                           stopped running: TaskCancelledError)
    dependent cancelled by the caller --> Backlog.forget(job) (its slot is freed)
    a queued job's future cancelled --> Owner.drop --> Backlog.drop(job) (its
                           place in the queue and its bytes are freed at once)

A result is substituted as the very object the dependency's future holds:
an array a local worker returned lives in shared memory, so the next local
task gets it by handle, without a copy and without a trip through the
caller. Failure and cancellation propagate down a chain through the same
callbacks (a dependent's own future settles, which settles its dependents).

Where futures are looked for ("anywhere"): the positional and keyword
arguments themselves and, recursively, the items of lists, tuples, sets,
frozensets and the values of dicts (exact types, not subclasses: a
namedtuple or a dataclass is passed as it is), up to ``MAX_DEPTH`` levels
and ``MAX_VISITS`` objects per call. Futures anywhere else are not
resolved (and fail to pickle).

Why a deferred job counts against ``max_pending``: a chain is submitted in
order, so its earliest unsettled task is always queued or running; counting
the waiting ones keeps a long chain (or a map over futures) from holding
unbounded memory, yet cannot deadlock, because the task that frees the next
slot is never one that waits.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from typing import Any

from ._argtree import DESCEND, MAX_DEPTH, Path, Swap
from ._job import Job
from ._lightfuture import LightFuture, notify_cancelled
from ._payload import only_scalars, payload_bytes
from .errors import DependencyError, TaskCancelledError

# How many Scheduler futures this thread is settling (running their done-callbacks).
_in_callbacks = threading.local()
# Per thread: the dependency settlements still to handle while one is being
# handled further up this thread's stack (``queue`` None: none is).
_settling = threading.local()

log = logging.getLogger("shmrunner.scheduler")


def in_done_callback() -> bool:
    """Whether this thread runs a done-callback of a Scheduler future now. A
    submit from there must not wait for room in the queue: the thread may be
    the one that frees it (a tier's), so it would wait forever, as it never
    does with ``concurrent.futures`` executors."""
    return getattr(_in_callbacks, "depth", 0) > 0


@contextlib.contextmanager
def running_callbacks() -> Iterator[None]:
    """Run user callbacks in here on a thread that settles futures (a tier's
    ``on_task_log``, say): :func:`in_done_callback` is then true, as in a
    done-callback."""
    _in_callbacks.depth = getattr(_in_callbacks, "depth", 0) + 1
    try:
        yield
    finally:
        _in_callbacks.depth -= 1

__all__ = ["TaskFuture", "futures_in", "find", "substitute", "Dependents", "MAX_VISITS",
           "in_done_callback", "running_callbacks"]

MAX_VISITS = 10_000  # objects looked at per call, at most

_CONTAINERS = (list, tuple, dict, set, frozenset)


class Owner:
    """What a Scheduler's futures carry to know their Scheduler (compared by
    identity) and to free a queued job's place when the caller cancels its
    future. It holds the Backlog weakly: a future kept after its Scheduler
    is gone keeps nothing of it alive."""

    __slots__ = ("_backlog", "__weakref__")

    def __init__(self, backlog: Any) -> None:
        self._backlog = weakref.ref(backlog)

    def drop(self, job: Job) -> bool:
        """``job``'s future was cancelled: see ``Backlog.drop``."""
        backlog = self._backlog()
        return backlog is not None and bool(backlog.drop(job))


class TaskFuture(LightFuture[Any]):
    """The Future a Scheduler returns: it knows its Scheduler (an opaque token,
    not a reference, so a kept future does not keep the Scheduler alive), its
    task id, which error messages name, and, until it settles, its job (what
    ``Scheduler.cancel`` and ``describe`` act on; no table keyed by future)."""

    def __init__(self, owner: Owner, task_id: int) -> None:
        LightFuture.__init__(self)  # (not through super(): a third of the cost, once a task)
        self.owner = owner
        self.task_id = task_id
        self.job: Job | None = None  # set by submit; None once settled
        # Once settled: (attempts, worker) of its task, for Scheduler.describe.
        self.settled_runs: tuple[int, str | None] | None = None

    def __reduce__(self) -> Any:
        # Reached when a future sits where find() does not look and so travels
        # with the task: say that, not "cannot pickle '_thread.RLock' object".
        # The search's object limit is named too: a fan-in of more futures than
        # it looks at sits exactly where the rest of the message says to put it.
        raise TypeError(
            f"a future (of task {self.task_id}) cannot be sent to a worker: futures are "
            "resolved only by the Scheduler that made them (a Pool or another executor "
            "never resolves them), as arguments or inside lists, tuples, sets and dict values, "
            f"up to {MAX_DEPTH} levels deep and among the first {MAX_VISITS} objects of "
            "a task's arguments (not as a dict key, nor inside a namedtuple, a dataclass "
            "or another object); put it there (a wider fan-in: combine the futures in "
            "stages of tasks), or pass its result()")

    def runs(self) -> tuple[Job | None, tuple[int, str | None] | None]:
        """(its job while unsettled, (attempts, worker of the latest))."""
        job = self.job
        if job is not None:
            return job, (job.attempts, job.worker)
        return None, self.settled_runs

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        job = self.job
        self._let_go()
        if job is not None and self.owner.drop(job):
            notify_cancelled(self)  # out of the queue: no place() will tell wait()
        return True

    def _settle(self, result: Any, exception: BaseException | None, failed: bool) -> None:
        self._let_go()  # whichever path settles it: the Scheduler's, a shutdown's, a dependency's
        if self._callbacks is None:
            LightFuture._settle(self, result, exception, failed)
            return
        _in_callbacks.depth = getattr(_in_callbacks, "depth", 0) + 1
        try:  # its done-callbacks run in here
            LightFuture._settle(self, result, exception, failed)
        finally:
            _in_callbacks.depth -= 1

    def _let_go(self) -> None:
        # Keep the job's last runs, not the job: the job refers to this future,
        # and its arguments must not live as long as the caller keeps the future.
        job = self.job
        if job is not None:
            self.settled_runs = (job.attempts, job.worker)
            self.job = None


def futures_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Future[Any]]:
    """Every future among the arguments, where "anywhere" reaches (repeats
    included), within ``MAX_DEPTH`` levels and ``MAX_VISITS`` objects."""
    if only_scalars(args, kwargs):  # the common tiny task: nothing to walk
        return
    visits = 0
    stack: list[tuple[Any, int]] = [(args, 0), (kwargs, 0)]
    while stack and visits < MAX_VISITS:
        obj, depth = stack.pop()
        visits += 1
        if isinstance(obj, Future):
            yield obj
        elif type(obj) in _CONTAINERS and depth < MAX_DEPTH:
            items = obj.values() if type(obj) is dict else obj
            # Never more than the visits left: a list of a million numbers
            # costs a bounded time to search.
            stack.extend((item, depth + 1)
                         for item in itertools.islice(items, MAX_VISITS - visits))


def find(args: tuple[Any, ...], kwargs: dict[str, Any], owner: object) -> list[TaskFuture]:
    """The distinct futures of ``owner`` in the arguments; TypeError for a
    future of anything else (another Scheduler, a Client, a
    ThreadPoolExecutor): its result is not this Scheduler's to wait for."""
    found: dict[int, TaskFuture] = {}
    for obj in futures_in(args, kwargs):
        if not isinstance(obj, TaskFuture) or obj.owner is not owner:
            raise TypeError(
                f"{obj!r} among the arguments is a future of another executor; only "
                "futures of this Scheduler are resolved before the task runs (pass "
                "its result() instead)")
        found.setdefault(id(obj), obj)
    return list(found.values())


def substitute(args: tuple[Any, ...], kwargs: dict[str, Any], futures: list[TaskFuture]
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments with each of ``futures`` (all settled with a result)
    replaced by its result, the same object, wherever :func:`find` could have
    met it; containers holding none are kept as they are, the others are
    rebuilt with their type (a set of futures whose results are unhashable:
    TypeError)."""
    return _Substitution({id(f): f.result(timeout=0) for f in futures}).arguments(args, kwargs)


class _Substitution(Swap):
    """Each settled future (by id) becomes its result, wherever :func:`find`
    could have met it (sets and dicts under any key included)."""

    sets = True
    any_key = True

    def __init__(self, results: dict[int, Any]) -> None:
        super().__init__()
        self.results = results

    def leaf(self, obj: Any, path: Path) -> Any:
        if isinstance(obj, Future):
            return self.results.get(id(obj), obj)
        return DESCEND


class _Wait:
    """One dependent job and the count of its dependencies not settled yet."""

    __slots__ = ("job", "deps", "remaining", "lock", "over")

    def __init__(self, job: Job, deps: list[TaskFuture]) -> None:
        self.job = job
        self.deps = deps
        self.remaining = len(deps)
        self.lock = threading.Lock()
        self.over = False  # a dependency failed or was cancelled: the rest are moot


class Dependents:
    """Holds the jobs of one Scheduler that wait for futures in their
    arguments, and releases them (``ready``), fails them or cancels them as
    those futures settle. ``backlog`` is the Scheduler's
    :class:`~shmrunner._backlog.Backlog`; ``pump`` places queued jobs."""

    def __init__(self, backlog: Any, pump: Callable[[], None]) -> None:
        self.token = Owner(backlog)  # what this Scheduler's futures carry as ``owner``
        self._backlog = backlog
        self._pump = pump

    def new_future(self, task_id: int) -> TaskFuture:
        return TaskFuture(self.token, task_id)

    def hold(self, job: Job, block: bool, over_budget: bool = False) -> bool:
        """Admit ``job`` as waiting for the futures in its arguments and watch
        them (``block``, ``over_budget``: as ``Backlog.admit``); False (nothing
        done) when it has none. Raises TypeError for a foreign future, before
        anything is admitted."""
        deps = find(job.args, job.kwargs, self.token)
        if not deps:
            return False
        self._backlog.admit(job, block, deferred=True, over_budget=over_budget)
        job.future.add_done_callback(self._cancelled_by_caller(job))
        wait = _Wait(job, deps)
        for dep in deps:
            dep.add_done_callback(functools.partial(self._settled, wait))
        return True

    def _cancelled_by_caller(self, job: Job) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            if future.cancelled() and self._backlog.forget(job):
                notify_cancelled(job.future)  # never queued: nothing else will
        return done

    def _settled(self, wait: _Wait, dep: Future[Any]) -> None:
        """A dependency of ``wait.job`` settled (any thread).

        Handled in a loop, not by recursion: failing or cancelling a dependent
        settles its own dependents from inside this call, and a chain a few
        hundred tasks deep would exhaust the stack (the RecursionError, logged
        by the future, left the rest of the chain pending forever)."""
        queue = getattr(_settling, "queue", None)
        if queue is not None:  # an outer call on this thread handles it next
            queue.append((self, wait, dep))
            return
        _settling.queue = queue = collections.deque([(self, wait, dep)])
        try:
            while queue:
                owner, waiting, settled = queue.popleft()
                try:
                    owner._handle(waiting, settled)
                except Exception:  # noqa: BLE001 (the others must still settle)
                    log.exception("settling the dependents of %r failed", settled)
        finally:
            _settling.queue = None

    def _handle(self, wait: _Wait, dep: Future[Any]) -> None:
        with wait.lock:
            if wait.over:
                return
            wait.remaining -= 1
            failed = dep.cancelled() or dep.exception(timeout=0) is not None
            if failed:
                wait.over = True
            elif wait.remaining > 0:
                return
        job = wait.job
        if not failed:
            self._release(job, wait.deps)
            wait.deps = []
        elif _was_cancelled(dep):
            if self._backlog.forget(job) and job.future.cancel():
                notify_cancelled(job.future)  # never queued: nothing else will
        elif self._backlog.forget(job):
            self._fail(job, dep)

    def _release(self, job: Job, deps: list[TaskFuture]) -> None:
        try:
            job.args, job.kwargs = substitute(job.args, job.kwargs, deps)
            nbytes = payload_bytes(job.args, job.kwargs)
        except Exception as exc:  # noqa: BLE001 (e.g. unhashable results in a set)
            # On a future's callback an exception would only be logged: the
            # task would wait forever. It fails instead.
            if self._backlog.forget(job):
                job.fn, job.args, job.kwargs = None, (), {}
                _settle(job.future, exc)
            return
        if self._backlog.ready(job, nbytes):
            self._pump()

    def _fail(self, job: Job, dep: Future[Any]) -> None:
        cause = dep.exception(timeout=0)
        assert cause is not None
        dep_id = dep.task_id if isinstance(dep, TaskFuture) else "?"
        root, depth = _root_of(cause)
        error = DependencyError(
            f"task {job.id} did not run: task {dep_id}, whose future is among its "
            f"arguments, failed with {_describe(cause, root)}")
        # Linked to the first failure itself past CAUSE_LINKS links: Python's
        # traceback printer recurses along __cause__, and a chain of thousands
        # printed nothing at all.
        error.__cause__ = cause if depth < CAUSE_LINKS else root
        job.fn, job.args, job.kwargs = None, (), {}
        _settle(job.future, error)


#: Links of DependencyErrors a dependent's ``__cause__`` chain keeps before it
#: points at the first failure directly.
CAUSE_LINKS = 50


def _was_cancelled(dep: Future[Any]) -> bool:
    """Whether ``dep`` (settled) was cancelled: before it ran, or stopped by
    ``Scheduler.cancel`` (or a shutdown's ``cancel_futures``) once it ran, which
    settles it with TaskCancelledError and ``describe`` calls "cancelled" too."""
    return dep.cancelled() or isinstance(dep.exception(timeout=0), TaskCancelledError)


def _root_of(cause: BaseException) -> tuple[BaseException, int]:
    """The first failure up ``cause``'s chain of DependencyErrors, and how many
    links lead to it (at most :data:`CAUSE_LINKS`: see ``_fail``)."""
    root, depth = cause, 0
    seen = {id(root)}
    while isinstance(root, DependencyError) and root.__cause__ is not None \
            and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
        depth += 1
    return root, depth


def _describe(cause: BaseException, root: BaseException) -> str:
    """``cause`` for a dependent's message. A DependencyError is named with the
    first failure up its chain (``root``), not with its own message: each link
    quoting the whole message of the link before made them quadratic in the depth."""
    if not isinstance(cause, DependencyError):
        return f"{type(cause).__name__}: {cause}"
    if root is cause:
        return f"DependencyError: {cause}"
    return f"DependencyError (the first failure up its chain: {type(root).__name__}: {root})"


def _settle(future: Future[Any], error: BaseException) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:  # cancelled by the caller meanwhile
        pass
