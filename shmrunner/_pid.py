"""This process's id, read without a system call.

``os.getpid()`` is a system call on every read (glibc stopped caching it);
the Scheduler and the engine compare it with their creator's on every
submit, so that a fork() child cannot use its parent's workers. The id here
is taken once at import and renewed in every fork() child (``os.fork``,
multiprocessing's fork and forkserver), the only way a process's id changes
under running Python code.
"""

from __future__ import annotations

import os

__all__ = ["current"]

_pid = os.getpid()


def _renew_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_in_child)


def current() -> int:
    """This process's id."""
    return _pid
