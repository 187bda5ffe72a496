"""The recycled-segment cache (``_segcache``) and ``map(out=...)``: a recycled
segment is never handed out while any process maps it (live, SIGSTOPped,
SIGKILLed, forked), its byte budget holds, its pages are given back; results
land in a shared ``out`` array. Real worker processes throughout."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import _cache_tasks as ct
import numpy as np
import pytest

import shmrunner
from _util import drop_shm_cache, shm_segments, wait_until
from shmrunner.errors import WorkerLostError

MIB = 1 << 20
N = MIB // 8  # float64 elements in 1 MiB


@pytest.fixture(autouse=True)
def default_cache() -> Iterator[None]:
    shmrunner.set_shm_cache(None)
    yield
    shmrunner.set_shm_cache(None)


def arrays(count: int, n: int = N, start: int = 0) -> list[np.ndarray]:
    return [np.full(n, start + k, dtype=np.float64) for k in range(count)]


def parent_inodes() -> set[int]:
    """Inodes of the shmrunner memfds this process holds an fd of."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:shmrunner"):
                found.add(os.fstat(int(fd)).st_ino)
        except OSError:
            continue
    return found


@pytest.mark.timeout(60)
def test_segments_are_recycled_and_results_stay_correct() -> None:
    with shmrunner.Pool(2) as pool:
        for round_ in range(3):
            xs = arrays(8, start=10 * round_)
            assert pool.map(_sum, xs) == [float(a.sum()) for a in xs]
        info = shmrunner.shm_cache_info()
        assert info["hits"] > 0 and info["recycled"] > 0
        assert info["lent_segments"] == 0


def _sum(a: np.ndarray) -> float:
    return float(a.sum())


@pytest.mark.timeout(60)
def test_budget_is_respected_and_pages_are_given_back() -> None:
    shmrunner.set_shm_cache(3 * MIB)
    with shmrunner.Pool(2) as pool:
        pool.map(_sum, arrays(8))
        info = shmrunner.shm_cache_info()
        assert info["limit"] == 3 * MIB
        assert 0 < info["free_bytes"] <= 3 * MIB
        assert info["evicted"] > 0  # 8 arrays in flight over time, only 3 MiB kept
        shmrunner.set_shm_cache(0)  # disable: every free page goes back now
        info = shmrunner.shm_cache_info()
        assert info["free_bytes"] == 0 and info["free_segments"] == 0
        assert shm_segments() == []  # the parent holds no segment at all
        assert pool.map(_sum, arrays(4)) == [float(k * N) for k in range(4)]
        assert shmrunner.shm_cache_info()["free_bytes"] == 0  # disabled: nothing kept
    with pytest.raises(ValueError):
        shmrunner.set_shm_cache(-1)


@pytest.mark.timeout(60)
def test_env_budget_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from shmrunner import _segcache
    from shmrunner.errors import ConfigError

    monkeypatch.setenv("SHMRUNNER_SHM_CACHE", "lots")
    monkeypatch.setattr(_segcache, "_limit", None)
    with pytest.raises(ConfigError, match="SHMRUNNER_SHM_CACHE"):
        _segcache.shm_cache_limit()
    monkeypatch.setenv("SHMRUNNER_SHM_CACHE", str(5 * MIB))
    assert _segcache.shm_cache_limit() == 5 * MIB


@pytest.mark.timeout(90)
def test_never_reused_while_a_live_worker_still_maps_it() -> None:
    """A worker keeps its argument after the task: that segment is never
    written again while it does (value semantics), though others recycle."""
    with shmrunner.Pool(1) as pool:
        _, kept = pool.apply(ct.keep, (np.full(N, 7.0),))
        seen = [pool.apply(ct.inode, (a,)) for a in arrays(12, start=100)]
        assert kept not in seen
        assert len(set(seen)) < len(seen)  # the others were recycled
        assert pool.apply(ct.kept_sum) == 7.0 * N  # its contents never changed
        assert pool.apply(ct.unkeep) == 1
        # Released now: it may serve later arrays again (and may be recycled).
        later = [pool.apply(ct.inode, (a,)) for a in arrays(12, start=200)]
        assert all(later)


@pytest.mark.timeout(90)
def test_never_reused_while_a_stopped_or_killed_worker_maps_it() -> None:
    """A worker holding a lent segment is SIGSTOPped, then SIGKILLed, while
    another pool churns through arrays of the same size: none of them lands
    in the victim's segment, and after the kill its segment is gone."""
    victim_pool = shmrunner.Pool(1)
    other = shmrunner.Pool(2)
    try:
        victim, kept = victim_pool.apply(ct.keep, (np.full(N, 3.0),))
        os.kill(victim, signal.SIGSTOP)
        try:
            seen = {other.apply(ct.inode, (a,)) for a in arrays(16, start=50)}
            seen |= set(other.map(ct.inode, arrays(16, start=70)))
            assert kept not in seen
            assert kept in parent_inodes()  # still lent: the parent keeps its fd
        finally:
            os.kill(victim, signal.SIGKILL)
            os.kill(victim, signal.SIGCONT)
        # The pool reaps it (no task was running); the lent slot is closed, not freed.
        wait_until(lambda: kept not in parent_inodes(), 20,
                   message="the killed worker's segment to be dropped")
        later = set(other.map(ct.inode, arrays(16, start=90)))
        assert kept not in later
    finally:
        victim_pool.terminate()
        other.terminate()
        victim_pool.join()
        other.join()


@pytest.mark.timeout(90)
def test_a_segment_mapped_by_a_forked_child_is_never_reused() -> None:
    r, w = os.pipe()
    try:
        with shmrunner.Pool(1) as pool:
            child, kept = pool.apply(ct.fork_keep, (np.full(N, 9.0), r))
            seen = set(pool.map(ct.inode, arrays(16, start=300), chunksize=1))
            assert kept not in seen
            assert shmrunner.shm_cache_info()["dropped"] >= 1
        os.write(w, b"x")  # the grandchild checks its copy and exits
    finally:
        os.close(w)
        os.close(r)

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().split(") ")[1][0] == "Z"
        except OSError:
            return True

    wait_until(gone, 20, message="the forked child to exit")


@pytest.mark.timeout(60)
def test_a_returned_argument_keeps_its_value() -> None:
    """W4: the worker returns the (lent) segment it was given by handle; the
    caller's result must not change as more arrays are recycled."""
    with shmrunner.Pool(2) as pool:
        out = pool.map(ct.add_one, arrays(6))
        more = pool.map(_sum, arrays(16, start=40))
        assert more == [float((40 + k) * N) for k in range(16)]
        assert [float(a[0]) for a in out] == [k + 1.0 for k in range(6)]
        assert all(float(a.sum()) == (k + 1.0) * N for k, a in enumerate(out))


@pytest.mark.timeout(60)
def test_killed_worker_mid_task_leaks_nothing() -> None:
    with shmrunner.Pool(1) as pool:
        victim, _ = pool.apply(ct.keep, (np.full(N, 1.0),))
        # A task that never ends: the kill always lands mid-task (kept_sum
        # could finish first, and the map below then met the dying worker).
        result = pool.apply_async(ct.block)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            result.get(timeout=20)
        assert pool.map(_sum, arrays(4)) == [float(k * N) for k in range(4)]
    gc.collect()
    drop_shm_cache()
    assert shm_segments() == []


# --- map(out=...) ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [None, 1, 3])
def test_map_out_fills_the_shared_array(chunksize: int | None) -> None:
    out = shmrunner.empty((10, 1000))
    with shmrunner.Pool(2) as pool:
        got = pool.map(ct.row, range(10), chunksize, out=out)
    assert got is out
    assert np.array_equal(out, np.stack([ct.row(i) for i in range(10)]))


@pytest.mark.timeout(60)
def test_starmap_out_and_casting() -> None:
    out = shmrunner.zeros((4, 2), dtype=np.float64)
    with shmrunner.Pool(2) as pool:
        pool.starmap(ct.pair, [(i, 2 * i) for i in range(4)], out=out)
        assert out.tolist() == [[i, 2 * i] for i in range(4)]
        with pytest.raises(TypeError):  # float results into an int array: not same_kind
            pool.map(ct.row, range(2), out=shmrunner.empty((2, 1000), dtype=np.int32))


@pytest.mark.timeout(60)
def test_map_out_errors_are_one_clear_line() -> None:
    with shmrunner.Pool(2) as pool:
        with pytest.raises(TypeError, match="shared array") as info:
            pool.map(ct.row, range(3), out=np.empty((3, 1000)))
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match=r"out has shape \(2, 1000\) but there are 3 items"):
            pool.map(ct.row, range(3), out=shmrunner.empty((2, 1000)))
        with pytest.raises(ValueError, match=r"result 2 has shape \(3,\), but out\[2\] has "
                                             r"shape \(5,\)") as info:
            pool.map(ct.bad_shape, range(4), out=shmrunner.empty((4, 5)))
        assert "\n" not in str(info.value)
        with pytest.raises(KeyError, match="three"):
            pool.map(ct.fail_on, range(5), out=shmrunner.empty((5, 5)))
        # The pool is fine afterwards.
        assert pool.map(ct.row, range(2), out=shmrunner.empty((2, 1000)))[1, 0] == 1.0


@pytest.mark.timeout(60)
def test_a_row_view_maps_only_its_window() -> None:
    """A task given one row of a large shared array maps that row, not all of it."""
    with shmrunner.Pool(1) as pool:
        big = shmrunner.zeros((8, 4 * N))  # 32 MiB, made after the fork of the worker
        assert pool.apply(ct.add_one, (big[5],)) is not None
        sizes = pool.apply(_mapped_sizes)
    assert float(big[5, 0]) == 1.0 and float(big[4, -1]) == 0.0
    assert all(size <= 4 * MIB + 4096 for size in sizes), sizes


def _mapped_sizes() -> list[int]:
    sizes = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "/memfd:shmrunner" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                sizes.append(hi - lo)
    return sizes


# --- spares for results, returned arguments ---------------------------------------------


def _inode_of(a: np.ndarray) -> int:
    seg = shmrunner.shm.segment_of(a)
    assert seg is not None
    return os.fstat(seg.fd).st_ino


@pytest.mark.timeout(90)
def test_results_written_into_spares_keep_their_values() -> None:
    """Workers copy their results into spare cached segments; a result the
    caller holds is never written again while later maps recycle others."""
    with shmrunner.Pool(2) as pool:
        del pool.map(ct.full, range(8), chunksize=1)[:]  # learns; its segments are cached
        used = shmrunner.shm_cache_info()["spares_used"]
        held = pool.map(ct.full, range(8), chunksize=2)
        assert shmrunner.shm_cache_info()["spares_used"] > used
        for round_ in range(1, 5):
            later = pool.map(ct.full, range(10 * round_, 10 * round_ + 8), chunksize=2)
            assert not {_inode_of(a) for a in later} & {_inode_of(a) for a in held}
            assert [float(a[-1]) for a in later] == [10.0 * round_ + k for k in range(8)]
            del later
        assert [float(a.sum()) for a in held] == [float(k * N) for k in range(8)]
        assert shmrunner.shm_cache_info()["lent_segments"] == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("parent_first", [True, False])
def test_a_returned_argument_is_recycled_only_once_both_sides_let_go(
        parent_first: bool) -> None:
    """A worker returns the lent segment it was given and keeps it too: it is
    not reused until the caller's result is gone *and* the worker let go."""
    with shmrunner.Pool(1) as pool:
        result = pool.apply(ct.keep_and_return, (np.full(N, 5.0),))
        kept = _inode_of(result)
        if parent_first:
            del result
        else:
            assert pool.apply(ct.unkeep) == 1
        seen = {pool.apply(ct.inode, (a,)) for a in arrays(12, start=20)}
        assert kept not in seen
        if parent_first:
            assert pool.apply(ct.kept_sum) == 5.0 * N  # unchanged in the worker
            assert pool.apply(ct.unkeep) == 1
        else:
            assert float(result.sum()) == 5.0 * N  # unchanged in the caller
            del result
        recycled = shmrunner.shm_cache_info()["recycled"]
        assert {pool.apply(ct.inode, (a,)) for a in arrays(12, start=40)}
        assert shmrunner.shm_cache_info()["recycled"] > recycled
        assert shmrunner.shm_cache_info()["lent_segments"] == 0


@pytest.mark.timeout(90)
def test_a_returned_argument_passed_on_or_held_by_a_killed_worker_is_never_reused() -> None:
    """The caller sends a returned segment to another worker (which keeps
    it), or the worker that returned it is SIGSTOPped, then SIGKILLed: the
    segment never serves another array."""
    victim_pool = shmrunner.Pool(1)
    other = shmrunner.Pool(2)
    try:
        result = other.apply(ct.add_one, (np.full(N, 1.0),))
        passed = _inode_of(result)
        victim, same = victim_pool.apply(ct.keep, (result,))  # by handle: the same segment
        assert same == passed
        del result
        returned = victim_pool.apply(ct.keep_and_return, (np.full(N, 2.0),))
        held = _inode_of(returned)
        os.kill(victim, signal.SIGSTOP)
        try:
            del returned
            seen = set(other.map(ct.inode, arrays(16, start=50), chunksize=1))
            seen |= {_inode_of(a) for a in other.map(ct.full, range(16), chunksize=1)}
            assert not {passed, held} & seen
        finally:
            os.kill(victim, signal.SIGKILL)
            os.kill(victim, signal.SIGCONT)
        wait_until(lambda: held not in parent_inodes(), 20,
                   message="the killed worker's returned segment to be dropped")
        later = set(other.map(ct.inode, arrays(16, start=90), chunksize=1))
        assert not {passed, held} & later
    finally:
        victim_pool.terminate()
        other.terminate()
        victim_pool.join()
        other.join()
