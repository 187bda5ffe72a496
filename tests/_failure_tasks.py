"""Importable task functions and pickling saboteurs for test_pool_failures.py.

They live in a module (not in the test file) so that workers started with
``spawn`` and ``forkserver`` can import them by name.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import threading
import time

import numpy as np

# --- handshakes ----------------------------------------------------------------------


def report(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader never sees a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def block_forever() -> None:
    """Block until a signal kills this process (the test sends it)."""
    while True:
        signal.pause()


def wait_gate(path: str) -> str:
    """Block until the test opens (and closes) the FIFO at ``path`` for writing."""
    with open(path) as f:
        return f.read()


# --- task functions --------------------------------------------------------------------


def checksum(arr: np.ndarray) -> float:
    return float(arr[0]) + float(arr[-1]) + arr.size


def checksum_or_block(item: tuple[int, np.ndarray, str | None]) -> float:
    """For item with a path: report ``pid`` there, then block while holding ``arr``."""
    index, arr, path = item
    if path is not None:
        report(path, str(os.getpid()))
        block_forever()
    return index + checksum(arr)


def hold_and_block(path: str, arr: np.ndarray | None = None) -> None:
    """Report this worker's pid at ``path``, then block while holding ``arr``."""
    report(path, str(os.getpid()))
    block_forever()


def exit_with(code: int) -> None:
    os._exit(code)


def append_line_and_exit(path: str, code: int) -> None:
    """Leave a trace of this run, then end the worker."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    os._exit(code)


def exit_or_len(item: tuple[str | None, bytes]) -> int:
    """``len(payload)``, or, given a path: leave a trace there and end the worker."""
    path, payload = item
    if path is not None:
        append_line_and_exit(path, 3)
    return len(payload)


def add_one_or_exit(x: int) -> int:
    """``x + 1``, except that a negative ``x`` ends the worker with ``os._exit(-x)``."""
    if x < 0:
        os._exit(-x)
    return x + 1


def raise_error(cls: type[BaseException], message: str) -> None:
    raise cls(message)


def segfault() -> None:
    ctypes.string_at(0)


def add_one(x: int) -> int:
    return x + 1


def getpid(_: object = None) -> int:
    return os.getpid()


def double(arr: np.ndarray) -> np.ndarray:
    return arr * 2


def return_instance(cls: type, *args: object) -> object:
    return cls(*args)


def identity(x: object) -> object:
    return x


def append_line_and_raise(path: str) -> None:
    """A broken initializer that leaves a trace of every run."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("initializer is broken on purpose")


def append_line_wait_and_raise(path: str, lock_path: str) -> None:
    """A broken, slow initializer: leaves a trace, waits until the test releases its
    exclusive lock on ``lock_path`` (so tasks are dispatched meanwhile), then raises."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(lock_path) as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
    raise ValueError("initializer is broken on purpose")


def unpicklable_result() -> object:
    return threading.Lock()


# --- pickling saboteurs (after loky's crash_cases) -----------------------------------------


class SaboteurError(Exception):
    """Raised on purpose while (un)pickling."""


def _raise_saboteur(where: str) -> None:
    raise SaboteurError(f"raised on purpose while unpickling ({where})")


def _exit_now(code: int) -> None:
    os._exit(code)


def _raise_system_exit() -> None:
    raise SystemExit(7)


def _segfault_now() -> None:
    ctypes.string_at(0)


class ErrorAtPickle:
    """Pickling it raises SaboteurError."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise SaboteurError("raised on purpose while pickling")


class ExitAtPickle:
    """Pickling it raises SystemExit."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise SystemExit(5)


class ErrorAtUnpickle:
    """Unpickling it raises SaboteurError."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _raise_saboteur, ("ErrorAtUnpickle",)


class ExitAtUnpickle:
    """Unpickling it raises SystemExit."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _raise_system_exit, ()


class CExitAtUnpickle:
    """Unpickling it ends the process with ``os._exit(11)``."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _exit_now, (11,)


class CrashAtUnpickle:
    """Unpickling it segfaults the process."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _segfault_now, ()


class SetstateExit:
    """Unpickling it (in ``__setstate__``) ends the process with ``os._exit(12)``."""

    def __getstate__(self) -> dict[str, int]:
        return {"x": 1}

    def __setstate__(self, state: dict[str, int]) -> None:
        os._exit(12)



def leave_no_free_fd() -> None:
    """Initializer: lower the soft RLIMIT_NOFILE to the lowest free fd, so this
    process can open (or receive) no new file descriptor."""
    import resource

    lowest_free = os.open("/dev/null", os.O_RDONLY)
    os.close(lowest_free)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))


# --- attacks on shared memory (test_security_pool.py) ---------------------------------


def try_to_resize(arr: np.ndarray) -> dict[str, str]:
    """Try every way to resize the segment behind ``arr``; the errno of each
    attempt (or "allowed"). A shrink that succeeds makes every process that
    maps the segment die of SIGBUS on its next access."""
    import errno

    from shmrunner.shm import segment_of

    seg = segment_of(arr)
    assert seg is not None
    fd = seg.fd
    outcomes: dict[str, str] = {}

    def attempt(name: str, action: object) -> None:
        try:
            action()  # type: ignore[operator]
            outcomes[name] = "allowed"
        except OSError as exc:
            outcomes[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))

    def shrink_reopened() -> None:
        other = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            os.ftruncate(other, 0)
        finally:
            os.close(other)

    attempt("shrink", lambda: os.ftruncate(fd, 0))
    attempt("grow", lambda: os.ftruncate(fd, arr.nbytes * 2))
    attempt("shrink-reopened", shrink_reopened)
    attempt("add-seal", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE))
    return outcomes


class CraftedSegment:
    """Pickles, inside a worker's result, as a shared array whose fd is a memfd
    the worker made itself: unsealed ("unsealed") or sealed but shorter than
    its handle says ("short")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[object, ...]:
        from shmrunner.transport import pickling

        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if self.kind == "short" else 0)
        fd = os.memfd_create("shmrunner", flags)
        os.ftruncate(fd, 8 if self.kind == "short" else 8000)
        if self.kind == "short":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        index = pickling._sending.state.add_fd(fd, owned=True)
        return pickling._rebuild_array, (index, 8000, 0, (1000,), (8,), np.dtype(float))


def return_crafted_segment(kind: str) -> CraftedSegment:
    return CraftedSegment(kind)


def child_stops_on_sigterm() -> int:
    """Start a process, SIGTERM it, return how it ended (-15: it stopped)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.2)  # let it start its sleep
    proc.terminate()
    return proc.wait(30)


def fork_helper(release: str, limit: float = 60.0) -> int:
    """Fork a helper (no exec, as a library's background process would) that
    outlives this task, holding every fd the worker has, until ``release``
    exists; return its pid."""
    pid = os.fork()
    if pid == 0:
        deadline = time.monotonic() + limit
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)
    return pid


def report_then_wait_gate(path: str, gate: str) -> str:
    """Report this worker's pid at ``path``, then :func:`wait_gate` on ``gate``."""
    report(path, str(os.getpid()))
    return wait_gate(gate)
