"""Shared arrays: allocate, describe as a handle, attach, free.

Mechanism: every shared array lives in an anonymous ``memfd`` (``memfd_create``)
mapped with ``MAP_SHARED``. A segment crosses to another process as a *file
descriptor* passed over an AF_UNIX socket (``SCM_RIGHTS``, see
``transport/fdchannel.py``) plus a small handle (offset, shape, strides,
dtype); the receiver maps the same pages. Why memfd and not named POSIX
shared memory (``/dev/shm``, ``multiprocessing.shared_memory``):

* **Nothing can leak.** A memfd has no name. Its pages live exactly as long as
  some process holds an fd or a mapping of it; the kernel frees them when the
  last one goes, including when a worker or the parent is SIGKILLed, and fds
  in flight in a socket die with the socket. There is no tracker process to
  keep alive and nothing is ever created in ``/dev/shm`` -- which also avoids
  Python 3.11's resource_tracker pitfalls (a child that attaches to a
  ``SharedMemory`` registers it and unlinks it at exit, under the parent).
* **No ``/dev/shm`` size limit.** memfd pages come from the kernel's internal
  shmem mount, bounded by RAM and the memory cgroup, not by the (often 64 MiB
  in containers) ``/dev/shm`` mount. :func:`available_memory` reads those
  bounds so an oversized request is a clear :class:`SharedMemoryError`
  instead of a SIGBUS or the OOM killer.
* **Fast.** A plain array is copied into a fresh memfd with ``pwrite`` (one
  kernel copy, no page faults in the sender, and ``ENOSPC`` instead of SIGBUS);
  the receiver maps it with ``MAP_POPULATE``.

Lifetimes: a :class:`Segment` owns one fd and one mapping; both are released
when the last numpy array viewing the mapping is garbage collected
(``weakref.finalize``). Under the ``fork`` start method a worker inherits, as
fork does, every segment its parent held at that moment (a task may use a
module-level shared array), and keeps those alive until it exits; ``spawn``
and ``forkserver`` workers hold only what they are sent. An fd is kept open
while the mapping lives so the array can be passed on again by handle (a
worker returning the array it received costs no copy). Segments are created ``MFD_CLOEXEC``.

Sealed size: every memfd is sealed against shrinking and growing (and against
further seals) as soon as it is sized, and a receiver maps only a segment
that carries those seals and is as large as its handle says. Without them,
any process holding the fd could ``ftruncate`` it and every process mapping
it would die of SIGBUS on its next access; with them the ``ftruncate`` fails
(EPERM). Contents stay writable by design: shared arrays are shared.

If memfds cannot be used at all (no ``memfd_create``, fd limit reached, the
allocation refused), transfers fall back to pickling the array's bytes, with
one :class:`SharedMemoryUnavailableWarning`.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import resource
import threading
import time
import warnings
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ProtocolError, SharedMemoryError

__all__ = [
    "DEFAULT_THRESHOLD",
    "Segment",
    "SharedMemoryUnavailableWarning",
    "available_memory",
    "empty",
    "is_shared",
    "share",
    "zeros",
]

#: Plain arrays at least this large (bytes) travel through shared memory;
#: smaller ones are cheaper to pickle inline than to map.
DEFAULT_THRESHOLD = 64 * 1024

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# Populating maps every page up front (one syscall instead of one fault per
# page); past this size a receiver that touches a slice should not pay for all.
_POPULATE_LIMIT = 1 << 30
# Headroom left to the rest of the system when checking a request.
_RESERVE_BYTES = 64 << 20
# Set on every segment once sized; required of every segment received.
_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedMemoryUnavailableWarning(RuntimeWarning):
    """Warned once when arrays fall back to pickling because shared memory failed."""


class Segment(mmap.mmap):
    """One memfd and its shared mapping; numpy arrays use it as their buffer.

    The fd stays open as long as the mapping is referenced, so the segment can
    be sent on by handle; both are released by the garbage collector.
    """

    fd: int
    address: int

    @classmethod
    def attach(cls, fd: int, size: int) -> Segment:
        """Map an fd received from another process; once this returns, the
        segment owns ``fd`` (on failure the caller still does).

        Refuses (ProtocolError) an fd that is not a memfd sealed against
        resizing, or smaller than ``size``: mapping it would let its sender
        crash this process with SIGBUS by shrinking it later."""
        _check_sealed(fd, size)
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if size <= _POPULATE_LIMIT else 0)
        seg = cls(fd, size, flags=flags)
        seg._own(fd)
        return seg

    @classmethod
    def allocate(cls, nbytes: int) -> Segment:
        """A new zero-filled segment of ``nbytes`` whose pages are reserved up front."""
        size = max(nbytes, 1)  # mmap refuses an empty file
        fd = _new_memfd(size)
        try:
            _reserve(fd, size)
            seg = cls(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        seg._own(fd)
        return seg

    def _own(self, fd: int) -> None:
        self.fd = fd
        probe = np.ndarray((1,), np.uint8, buffer=self)
        self.address = probe.ctypes.data
        del probe
        weakref.finalize(self, os.close, fd)


def _new_memfd(size: int) -> int:
    """A memfd of ``size`` bytes whose size is sealed (see the module docstring)."""
    fd = os.memfd_create("shmrunner", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reserve(fd: int, size: int) -> None:
    """Allocate the pages now: a full tmpfs or memory cgroup then fails here
    with a SharedMemoryError instead of a SIGBUS on a later write through a map."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise SharedMemoryError(
                f"cannot reserve {_mib(size)} of shared memory: {exc.strerror}; "
                "free memory, release arrays you no longer use, or use smaller arrays"
            ) from exc
        raise


def _check_sealed(fd: int, size: int) -> None:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        actual = os.fstat(fd).st_size
    except OSError as exc:  # EINVAL: not a memfd (a file, a pipe, a socket)
        raise ProtocolError(
            f"refused a shared array: its fd is not a shared memory segment ({exc.strerror}); "
            "it was not sent by shmrunner"
        ) from exc
    if seals & _SIZE_SEALS != _SIZE_SEALS:
        raise ProtocolError(
            "refused a shared array: its segment is not sealed against resizing, so its "
            "sender could crash this process (SIGBUS); it was not sent by shmrunner"
        )
    if actual < size:
        raise ProtocolError(
            f"refused a shared array: its segment holds {actual} bytes but its handle "
            f"says {size}; it was not sent by shmrunner"
        )


# --- the public allocation API -------------------------------------------------


def empty(shape: int | tuple[int, ...], dtype: npt.DTypeLike = float) -> np.ndarray[Any, Any]:
    """A new uninitialised array in shared memory (contents are zero on Linux).

    It passes to a worker by handle in O(1) and the worker sees the same memory:
    writes on either side are visible to the other.
    """
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(
            f"cannot place dtype {dt} in shared memory: it holds Python objects; "
            "use a numeric, string or structured dtype without objects"
        )
    shape_t = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if any(dim < 0 for dim in shape_t):
        # np.ndarray(buffer=...) would read a lone -1 as "infer from the buffer".
        raise ValueError("negative dimensions are not allowed")
    nbytes = int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize
    _check_fits(nbytes)
    raise_fd_limit()
    try:
        seg = Segment.allocate(nbytes)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot allocate {_mib(nbytes)} of shared memory: {exc.strerror or exc}; "
            "free memory or use a smaller array"
        ) from exc
    array: np.ndarray[Any, Any] = np.ndarray(shape_t, dt, buffer=seg)
    return array


def zeros(shape: int | tuple[int, ...], dtype: npt.DTypeLike = float) -> np.ndarray[Any, Any]:
    """A new zero-filled array in shared memory (see :func:`empty`)."""
    # A fresh memfd reads as zeros: no fill pass needed.
    return empty(shape, dtype)


def share(array: npt.ArrayLike) -> np.ndarray[Any, Any]:
    """Copy ``array`` into shared memory once and return the shared copy.

    An array that is already shared is returned as it is.
    """
    arr = np.asarray(array)
    if is_shared(arr):
        return arr
    out = empty(arr.shape, arr.dtype)
    np.copyto(out, arr, casting="no")
    return out


def is_shared(array: object) -> bool:
    """True if ``array`` is a numpy array (or view) backed by a shared segment."""
    return isinstance(array, np.ndarray) and segment_of(array) is not None


def segment_of(array: np.ndarray[Any, Any]) -> Segment | None:
    """The shared segment an array views, or None for private memory."""
    base: object = array
    # ndarray.base chains, and objects such as as_strided's DummyArray that
    # expose the array they wrap as ``.base`` too.
    while base is not None:
        if isinstance(base, Segment):
            return base
        base = getattr(base, "base", None)
    return None


# --- transfer: plain arrays copied into a fresh segment ------------------------


def copy_to_memfd(array: np.ndarray[Any, Any]) -> tuple[int, int, tuple[int, ...]]:
    """Copy a private array into a new memfd; return ``(fd, size, strides)``.

    The caller owns the fd and closes it once it has been sent. Raises OSError
    when shared memory cannot be used (the caller falls back to pickling) and
    SharedMemoryError when the array cannot fit.
    """
    nbytes = array.nbytes
    _check_fits(nbytes)
    size = max(nbytes, 1)
    fd = _new_memfd(size)
    _copies.add(fd)
    try:
        if array.flags.c_contiguous or array.flags.f_contiguous:
            # Same memory order on both sides; pwrite is one kernel copy and
            # reports ENOSPC instead of faulting.
            flat = (array if array.flags.c_contiguous else array.T).reshape(-1)
            _pwrite_all(fd, memoryview(flat.view(np.uint8)))  # type: ignore[arg-type]
            strides = array.strides
        else:
            _reserve(fd, size)  # a write through the map would SIGBUS on a full tmpfs
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as mapping:
                dst = np.ndarray(array.shape, array.dtype, buffer=mapping)
                np.copyto(dst, array, casting="no")
                strides = dst.strides
                del dst
    except BaseException:
        close_copies([fd])
        raise
    return fd, size, tuple(strides)


# Fds made by copy_to_memfd and not yet closed by their message. Pickling runs
# outside the pool's lock, so the pool may fork a worker meanwhile: the child
# closes these at once instead of holding a copy of each array until it exits.
_copies: set[int] = set()


def close_copies(fds: list[int]) -> None:
    """Close fds returned by :func:`copy_to_memfd` (once sent, or dropped)."""
    for fd in fds:
        # Forgotten before closed: a fork in between leaks one fd into the
        # child, where the other order could close an unrelated reused fd.
        _copies.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass


def _close_copies_in_child() -> None:
    for fd in _copies:
        try:
            os.close(fd)
        except OSError:
            pass
    _copies.clear()


os.register_at_fork(after_in_child=_close_copies_in_child)


def _pwrite_all(fd: int, data: memoryview) -> None:
    offset = 0
    try:
        while offset < len(data):
            offset += os.pwrite(fd, data[offset:], offset)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise SharedMemoryError(
                f"cannot copy {_mib(len(data))} into shared memory: {exc.strerror}; "
                "free memory, release arrays you no longer use, or use smaller arrays"
            ) from exc
        raise


# --- limits ----------------------------------------------------------------------

_limits_lock = threading.Lock()
_fd_limit_raised = False
_available_cache: tuple[float, int] = (0.0, 0)


def raise_fd_limit() -> None:
    """Lift the soft fd limit to the hard one: every live shared array holds an fd."""
    global _fd_limit_raised
    with _limits_lock:
        if _fd_limit_raised:
            return
        _fd_limit_raised = True
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass  # keep the soft limit; transfers fall back when fds run out


def fd_limit_error(cause: str) -> SharedMemoryError:
    """The error for a shared array that could not be received because this
    process has no free file descriptor: names the limit and how to raise it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return SharedMemoryError(
        f"{cause}: process {os.getpid()} reached its open-file limit "
        f"(RLIMIT_NOFILE soft {_limit(soft)}, hard {_limit(hard)}; each shared array "
        "received holds two fds); raise it with `ulimit -n` or "
        "resource.setrlimit(resource.RLIMIT_NOFILE, ...), or pass fewer arrays per task"
    )


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def available_memory() -> int:
    """Bytes shared memory can still take: the least of MemAvailable and the
    memory cgroup's headroom. Cached for 100 ms (it is read per large array)."""
    global _available_cache
    now = time.monotonic()
    stamp, value = _available_cache
    if now - stamp < 0.1:
        return value
    value = _meminfo_available()
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        value = min(value, cgroup)
    _available_cache = (now, value)
    return value


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse anything


def _cgroup_headroom() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read().strip()
        if limit == b"max":
            return None
        with open("/sys/fs/cgroup/memory.current", "rb") as f:
            current = int(f.read())
        return int(limit) - current
    except (OSError, ValueError):
        return None


def _check_fits(nbytes: int) -> None:
    if nbytes < (16 << 20):
        return  # small requests: not worth a /proc read
    free = available_memory() - _RESERVE_BYTES
    if nbytes > free:
        raise SharedMemoryError(
            f"need {_mib(nbytes)} of shared memory but only {_mib(max(free, 0))} is "
            "available; release arrays you no longer use, lower the pool's "
            "shm_threshold, or add memory"
        )


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


_warned = False


def warn_fallback(reason: BaseException) -> None:
    """Warn once per process that arrays are being pickled instead of shared."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"shared memory is unavailable ({reason}); arrays are pickled instead, "
        "which is slower but correct",
        SharedMemoryUnavailableWarning,
        stacklevel=3,
    )
