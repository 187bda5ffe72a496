"""A wake-up pipe: how other threads interrupt a thread blocked in a poller.

ZeroMQ sockets belong to one thread; the others hand it work through a deque
and call :meth:`Wakeup.wake`, which makes the pipe readable in that thread's
``zmq.Poller``. Writes are non-blocking: a full pipe already means "awake".
"""

from __future__ import annotations

import os

__all__ = ["Wakeup"]


class Wakeup:
    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        """Safe from any thread and from a signal handler."""
        try:
            os.write(self._write_fd, b"\0")
        except OSError:
            pass  # already pending (pipe full), or closed

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
