"""``shmrunner.Pool`` as a drop-in: behaviour CPython's own pool tests do not cover.

Arrays in and out of every map flavour (values, dtypes, memory order, shared
memory on the way back), shared arrays written by workers, result objects
(timeouts, callbacks), worker lifetime (initializer, maxtasksperchild),
imap's ``buffersize`` back-pressure, close/join and terminate with queued
work, and the ``ValueError`` cases.

Tests whose behaviour could depend on how workers are started run under fork,
spawn and forkserver; the ones that only exercise the parent's bookkeeping
use fork. Worker functions are module-level so spawn and forkserver workers
can import them by name. Nothing here sleeps to synchronise: blocked tasks
wait on a ``multiprocessing`` Event handed to the workers by ``initargs``,
and report that they started on a Semaphore.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections import Counter
from multiprocessing.pool import RemoteTraceback

import numpy as np
import pytest

import shmrunner

START_METHODS = ["fork", "spawn", "forkserver"]

pytestmark = pytest.mark.timeout(30)

# Comfortably above the default shm threshold (64 KiB): these travel by memfd.
BIG = 32 * 1024  # float64 elements: 256 KiB


# --- worker-side functions (module level: spawn imports them by name) ----------------


def double(a):
    return a * 2


def add(a, b):
    return a + b


def identity(x):
    return x


def square(x):
    return x * x


def scribble(a):
    """Overwrite the received array and return it (value semantics: the
    caller's own array must not change)."""
    a[...] = -1
    return a


def layout(a):
    return (a.shape, a.dtype.str, bool(a.flags.c_contiguous), bool(a.flags.f_contiguous),
            bool(a.flags.writeable))


def fill_row(out, row, value):
    out[row] = value


def fill(view, value):
    view[...] = value


def raise_key_error(key):
    raise KeyError(key)


@dataclasses.dataclass
class Sample:
    """Module-level so it pickles by reference under every start method."""

    name: str
    data: np.ndarray
    mask: np.ndarray


def transform_nested(obj):
    """Double every array found in a tuple/dict/dataclass, keep the shape of
    the container."""
    if isinstance(obj, tuple):
        return tuple(transform_nested(x) for x in obj)
    if isinstance(obj, list):
        return [transform_nested(x) for x in obj]
    if isinstance(obj, dict):
        return {k: transform_nested(v) for k, v in obj.items()}
    if isinstance(obj, Sample):
        return Sample(obj.name.upper(), obj.data * 2, ~obj.mask)
    if isinstance(obj, np.ndarray):
        return obj * 2
    return obj


_INIT_VALUE = None
_GATE = None
_STARTED = None


def remember(value):
    global _INIT_VALUE
    _INIT_VALUE = value


def recall(_):
    return _INIT_VALUE, os.getpid()


def install_gate(gate, started):
    global _GATE, _STARTED
    _GATE, _STARTED = gate, started


def gated(x):
    """Say "started", then block until the test opens the gate."""
    _STARTED.release()
    if not _GATE.wait(25):
        raise RuntimeError("the test never opened the gate")
    return x * 10


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def resource_tracker_started():
    """multiprocessing's resource tracker is started by the first spawn or
    forkserver process and then serves the whole session, like the forkserver
    (which conftest's no-leak check exempts). Start it before any test's
    no-leak snapshot, so the first test to use spawn is not blamed for it."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.fixture(scope="module", params=START_METHODS)
def pool(request):
    """One 2-worker pool per start method, shared by the data-path tests."""
    p = shmrunner.Pool(2, context=multiprocessing.get_context(request.param))
    yield p
    p.terminate()
    p.join()


@pytest.fixture
def fork_pool():
    p = shmrunner.Pool(2, context=multiprocessing.get_context("fork"))
    yield p
    p.terminate()
    p.join()


def gated_pool(ctx, processes=2):
    """A pool whose workers can run ``gated``; returns (pool, gate, started)."""
    gate, started = ctx.Event(), ctx.Semaphore(0)
    p = shmrunner.Pool(processes, initializer=install_gate, initargs=(gate, started),
                       context=ctx)
    return p, gate, started


def wait_started(started, n):
    for _ in range(n):
        assert started.acquire(timeout=20), "a gated task never started"


def join_within(p, seconds):
    """``p.join()``, with a hang reported as a failure instead of a stuck run:
    past ``seconds`` the pool is terminated so the test can clean up."""
    joiner = threading.Thread(target=p.join, name="test-joiner", daemon=True)
    joiner.start()
    joiner.join(seconds)
    hung = joiner.is_alive()
    if hung:
        p.terminate()
        joiner.join(10)
    assert not hung, f"join() did not return within {seconds}s of close()"


def assert_returned_shared(result, expected):
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == expected.dtype
    assert result.flags.writeable
    assert shmrunner.is_shared(result)


# --- arrays in, arrays out ----------------------------------------------------------------


def test_arrays_through_apply(pool):
    a = np.arange(BIG, dtype=np.float64)
    assert_returned_shared(pool.apply(double, (a,)), a * 2)
    assert_returned_shared(pool.apply_async(add, (a, a)).get(timeout=20), a + a)
    assert_returned_shared(pool.apply(add, (), {"a": a, "b": 1.0}), a + 1.0)


def test_map_over_ranges_as_over_lists(pool):
    # A range is chunked by slicing (its chunks travel as ranges): every step,
    # sign and chunk size must give what the builtin map gives.
    for r in (range(1000), range(10, -50, -3), range(7, 8), range(0), range(5, 500, 7)):
        expected = [x * x for x in r]
        assert pool.map(square, r) == expected
        assert pool.map(square, r, chunksize=3) == expected
        assert pool.map_async(square, r).get(timeout=20) == expected
    out = shmrunner.empty((100,), dtype=np.int64)
    assert pool.map(square, range(100), out=out) is out
    assert out.tolist() == [x * x for x in range(100)]


def test_arrays_through_map_and_starmap(pool):
    arrays = [np.full(BIG, i, dtype=np.float64) for i in range(6)]
    for results in (pool.map(double, arrays),
                    pool.map(double, arrays, chunksize=4),
                    pool.map_async(double, arrays).get(timeout=20)):
        assert len(results) == 6
        for got, a in zip(results, arrays, strict=True):
            assert_returned_shared(got, a * 2)
    pairs = [(a, a) for a in arrays]
    for results in (pool.starmap(add, pairs), pool.starmap_async(add, pairs).get(timeout=20)):
        for got, a in zip(results, arrays, strict=True):
            assert_returned_shared(got, a + a)


def test_arrays_through_imap(pool):
    arrays = [np.full(BIG, i, dtype=np.int64) for i in range(6)]
    for got, a in zip(pool.imap(double, arrays), arrays, strict=True):
        assert_returned_shared(got, a * 2)
    got = list(pool.imap(double, iter(arrays), chunksize=4))
    for g, a in zip(got, arrays, strict=True):
        assert_returned_shared(g, a * 2)
    got = sorted(pool.imap_unordered(double, arrays), key=lambda r: r[0])
    for g, a in zip(got, arrays, strict=True):
        assert_returned_shared(g, a * 2)


def test_plain_arrays_have_value_semantics(pool):
    # Like pickling: the worker gets a copy; scribbling on it leaves ours alone.
    a = np.arange(BIG, dtype=np.float64)
    small = np.arange(10, dtype=np.float64)
    got_big, got_small = pool.apply(scribble, (a,)), pool.apply(scribble, (small,))
    np.testing.assert_array_equal(a, np.arange(BIG, dtype=np.float64))
    np.testing.assert_array_equal(small, np.arange(10, dtype=np.float64))
    assert (got_big == -1).all() and (got_small == -1).all()
    assert got_big.flags.writeable and got_small.flags.writeable
    assert not shmrunner.is_shared(got_small)  # under the threshold: pickled inline


def test_shared_array_rows_written_by_workers(pool):
    out = shmrunner.zeros((8, 1000), dtype=np.float64)
    assert pool.starmap(fill_row, [(out, i, i + 1.5) for i in range(8)]) == [None] * 8
    np.testing.assert_array_equal(out, np.repeat(np.arange(8) + 1.5, 1000).reshape(8, 1000))
    # Views of a shared array (offset into the segment) are passed by handle too.
    grid = shmrunner.zeros((4, 6), dtype=np.int32)
    pool.starmap(fill, [(grid[:, j], j) for j in range(6)])
    np.testing.assert_array_equal(grid, np.tile(np.arange(6, dtype=np.int32), (4, 1)))


def test_arrays_nested_in_containers(pool):
    a = np.arange(BIG, dtype=np.float32)
    b = np.arange(BIG, dtype=np.int16).reshape(128, -1)
    small = np.arange(3)
    payload = (a, {"b": b, "inner": [small, (a, "text")]},
               Sample("s", a, np.arange(4 * BIG) % 2 == 0))  # 128 KiB of bools
    got = pool.apply(transform_nested, (payload,))
    got_a, got_dict, got_sample = got
    assert_returned_shared(got_a, a * 2)
    assert_returned_shared(got_dict["b"], b * 2)
    np.testing.assert_array_equal(got_dict["inner"][0], small * 2)
    assert_returned_shared(got_dict["inner"][1][0], a * 2)
    assert got_dict["inner"][1][1] == "text"
    assert isinstance(got_sample, Sample) and got_sample.name == "S"
    assert_returned_shared(got_sample.data, a * 2)
    assert_returned_shared(got_sample.mask, np.arange(4 * BIG) % 2 != 0)


def test_non_contiguous_and_fortran_arrays(pool):
    base = np.arange(512 * 512, dtype=np.float64).reshape(512, 512)
    strided = base[::2, ::3]
    assert not strided.flags.c_contiguous and not strided.flags.f_contiguous
    got = pool.apply(identity, (strided,))
    np.testing.assert_array_equal(got, strided)
    assert got.flags.writeable
    assert pool.apply(layout, (strided,))[0] == strided.shape

    fortran = np.asfortranarray(base)
    got = pool.apply(identity, (fortran,))
    np.testing.assert_array_equal(got, fortran)
    assert got.flags.f_contiguous  # pickle keeps Fortran order; so must the drop-in
    assert pool.apply(layout, (fortran,)) == (fortran.shape, fortran.dtype.str, False, True,
                                              True)
    assert_returned_shared(pool.apply(double, (fortran,)), fortran * 2)
    # A transposed view (Fortran-ordered, not a copy) and a reversed one.
    for view in (base.T, base[::-1]):
        np.testing.assert_array_equal(pool.apply(identity, (view,)), view)


@pytest.mark.parametrize("make", [
    lambda: np.empty((0, 5)),
    lambda: np.zeros((100_000, 0), dtype=np.int8),
    lambda: np.array(3.5),
    lambda: np.array(7, dtype=np.uint16),
    lambda: shmrunner.zeros((0,)),
    lambda: shmrunner.zeros(()),
], ids=["empty-2d", "zero-width", "0d-float", "0d-uint16", "shared-empty", "shared-0d"])
def test_zero_size_and_zero_dim_arrays(pool, make):
    a = make()
    got = pool.apply(identity, (a,))
    assert isinstance(got, np.ndarray)
    assert (got.shape, got.dtype) == (a.shape, a.dtype)
    np.testing.assert_array_equal(got, a)
    assert pool.apply(layout, (a,))[:2] == (a.shape, a.dtype.str)


STRUCT = np.dtype([("x", "<f8"), ("n", "<i4"), ("tag", "<U6"), ("flags", "u1", (3,))])


@pytest.mark.parametrize("dtype", [
    STRUCT,
    np.dtype("datetime64[ns]"),
    np.dtype("timedelta64[ms]"),
    np.dtype(">i4"),  # non-native byte order
    np.dtype("complex128"),
    np.dtype("U5"),
    np.dtype("bool"),
], ids=str)
def test_structured_datetime_and_other_dtypes(pool, dtype):
    n = 100_000
    a = np.zeros(n, dtype=dtype)
    if dtype == STRUCT:
        a["x"] = np.arange(n) / 3
        a["n"] = np.arange(n)
        a["tag"] = "t" + (np.arange(n) % 100).astype("U")
        a["flags"] = np.arange(n * 3).reshape(n, 3) % 256
    elif dtype.kind in "mM":
        a = np.arange(n).astype(dtype)
    elif dtype.kind == "U":
        a = (np.arange(n) % 99999).astype(dtype)
    else:
        a = (np.arange(n) % 2).astype(dtype)
    assert a.nbytes >= 64 * 1024
    got = pool.apply(identity, (a,))
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, a)
    assert shmrunner.is_shared(got)
    # Shared arrays of the dtype, written in the worker, read here.
    shared = shmrunner.zeros(n, dtype=dtype)
    pool.apply(fill, (shared, a))
    np.testing.assert_array_equal(shared, a)


def test_object_arrays_fall_back_to_pickle(pool):
    a = np.empty(30_000, dtype=object)  # 240 KiB of pointers: above the threshold
    for i in range(len(a)):
        a[i] = {"k": i} if i % 3 else (i, "x")
    got = pool.apply(identity, (a,))
    assert got.dtype == object and got.shape == a.shape
    assert list(got[:6]) == list(a[:6]) and got[-1] == a[-1]
    assert not shmrunner.is_shared(got)
    mixed = pool.apply(identity, ((a[:4], np.arange(BIG)),))
    assert list(mixed[0]) == list(a[:4])
    assert_returned_shared(mixed[1], np.arange(BIG))


# --- result objects -----------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_get_timeout_raises_multiprocessing_timeout_error():
    p, gate, started = gated_pool(multiprocessing.get_context("fork"), processes=1)
    try:
        r = p.apply_async(gated, (4,))
        wait_started(started, 1)
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.05)
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()  # not ready yet
        m = p.map_async(gated, [1, 2])
        with pytest.raises(multiprocessing.TimeoutError):
            m.get(0.01)
        it = p.imap(gated, [5])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.01)
        gate.set()
        assert r.get(timeout=20) == 40 and r.successful()
        assert m.get(timeout=20) == [10, 20]
        assert it.next(timeout=20) == 50
        with pytest.raises(StopIteration):
            it.next(timeout=20)
    finally:
        p.terminate()
        p.join()


def test_callbacks_and_error_callbacks(fork_pool):
    calls = []

    def on_value(value):
        calls.append(("value", value))

    def on_error(exc):
        calls.append(("error", exc))

    r = fork_pool.apply_async(square, (7,), callback=on_value, error_callback=on_error)
    assert r.get(timeout=20) == 49
    # multiprocessing runs the callback before it wakes waiters.
    assert calls == [("value", 49)]

    calls.clear()
    r = fork_pool.apply_async(raise_key_error, ("k",), callback=on_value,
                              error_callback=on_error)
    with pytest.raises(KeyError):
        r.get(timeout=20)
    assert not r.successful()
    [(kind, exc)] = calls
    assert kind == "error"
    assert isinstance(exc, KeyError) and exc.args == ("k",)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise KeyError(key)" in exc.__cause__.tb

    calls.clear()
    m = fork_pool.map_async(square, range(5), callback=on_value, error_callback=on_error)
    assert m.get(timeout=20) == [0, 1, 4, 9, 16]
    assert calls == [("value", [0, 1, 4, 9, 16])]

    calls.clear()
    m = fork_pool.starmap_async(add, [(1, 2), (3, None)], callback=on_value,
                                error_callback=on_error)
    with pytest.raises(TypeError):
        m.get(timeout=20)
    assert [c[0] for c in calls] == ["error"] and isinstance(calls[0][1], TypeError)

    # Without an error_callback, a failure calls nothing; the callback never
    # runs for a failed task.
    calls.clear()
    r = fork_pool.apply_async(raise_key_error, ("z",), callback=on_value)
    with pytest.raises(KeyError):
        r.get(timeout=20)
    assert calls == []


@pytest.mark.parametrize("error", [RuntimeError("callback bug"), SystemExit(1)],
                         ids=["RuntimeError", "SystemExit"])
def test_a_raising_callback_does_not_break_the_pool(fork_pool, caplog, error):
    def bad_callback(value):
        raise error

    with caplog.at_level(logging.ERROR, logger="shmrunner"):
        r = fork_pool.apply_async(square, (3,), callback=bad_callback)
        assert r.get(timeout=20) == 9
        e = fork_pool.apply_async(raise_key_error, ("x",), error_callback=bad_callback)
        with pytest.raises(KeyError):
            e.get(timeout=20)
    assert sum("callback" in rec.getMessage() for rec in caplog.records) == 2
    assert fork_pool.map(square, range(10)) == [i * i for i in range(10)]


# --- worker lifetime ---------------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_initializer_and_initargs_visible_in_tasks(method):
    ctx = multiprocessing.get_context(method)
    payload = {"answer": 42, "array": np.arange(5)}
    with shmrunner.Pool(2, initializer=remember, initargs=(payload,), context=ctx) as p:
        results = p.map(recall, range(8), chunksize=1)
    p.join()
    assert len(results) == 8
    for value, pid in results:
        assert value["answer"] == 42
        np.testing.assert_array_equal(value["array"], np.arange(5))
        assert pid != os.getpid()
    assert _INIT_VALUE is None  # the initializer ran in the workers only


@pytest.mark.parametrize("method", START_METHODS)
def test_maxtasksperchild_recycles_workers(method):
    ctx = multiprocessing.get_context(method)
    p = shmrunner.Pool(1, maxtasksperchild=2, context=ctx)
    try:
        pids = [p.apply(os.getpid) for _ in range(6)]
        # One worker at a time, two tasks each, then a fresh process.
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
        assert len({pids[0], pids[2], pids[4]}) == 3
        # Through map too: no worker ever runs more than two tasks.
        counts = Counter(pid for _, pid in p.map(recall, range(7), chunksize=1))
        assert max(counts.values()) <= 2 and sum(counts.values()) == 7
        assert not set(counts) & set(pids)
    finally:
        p.close()
        p.join()


# --- imap back-pressure -----------------------------------------------------------------


class RecordingIterator:
    """Yields 0..n-1 and records how far it was read: the highest index read
    while only ``started`` results had been asked for."""

    def __init__(self, n, window):
        self.n = n
        self.window = window
        self.started = 0  # next() calls the consumer has begun
        self.read = 0
        self.read_events = [threading.Event() for _ in range(n)]
        self.overrun = []

    def __iter__(self):
        return self

    def __next__(self):
        if self.read == self.n:
            raise StopIteration
        index = self.read
        # A result is released to the feeder only inside a next() call, so
        # at most ``window`` items beyond the ones asked for may be read.
        if index >= self.started + self.window:
            self.overrun.append((index, self.started))
        self.read += 1
        self.read_events[index].set()
        return index


@pytest.mark.parametrize("kind", ["imap", "imap_unordered"])
def test_imap_buffersize_never_reads_more_than_two_ahead(fork_pool, kind):
    n, window = 12, 2
    source = RecordingIterator(n, window)
    it = getattr(fork_pool, kind)(square, source, buffersize=window)
    got = []
    for k in range(n):
        # Pace: the feeder has read as far as it may before we consume more,
        # so it has every chance to overrun.
        assert source.read_events[min(k + window, n) - 1].wait(20)
        source.started += 1
        got.append(it.next(timeout=20))
        assert source.read <= min(source.started + window, n), (source.read, source.started)
    with pytest.raises(StopIteration):
        next(it)
    assert source.overrun == []
    expected = [i * i for i in range(n)]
    assert (got if kind == "imap" else sorted(got)) == expected


def test_imap_without_buffersize_reads_ahead(fork_pool):
    # The contrast: without buffersize the input is read ahead of the consumer.
    source = RecordingIterator(8, window=8)
    it = fork_pool.imap(square, source)
    assert source.read_events[7].wait(20)
    assert list(it) == [i * i for i in range(8)]


# --- close, join, terminate ----------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_close_then_join_finishes_queued_work(method):
    p, gate, started = gated_pool(multiprocessing.get_context(method))
    results = [p.apply_async(gated, (i,)) for i in range(6)]
    mapped = p.map_async(gated, range(6, 10), chunksize=1)
    wait_started(started, 2)  # both workers busy, the rest queued
    assert not any(r.ready() for r in results[2:])
    p.close()
    with pytest.raises(ValueError):
        p.apply_async(square, (1,))
    gate.set()
    join_within(p, 10)
    assert [r.get(timeout=0) for r in results] == [i * 10 for i in range(6)]
    assert mapped.get(timeout=0) == [i * 10 for i in range(6, 10)]


@pytest.mark.parametrize("method", START_METHODS)
def test_terminate_fails_queued_work_with_task_cancelled(method):
    p, gate, started = gated_pool(multiprocessing.get_context(method))
    results = [p.apply_async(gated, (i,)) for i in range(6)]
    mapped = p.map_async(gated, range(6, 10), chunksize=1)
    it = p.imap(gated, range(10, 13))
    wait_started(started, 2)
    p.terminate()
    p.join()
    # Nothing is left hanging: every outcome is decided, and none succeeded
    # (the gate was never opened).
    for r in results + [mapped]:
        assert r.ready()
        with pytest.raises(shmrunner.TaskCancelledError):
            r.get(timeout=0)
    with pytest.raises(shmrunner.TaskCancelledError):
        it.next(timeout=5)
    with pytest.raises(ValueError):
        p.apply_async(square, (1,))
    # (The gate stays shut: a multiprocessing Event whose waiter was killed
    # cannot be set any more -- set() waits for the dead sleeper to wake.)


# --- ValueError cases ------------------------------------------------------------------


@pytest.mark.parametrize("processes", [0, -1])
def test_invalid_processes(processes, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError):
            shmrunner.Pool(processes)
        gc.collect()
    # A pool that never started has nothing to warn about (multiprocessing
    # warns only for a pool left running), and __del__ must not crash.
    assert [u.exc_value for u in unraisable] == []
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_use_after_close_raises_value_error(fork_pool):
    with pytest.raises(ValueError):
        fork_pool.join()  # still running
    fork_pool.close()
    for call in (lambda: fork_pool.apply(square, (1,)),
                 lambda: fork_pool.apply_async(square, (1,)),
                 lambda: fork_pool.map(square, [1]),
                 lambda: fork_pool.map_async(square, [1]),
                 lambda: fork_pool.starmap(add, [(1, 2)]),
                 lambda: fork_pool.starmap_async(add, [(1, 2)]),
                 lambda: fork_pool.imap(square, [1]),
                 lambda: fork_pool.imap_unordered(square, [1])):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        with fork_pool:
            pass
    fork_pool.join()
    fork_pool.close()  # idempotent, as in multiprocessing
    fork_pool.join()


def test_use_after_terminate_raises_value_error(fork_pool):
    fork_pool.terminate()
    fork_pool.join()
    with pytest.raises(ValueError):
        fork_pool.apply_async(square, (1,))
    with pytest.raises(ValueError):
        fork_pool.map(square, [1])


def test_bad_chunksize_and_buffersize(fork_pool):
    for chunksize in (0, -1):
        with pytest.raises(ValueError):
            fork_pool.map(square, [1, 2], chunksize=chunksize)
        with pytest.raises(ValueError):
            fork_pool.imap(square, [1, 2], chunksize=chunksize)
    with pytest.raises(ValueError):
        fork_pool.imap(square, [1, 2], buffersize=0)
    with pytest.raises(TypeError):
        fork_pool.imap(square, [1, 2], buffersize=1.5)
    assert fork_pool.map(square, [3]) == [9]  # the pool still serves


# --- interpreter exit ------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent("""\
    import atexit, os, sys, threading
    {prelude}

    def after_multiprocessing_exit_hook():
        # atexit runs hooks last-registered-first; this one is registered
        # before multiprocessing.util is imported, so it runs after
        # multiprocessing's own hook (which finalizes pools, then terminates
        # daemonic children). A drop-in pool is gone by then, threads included.
        import multiprocessing
        threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        children = multiprocessing.active_children()
        if threads or children:
            print(f"left after multiprocessing's exit hook: threads={{threads}} "
                  f"children={{children}}", file=sys.stderr, flush=True)
            os._exit(3)  # do not let a stuck finalization hang the test

    if __name__ == "__main__":
        assert "multiprocessing.util" not in sys.modules
        atexit.register(after_multiprocessing_exit_hook)

    import multiprocessing
    from shmrunner import Pool

    pool = None
    if __name__ == "__main__":
        multiprocessing.set_start_method({method!r})
        pool = Pool(2)  # never closed
        assert pool.map(abs, range(-4, 4)) == [4, 3, 2, 1, 0, 1, 2, 3]
        print("ok")
""")


# A weakref.finalize made before multiprocessing is imported (here by
# tempfile, as any library could) puts weakref's own atexit hook *under*
# multiprocessing's: a pool that relies on weakref.finalize(...).atexit is
# then still running when multiprocessing kills its workers.
EXIT_PRELUDES = {
    "plain": "",
    "finalize-registered-first": "import tempfile; scratch = tempfile.TemporaryDirectory()",
}


@pytest.mark.parametrize("prelude", [
    "plain",
    "finalize-registered-first",
])
@pytest.mark.parametrize("method", START_METHODS)
def test_pool_left_running_is_shut_down_at_exit(method, prelude):
    script = EXIT_SCRIPT.format(method=method, prelude=EXIT_PRELUDES[prelude])
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-I", "-c", script],
                          capture_output=True, text=True, timeout=20)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")
