"""The daemon's journal: accepted jobs and their results in SQLite (WAL).

A job is acknowledged to its client only after its row is committed, so a
``kill -9`` of the daemon loses no accepted job: on restart every job not yet
finished is run again (at-least-once). Finished results are kept for
``result_ttl`` seconds so clients can fetch them by id, then expire, which
bounds the file.

Writes are grouped: the daemon's front thread commits every job that arrived
in one poll round in one transaction (one WAL append), which is what keeps the
journal from dominating a stream of tiny jobs. ``synchronous=NORMAL`` in WAL
mode survives a killed process (the contract), not a power cut.

Only the thread that opened a Journal uses it (sqlite3's default rule).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgpack

from .errors import ConfigError

__all__ = ["Journal", "PENDING", "DONE", "FAILED"]

PENDING, DONE, FAILED = "pending", "done", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id   TEXT PRIMARY KEY,
    state    TEXT NOT NULL,
    request  BLOB NOT NULL,
    result   BLOB,
    created  REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, finished);
"""


def pack_frames(frames: Sequence[bytes | memoryview]) -> bytes:
    blob: bytes = msgpack.packb([bytes(f) for f in frames], use_bin_type=True)
    return blob


def unpack_frames(blob: bytes) -> list[bytes]:
    frames = msgpack.unpackb(blob, raw=False)
    return list(frames)


class Journal:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"daemon.journal: cannot open {self.path}: {exc}; "
                              "point it at a writable file") from None

    def close(self) -> None:
        self._db.close()

    def add(self, jobs: Iterable[tuple[str, bytes]]) -> list[str]:
        """Journal new jobs in one transaction; return the ids that were new
        (a job id seen before is not added twice: resubmitting is idempotent)."""
        now = time.time()
        new = []
        with self._transaction():
            for job_id, request in jobs:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO jobs (job_id, state, request, created) "
                    "VALUES (?, ?, ?, ?)", (job_id, PENDING, request, now))
                if cur.rowcount:
                    new.append(job_id)
        return new

    def finish(self, outcomes: Iterable[tuple[str, bool, bytes]]) -> None:
        """Record results (``ok`` and the packed result message) in one transaction."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "UPDATE jobs SET state = ?, result = ?, finished = ?, request = x'' "
                "WHERE job_id = ?",
                [(DONE if ok else FAILED, result, now, job_id)
                 for job_id, ok, result in outcomes])

    def get(self, job_id: str) -> tuple[str, bytes | None] | None:
        """(state, packed result or None) of a job, or None if unknown/expired."""
        row = self._db.execute("SELECT state, result FROM jobs WHERE job_id = ?",
                               (job_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def unfinished(self) -> list[tuple[str, bytes]]:
        """Every accepted job without a result, oldest first: to run again."""
        return list(self._db.execute(
            "SELECT job_id, request FROM jobs WHERE state = ? ORDER BY created", (PENDING,)))

    def expire(self, ttl: float) -> int:
        """Drop results finished more than ``ttl`` seconds ago; return how many."""
        with self._transaction():
            cur = self._db.execute(
                "DELETE FROM jobs WHERE state != ? AND finished < ?", (PENDING, time.time() - ttl))
        return cur.rowcount

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state"))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
