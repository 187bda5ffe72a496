"""A worker process's end as a file descriptor to wait on.

``multiprocessing``'s sentinel is a pipe whose write end the child holds, so
it reads EOF once every copy of that end is closed. A process the worker
forks without exec (a library's background helper, a task's own
``os.fork()``) inherits the end and keeps the sentinel silent after the
worker dies, for as long as it lives; the worker's channel socket stays open
the same way. A pidfd (Linux 5.3, Python 3.9) becomes readable when the
process itself exits, whoever else holds its fds, so it is preferred; the
sentinel remains where the kernel has no pidfds.
"""

from __future__ import annotations

import os
from multiprocessing.process import BaseProcess

__all__ = ["EndWatch"]


class EndWatch:
    """The fd that is readable once ``process`` (started) has ended: its pidfd,
    else its sentinel. :meth:`close` releases the pidfd (the sentinel is the
    process object's own)."""

    __slots__ = ("fd", "_owned")

    def __init__(self, process: BaseProcess) -> None:
        pid = process.pid
        fd: int | None = None
        if pid is not None and hasattr(os, "pidfd_open"):
            try:
                # Still ours to reap, so the pid cannot have been reused yet.
                fd = os.pidfd_open(pid)
            except OSError:  # ENOSYS (kernel < 5.3), EPERM under some seccomp filters
                fd = None
        self._owned = fd is not None
        self.fd: int = fd if fd is not None else process.sentinel

    @property
    def pidfd(self) -> int | None:
        """The pidfd, if this watch opened one (a child forked later closes it)."""
        return self.fd if self._owned else None

    def close(self) -> None:
        if self._owned:
            self._owned = False
            os.close(self.fd)
