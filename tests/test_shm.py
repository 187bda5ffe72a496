"""Shared arrays: allocation, copying in, identity, lifetime and limits.

Every test runs under conftest's no-leak fixture, so a segment left mapped or
open by a test fails that test.
"""

from __future__ import annotations

import gc
import math
import re

import numpy as np
import pytest

import shmrunner
from _util import shm_segments
from shmrunner import shm

# --- dtypes and shapes -----------------------------------------------------------

_PADDED = np.dtype([("a", "u1"), ("b", "<f8"), ("c", "<i2", (3,)), ("d", "S3")], align=True)
assert _PADDED.itemsize > sum(_PADDED.fields[n][0].itemsize for n in _PADDED.names)  # has padding

DTYPES = [
    np.dtype(t) for t in (
        "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8",
        "f2", "f4", "f8", np.longdouble,
        "c8", "c16", np.clongdouble,
        "?",
        "M8[ns]", "M8[D]", "m8[s]", "m8[us]",
        "S1", "S7", "U1", "U5", "V3",
        ">i4", ">f8",  # non-native byte order
    )
] + [
    _PADDED,
    np.dtype([("x", "<i4"), ("y", "<f4")]),            # packed structured
    np.dtype([("inner", _PADDED), ("z", "u2")]),        # nested structured
]

SHAPES = [(), (0,), (3, 0), (0, 4, 2), (1,), (7,), (3, 4), (2, 3, 5)]


def _ids(values: list[object]) -> list[str]:
    return [str(v) for v in values]


def sample(dt: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic C-contiguous array of ``dt`` with distinct, non-zero values."""
    n = math.prod(shape)
    if dt.names:
        out = np.zeros(n, dt)
        for name in dt.names:
            field = dt.fields[name][0]
            out[name] = sample(field.base, (n, *field.shape))
        return out.reshape(shape)
    vals = np.arange(1, n + 1)
    kind = dt.kind
    if kind == "b":
        arr = vals % 3 == 0
    elif kind in "SU":
        arr = np.array([str(v)[: dt.itemsize // (4 if kind == "U" else 1)] for v in vals], dtype=dt)
    elif kind == "V":
        arr = np.frombuffer(bytes(i % 251 + 1 for i in range(n * dt.itemsize)), dt).copy()
    elif kind in "Mm":
        arr = (vals * 1000).astype(dt)
    elif kind == "c":
        arr = (vals * 1.5).astype(dt) + (vals * -0.25).astype(dt) * 1j
    else:
        arr = (vals * 37 % 251 + 1).astype(dt)
    return arr.astype(dt).reshape(shape)


def assert_same_values(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    dt = got.dtype
    if dt.names:
        for name in dt.names:
            assert_same_values(got[name], expected[name])
    elif dt.kind in "fc":
        # Not tobytes(): long double has padding bytes numpy leaves undefined.
        assert np.array_equal(got, expected, equal_nan=True)
    else:
        # tobytes() is a C-order copy of the logical values: every byte counts.
        assert got.tobytes() == expected.tobytes()


# --- empty / zeros / share / is_shared --------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_empty_zeros_share_every_dtype_and_shape(dtype: np.dtype) -> None:
    # Shapes are looped, not parametrized: the no-leak fixture costs more than the test.
    for shape in SHAPES:
        check_allocation(dtype, shape)


def check_allocation(dtype: np.dtype, shape: tuple[int, ...]) -> None:
    e = shmrunner.empty(shape, dtype)
    assert (e.shape, e.dtype) == (shape, dtype)
    assert e.flags.c_contiguous and e.flags.writeable
    assert shmrunner.is_shared(e)

    z = shmrunner.zeros(shape, dtype)
    assert shmrunner.is_shared(z)
    assert_same_values(z, np.zeros(shape, dtype))

    src = sample(dtype, shape)
    s = shmrunner.share(src)
    assert shmrunner.is_shared(s)
    assert not shmrunner.is_shared(src)
    assert_same_values(s, src)
    # A copy, not an alias of the source.
    assert not np.shares_memory(s, src)
    if s.size:
        s.reshape(-1)[0] = s.reshape(-1)[-1]
        assert_same_values(src, sample(dtype, shape))


def test_int_shape_and_default_dtype() -> None:
    a = shmrunner.empty(5)
    assert (a.shape, a.dtype) == ((5,), np.dtype(float))
    z = shmrunner.zeros(np.int64(4))
    assert (z.shape, z.dtype) == ((4,), np.dtype(float))
    assert z.tolist() == [0.0] * 4
    z2 = shmrunner.zeros([2, 3], "i2")
    assert (z2.shape, z2.dtype) == ((2, 3), np.dtype("i2"))


def test_writes_are_visible_through_every_view() -> None:
    a = shmrunner.zeros((4, 5), "i4")
    v = a[1:3, ::2]
    v[...] = 7
    assert a[1].tolist() == [7, 0, 7, 0, 7]
    assert a[0].tolist() == [0] * 5


def test_share_accepts_array_likes() -> None:
    s = shmrunner.share([[1, 2], [3, 4]])
    assert shmrunner.is_shared(s)
    assert s.tolist() == [[1, 2], [3, 4]]
    assert shmrunner.share(3.5).shape == ()


BASE = np.arange(6 * 8 * 3, dtype=np.int32).reshape(6, 8, 3)
LAYOUTS = {
    "non-contiguous": lambda a: a[:, 1::3, :],
    "fortran": np.asfortranarray,
    "negative-strides": lambda a: a[::-1, ::-2, ::-1],
    "transposed": lambda a: a.transpose(2, 0, 1),
    "broadcast": lambda a: np.broadcast_to(a[0, 0], (5, 3)),
    "zero-size-view": lambda a: a[:, 8:, :],
    "0-d-view": lambda a: a[2, 3, 1, ...],
    "structured-field": lambda a: np.zeros(10, _PADDED)["b"] + np.arange(10),
    "unaligned": lambda a: np.frombuffer(b"\0" + a.tobytes(), np.int32, count=a.size, offset=1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_share_of_any_layout_gives_equal_values(layout: str) -> None:
    src = LAYOUTS[layout](BASE)
    s = shmrunner.share(src)
    assert shmrunner.is_shared(s)
    np.testing.assert_array_equal(s, src)
    assert_same_values(s, src)


def test_share_of_a_shared_array_or_view_returns_it_unchanged() -> None:
    a = shmrunner.zeros((4, 6))
    assert shmrunner.share(a) is a
    for view in (a[1:], a[:, ::-2], a.T, a[2, 3, ...], a.reshape(-1), a.view(np.uint8)):
        assert shmrunner.share(view) is view


@pytest.mark.parametrize("dtype", [object, [("a", "i4"), ("o", object)], ("O", (2,))],
                         ids=["object", "structured-with-object", "object-subarray"])
def test_object_dtypes_are_refused_with_a_clear_message(dtype: object) -> None:
    for call in (lambda: shmrunner.empty(3, dtype), lambda: shmrunner.zeros(3, dtype)):
        with pytest.raises(TypeError, match=r"(?i)python objects"):
            call()
    with pytest.raises(TypeError, match=r"(?i)python objects") as info:
        shmrunner.share(np.array([None, "a", 1], dtype=object))
    assert "\n" not in str(info.value)
    assert shm_segments() == []  # nothing was allocated on the way to the error


def test_is_shared() -> None:
    a = shmrunner.zeros((3, 4))
    views = [a, a[1:], a[:, ::-1], a.T, a[1, 2, ...], a.reshape(12), a.view("u1"),
             a[np.newaxis], np.broadcast_to(a[0], (5, 4)), a.real]
    assert all(shmrunner.is_shared(v) for v in views)
    assert shm.segment_of(a[::2]) is shm.segment_of(a)
    # Copies, fancy indexing and private memory are not shared.
    for other in (a.copy(), a[[0, 2]], np.zeros(3), np.array(1.0), [1, 2], None, memoryview(b"x"),
                  1.0, np.float64(1.0)):
        assert not shmrunner.is_shared(other)


def test_as_strided_view_of_shared_array_is_shared() -> None:
    a = shmrunner.zeros(16)
    view = np.lib.stride_tricks.as_strided(a, shape=(4, 4), strides=(a.itemsize, a.itemsize))
    aliases, shared = np.shares_memory(view, a), shmrunner.is_shared(view)
    del a, view  # the failure's traceback must not keep the segment alive
    assert aliases
    assert shared


@pytest.mark.parametrize("shape", [-2, (-1, 2), (2, -1), (0, -1)])
def test_negative_dimensions_raise(shape: object) -> None:
    with pytest.raises(ValueError, match="negative dimensions"):
        shmrunner.empty(shape)


@pytest.mark.parametrize("dtype", ["u1", "f8"])
@pytest.mark.parametrize("shape", [-1, (-1,)], ids=["int", "tuple"])
def test_minus_one_dimension_raises_like_numpy(shape: object, dtype: str) -> None:
    with pytest.raises(ValueError, match="negative dimensions"):
        np.empty(shape, dtype)
    with pytest.raises(ValueError, match="negative dimensions"):
        shmrunner.empty(shape, dtype)


# --- lifetime ------------------------------------------------------------------------


def test_memory_is_released_when_the_last_view_dies() -> None:
    assert shm_segments() == []
    a = shmrunner.zeros(1 << 20, np.uint8)
    held = shm_segments()
    assert any(s.startswith("fd ") for s in held)
    assert any("/memfd:shmrunner" in s for s in held if not s.startswith("fd "))
    del a
    # Reference counting alone frees it: no cycle, no gc pass needed.
    assert shm_segments() == []


def test_a_view_keeps_the_segment_alive_after_the_base_is_deleted() -> None:
    a = shmrunner.zeros(1000, np.int64)
    a[:] = np.arange(1000)
    v = a[10:20][::-1]
    del a
    gc.collect()
    assert shm_segments() != []
    assert v.tolist() == list(range(19, 9, -1))
    v[:] = 0  # still mapped and writable
    assert shmrunner.is_shared(v)
    del v
    assert shm_segments() == []


def test_many_arrays_free_their_fds() -> None:
    # Each array owns an fd; they must all go back (the fd table is finite).
    arrays = [shmrunner.zeros(10) for _ in range(300)]
    assert len([s for s in shm_segments() if s.startswith("fd ")]) >= 300
    del arrays
    assert shm_segments() == []


# --- limits --------------------------------------------------------------------------

# 1 << 50 bytes, however the message chooses to write it.
_SIZE_1_PIB = (r"(1125899906842624|1073741824(\.0)? ?MiB|1048576(\.0)? ?GiB"
               r"|1024(\.0)? ?TiB|1(\.0)? ?PiB)")


@pytest.mark.parametrize("make", [shmrunner.empty, shmrunner.zeros], ids=["empty", "zeros"])
def test_oversized_request_raises_shared_memory_error(make: object) -> None:
    with pytest.raises(shmrunner.SharedMemoryError) as info:
        make(1 << 50, np.uint8)  # type: ignore[operator]
    err = info.value
    assert isinstance(err, MemoryError)
    assert isinstance(err, shmrunner.ShmrunnerError)
    message = str(err)
    assert message and "\n" not in message
    assert re.search(_SIZE_1_PIB, message), message
    assert shm_segments() == []


def test_available_memory_is_positive_and_not_above_memtotal() -> None:
    with open("/proc/meminfo") as f:
        memtotal = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    available = shm.available_memory()
    assert isinstance(available, int)
    assert 0 < available <= memtotal


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_a_full_shared_memory_device_raises_shared_memory_error_for_every_copy(
        layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full tmpfs or memory cgroup (simulated: the kernel answers ENOSPC to
    the page reservation or the write) is a SharedMemoryError before anything
    is mapped, whichever copy path the array takes: never a SIGBUS on a write
    through the map."""
    import errno
    import os

    from shmrunner.transport import pickling

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(os, "pwrite", full)
    base = np.arange(1 << 16, dtype=np.float64)
    array = base if layout == "contiguous" else base[::2]
    assert array.flags.c_contiguous == (layout == "contiguous")
    with pytest.raises(shmrunner.SharedMemoryError, match="No space left on device"):
        pickling.dumps(array, 1024)
    with pytest.raises(shmrunner.SharedMemoryError, match="No space left on device"):
        shmrunner.empty(1000)
    monkeypatch.undo()
    assert shm_segments() == []


def test_segments_are_sealed_against_resizing() -> None:
    import errno
    import fcntl
    import os

    arr = shmrunner.zeros(1000)
    seg = shm.segment_of(arr)
    assert seg is not None
    seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(PermissionError) as info:
        os.ftruncate(seg.fd, 0)
    assert info.value.errno == errno.EPERM
    arr[:] = 2.0  # the contents stay writable
    assert float(arr.sum()) == 2000.0
    del arr, seg
