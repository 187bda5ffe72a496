"""Where a journaled message's bytes go: inline in its row, or a spill file.

A message (its frames) smaller than ``SPILL_BYTES`` is packed with msgpack
into the row's blob. A larger one (array bodies) is written to a file in
``JOURNAL.spill/`` and the row stores ``b""`` plus the file's name: SQLite
rewriting megabytes into its WAL and then checkpointing them costs more than
the job.

Data flow: :meth:`SpillFiles.store` hands the journal (blob, name or None);
the file is written and fsynced first, the journal fsyncs the directory
(:meth:`SpillFiles.sync`) and only then commits the row, so a row never
outlives the file it names. :meth:`SpillFiles.load` reads a message back and
fails that one job (:class:`JournalError`) if its file is missing, truncated
or corrupt. :meth:`SpillFiles.sweep` deletes the files no row names (the
daemon died between writing one and committing its row).

Naming: a spill file is named by a random token the journal draws and stores
in the row, never by the client's job id; rows from before tokens are read by
their old ``JOB_ID.KIND`` name only when the id is valid (:func:`legacy_name`).
Files are created 0600, exclusively, never through a symlink.

A spill file holds a header (the frame count, then each frame's size, all
little-endian) followed by the frames' bytes.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path

import msgpack

from ._jobid import job_id_problem
from .errors import ConfigError, JournalError

__all__ = ["Frames", "SPILL_BYTES", "SpillFiles", "legacy_name"]

SPILL_BYTES = 256 * 1024
_MAX_FRAMES = 1 << 20  # more than any message the daemon accepts has

Frames = list[bytes | memoryview]


class SpillFiles:
    """The spill directory of the journal at ``journal`` (``JOURNAL.spill``)."""

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.path = journal.with_name(journal.name + ".spill")

    def create(self) -> None:
        """Make the directory (0700) unless it exists; refuse a symlink."""
        if not os.path.lexists(self.path):
            os.mkdir(self.path, 0o700)
        if os.path.islink(self.path) or not self.path.is_dir():
            raise ConfigError(f"daemon.journal: {self.path} is not a directory (a "
                              "symlink?); remove it, the journal makes its own")

    def store(self, frames: Frames) -> tuple[bytes, str | None]:
        """(blob for the row, spill file name or None); the file is fsynced."""
        size = sum(_nbytes(f) for f in frames)
        if size < SPILL_BYTES:
            return _pack(frames), None
        name = secrets.token_hex(16)
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(_pack_header(frames))
                for frame in frames:
                    f.write(frame)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(name)
            raise
        os.close(fd)
        return b"", name

    def load(self, job_id: str, kind: str, blob: bytes, name: str | None) -> Frames:
        """The frames a row stores (``blob``) or names (``name``), or JournalError."""
        if blob:
            try:
                return _unpack(blob)
            except Exception as exc:  # noqa: BLE001 (whatever msgpack makes of bad bytes)
                raise JournalError(f"the journaled {kind} of job {job_id} in {self.journal} "
                                   f"is corrupt ({exc}); submit the job again") from None
        if name is None:
            raise JournalError(f"the journaled {kind} of job {job_id} names no spill file "
                               f"in {self.path}; submit the job again")
        path = self.path / name
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

    def unlink(self, name: str) -> None:
        try:
            os.unlink(self.path / name)
        except OSError:
            pass  # gone already; or left for the orphan sweep at the next start

    def sync(self) -> None:
        """fsync the directory: the files just written are then named on disk."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sweep(self, named: set[str]) -> int:
        """Delete the spill files not in ``named`` (no row names them: they would
        otherwise stay forever); return how many."""
        removed = 0
        for entry in os.scandir(self.path):
            if entry.name not in named and not entry.is_dir(follow_symlinks=False):
                self.unlink(entry.name)
                removed += 1
        return removed


def legacy_name(job_id: str, kind: str, name: str | None) -> str | None:
    """A spilled row from before token names: its file was named by its job id,
    which is safe to use only if it is a valid id (never a path)."""
    if name is not None:
        return name
    return f"{job_id}.{kind}" if job_id_problem(job_id) is None else None


def _pack(frames: Sequence[bytes | memoryview]) -> bytes:
    blob: bytes = msgpack.packb([bytes(f) for f in frames], use_bin_type=True)
    return blob


def _unpack(blob: bytes) -> Frames:
    frames = msgpack.unpackb(blob, raw=False)
    if type(frames) is not list or not all(type(f) is bytes for f in frames):
        raise ValueError("not a list of frames")
    return frames


def _pack_header(frames: Frames) -> bytes:
    return struct.pack(f"<I{len(frames)}Q", len(frames), *(_nbytes(f) for f in frames))


def _nbytes(frame: bytes | memoryview) -> int:
    # len() of a memoryview counts items of its first dimension, not bytes.
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


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
