"""Spare segments for workers' results (``_spares``): the trailer that names
them is parsed with bounds, a worker keeps only sealed memfds of a size
class, and with the cache disabled no spare is lent and nothing stays."""

from __future__ import annotations

import fcntl
import os

import _cache_tasks as ct
import pytest

import shmrunner
from _util import drop_shm_cache, shm_segments
from shmrunner import _segcache, _spares


def test_trailer_round_trip_and_garbage() -> None:
    body = b"\x80\x05N."  # pickle.dumps(None): ends with STOP
    assert _spares.split_trailer(memoryview(body), 3) == []
    assert _spares.split_trailer(memoryview(body + _spares.trailer([2, 0])), 3) == [2, 0]
    for bad in (_spares.trailer([3]),             # names an fd the message lacks
                _spares.trailer([1, 1]),          # twice
                b"\x09\x00S",                     # a count past MAX_SPARES
                b"\x02\x00S"):                    # a count longer than the message
        with pytest.raises(ValueError):
            _spares.split_trailer(memoryview(b"." + bad), 3)


def _memfd(size: int, seal: bool) -> int:
    fd = os.memfd_create("shmrunner", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_a_worker_keeps_only_sealed_memfds_of_a_size_class() -> None:
    refused = [_memfd(1 << 20, seal=False), _memfd((1 << 20) + 12345, seal=True)]
    r, w = os.pipe()
    os.close(w)
    refused.append(r)  # not a memfd at all
    kept = _memfd(1 << 20, seal=True)
    try:
        for fd in [*refused, kept]:
            _spares.stash(fd)
        assert _spares.take((1 << 20) + 12345) is None
        got = _spares.take(1 << 20)
        assert got == kept
        os.close(got)
        for fd in refused:  # closed by stash
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        _spares.give_back_unused()
        _segcache.pending_reports()  # this process is no worker: drop what it queued


@pytest.mark.timeout(60)
def test_no_spare_with_the_cache_disabled_and_nothing_left() -> None:
    shmrunner.set_shm_cache(0)
    try:
        with shmrunner.Pool(2) as pool:
            granted = shmrunner.shm_cache_info()["spares_granted"]
            for _ in range(3):
                out = pool.map(ct.full, range(6), chunksize=2)
                assert [float(a[0]) for a in out] == [float(k) for k in range(6)]
                del out
            assert shmrunner.shm_cache_info()["spares_granted"] == granted
            assert shmrunner.shm_cache_info()["free_bytes"] == 0
    finally:
        shmrunner.set_shm_cache(None)
    drop_shm_cache()
    assert shm_segments() == []
