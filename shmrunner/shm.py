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
  the receiver maps it lazily (a read fault maps 16 pages at once, cheaper
  than ``MAP_POPULATE`` here even for an array read whole).

If memfds cannot be used at all (no ``memfd_create``, fd limit reached, the
allocation refused), transfers fall back to pickling the array's bytes, with
one :class:`SharedMemoryUnavailableWarning`.

Where it lives: this module is the public face (allocation, ``is_shared``,
the fallback warning); ``_memfd.py`` holds the segments themselves (creating,
sealing, reserving, attaching, copying into; their lifetimes and seals are
explained there); ``_shmlimits.py`` the fd limit and the memory check.
"""

from __future__ import annotations

import errno
import resource
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt

# The ``x as x`` names are re-exported: the transport and the worker loop
# reach shared memory through this module.
from ._memfd import Segment
from ._memfd import close_copies as close_copies
from ._memfd import copy_to_memfd as copy_to_memfd
from ._shmlimits import available_memory, check_fits, mib
from ._shmlimits import fd_limit_error as fd_limit_error
from ._shmlimits import raise_fd_limit as raise_fd_limit
from .errors import SharedMemoryError

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


class SharedMemoryUnavailableWarning(RuntimeWarning):
    """Warned once when arrays fall back to pickling because shared memory failed."""


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
    check_fits(nbytes)
    raise_fd_limit()
    try:
        seg = Segment.allocate(nbytes)
    except OSError as exc:
        raise _allocation_error(exc, nbytes) from exc
    array: np.ndarray[Any, Any] = np.ndarray(shape_t, dt, buffer=seg)
    return array


def _allocation_error(exc: OSError, nbytes: int) -> SharedMemoryError:
    """The one-line error for a segment :func:`empty` could not make: the fix
    depends on what ran out (fds, memory) or is missing (memfds)."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return fd_limit_error("cannot allocate a shared array")
    if exc.errno == errno.EFBIG:  # a memfd counts against the file-size limit
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        return SharedMemoryError(
            f"cannot allocate {mib(nbytes)} of shared memory: it is past this process's "
            f"file-size limit (RLIMIT_FSIZE {soft} bytes), which shared arrays count "
            "against; raise it with `ulimit -f unlimited`, or use a smaller array")
    if exc.errno == errno.ENOSYS:
        return SharedMemoryError(
            f"cannot allocate a shared array: shared memory is unavailable ({exc.strerror}); "
            "pass plain numpy arrays instead, which are pickled to the workers")
    return SharedMemoryError(
        f"cannot allocate {mib(nbytes)} of shared memory: {exc.strerror or exc}; "
        "free memory or use a smaller array")


def zeros(shape: int | tuple[int, ...], dtype: npt.DTypeLike = float) -> np.ndarray[Any, Any]:
    """A new zero-filled array in shared memory (see :func:`empty`)."""
    # A fresh memfd reads as zeros: no fill pass needed.
    return empty(shape, dtype)


def share(array: npt.ArrayLike) -> np.ndarray[Any, Any]:
    """Copy ``array`` into shared memory once and return the shared copy.

    An array that is already shared is returned as it is; a Fortran-ordered
    one stays Fortran-ordered (code that relies on its layout still can).
    """
    arr = np.asarray(array)
    if is_shared(arr):
        return arr
    out: np.ndarray[Any, Any]
    if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous:
        out = empty(arr.shape[::-1], arr.dtype).T
    else:
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
