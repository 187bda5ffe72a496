"""The daemon's journal: accepted jobs and their results in SQLite (WAL).

A job is acknowledged to its client only after its row is committed, so a
``kill -9`` of the daemon loses no accepted job: on restart every job not yet
finished is run again (at-least-once). Finished results are kept for
``result_ttl`` seconds so clients can fetch them by id, then expire, which
bounds the file.

Writes are grouped: the daemon's front thread commits every job that arrived
in one poll round in one transaction (one WAL append), which is what keeps the
journal from dominating a stream of tiny jobs. Messages larger than
``SPILL_BYTES`` (array bodies) are written to files in ``JOURNAL.spill/``
before the row that names them is committed: SQLite rewriting megabytes into
its WAL and then checkpointing them costs more than the job. A spill file is
named by a random token the journal draws and stores in the row, never by the
client's job id, and it is fsynced (with its directory) before that commit, so
a row never outlives the file it names. ``synchronous=NORMAL`` in WAL mode
survives a killed process (the contract), not a power cut.

Ownership and trust: the journal is one daemon's. It holds a POSIX lock on
``JOURNAL.lock`` for its life (a second daemon on the same file is refused;
POSIX locks, unlike flock, are not inherited by forked workers, so a worker
still exiting after a ``kill -9`` does not block the restart). The database,
its WAL/SHM files, the lock and spill files are created 0600 and never through
a symlink; directories it creates are 0700. Spill files no row names (a crash
between writing one and committing its row) are deleted when it opens. A
missing or truncated spill file fails that one job (:class:`JournalError`),
never the daemon's start.

Every ``sqlite3`` and ``OSError`` is translated here, at one boundary, into
:class:`JournalError` (or :class:`ConfigError` when opening) with one line
naming the file and what to do.

Only the thread that opened a Journal uses it (sqlite3's default rule).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import sqlite3
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgpack

from ._jobid import job_id_problem
from .errors import ConfigError, JournalError

__all__ = ["Journal", "PENDING", "DONE", "FAILED", "SPILL_BYTES"]

PENDING, DONE, FAILED = "pending", "done", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id       TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    request      BLOB NOT NULL,     -- packed frames, or b"" when spilled to a file
    result       BLOB,
    created      REAL NOT NULL,
    finished     REAL,
    request_file TEXT,              -- the spill file's name (a token), if spilled
    result_file  TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, finished);
"""

SPILL_BYTES = 256 * 1024
_MAX_FRAMES = 1 << 20  # more than any message the daemon accepts has

Frames = list[bytes | memoryview]

# Journals this process holds: POSIX locks do not conflict within one process.
_HELD: set[tuple[int, int]] = set()


def _pack(frames: Sequence[bytes | memoryview]) -> bytes:
    blob: bytes = msgpack.packb([bytes(f) for f in frames], use_bin_type=True)
    return blob


def _unpack(blob: bytes) -> Frames:
    frames = msgpack.unpackb(blob, raw=False)
    if type(frames) is not list or not all(type(f) is bytes for f in frames):
        raise ValueError("not a list of frames")
    return frames


class Journal:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._spill = self.path.with_name(self.path.name + ".spill")
        self._lock_fd = -1
        self._lock_key: tuple[int, int] | None = None
        self._db: sqlite3.Connection | None = None
        # job id -> its spilled request file, for the jobs this run may finish
        self._request_files: dict[str, str] = {}
        try:
            _make_private_dirs(self.path.parent)
            self._lock()
            _create_private(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=2.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
            for suffix in ("-wal", "-shm"):  # a journal made before files were private
                _chmod_private(self.path.with_name(self.path.name + suffix))
            if not os.path.lexists(self._spill):
                os.mkdir(self._spill, 0o700)
            if os.path.islink(self._spill) or not self._spill.is_dir():
                raise ConfigError(f"daemon.journal: {self._spill} is not a directory (a "
                                  "symlink?); remove it, the journal makes its own")
            self.orphans_removed = self._remove_orphans()
        except ConfigError:
            self.close()
            raise
        except (OSError, sqlite3.Error, JournalError) as exc:
            self.close()
            raise ConfigError(f"daemon.journal: {_explain(exc, self.path)}") from None

    def _lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._lock_fd = fd
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
            raise ConfigError(f"daemon.journal: {self.path} is in use by another daemon "
                              f"(pid {holder}); stop that one, or point daemon.journal at "
                              "another file") from None
        _HELD.add(key)
        self._lock_key = key
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _migrate(self) -> None:
        """Journals written before spill files were named by tokens lack two columns."""
        columns = {row[1] for row in self._db_().execute("PRAGMA table_info(jobs)")}
        for column in ("request_file", "result_file"):
            if column not in columns:
                self._db_().execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")

    def _db_(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    def close(self) -> None:
        """Close the database and release the lock. Idempotent."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        if self._lock_key is not None:
            _HELD.discard(self._lock_key)
            self._lock_key = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1

    # --- the daemon's operations (each raises JournalError, never sqlite3.Error) -------

    def add(self, jobs: Sequence[tuple[str, Frames]]) -> list[str]:
        """Journal new jobs (their request frames) in one transaction; return
        the ids that were new (resubmitting a known id is idempotent)."""
        with self._failing("journal new jobs"):
            now = time.time()
            known = self._known([job_id for job_id, _ in jobs])
            rows = []
            written: list[str] = []
            try:
                for job_id, frames in jobs:
                    if job_id not in known:
                        blob, name = self._store(frames)
                        if name is not None:
                            written.append(name)
                        rows.append((job_id, PENDING, blob, now, name))
                        known.add(job_id)
                if written:
                    _fsync_dir(self._spill)
                with self._transaction():
                    self._db_().executemany(
                        "INSERT OR IGNORE INTO jobs (job_id, state, request, created, "
                        "request_file) VALUES (?, ?, ?, ?, ?)", rows)
            except BaseException:
                for name in written:  # no row names them
                    self._unlink(name)
                raise
            for job_id, _, _, _, name in rows:
                if name is not None:
                    self._request_files[job_id] = name
            return [row[0] for row in rows]

    def finish(self, outcomes: Iterable[tuple[str, bool, Frames]]) -> None:
        """Record results (``ok`` and the result message's frames) in one transaction."""
        with self._failing("record results"):
            now = time.time()
            rows = []
            written: list[str] = []
            try:
                for job_id, ok, frames in outcomes:
                    blob, name = self._store(frames)
                    if name is not None:
                        written.append(name)
                    rows.append((DONE if ok else FAILED, blob, name, now, job_id))
                if written:
                    _fsync_dir(self._spill)
                with self._transaction():
                    self._db_().executemany(
                        "UPDATE jobs SET state = ?, result = ?, result_file = ?, finished = ?, "
                        "request = x'', request_file = NULL WHERE job_id = ?", rows)
            except BaseException:
                for name in written:
                    self._unlink(name)
                raise
            for *_, job_id in rows:
                request_file = self._request_files.pop(job_id, None)
                if request_file is not None:
                    self._unlink(request_file)

    def get(self, job_id: str) -> tuple[str, Frames | None] | None:
        """(state, result frames or None) of a job, or None if unknown/expired;
        JournalError if its result cannot be read back."""
        with self._failing(f"read job {job_id}"):
            row = self._db_().execute(
                "SELECT state, result, result_file FROM jobs WHERE job_id = ?",
                (job_id,)).fetchone()
        if row is None:
            return None
        state, blob, name = row
        if blob is None:
            return state, None
        return state, self._load(job_id, "result", blob, _legacy(job_id, "result", name))

    def unfinished(self) -> list[tuple[str, Frames | JournalError]]:
        """Every accepted job without a result, oldest first: to run again. A
        job whose request cannot be read back comes with the error instead."""
        with self._failing("read the unfinished jobs"):
            rows = list(self._db_().execute(
                "SELECT job_id, request, request_file FROM jobs WHERE state = ? "
                "ORDER BY created", (PENDING,)))
        jobs: list[tuple[str, Frames | JournalError]] = []
        for job_id, blob, name in rows:
            name = _legacy(job_id, "request", name) if not blob else name
            if name is not None:
                self._request_files[job_id] = name
            try:
                jobs.append((job_id, self._load(job_id, "request", blob, name)))
            except JournalError as exc:
                jobs.append((job_id, exc))
        return jobs

    def expire(self, ttl: float) -> int:
        """Drop results finished more than ``ttl`` seconds ago; return how many."""
        with self._failing("expire old results"):
            cutoff = time.time() - ttl
            gone = list(self._db_().execute(
                "SELECT job_id, result, result_file FROM jobs WHERE state != ? AND finished < ?",
                (PENDING, cutoff)))
            with self._transaction():
                self._db_().execute("DELETE FROM jobs WHERE state != ? AND finished < ?",
                                    (PENDING, cutoff))
        for job_id, blob, name in gone:
            name = _legacy(job_id, "result", name) if not blob else name
            if name is not None:
                self._unlink(name)
        return len(gone)

    def counts(self) -> dict[str, int]:
        with self._failing("count jobs"):
            return dict(self._db_().execute("SELECT state, count(*) FROM jobs GROUP BY state"))

    # --- files ----------------------------------------------------------------------------

    def _known(self, job_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            found.update(row[0] for row in self._db_().execute(
                f"SELECT job_id FROM jobs WHERE job_id IN ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def _store(self, frames: Frames) -> tuple[bytes, str | None]:
        """(blob for the row, spill file name or None); the file is fsynced."""
        size = sum(len(f) for f in frames)
        if size < SPILL_BYTES:
            return _pack(frames), None
        name = secrets.token_hex(16)
        fd = os.open(self._spill / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(_pack_header(frames))
                for frame in frames:
                    f.write(frame)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._unlink(name)
            raise
        os.close(fd)
        return b"", name

    def _load(self, job_id: str, kind: str, blob: bytes, name: str | None) -> Frames:
        if blob:
            try:
                return _unpack(blob)
            except Exception as exc:  # noqa: BLE001 (whatever msgpack makes of bad bytes)
                raise JournalError(f"the journaled {kind} of job {job_id} in {self.path} is "
                                   f"corrupt ({exc}); submit the job again") from None
        if name is None:
            raise JournalError(f"the journaled {kind} of job {job_id} names no spill file "
                               f"in {self._spill}; submit the job again")
        path = self._spill / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise JournalError(f"the spill file {path} of job {job_id} ({kind}) cannot be "
                               f"read: {exc.strerror}; submit the job again") from None
        frames = _split(data)
        if frames is None:
            raise JournalError(f"the spill file {path} of job {job_id} ({kind}) is truncated "
                               f"or corrupt ({len(data)} bytes); submit the job again")
        return frames

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self._spill / name)
        except OSError:
            pass  # gone already; or left for the orphan sweep at the next start

    def _remove_orphans(self) -> int:
        """Delete spill files no row names (written, then the daemon died before
        the commit): they would otherwise stay forever."""
        named: set[str] = set()
        for job_id, request, request_file, result, result_file in self._db_().execute(
                "SELECT job_id, request, request_file, result, result_file FROM jobs"):
            for blob, name, kind in ((request, request_file, "request"),
                                     (result, result_file, "result")):
                name = name if name is not None or blob != b"" else _legacy(job_id, kind, None)
                if name is not None:
                    named.add(name)
        removed = 0
        for entry in os.scandir(self._spill):
            if entry.name not in named and not entry.is_dir(follow_symlinks=False):
                self._unlink(entry.name)
                removed += 1
        return removed

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        db = self._db_()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """Translate what SQLite and the file system raise into one JournalError."""
        try:
            yield
        except JournalError:
            raise
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot {what}: {_explain(exc, self.path)}") from None


def _legacy(job_id: str, kind: str, name: str | None) -> str | None:
    """A spilled row from before token names: its file was named by its job id,
    which is safe to use only if it is a valid id (never a path)."""
    if name is not None:
        return name
    return f"{job_id}.{kind}" if job_id_problem(job_id) is None else None


def _pack_header(frames: Frames) -> bytes:
    return struct.pack(f"<I{len(frames)}Q", len(frames), *(len(f) for f in frames))


def _split(data: bytes) -> Frames | None:
    """The frames of a spill file, or None if it is truncated or corrupt."""
    if len(data) < 4:
        return None
    (count,) = struct.unpack_from("<I", data)
    offset = 4 + 8 * count
    if count > _MAX_FRAMES or offset > len(data):
        return None
    sizes = struct.unpack_from(f"<{count}Q", data, 4)
    if offset + sum(sizes) != len(data):
        return None
    view = memoryview(data)
    frames: Frames = []
    for size in sizes:
        frames.append(view[offset:offset + size])
        offset += size
    return frames


def _explain(exc: BaseException, path: Path) -> str:
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


def _make_private_dirs(directory: Path) -> None:
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


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (its WAL and SHM files
    copy its mode); an existing file of ours is made 0600; never via a symlink."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _chmod_private(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and not os.path.islink(path):
        os.chmod(path, 0o600)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

