"""The daemon's journal: accepted jobs and their results in SQLite (WAL).

A job is acknowledged to its client only after its row is committed, so a
``kill -9`` of the daemon loses no accepted job: on restart every job not yet
finished is run again (at-least-once). Finished results are kept for
``result_ttl`` seconds so clients can fetch them by id, then expire, which
bounds the file.

Writes are grouped: the daemon's front thread commits every job that arrived
in one poll round in one transaction (one WAL append), which is what keeps the
journal from dominating a stream of tiny jobs. Messages larger than
``SPILL_BYTES`` (array bodies) are written to files beside the database before
the row that names them is committed: SQLite rewriting megabytes into its WAL
and then checkpointing them costs more than the job. ``synchronous=NORMAL`` in
WAL mode, and plain file writes, survive a killed process (the contract, since
the kernel keeps what was written), not a power cut.

Only the thread that opened a Journal uses it (sqlite3's default rule).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgpack

from .errors import ConfigError

__all__ = ["Journal", "PENDING", "DONE", "FAILED", "SPILL_BYTES"]

PENDING, DONE, FAILED = "pending", "done", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id   TEXT PRIMARY KEY,
    state    TEXT NOT NULL,
    request  BLOB NOT NULL,     -- packed frames, or b"" when spilled to a file
    result   BLOB,
    created  REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, finished);
"""


SPILL_BYTES = 256 * 1024

Frames = list[bytes | memoryview]


def _pack(frames: Sequence[bytes | memoryview]) -> bytes:
    blob: bytes = msgpack.packb([bytes(f) for f in frames], use_bin_type=True)
    return blob


def _unpack(blob: bytes) -> Frames:
    return list(msgpack.unpackb(blob, raw=False))


class Journal:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._spill = self.path.with_name(self.path.name + ".spill")
            self._spilled: set[str] = set()  # "job_id.kind" written this run
            self._spill.mkdir(exist_ok=True)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"daemon.journal: cannot open {self.path}: {exc}; "
                              "point it at a writable file") from None

    def close(self) -> None:
        self._db.close()

    def add(self, jobs: Sequence[tuple[str, Frames]]) -> list[str]:
        """Journal new jobs (their request frames) in one transaction; return
        the ids that were new (resubmitting a known id is idempotent)."""
        now = time.time()
        known = self._known([job_id for job_id, _ in jobs])
        rows = []
        for job_id, frames in jobs:
            if job_id not in known:
                rows.append((job_id, PENDING, self._store(job_id, "request", frames), now))
                known.add(job_id)
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO jobs (job_id, state, request, created) "
                "VALUES (?, ?, ?, ?)", rows)
        return [row[0] for row in rows]

    def finish(self, outcomes: Iterable[tuple[str, bool, Frames]]) -> None:
        """Record results (``ok`` and the result message's frames) in one transaction."""
        now = time.time()
        rows = [(DONE if ok else FAILED, self._store(job_id, "result", frames), now, job_id)
                for job_id, ok, frames in outcomes]
        with self._transaction():
            self._db.executemany(
                "UPDATE jobs SET state = ?, result = ?, finished = ?, request = x'' "
                "WHERE job_id = ?", rows)
        for _, _, _, job_id in rows:
            self._unlink(job_id, "request")

    def get(self, job_id: str) -> tuple[str, Frames | None] | None:
        """(state, result frames or None) of a job, or None if unknown/expired."""
        row = self._db.execute("SELECT state, result FROM jobs WHERE job_id = ?",
                               (job_id,)).fetchone()
        if row is None:
            return None
        state, blob = row
        return state, (None if blob is None else self._load(job_id, "result", blob))

    def unfinished(self) -> list[tuple[str, Frames]]:
        """Every accepted job without a result, oldest first: to run again."""
        rows = list(self._db.execute(
            "SELECT job_id, request FROM jobs WHERE state = ? ORDER BY created", (PENDING,)))
        self._spilled.update(f"{job_id}.request" for job_id, blob in rows if not blob)
        return [(job_id, self._load(job_id, "request", blob)) for job_id, blob in rows]

    def expire(self, ttl: float) -> int:
        """Drop results finished more than ``ttl`` seconds ago; return how many."""
        cutoff = time.time() - ttl
        gone = [job_id for (job_id,) in self._db.execute(
            "SELECT job_id FROM jobs WHERE state != ? AND finished < ?", (PENDING, cutoff))]
        with self._transaction():
            self._db.execute("DELETE FROM jobs WHERE state != ? AND finished < ?",
                             (PENDING, cutoff))
        for job_id in gone:
            self._unlink(job_id, "result")
        return len(gone)

    def _known(self, job_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            found.update(row[0] for row in self._db.execute(
                f"SELECT job_id FROM jobs WHERE job_id IN ({','.join('?' * len(chunk))})",
                chunk))
        return found

    def _store(self, job_id: str, kind: str, frames: Frames) -> bytes:
        size = sum(len(f) for f in frames)
        if size < SPILL_BYTES:
            return _pack(frames)
        path = self._spill / f"{job_id}.{kind}"
        self._spilled.add(path.name)
        with open(path, "wb") as f:  # before the commit that names it
            f.write(_pack_header(frames))
            for frame in frames:
                f.write(frame)
        return b""

    def _load(self, job_id: str, kind: str, blob: bytes) -> Frames:
        if blob:
            return _unpack(blob)
        data = (self._spill / f"{job_id}.{kind}").read_bytes()
        view = memoryview(data)
        (count,) = struct.unpack_from("<I", view)
        sizes = struct.unpack_from(f"<{count}Q", view, 4)
        offset = 4 + 8 * count
        frames: Frames = []
        for size in sizes:
            frames.append(view[offset:offset + size])
            offset += size
        return frames

    def _unlink(self, job_id: str, kind: str) -> None:
        name = f"{job_id}.{kind}"
        if name not in self._spilled and kind == "request":
            return  # never spilled: no file (the common, small case)
        self._spilled.discard(name)
        try:
            os.unlink(self._spill / name)
        except FileNotFoundError:
            pass

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state"))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


def _pack_header(frames: Frames) -> bytes:
    return struct.pack(f"<I{len(frames)}Q", len(frames), *(len(f) for f in frames))


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
