"""The worker process: receive a task, run it, send the result, repeat.

Messages on the worker's channel (see ``transport/fdchannel.py``):

* parent -> worker: ``<task id: u64><pickle of (fn, args, kwargs)>`` with the
  arrays' fds; an empty message means "stop".
* worker -> parent: ``<task id: u64><pickle of (ok, value)>``; ``value`` is
  the result, or ``(exception, formatted traceback)``. Two ids are control
  messages: ``BYE`` (retiring after ``maxtasks``, said before exiting so the
  parent does not count the worker lost) and ``INIT_FAILED``; and ``STARTED``
  followed by a task id, sent just before running a task whose id carries the
  ``REPORT_START`` bit (a task with a timeout: its clock starts when it
  really starts, so a timeout never stops a task short of its time);
  ``RELEASED`` followed by the inodes of recycled segments this worker no
  longer maps, or passed on (``_segcache.py``), sent before a result. And
  ``LOGS`` followed by a task id and a pickled list of log records, sent
  just before that task's result when the engine forwards task logs and the
  task logged or printed something (``_tasklogs.py``), and while a task that
  runs longer than a second logs (at most once a second).

The task id travels outside the pickle both ways, so that a task whose
arguments cannot be unpickled here, or whose result cannot be unpickled
there, still gets its failure reported against the right task. The worker dies with
the pool's process (:func:`_die_with_owner`), ignores SIGINT (Ctrl-C is the parent's to
handle: it terminates the pool), and drops every reference to a task's
arguments and result before waiting for the next, so shared segments are
unmapped as soon as neither side uses them.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import pickle
import select
import signal
import socket
import struct
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined]
from typing import Any

from .. import _segcache, _spares
from .._payload import only_scalars
from ..shm import raise_fd_limit
from ..transport.fdchannel import FdChannel, PeerClosed
from ..transport.pickling import dumps, loads
from ..transport.protocol import rebuildable

__all__ = ["worker_main", "TASK_ID", "BYE", "INIT_FAILED", "STARTED", "RELEASED", "LOGS",
           "READY", "REPORT_START"]

TASK_ID = struct.Struct("<Q")
BYE = (1 << 64) - 1
INIT_FAILED = (1 << 64) - 2
STARTED = (1 << 64) - 3
RELEASED = (1 << 64) - 4
LOGS = (1 << 64) - 5
READY = (1 << 64) - 6  # the initializer returned: tasks sent from now on may start
REPORT_START = 1 << 63  # a bit of a task's id on its way to the worker
_PR_SET_PDEATHSIG = 1


def worker_main(sock: socket.socket, owner_pid: int, direct_child: bool,
                initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
                maxtasks: int | None, threshold: int, inherited: list[int],
                logs: tuple[int, int] | None = None) -> None:
    """Serve tasks on ``sock``; ``logs``: (level, limit) to capture each
    task's logs and printed text and send them with its result."""
    _die_with_owner(owner_pid, direct_child)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pool ends its workers (a stop message, SIGKILL), never a SIGTERM:
    # not the parent's own handler, which a fork child inherits (a service's
    # shutdown hook must not run in each worker), and not a SIGTERM sent to
    # the whole process group (Slurm's, a shell's), which leaves the parent to
    # drain its workers. A handler, not SIG_IGN: exec() resets a handler, so
    # the processes a task starts still stop on SIGTERM. Forked with SIGTERM
    # blocked (ProcessLifecycle._start): one sent meanwhile lands here.
    signal.signal(signal.SIGTERM, _ignore_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    raise_fd_limit()  # each shared array received holds two fds
    _segcache.track_releases()
    for fd in inherited:  # fork: the parent's ends of the other workers' channels
        try:
            os.close(fd)
        except OSError:
            pass
    channel = FdChannel(sock)
    # Handlers the root logger got through fork(): replaced by the capture's.
    forked_handlers = list(logging.getLogger().handlers) if logs is not None else []
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001 (reported to the parent)
            channel.send_batch([_encode(INIT_FAILED, False, (exc, traceback.format_exc()),
                                      threshold)])
            return
        # Until this arrives, a death (the initializer's os._exit, a crash in a
        # library's set-up) costs no task: none of those sent has started.
        channel.send_batch([(TASK_ID.pack(READY), [], _nothing)])
    capture = None
    # Held around every send: the task-log flusher thread sends too.
    send_lock = threading.Lock()
    if logs is not None:
        from .._tasklogs import Capture

        capture = Capture(*logs)
        capture.install(forked_handlers)

        def send_logs(task_id: int, records: list[Any]) -> None:
            channel.send_batch([(_logs_message(task_id, records), [], _nothing)])

        capture.sender = send_logs
        capture.start_flusher(send_lock)
    done = 0
    while maxtasks is None or done < maxtasks:
        try:
            payload, fds = channel.recv()
        except PeerClosed:
            return  # the parent is gone
        if not payload:
            break
        (task_id,) = TASK_ID.unpack_from(payload)
        if task_id & REPORT_START:
            task_id ^= REPORT_START
            with send_lock:
                channel.send_batch([(TASK_ID.pack(STARTED) + TASK_ID.pack(task_id), [],
                                     _nothing)])
        if capture is not None:
            capture.begin(task_id)
        ok, value = _run(memoryview(payload)[TASK_ID.size:], fds)
        del payload, fds
        # Sent before the next task starts: a result held back while another
        # task runs would be lost if that task killed us, and the parent could
        # no longer tell which of its tasks we were running.
        reply = _encode(task_id, ok, value, threshold)
        with send_lock:  # the task's last records, then its result: never the other way
            records = capture.take() if capture is not None else None
            # Nothing logged: nothing more is sent (the common case).
            log_message: list[tuple[bytes, list[int], Callable[[], None] | None]] = [
                (_logs_message(task_id, records), [], _nothing)] if records else []
            channel.send_batch([*_releases(), *log_message, reply])
        del value, reply  # unmap this task's arrays before waiting for the next
        if late := _releases():
            with send_lock:
                channel.send_batch(late)  # the result held them: free them for reuse now
        done += 1
    if maxtasks is not None and done >= maxtasks:
        with send_lock:
            channel.send_batch([_encode(BYE, True, None, threshold)])


def _nothing() -> None:
    pass


def _ignore_sigterm(signum: int, frame: object) -> None:
    pass


@contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Fork inside this (``process.start()``): the child starts with SIGTERM
    blocked, so one sent before it installs its own handler waits for it
    instead of running the handler inherited from this process; the child
    unblocks it (worker_main, the slots' slot_main)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _releases() -> list[tuple[bytes, list[int], Callable[[], None] | None]]:
    """The RELEASED message for recycled segments no longer mapped here, if any."""
    _spares.give_back_unused()  # the reply is encoded: spares it did not use go back
    report = _segcache.pending_reports()
    if report is None:
        return []
    return [(TASK_ID.pack(RELEASED) + _segcache.encode_report(*report), [], _nothing)]
def _logs_message(task_id: int, records: list[Any]) -> bytes:
    return TASK_ID.pack(LOGS) + TASK_ID.pack(task_id) + pickle.dumps(records,
                                                                      pickle.HIGHEST_PROTOCOL)


def _run(body: memoryview, fds: list[int]) -> tuple[bool, Any]:
    try:
        fn, args, kwargs = loads(body, fds)
        return True, fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 (even SystemExit: the task fails, the worker lives)
        return False, (exc, traceback.format_exc())


def _encode(task_id: int, ok: bool, value: Any, threshold: int,
            ) -> tuple[bytes, list[int], Callable[[], None]]:
    _segcache.replying(True)  # arrays it returns by handle go back to the parent only
    if not ok:
        value = (rebuildable(*value), value[1])
    try:
        encoded = dumps((ok, value), threshold, plain=ok and only_scalars((value,), {}))
    except Exception as exc:  # the result (or exception) cannot be pickled
        wrapped = MaybeEncodingError(exc, value[0] if not ok else value)
        encoded = dumps((False, (wrapped, traceback.format_exc())), threshold)
    finally:
        _segcache.replying(False)
    return TASK_ID.pack(task_id) + encoded.data, encoded.fds, encoded.release


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, or None where there is none."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def prepare_fork() -> None:
    """Load, in the process about to fork workers, what each child needs at
    its start: looked up in the child, ``prctl`` (ctypes builds a class for
    each library it loads) took 0.24 ms of every worker's start."""
    _prctl()


def _die_with_owner(owner_pid: int, direct_child: bool) -> None:
    """Exit when the pool's process dies, however it dies.

    A direct child (fork, spawn) asks the kernel for SIGKILL when the thread
    that started it dies. Under forkserver our parent is the fork server,
    which outlives the pool's process (every worker holds the write end of its
    "alive" pipe), so a thread waits on a pidfd of the pool's process instead:
    an event, not a poll.
    """
    if direct_child:
        prctl = _prctl()
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != owner_pid:  # it died before prctl took effect
            os._exit(1)
        return
    try:
        pidfd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        os._exit(1)
    except OSError:
        return  # no pidfds here: idle workers still exit when their socket closes

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="shmrunner-owner-watch", daemon=True).start()
