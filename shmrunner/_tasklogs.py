"""Task logs: what a task logs and prints in its worker process, re-emitted in
the caller's process as ``logging`` records on the logger ``shmrunner.task``.

Data flow::

    worker process (worker/loop.py)               caller process
    task: logging.x(...) -> root handler --+
    task: print(...)     -> sys.stdout ----+-> Capture: one bounded buffer per task
          (sys.stderr)   -> sys.stderr ----+   (past ``limit`` characters: dropped,
                                               counted, one "[... N characters
                                               truncated]" record at the end)
    after the task: records? --LOGS message, just before the result-->
    (a task running past FLUSH_EVERY: also LOGS messages while it runs, at
     most one a second: in a local worker from a flusher thread, so what a
     task printed once before computing quietly shows within a second; in a
     slot process from the task's thread when it logs again)
        engine's manager thread (_manager.py) -> the engine's ``on_logs``:
            Pool, Scheduler local tier -> emit() on "shmrunner.task"
            remote agent -> the result message's "logs" field, or, early, a
                "logs" message -> the hub checks it (checked(): types and
                sizes) -> emit() at the Scheduler
    a slot process (worker/_slots.py): the same, its Capture's sender sending
        the "logs" message itself
            Scheduler -> also its daemon's per-job store (_joblogs.py)

Why this shape: a task that logs nothing costs its worker about 0.1 us (a
clock read and one test; no message, no field); the bound is applied where the
text is produced, so a task that prints gigabytes costs the worker at most
``limit`` characters and sends no more, and the caller never holds more than
one bounded buffer per task.

A record is ``(created, levelno, name, message)``: ``name`` is the task's
logger name, or "stdout"/"stderr" for printed text (one record per line,
level INFO and WARNING). Re-emitted records keep the worker's time and carry
``worker``, ``host``, ``task_id``, ``pid`` and ``source`` (that name) as
attributes. When nothing handles ``shmrunner.task`` (logging not configured at
all), they are written to the caller's own stdout (printed text) and stderr
(stderr text, records from WARNING up) instead, prefixed with the worker, as
Ray's ``log_to_driver`` does, so ``print`` in a task still shows on the terminal.
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError

__all__ = ["Capture", "Record", "level_of", "valid_setting", "engine_setting", "emit",
           "checked", "wire_ok", "local_worker", "HOST", "LOGGER", "DEFAULT_LIMIT", "MAX_LIMIT",
           "MAX_WIRE_CHARS", "MAX_WIRE_RECORDS", "FLUSH_EVERY"]

LOGGER = "shmrunner.task"
DEFAULT_LIMIT = 64 * 1024  # characters of one task's log kept (the rest counted, dropped)
# Bounds on a log that arrives from the network (a remote agent's "logs" field):
# whatever its agent's limit, a scheduler accepts no more than this per result.
# The settings' task_log_bytes is at most MAX_LIMIT, so an honest agent always fits.
MAX_LIMIT = 1 << 20
_RECORD_COST = 32  # characters a record counts for beyond its text (so empty ones are bounded)
FLUSH_EVERY = 1.0  # seconds: how often a long task's records go out before its result
MAX_WIRE_CHARS = MAX_LIMIT + 256  # the truncation marker comes on top of the limit
MAX_WIRE_RECORDS = MAX_LIMIT // _RECORD_COST + 1
_MAX_NAME = 200  # characters of a logger name kept
_MIN_NAP = 0.05  # seconds: the flusher's shortest sleep

Record = tuple[float, int, str, str]  # (created, levelno, logger name or stdout/stderr, message)

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
LEVEL_NAMES = "one of DEBUG, INFO, WARNING, ERROR, CRITICAL, or off"


def level_of(value: Any, key: str = "task_logs") -> int | None:
    """The level a ``task_logs`` setting names, or None for off (``"off"``,
    False (YAML's ``off``), None). Raises ConfigError naming ``key``."""
    if value is None or value is False or (isinstance(value, str) and value.lower() == "off"):
        return None
    if isinstance(value, str) and value.upper() in _LEVELS:
        return _LEVELS[value.upper()]
    raise ConfigError(f"{key}: expected {LEVEL_NAMES}, got {value!r}")


def valid_setting(value: Any) -> bool:
    try:
        level_of(value)
    except ConfigError:
        return False
    return True


# --- the worker side ---------------------------------------------------------------------

_captures: weakref.WeakSet[Capture] = weakref.WeakSet()


def _forked_all() -> None:
    for capture in list(_captures):
        capture._forked()


os.register_at_fork(after_in_child=_forked_all)


class Capture:
    """One task's bounded log, fed by a root-logger handler and by replacements
    of sys.stdout/sys.stderr (for those whose level passes ``level``).

    Lives for the worker process; :meth:`take` hands over what the last task
    produced and starts afresh. Thread-safe: a task's threads may log too.
    """

    def __init__(self, level: int, limit: int = DEFAULT_LIMIT) -> None:
        self.level = level
        self.limit = max(int(limit), 1)
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._used = 0
        self._dropped = 0
        self._streams: list[_Stream] = []
        self._handler: logging.Handler | None = None
        self.partial = False  # a stream holds the start of a line (take() ends it)
        # Early flushes of a long task's records: sender(task id, records), called
        # from the worker's main thread when a task logs, or from the flusher
        # thread (start_flusher) holding the worker's send lock.
        self.sender: Callable[[int, list[Record]], None] | None = None
        self._main = threading.get_ident()
        self._task_id = 0
        self._running = False  # between begin() and take()
        self._begun = 0  # tasks begun (the flusher tells an idle worker by it)
        self._next_flush = math.inf
        self._sending = False
        self._send_lock: threading.Lock | None = None
        self._armed: threading.Event | None = None  # set while the flusher has work
        _captures.add(self)

    def start_flusher(self, send_lock: threading.Lock) -> None:
        """Send a long task's records every FLUSH_EVERY from a thread of their
        own, even while the task logs nothing more. ``send_lock``: held by the
        worker around every send on its channel (and around take() and the
        result's send, so a task's records never follow its result)."""
        self._send_lock = send_lock
        self._armed = threading.Event()
        threading.Thread(target=self._flush_loop, name="shmrunner-task-logs",
                         daemon=True).start()

    def _flush_loop(self) -> None:
        # Wakes at most about once a FLUSH_EVERY while tasks run, and sleeps on
        # ``armed`` once none has begun for a whole nap: disarming between two
        # tiny tasks made every begin() wake this thread (a quarter of a tiny
        # task's throughput, in lock and interpreter-lock hand-offs).
        armed = self._armed
        assert armed is not None
        while True:
            armed.wait()
            begun = self._begun
            time.sleep(max(self._next_flush - time.monotonic(), _MIN_NAP))
            if self._running and time.monotonic() >= self._next_flush:
                self._flush()
            elif not self._running and self._begun == begun:  # idle since the last nap
                armed.clear()
                if self._running or self._begun != begun:  # one began meanwhile
                    armed.set()

    def _forked(self) -> None:
        # A process a task forks (no exec) shares the worker's channel: it must
        # never send on it (its frames would interleave with the worker's), nor
        # wait on a lock another thread held at the fork. It prints and logs
        # as an uncaptured process would.
        self.sender = None
        self._lock = threading.Lock()
        self._send_lock = self._armed = None
        for stream in self._streams:
            if sys.stdout is stream:
                sys.stdout = stream.original
            if sys.stderr is stream:
                sys.stderr = stream.original
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)

    def begin(self, task_id: int) -> None:
        """Task ``task_id`` starts: its records go out early once it has run
        FLUSH_EVERY seconds (at most once every FLUSH_EVERY), the rest with its result."""
        self._task_id = task_id
        self._next_flush = time.monotonic() + FLUSH_EVERY
        self._running = True
        self._begun += 1
        armed = self._armed
        if armed is not None and not armed.is_set():  # (set() takes a lock: only when idle)
            armed.set()

    def install(self, inherited: Sequence[logging.Handler] = ()) -> None:
        """Capture from now on. ``inherited``: root handlers the worker got from
        its parent through fork(), removed (they would write the same records
        to the parent's terminal a second time)."""
        root = logging.getLogger()
        for handler in inherited:
            root.removeHandler(handler)
        self._handler = _Handler(self)
        root.addHandler(self._handler)
        if self.level <= logging.INFO:
            sys.stdout = self._stream("stdout", logging.INFO, sys.stdout)
        if self.level <= logging.WARNING:
            sys.stderr = self._stream("stderr", logging.WARNING, sys.stderr)

    def _stream(self, name: str, level: int, original: Any) -> _Stream:
        stream = _Stream(self, name, level, original)
        self._streams.append(stream)
        return stream

    def add(self, created: float, level: int, name: str, message: str) -> None:
        # What the wire carries (wire_ok): a level from 0 to 100 and UTF-8 text.
        # A custom level past 100, or a lone surrogate (surrogateescape'd bytes
        # printed), once failed the whole result's send on a remote worker.
        if not 0 <= level <= 100:
            level = min(max(level, 0), 100)
        message, name = _utf8(message), _utf8(name)
        cost = len(message) + len(name) + _RECORD_COST
        with self._lock:
            room = self.limit - self._used
            if cost <= room:
                self._records.append((created, level, name, message))
                self._used += cost
                full = False
            else:
                full = True
        if full:
            self._add_cut(created, level, name, message)
        elif (self._running and self.sender is not None
              and time.monotonic() >= self._next_flush
              and threading.get_ident() == self._main):
            # Not once the task ended: take() closes an open line (a record
            # added here) while the worker holds its send lock, which _flush
            # takes too: the worker hung for good.
            self._flush()

    def _add_cut(self, created: float, level: int, name: str, message: str) -> None:
        with self._lock:
            room = self.limit - self._used
            # Full: what fits of this one, then nothing more (the log keeps its
            # beginning, and the marker says how much is missing after it).
            keep = room - len(name) - _RECORD_COST
            if keep > 0:
                self._records.append((created, level, name, message[:keep]))
            self._dropped += max(len(message) - max(keep, 0), 0)
            self._used = self.limit

    def _flush(self) -> None:
        """Send what a long task logged so far (its bound still counts it)."""
        if self._sending or self.sender is None:
            return  # the send itself logged
        lock = self._send_lock
        if lock is None:
            self._send_early()
            return
        with lock:
            if self._running:  # (not ended, its records taken, meanwhile)
                self._send_early()

    def _send_early(self) -> None:
        with self._lock:
            records, self._records = self._records, []
        self._next_flush = time.monotonic() + FLUSH_EVERY
        if not records:
            return
        sender = self.sender
        if sender is None:
            return
        self._sending = True
        try:
            sender(self._task_id, records)
        except Exception:  # noqa: BLE001 (the parent is gone: the worker loop sees it next)
            pass
        finally:
            self._sending = False

    def take(self) -> list[Record]:
        """The records of the task that just ended not sent yet (empty: none)."""
        self._running = False
        if not (self._used or self._dropped or self.partial):
            return []  # the common case, once per task: keep it this cheap
        if self.partial:
            self.partial = False
            for stream in self._streams:
                if stream.partial:
                    stream.flush_line()
        with self._lock:
            records, dropped = self._records, self._dropped
            self._records, self._used, self._dropped = [], 0, 0
        if dropped:
            created = records[-1][0] if records else 0.0
            records.append((created, logging.WARNING, LOGGER,
                            f"[... {dropped} characters truncated]"))
        return records


def _utf8(text: str) -> str:
    """``text``, its lone surrogates (undecodable bytes) written as escapes."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class _Handler(logging.Handler):
    def __init__(self, capture: Capture) -> None:
        super().__init__(capture.level)
        self._capture = capture
        self.setFormatter(logging.Formatter("%(message)s"))  # the message and any traceback

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 (a record that cannot format: logging's own rule)
            self.handleError(record)
            return
        self._capture.add(record.created, record.levelno, record.name[:_MAX_NAME], message)


class _Stream(io.TextIOBase):
    """sys.stdout or sys.stderr during a task: each line a record. What goes
    around Python's text layer (``fileno()``, ``buffer``: subprocesses, C code)
    reaches the original stream, uncaptured, as before."""

    def __init__(self, capture: Capture, name: str, level: int, original: Any) -> None:
        self._capture = capture
        self._name = name
        self._level = level
        self._original = original
        self._encoding = getattr(original, "encoding", None) or "utf-8"
        self.partial = ""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    @property
    def original(self) -> Any:
        """The stream this one stands in for."""
        return self._original

    @property
    def buffer(self) -> Any:
        return self._original.buffer

    def fileno(self) -> int:
        return int(self._original.fileno())

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        capture = self._capture
        room = capture.limit - capture._used
        if len(text) > room:  # never split (or copy) more than fits: gigabytes may follow
            with capture._lock:
                capture._dropped += len(text) - max(room, 0)
            if room <= 0:
                return len(text)
            text = text[:room]
        now = time.time()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        if self.partial:
            capture.partial = True
        for line in lines:
            capture.add(now, self._level, self._name, line)
        if len(text) == room:  # it was cut: the log is full from here on
            if self.partial:
                self.flush_line()
            capture._used = capture.limit
        if len(self.partial) > capture.limit:  # one endless line
            self.flush_line()
        return len(text)

    def flush_line(self) -> None:
        line, self.partial = self.partial, ""
        self._capture.add(time.time(), self._level, self._name, line)


# --- the caller side ---------------------------------------------------------------------

def _is_record(item: Any) -> bool:
    return (type(item) in (list, tuple) and len(item) == 4
            and type(item[0]) in (int, float) and math.isfinite(item[0])
            and type(item[1]) is int and 0 <= item[1] <= 100
            and type(item[2]) is str and len(item[2]) <= _MAX_NAME
            and type(item[3]) is str)


def wire_ok(value: Any) -> bool:
    """Whether ``value`` is a log a peer may send (see :func:`checked`)."""
    return checked(value) is not None


def checked(value: Any) -> list[Record] | None:
    """A log from the network as records, or None when it breaks the rules
    (not a list of [time, level 0-100, name, message], more than
    MAX_WIRE_RECORDS records or MAX_WIRE_CHARS characters)."""
    if type(value) is not list or len(value) > MAX_WIRE_RECORDS:
        return None
    total = 0
    for item in value:
        if not _is_record(item):
            return None
        total += len(item[3]) + len(item[2])
        if total > MAX_WIRE_CHARS:
            return None
    return [(float(t), level, name, message) for t, level, name, message in value]


def emit(records: Sequence[Record], *, level: int, worker: str, host: str,
         task_id: Any, pid: int | None = None) -> None:
    """Re-emit ``records`` (those at ``level`` or above) on the logger
    ``shmrunner.task``, with the worker's time and the attributes worker,
    host, task_id, pid and source; printed text goes to the caller's own
    stdout/stderr when nothing handles that logger (see the module's docstring)."""
    logger = logging.getLogger(LOGGER)
    handled = logger.hasHandlers()
    for created, levelno, name, message in records:
        if levelno < level:
            continue
        if not handled:  # logging is not configured: show it as Ray does, prefixed
            _show(name, levelno, message, worker, host)
            continue
        if not logger.isEnabledFor(levelno):
            continue
        record = logger.makeRecord(LOGGER, levelno, "(task)", 0, message, (), None,
                                   extra={"worker": worker, "host": host, "task_id": task_id,
                                          "pid": pid, "source": name})
        record.created = created
        record.msecs = (created - int(created)) * 1000
        logger.handle(record)


def _show(name: str, levelno: int, message: str, worker: str, host: str) -> None:
    """Printed text on the caller's stdout/stderr; records from WARNING up (as
    logging's last resort would) on its stderr."""
    if name == "stdout":
        stream, text = sys.stdout, message
    elif name == "stderr":
        stream, text = sys.stderr, message
    elif levelno >= logging.WARNING:
        stream, text = sys.stderr, f"{logging.getLevelName(levelno)} {name}: {message}"
    else:
        return
    try:
        stream.write(f"({worker} on {host}) {text}\n")
    except (OSError, ValueError):
        pass  # the caller's stream is closed: nowhere to show it


HOST = socket.gethostname()


def engine_setting(value: Any, limit: int, key: str = "task_logs") -> tuple[int, int] | None:
    """What a process engine's workers capture: (level, limit), or None (off)."""
    level = level_of(value, key)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"{key} limit: expected a whole number of characters from 1 to "
                          f"{MAX_LIMIT}, got {limit!r}")
    return None if level is None else (level, limit)


def local_worker(pid: int | None) -> str:
    """How re-emitted records name a local worker process."""
    return f"local-{pid}"
