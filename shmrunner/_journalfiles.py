"""Who may touch the journal's files: one daemon's lock, private modes.

The journal is one daemon's. :class:`JournalLock` holds a POSIX lock on
``JOURNAL.lock`` for the journal's life and writes the holder's pid into it,
so a second daemon on the same file is refused with a line naming that pid.
POSIX locks, unlike flock, are not inherited by forked workers, so a worker
still exiting after a ``kill -9`` does not block the restart; but they do not
conflict within one process either, so the locks this process holds are also
kept in ``_HELD`` (keyed by device and inode) and checked first.

The database, its WAL/SHM files and the lock are created 0600 and never
through a symlink; directories the journal creates are 0700
(:func:`make_private_dirs`, :func:`create_private`, :func:`chmod_private`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["JournalLock", "chmod_private", "create_private", "make_private_dirs"]

# Journals this process holds: POSIX locks do not conflict within one process.
_HELD: set[tuple[int, int]] = set()


class JournalLock:
    """The lock on the journal at ``journal``, taken on construction (ConfigError
    if another daemon holds it, OSError if the lock file cannot be made)."""

    def __init__(self, journal: Path) -> None:
        self._fd = -1
        self._key: tuple[int, int] | None = None
        lock_path = journal.with_name(journal.name + ".lock")
        self._fd = os.open(lock_path,
                           os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            self._acquire(journal)
        except BaseException:
            self.release()
            raise

    def _acquire(self, journal: Path) -> None:
        fd = self._fd
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        try:
            if key in _HELD:
                raise BlockingIOError(errno.EAGAIN, "held by this process")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"daemon.journal: {journal} is in use by another daemon "
                              f"(pid {holder}); stop that one, or point daemon.journal at "
                              "another file") from None
        _HELD.add(key)
        self._key = key
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Release the lock. Idempotent."""
        if self._key is not None:
            _HELD.discard(self._key)
            self._key = None
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents, each 0700 (existing ones untouched)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (its WAL and SHM files
    copy its mode); an existing file of ours is made 0600; never via a symlink."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def chmod_private(path: Path) -> None:
    """Make an existing file of ours 0600 (a journal made before files were private)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and not os.path.islink(path):
        os.chmod(path, 0o600)
