"""What went wrong with the journal, in one line a user can act on.

The journal translates every ``sqlite3.Error`` and ``OSError`` at one boundary
(opening, and each of its operations) into :class:`JournalError` or
:class:`ConfigError`; :func:`explain` writes the line: which file, what
happened (not a database, locked, disk full, a symlink, no permission) and
what to do.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from .errors import JournalError

__all__ = ["explain"]


def explain(exc: BaseException, path: Path) -> str:
    """One line saying what went wrong with the journal at ``path`` and what to do."""
    if isinstance(exc, JournalError):
        return str(exc)
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return (f"{path} is not a readable SQLite journal ({exc}); move it (and its "
                    "-wal, -shm files) aside, or point daemon.journal at another file")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return (f"{path} is locked by another process ({exc}); stop whatever holds it "
                    "open, or point daemon.journal at another file")
        if name.startswith("SQLITE_FULL"):
            return f"the disk holding {path} is full; free some space on it"
        return f"{path}: {exc} ({name or 'sqlite3 error'})"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return (f"the disk holding {path} is full (or a file size limit was reached): "
                    f"{exc.strerror}; free some space on it")
        if exc.errno == errno.ELOOP:
            return (f"{exc.filename or path} is a symlink; the journal does not follow "
                    "symlinks: point daemon.journal at the real file")
        where = exc.filename or path
        return (f"{where}: {exc.strerror or exc}; point daemon.journal at a file in a "
                "directory you can write")
    return str(exc)
