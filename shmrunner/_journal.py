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

Where it lives: this module is the SQLite store (schema, migration,
transactions, the daemon's operations); ``_spill.py`` the spill files (and
inline blobs); ``_journalfiles.py`` the lock and private file modes;
``_journalerrors.py`` the one-line explanations.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._journalerrors import explain
from ._journalfiles import JournalLock, chmod_private, create_private, make_private_dirs
from ._spill import SPILL_BYTES, Frames, SpillFiles, legacy_name
from .errors import ConfigError, JournalError

__all__ = ["Journal", "PENDING", "DONE", "FAILED", "CANCELLED", "SPILL_BYTES"]

PENDING, DONE, FAILED, CANCELLED = "pending", "done", "failed", "cancelled"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id       TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    request      BLOB NOT NULL,     -- packed frames, or b"" when spilled to a file
    result       BLOB,
    created      REAL NOT NULL,
    finished     REAL,
    request_file TEXT,              -- the spill file's name (a token), if spilled
    result_file  TEXT,
    attempts     INTEGER,           -- attempts started, once finished (NULL: not recorded)
    worker       TEXT               -- 'name@host' of the last attempt's worker, once finished
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, finished);
"""


_ROW = "job_id, state, created, finished, attempts, worker"

# Writes of many jobs at once (Journal._many): at most _ROWS rows a statement,
# 700 parameters, under SQLite's oldest limit (999).
_ROWS = 100
_INSERT = ("INSERT OR IGNORE INTO jobs (job_id, state, request, created, request_file) VALUES",
           "(?, ?, ?, ?, ?)", "")
# A finish is an upsert (SQLite >= 3.24): one statement for many rows, where an
# UPDATE takes one per row. Its insert never happens: a job is finished only
# after its add was committed, and only finished rows expire.
_FINISH = ("INSERT INTO jobs (job_id, state, result, result_file, finished, attempts, worker, "
           "request, created) VALUES", "(?, ?, ?, ?, ?, ?, ?, x'', 0)",
           "ON CONFLICT (job_id) DO UPDATE SET state = excluded.state, result = excluded.result, "
           "result_file = excluded.result_file, finished = excluded.finished, "
           "attempts = excluded.attempts, worker = excluded.worker, request = x'', "
           "request_file = NULL")
_SQLITE_NEEDED = (3, 24, 0)


def _row(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(("job_id", "state", "created", "finished", "attempts", "worker"), row,
                    strict=True))


class Journal:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._spill = SpillFiles(self.path)
        self._lock: JournalLock | None = None
        self._db: sqlite3.Connection | None = None
        # job id -> its spilled request file, for the jobs this run may finish
        self._request_files: dict[str, str] = {}
        try:
            if sqlite3.sqlite_version_info < _SQLITE_NEEDED:
                raise ConfigError(
                    f"daemon.journal: SQLite {'.'.join(map(str, _SQLITE_NEEDED))} or newer is "
                    f"needed, this Python has {sqlite3.sqlite_version}; use a Python built "
                    "with a newer SQLite")
            make_private_dirs(self.path.parent)
            self._lock = JournalLock(self.path)
            create_private(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=2.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
            for suffix in ("-wal", "-shm"):  # a journal made before files were private
                chmod_private(self.path.with_name(self.path.name + suffix))
            self._spill.create()
            self.orphans_removed = self._remove_orphans()
        except ConfigError:
            self.close()
            raise
        except (OSError, sqlite3.Error, JournalError) as exc:
            self.close()
            raise ConfigError(f"daemon.journal: {explain(exc, self.path)}") from None

    def _migrate(self) -> None:
        """Journals written before spill files were named by tokens lack two
        columns; before job control recorded runs, two more."""
        columns = {row[1] for row in self._db_().execute("PRAGMA table_info(jobs)")}
        for column, kind in (("request_file", "TEXT"), ("result_file", "TEXT"),
                             ("attempts", "INTEGER"), ("worker", "TEXT")):
            if column not in columns:
                self._db_().execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

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
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
                        blob, name = self._spill.store(frames)
                        if name is not None:
                            written.append(name)
                        rows.append((job_id, PENDING, blob, now, name))
                        known.add(job_id)
                if written:
                    self._spill.sync()
                with self._transaction():
                    self._many(_INSERT, rows)
            except BaseException:
                for name in written:  # no row names them
                    self._spill.unlink(name)
                raise
            for job_id, _, _, _, name in rows:
                if name is not None:
                    self._request_files[job_id] = name
            return [row[0] for row in rows]

    def finish(self, outcomes: Iterable[tuple[str, bool, Frames]],
               cancelled: Collection[str] = (),
               runs: Mapping[str, tuple[int, str | None]] | None = None) -> None:
        """Record results (``ok`` and the result message's frames) in one
        transaction; the jobs in ``cancelled`` are recorded as cancelled (never
        run again after a restart); ``runs``: job id -> (attempts, worker)."""
        runs = runs or {}
        with self._failing("record results"):
            now = time.time()
            rows = []
            written: list[str] = []
            try:
                for job_id, ok, frames in outcomes:
                    blob, name = self._spill.store(frames)
                    if name is not None:
                        written.append(name)
                    state = CANCELLED if job_id in cancelled else DONE if ok else FAILED
                    attempts, worker = runs.get(job_id, (None, None))
                    rows.append((job_id, state, blob, name, now, attempts, worker))
                if written:
                    self._spill.sync()
                with self._transaction():
                    self._many(_FINISH, rows)
            except BaseException:
                for name in written:
                    self._spill.unlink(name)
                raise
            for job_id, *_ in rows:
                request_file = self._request_files.pop(job_id, None)
                if request_file is not None:
                    self._spill.unlink(request_file)

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
        return state, self._spill.load(job_id, "result", blob, legacy_name(job_id, "result", name))

    def unfinished(self) -> list[tuple[str, Frames | JournalError]]:
        """Every accepted job without a result, oldest first: to run again. A
        job whose request cannot be read back comes with the error instead."""
        with self._failing("read the unfinished jobs"):
            rows = list(self._db_().execute(
                "SELECT job_id, request, request_file FROM jobs WHERE state = ? "
                "ORDER BY created", (PENDING,)))
        jobs: list[tuple[str, Frames | JournalError]] = []
        for job_id, blob, name in rows:
            name = legacy_name(job_id, "request", name) if not blob else name
            if name is not None:
                self._request_files[job_id] = name
            try:
                jobs.append((job_id, self._spill.load(job_id, "request", blob, name)))
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
            name = legacy_name(job_id, "result", name) if not blob else name
            if name is not None:
                self._spill.unlink(name)
        return len(gone)

    def states(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """job id -> {job_id, state, created, finished, attempts, worker} of the
        journaled ones among ``job_ids`` (finished, attempts and worker None
        until it finished)."""
        found: dict[str, dict[str, Any]] = {}
        with self._failing("read job states"):
            for start in range(0, len(job_ids), 500):
                chunk = list(job_ids[start:start + 500])
                for row in self._db_().execute(
                        f"SELECT {_ROW} FROM jobs WHERE job_id IN "
                        f"({','.join('?' * len(chunk))})", chunk):
                    found[row[0]] = _row(row)
        return found

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recently accepted jobs, newest first (as :meth:`states`)."""
        with self._failing("list recent jobs"):
            return [_row(r) for r in self._db_().execute(
                f"SELECT {_ROW} FROM jobs ORDER BY created DESC LIMIT ?", (limit,))]

    def counts(self) -> dict[str, int]:
        with self._failing("count jobs"):
            return dict(self._db_().execute("SELECT state, count(*) FROM jobs GROUP BY state"))

    # --- helpers --------------------------------------------------------------------------

    def _many(self, statement: tuple[str, str, str], rows: Sequence[tuple[Any, ...]]) -> None:
        """``statement`` (head, one row's values, tail) for ``rows``, _ROWS rows a
        statement.

        One statement of many rows costs a fifth less CPU than executemany's one
        per row, and sqlite3 lets the interpreter lock go once a statement, not
        once a row (each time, the hub thread may take it and the front thread
        waits for its turn)."""
        db = self._db_()
        head, row, tail = statement
        for start in range(0, len(rows), _ROWS):
            chunk = rows[start:start + _ROWS]
            db.execute(f"{head} {','.join([row] * len(chunk))} {tail}",
                       [value for r in chunk for value in r])

    def _known(self, job_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            found.update(row[0] for row in self._db_().execute(
                f"SELECT job_id FROM jobs WHERE job_id IN ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def _remove_orphans(self) -> int:
        """Delete spill files no row names (written, then the daemon died before
        the commit): they would otherwise stay forever."""
        named: set[str] = set()
        for job_id, request, request_file, result, result_file in self._db_().execute(
                "SELECT job_id, request, request_file, result, result_file FROM jobs"):
            for blob, name, kind in ((request, request_file, "request"),
                                     (result, result_file, "result")):
                name = name if name is not None or blob != b"" else legacy_name(job_id, kind, None)
                if name is not None:
                    named.add(name)
        return self._spill.sweep(named)

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
            raise JournalError(f"cannot {what}: {explain(exc, self.path)}") from None
