"""Every error shmrunner raises, under one base class.

::

    ShmrunnerError
     +-- WorkerLostError          a worker died while holding a task
 |    +-- MemoryLimitError    ... killed for its memory: over memory_limit, or by the OOM killer
     +-- TaskTimeoutError         (also TimeoutError) a task ran past its timeout
     +-- ResultTimeoutError       (also TimeoutError) Client.result(job_id, timeout) ran out
     +-- TaskCancelledError       a task was dropped by terminate() or shutdown
     +-- DependencyError          a future among a task's arguments failed: it did not run
     +-- InitializerError         a worker's initializer raised; the pool is broken
     +-- SharedMemoryError        (also MemoryError) shared memory cannot hold an array
     +-- ProtocolError            a peer sent a message that breaks the wire protocol
     +-- ChannelError             a network socket failed (bind, connect, send)
     |    +-- ChannelClosedError  ... because you closed it (not broken by the peer)
     +-- RemoteTaskError          a remote task's exception whose class cannot be rebuilt here
     +-- ConfigError              (also ValueError) a setting is missing or wrong
     +-- FunctionNotAllowedError  a peer asked to run a function the allow-list refuses
     +-- JournalError             the daemon's journal cannot be read or written
     +-- SchedulerBusyError       Scheduler.try_submit: max_pending tasks already wait

A task's *own* exception is never wrapped: it reaches the caller as itself, with
the worker's formatted traceback attached as ``__cause__`` (a
``multiprocessing.pool.RemoteTraceback``, exactly as ``multiprocessing.Pool``
does), see :func:`attach_remote_traceback`.
"""

from __future__ import annotations

import signal
from multiprocessing.pool import RemoteTraceback  # type: ignore[attr-defined]
from typing import Any

from ._memsize import describe as _size

__all__ = [
    "ShmrunnerError",
    "WorkerLostError",
    "MemoryLimitError",
    "TaskTimeoutError",
    "ResultTimeoutError",
    "TaskCancelledError",
    "DependencyError",
    "InitializerError",
    "SharedMemoryError",
    "ProtocolError",
    "ChannelError",
    "ChannelClosedError",
    "RemoteTaskError",
    "ConfigError",
    "FunctionNotAllowedError",
    "JournalError",
    "SchedulerBusyError",
    "attach_remote_traceback",
]


class ShmrunnerError(Exception):
    """Base class of every error raised by shmrunner itself."""


class WorkerLostError(ShmrunnerError):
    """Raised when the worker running a task died before returning its result.

    Carries the evidence: the worker's ``pid``, its ``exitcode`` (negative for a
    signal, as in ``multiprocessing``) and the ``task`` it held.
    """

    def __init__(self, pid: int | None, exitcode: int | None, task: object = None) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.task = task
        super().__init__(pid, exitcode, task)

    @property
    def signal(self) -> int | None:
        """The signal number that killed the worker, if a signal did."""
        if self.exitcode is not None and self.exitcode < 0:
            return -self.exitcode
        return None

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                how = f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                how = f"killed by signal {self.signal}"
        elif self.exitcode is None:
            how = "lost"
        else:
            how = f"exited with code {self.exitcode}"
        task = f" while running task {self.task}" if self.task is not None else ""
        return f"worker pid {self.pid} {how}{task}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.pid, self.exitcode, self.task))


class MemoryLimitError(WorkerLostError):
    """Raised when the worker running a task was killed for the memory it used:
    over its ``memory_limit`` (shmrunner killed it), or by the kernel's OOM
    killer (``oom_killer`` True). A :class:`WorkerLostError`, so the Scheduler
    retries it while the task's retries allow.

    Carries ``limit`` (the worker's memory_limit in bytes, or None), ``size``
    (the private memory measured when it was killed, or None) and
    ``evidence`` (for the OOM killer: which kernel counter says so).
    """

    def __init__(self, pid: int | None, exitcode: int | None, task: object = None,
                 limit: int | None = None, size: int | None = None,
                 oom_killer: bool = False, evidence: str = "") -> None:
        super().__init__(pid, exitcode, task)
        self.limit = limit
        self.size = size
        self.oom_killer = oom_killer
        self.evidence = evidence
        self.args = (pid, exitcode, task, limit, size, oom_killer, evidence)

    def __str__(self) -> str:
        task = f" while running task {self.task}" if self.task is not None else ""
        if self.oom_killer:
            evidence = f" ({self.evidence})" if self.evidence else ""
            limit = f" (its memory limit: {_size(self.limit)})" if self.limit is not None else ""
            return (f"worker pid {self.pid} was killed by the kernel's OOM killer{task}"
                    f"{evidence}: the host, or the worker's memory cgroup, ran out of memory"
                    f"{limit}")
        return (f"worker pid {self.pid} exceeded its memory limit of {_size(self.limit)} "
                f"(private memory {_size(self.size)}){task}; it was killed and replaced")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), self.args)


class TaskTimeoutError(ShmrunnerError, TimeoutError):
    """Raised when a task ran longer than its timeout and was stopped."""


class ResultTimeoutError(ShmrunnerError, TimeoutError):
    """Raised by ``Client.result(job_id, timeout=...)`` when the job has not
    finished within ``timeout`` seconds (the job itself goes on running)."""


class TaskCancelledError(ShmrunnerError):
    """Raised for a task that was dropped unrun by ``terminate()`` or a shutdown."""


class DependencyError(ShmrunnerError):
    """Raised (as a task's outcome) when a future passed among the task's
    arguments failed: the task did not run. ``__cause__`` is that future's
    exception (a DependencyError itself when the failure came further up a
    chain)."""


class InitializerError(ShmrunnerError):
    """Raised when a worker's ``initializer`` raised: no worker can start, so the
    pool fails its tasks instead of respawning workers forever."""


class SharedMemoryError(ShmrunnerError, MemoryError):
    """Raised when shared memory cannot hold an array the caller asked for
    (for example ``shmrunner.empty`` larger than the memory available)."""


class ProtocolError(ShmrunnerError):
    """Raised when a peer sends a message that breaks the wire protocol
    (malformed, truncated, oversized, unknown type or wrong version)."""


class ChannelError(ShmrunnerError):
    """Raised when the socket under a channel fails (bind, connect or send)."""


class ChannelClosedError(ChannelError):
    """Raised when a channel is used after its own ``close()`` (closed by you,
    as opposed to broken)."""


class RemoteTaskError(ShmrunnerError):
    """Raised in place of a remote task's exception whose class cannot be rebuilt
    here (not imported in this process, not an ``Exception``, or not
    constructible from its args); carries the remote type name, message and
    traceback."""

    def __init__(self, type_name: str, message: str, traceback: str = "",
                 remote_args: list[Any] | None = None) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.remote_args = remote_args

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.traceback, self.remote_args))


class ConfigError(ShmrunnerError, ValueError):
    """Raised when a setting is missing, of the wrong type or out of range;
    the message names the key and how to fix it."""


class FunctionNotAllowedError(ShmrunnerError):
    """Raised (as the task's outcome) when a peer asks to run a function that
    ``allowed_functions`` does not list; nothing was imported or called."""


class JournalError(ShmrunnerError):
    """Raised when the daemon's journal cannot be read or written: the disk is
    full, the database is locked or corrupt, or a job's spill file is missing
    or truncated. The message names the file and what to do."""


class SchedulerBusyError(ShmrunnerError):
    """Raised by ``Scheduler.try_submit`` when ``max_pending`` tasks already
    wait for a worker (``submit`` would block); the daemon answers such a
    submit with a ``busy`` error and the client submits again later."""


def attach_remote_traceback(exc: BaseException, tb_text: str) -> BaseException:
    """Attach a worker's formatted traceback to ``exc`` as its cause.

    One helper for both tiers, so a task's exception looks the same whether it
    ran in a local process or on a remote host.
    """
    exc.__cause__ = RemoteTraceback(tb_text)
    return exc
