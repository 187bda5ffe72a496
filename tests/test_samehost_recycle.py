"""A same-host client recycles the memfds it hands its arrays over in
(shmrunner/_depositwatch.py, _localclients.py, _shmclient.py): reused only
once the daemon says no process maps one any more; never while a worker
still reads it, keeps it, or after anything unclear (a worker or the daemon
killed). Real daemon subprocesses, real workers, real sockets."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmrunner
from _util import shm_segments, wait_until

pytestmark = pytest.mark.timeout(120)

N = 200_000  # float64: 1.6 MB, one size class for every array here


def _info() -> dict[str, int]:
    return shmrunner.shm_cache_info()


def _until_recycled(client: Any, value: float) -> None:
    """Submit arrays of N until one goes into a memfd the daemon gave back."""
    hits = _info()["hits"]

    def reused() -> bool:
        a = np.full(N, value)
        assert client.submit("_daemon_tasks:total", a).result(timeout=30) == a.sum()
        return _info()["hits"] > hits

    wait_until(reused, timeout=30, message="a deposited memfd to be reused")


@pytest.mark.parametrize("durable", [True, False])
def test_a_sequence_of_jobs_reuses_the_memfds(daemons, durable: bool) -> None:
    shmrunner.set_shm_cache(0)  # empty: every hit below is a memfd the daemon gave back
    shmrunner.set_shm_cache(None)
    d = daemons(scheduler={"local_workers": 2}).start()
    client = d.client(durable=durable)
    before = _info()
    arrays = [np.full(N, float(i)) for i in range(12)]
    for a in arrays:  # one at a time: each job's memfd is free again before the next
        assert client.submit("_daemon_tasks:total", a).result(timeout=30) == a.sum()
    _until_recycled(client, 7.0)
    after = _info()
    assert after["recycled"] > before["recycled"]  # released by the daemon, taken back
    assert client.same_host["recycles"] is True
    # Every deposit settles: none is left watched once its job is done.
    wait_until(lambda: client.status()["same_host"]["deposits_watched"] == 0, timeout=30,
               message="every deposited memfd to settle")
    assert client.status()["same_host"]["deposits_released"] >= 12
    # Idle, the client takes them back as messages come (a status answer here).
    wait_until(lambda: client.status() and _info()["lent_segments"] == 0, timeout=30,
               message="the idle client to take its memfds back")


def test_a_memfd_is_not_reused_while_its_job_runs(daemons, tmp_path: Path) -> None:
    """Job A holds its array X on a worker; jobs with arrays of X's size come
    and go on the other worker, their memfds reused; A still reads X."""
    d = daemons(scheduler={"local_workers": 2}).start()
    client = d.client(durable=False)
    x = np.full(N, 1.0)
    started, release = tmp_path / "started", tmp_path / "release"
    a = client.submit("_daemon_tasks:gated_total", x, str(started), str(release))
    wait_until(started.exists, timeout=30, message="job A to start")
    y = np.full(N, 2.0)
    assert client.submit("_daemon_tasks:total", y).result(timeout=30) == y.sum()
    _until_recycled(client, 3.0)  # B's memfd (or a later one) reused, never A's
    for i in range(5):
        z = np.full(N, 4.0 + i)
        assert client.submit("_daemon_tasks:total", z).result(timeout=30) == z.sum()
    release.touch()
    assert a.result(timeout=30) == x.sum()


def test_an_array_a_worker_keeps_is_never_overwritten(daemons) -> None:
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client(durable=False)
    x = np.full(N, 5.0)
    assert client.submit("_daemon_tasks:keep", x).result(timeout=30) == x.sum()
    _until_recycled(client, 6.0)
    for i in range(5):
        z = np.full(N, 7.0 + i)
        assert client.submit("_daemon_tasks:total", z).result(timeout=30) == z.sum()
    assert client.submit("_daemon_tasks:kept_total").result(timeout=30) == x.sum()
    assert client.status()["same_host"]["deposits_watched"] >= 1  # the kept one


def test_a_worker_that_forks_while_mapping_drops_the_memfd(daemons) -> None:
    """A fork in the worker while it maps the array: the child may map it on,
    so the daemon says dropped and the client closes that memfd."""
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client(durable=False)
    dropped = _info()["dropped"]
    x = np.full(N, 3.0)
    assert client.submit("_daemon_tasks:fork_total", x).result(timeout=30) == x.sum()
    wait_until(lambda: client.status()["same_host"]["deposits_dropped"] >= 1, timeout=30,
               message="the daemon to drop the forked worker's memfd")
    _until_recycled(client, 4.0)  # (its release datagram read on the way)
    assert _info()["dropped"] > dropped


def test_a_returned_argument_is_never_reused(daemons) -> None:
    """A task hands its argument back (a result by memfd naming the very
    memfd the client deposited): the client maps it as its result, so that
    memfd is dropped, never written again."""
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client(durable=False)
    x = np.full(N, 8.0)
    back = client.submit("_daemon_tasks:add", x, 0.0).result(timeout=30)
    same = client.submit("_daemon_tasks:inc_inplace", np.full(N, 1.0)).result(timeout=30)
    _until_recycled(client, 9.0)
    for i in range(5):
        z = np.full(N, 10.0 + i)
        assert client.submit("_daemon_tasks:total", z).result(timeout=30) == z.sum()
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(same, np.full(N, 2.0))


def _memfds() -> int:
    return sum(1 for entry in shm_segments() if entry.startswith("fd "))


def test_kill9_of_a_worker_drops_what_it_was_lent(daemons, tmp_path: Path) -> None:
    shmrunner.set_shm_cache(0)
    baseline = _memfds()
    shmrunner.set_shm_cache(None)
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client(durable=False)
    dropped = _info()["dropped"]
    x = np.full(N, 1.0)
    started, release = tmp_path / "started", tmp_path / "release"
    job = client.submit("_daemon_tasks:hold", str(started), str(release), payload=x)
    wait_until(started.exists, timeout=30, message="the job to start")
    os.kill(int(started.read_text()), signal.SIGKILL)
    release.touch()
    try:  # as today: retried on a new worker, or lost
        job.result(timeout=30)
    except shmrunner.WorkerLostError:
        pass
    # The killed worker's memfd is never reused: dropped once the daemon says so.
    _until_recycled(client, 2.0)
    wait_until(lambda: _info()["dropped"] > dropped, timeout=30,
               message="the killed worker's memfd to be dropped")
    client.shutdown()
    shmrunner.set_shm_cache(0)
    assert _memfds() == baseline and _info()["lent_segments"] == 0
    shmrunner.set_shm_cache(None)


def test_kill9_of_the_daemon_closes_every_lent_memfd(daemons, tmp_path: Path) -> None:
    shmrunner.set_shm_cache(0)
    baseline = _memfds()
    shmrunner.set_shm_cache(None)
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client(durable=False, refetch_interval=0.2)
    _until_recycled(client, 1.0)
    started, release = tmp_path / "started", tmp_path / "release"
    jobs = [client.submit("_daemon_tasks:gated_total", np.full(N, float(i)),
                          str(started), str(release)) for i in range(3)]
    for job in jobs:
        assert job.wait_accepted(timeout=30)
    wait_until(started.exists, timeout=30, message="the first job to start")
    assert _info()["lent_segments"] >= 3
    d.kill9()
    client.shutdown(wait=False, cancel_futures=True)
    shmrunner.set_shm_cache(0)
    assert _info()["lent_segments"] == 0
    assert _memfds() == baseline
    shmrunner.set_shm_cache(None)
