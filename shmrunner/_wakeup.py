"""A wake-up pipe: how other threads interrupt a thread blocked in a poller.

ZeroMQ sockets belong to one thread; the others hand it work through a deque
and call :meth:`Wakeup.wake`, which makes the pipe readable in that thread's
``zmq.Poller`` (or the process engine's ``selectors`` loop). Writes are
non-blocking: a full pipe already means "awake".
"""

from __future__ import annotations

import os

__all__ = ["Wakeup"]


class Wakeup:
    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        """Safe from any thread and from a signal handler; a no-op once closed
        (the fd number may belong to another file by then)."""
        fd = self._write_fd
        if fd < 0:
            return
        try:
            os.write(fd, b"\0")
        except OSError:
            pass  # already pending (pipe full), or closed

    def fds(self) -> tuple[int, int]:
        """Both ends: a fork() child that must not keep them closes them."""
        return self.fd, self._write_fd

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        fds = (self.fd, self._write_fd)
        self.fd = self._write_fd = -1
        for fd in fds:
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
