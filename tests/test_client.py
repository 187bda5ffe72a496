"""The client (shmrunner.connect) against a real daemon subprocess started from
the CLI: arrays both ways, job ids, results by id from a later client, task
exceptions as themselves, remote workers joining the daemon."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _daemon_tasks
import shmrunner
from _daemon_tasks import TaskFailed, Worker, named, stopped
from _util import children, wait_until
from shmrunner.client import Client
from shmrunner.transport.zmqchannel import ZmqChannel


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    leftovers = [pid for w in started for pid in w.stop()]
    assert not leftovers, f"processes outlived their worker agent and were killed: {leftovers}"


@pytest.mark.timeout(60)
def test_arrays_both_ways_job_ids_and_result_by_id_from_a_new_client(daemons) -> None:
    d = daemons().start()
    first = d.client()
    a = np.arange(200_000, dtype=np.float64)  # 1.6 MB: above any shared-memory threshold
    future = first.submit("_daemon_tasks:arrays_out", a, 2.0)
    by_ref = first.submit(_daemon_tasks.add, a, np.ones_like(a))  # a function, not a string
    small = first.submit("_daemon_tasks:inc", 41)
    ids = [future.job_id, by_ref.job_id, small.job_id]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == 3

    out = future.result(timeout=30)
    np.testing.assert_array_equal(out["scaled"], a * 2.0)
    assert isinstance(out["pair"], tuple)
    np.testing.assert_array_equal(out["pair"][0], a + 1)
    assert out["pair"][1].dtype == np.int32
    np.testing.assert_array_equal(out["pair"][1], np.arange(a.size, dtype=np.int32))
    assert out["sum"] == float(a.sum())
    for array in (out["scaled"], out["pair"][0], out["pair"][1]):
        assert array.flags.writeable
        array[0] = 7  # returned arrays are the caller's to modify
        assert array[0] == 7
    np.testing.assert_array_equal(by_ref.result(timeout=30), a + 1)
    assert small.result(timeout=30) == 42
    assert list(first.map(_daemon_tasks.inc, range(5), timeout=30)) == [1, 2, 3, 4, 5]
    a[:] = -1  # the client's own array is untouched by what came back, and vice versa
    first.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        first.submit("_daemon_tasks:inc", 1)

    second = d.client()  # a new connection, after the first client is gone
    again = second.result(future.job_id, timeout=30)
    expected = np.arange(200_000, dtype=np.float64)
    np.testing.assert_array_equal(again["scaled"], expected * 2.0)
    np.testing.assert_array_equal(again["pair"][0], expected + 1)
    assert again["scaled"].flags.writeable
    again["scaled"][:] = 0
    np.testing.assert_array_equal(second.result(by_ref.job_id, timeout=30), expected + 1)
    assert second.result(small.job_id, timeout=30) == 42


@pytest.mark.timeout(60)
def test_task_exception_comes_back_as_its_own_type(daemons) -> None:
    d = daemons().start()
    client = d.client()
    custom = client.submit("_daemon_tasks:fail", "boom 17")
    builtin = client.submit("_daemon_tasks:fail_key", "missing-key")
    with pytest.raises(TaskFailed, match="boom 17") as info:
        custom.result(timeout=30)
    cause = info.value.__cause__
    assert cause is not None and "raise TaskFailed(message)" in str(cause) \
        and "boom 17" in str(cause), f"no remote traceback attached: {cause!r}"
    with pytest.raises(KeyError, match="missing-key"):
        builtin.result(timeout=30)
    client.shutdown()

    later = d.client()  # the failure is journaled: a later client gets the same exception
    with pytest.raises(TaskFailed, match="boom 17"):
        later.result(custom.job_id, timeout=30)
    with pytest.raises(KeyError):
        later.result(builtin.job_id, timeout=30)
    status = later.status()
    assert status["failed"] == 2 and status["done"] == 0


@pytest.mark.timeout(60)
def test_unknown_job_id_and_fetch_timeout_are_errors(tmp_path: Path, daemons) -> None:
    d = daemons().start()
    client = d.client()
    with pytest.raises(shmrunner.ShmrunnerError, match="unknown job"):
        client.result("no-such-job", timeout=5)
    running = client.submit("_daemon_tasks:hold", str(tmp_path / "started"),
                            str(tmp_path / "release"))
    wait_until((tmp_path / "started").exists, timeout=30, message="the job to start")
    watcher = d.client()
    with pytest.raises(concurrent.futures.TimeoutError, match="not finish") as info:
        watcher.result(running.job_id, timeout=0.2)
    assert isinstance(info.value, shmrunner.ShmrunnerError)
    (tmp_path / "release").touch()
    assert watcher.result(running.job_id, timeout=30) == running.result(timeout=30)


@pytest.mark.timeout(60)
def test_fetch_timeout_does_not_fail_the_jobs_own_future(tmp_path: Path, daemons) -> None:
    d = daemons().start()
    client = d.client()
    running = client.submit("_daemon_tasks:hold", str(tmp_path / "started"),
                            str(tmp_path / "release"))
    wait_until((tmp_path / "started").exists, timeout=30, message="the job to start")
    with pytest.raises(concurrent.futures.TimeoutError, match="not finish"):
        client.result(running.job_id, timeout=0.2)
    (tmp_path / "release").touch()
    assert isinstance(running.result(timeout=30), int)  # the job itself succeeded


@pytest.mark.timeout(60)
def test_resubmitting_a_job_id_is_idempotent(tmp_path: Path, daemons) -> None:
    d = daemons().start()
    ran = tmp_path / "ran.txt"
    client = d.client()
    first = client.submit("_daemon_tasks:append_id", str(ran), "job-x", 0.0, job_id="job-x")
    assert first.result(timeout=30) == "job-x"
    other = d.client()
    again = other.submit("_daemon_tasks:append_id", str(ran), "job-x", 0.0, job_id="job-x")
    assert again.job_id == "job-x" and again.result(timeout=30) == "job-x"
    assert ran.read_text().splitlines() == ["job-x"]


@pytest.mark.timeout(60)
def test_a_job_id_this_client_has_in_flight_is_refused_and_the_first_settles(
        tmp_path: Path, daemons) -> None:
    """A second submit of an id still in flight once replaced the first's future,
    which then never settled (and its bytes stayed counted against the budget)."""
    d = daemons().start()
    client = d.client()
    started, release = tmp_path / "started", tmp_path / "release"
    first = client.submit("_daemon_tasks:hold", str(started), str(release), job_id="job-y")
    with pytest.raises(ValueError, match="'job-y' is in flight on this client already"):
        client.submit("_daemon_tasks:inc", 1, job_id="job-y")
    release.touch()
    assert first.result(timeout=30) == int(started.read_text())
    # Settled: the id may be submitted again (the daemon answers with the same job).
    assert client.submit("_daemon_tasks:inc", 1, job_id="job-y").result(timeout=30) \
        == first.result()


@pytest.mark.timeout(60)
def test_keyword_arguments_named_like_scheduler_options_reach_the_function(daemons) -> None:
    # The daemon once passed them to its Scheduler's submit, which took retry_on.
    d = daemons().start()
    client = d.client()
    got = client.submit("_daemon_tasks:keywords", retry_on="ValueError", block=True,
                        fn="f").result(timeout=30)
    assert got == {"retry_on": "ValueError", "block": True, "fn": "f"}


@pytest.mark.timeout(60)
def test_every_call_after_shutdown_raises_at_once(daemons) -> None:
    d = daemons().start()
    client = d.client()
    job = client.submit("_daemon_tasks:inc", 1)
    assert job.result(timeout=30) == 2
    client.shutdown()
    for call, what in [(lambda: client.submit("_daemon_tasks:inc", 1), "schedule new futures"),
                       (lambda: client.result(job.job_id), "fetch a result"),
                       (lambda: client.status(), "ask for the status"),
                       (lambda: client.job_state(job.job_id), "ask about jobs"),
                       (lambda: client.cancel(job.job_id), "cancel a job")]:
        with pytest.raises(RuntimeError, match=f"cannot {what} after shutdown"):
            call()


@pytest.mark.timeout(90)
def test_a_done_callback_submits_while_the_byte_budget_is_full(tmp_path: Path,
                                                               daemons) -> None:
    """Done-callbacks run on the client thread, the one that frees the budget as
    the daemon accepts submits: a submit there is queued at once, over the
    budget, instead of waiting for itself forever (as concurrent.futures never
    waits there)."""
    d = daemons(scheduler={"local_workers": 1, "max_pending": 1}).start()
    client = d.client(max_pending_bytes=600_000)
    payload = b"x" * 400_000
    release = tmp_path / "release"
    paths = iter(tmp_path / f"started-{i}" for i in range(10))
    first_started = next(paths)
    first = client.submit("_daemon_tasks:hold", str(first_started), str(release))
    wait_until(first_started.exists, timeout=30, message="the first job to start")
    queued = client.submit("_daemon_tasks:inc", 1)  # the daemon's queue is full now
    assert queued.wait_accepted(30)
    # The first is accepted (the daemon's local tier holds the queued job); the second
    # is refused "busy" and sent again and again: it holds 400 KB of the 600 KB.
    held = [client.submit("_daemon_tasks:hold", str(next(paths)), str(release), 60.0, payload)
            for _ in range(2)]
    chained: list[Any] = []
    first.add_done_callback(lambda _: chained.append(client.submit(
        "_daemon_tasks:hold", str(next(paths)), str(release), 60.0, payload)))
    release.touch()
    assert isinstance(first.result(timeout=30), int)
    assert queued.result(timeout=30) == 2
    wait_until(lambda: len(chained) == 1, timeout=30, message="the callback's submit")
    assert all(isinstance(f.result(timeout=30), int) for f in [*held, *chained])


@pytest.mark.timeout(60)
def test_a_fork_child_cannot_use_its_parents_client(daemons) -> None:
    d = daemons().start()
    client = d.client()
    assert client.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its parent's client has no thread here
        code = 1
        try:
            os.close(read)
            try:
                client.submit("_daemon_tasks:inc", 1)
            except shmrunner.ShmrunnerError as exc:
                os.write(write, str(exc).encode())
                code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        said = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    assert "a fork() child cannot use it: call shmrunner.connect() in the child" in said
    assert client.submit("_daemon_tasks:inc", 2).result(timeout=30) == 3  # the parent's works


@pytest.mark.timeout(90)
def test_remote_worker_joins_shows_in_status_and_runs_jobs(tmp_path: Path, daemons,
                                                           workers) -> None:
    d = daemons().start()
    w = Worker(tmp_path, d.workers_address, "remote-one")
    workers.append(w)
    wait_until(lambda: named(d.status(), "remote-one") is not None, timeout=30,
               message="the remote worker to show in status")
    entry = named(d.status(), "remote-one")
    assert entry is not None
    assert entry["capacity"] == 1 and entry["busy"] == 0
    assert isinstance(entry["host"], str) and entry["host"]
    assert 0 <= entry["last_heartbeat"] < 1.0  # heartbeats every 0.2 s

    # Jobs that hold their worker until released: the local worker takes what its pool
    # engine holds (one running, one queued behind it today), the rest go remote.
    client = d.client()
    release = tmp_path / "release"
    futures = [client.submit("_daemon_tasks:hold", str(tmp_path / f"started{i}"), str(release))
               for i in range(6)]

    def started_remotely() -> bool:
        agent = set(children(w.pid))
        return any(int(p.read_text()) in agent for p in tmp_path.glob("started?"))

    wait_until(started_remotely, timeout=30, message="a job to start on the remote worker")

    def all_running() -> bool:
        # The daemon accepts (journals) the six one by one: a job may start on
        # the agent before the last ones are accepted and handed to a worker.
        status = d.status()
        remote = named(status, "remote-one")
        return remote is not None and remote["busy"] >= 1 and status["running"] == 6

    wait_until(all_running, timeout=30, message="all six jobs handed to a worker")
    release.touch()
    pids = [f.result(timeout=30) for f in futures]
    assert any(pid in children(w.pid) for pid in pids), \
        f"no job ran under the remote worker {w.pid}: {pids}"
    more = [client.submit("_daemon_tasks:inc", i) for i in range(20)]  # both tiers
    done, pending = concurrent.futures.wait(more, timeout=30)
    assert not pending
    assert [f.result() for f in more] == list(range(1, 21))


# --- every future settles ------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_futures_and_result_calls_settle_when_a_restarted_daemon_does_not_know_the_job(
        tmp_path: Path, daemons) -> None:
    d = daemons().start()
    client = d.client(refetch_interval=0.2)
    started, release = tmp_path / "started", tmp_path / "release"
    future = client.submit("_daemon_tasks:hold", str(started), str(release))
    assert future.wait_accepted(30)
    wait_until(started.exists, timeout=30, message="the job to start")
    outcome: list[BaseException] = []
    waiter = threading.Thread(target=lambda: outcome.append(
        pytest.raises(shmrunner.ShmrunnerError, client.result, future.job_id).value))
    waiter.start()  # result(job_id) with no timeout
    try:
        d.kill9()
        d.daemon_settings["journal"] = str(tmp_path / "another-journal.sqlite")
        d.start()  # same address, a journal that never heard of the job
        with pytest.raises(shmrunner.ShmrunnerError,
                           match=f"does not know job {future.job_id}"):
            future.result(timeout=30)
        waiter.join(30)
        assert not waiter.is_alive(), "result(job_id) never returned"
        assert f"does not know job {future.job_id}" in str(outcome[0])
    finally:
        release.touch()
        waiter.join(30)


@pytest.mark.timeout(90)
def test_result_without_timeout_completes_across_a_restart_on_the_same_journal(
        tmp_path: Path, daemons) -> None:
    d = daemons().start()
    started, release = tmp_path / "started", tmp_path / "release"
    submitter = d.client()
    future = submitter.submit("_daemon_tasks:hold", str(started), str(release))
    assert future.wait_accepted(30) and future.accepted()
    d.forget(submitter)
    wait_until(started.exists, timeout=30, message="the job to start")
    watcher = d.client(refetch_interval=0.2)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(watcher.result(future.job_id)))
    waiter.start()
    try:
        d.kill9()
        started.unlink()
        d.start()  # replays the job; the watcher's fetch was lost with the old process
        wait_until(started.exists, timeout=30, message="the replayed job to start")
        release.touch()
        waiter.join(30)
        assert not waiter.is_alive(), "result(job_id) did not complete after the restart"
        assert got == [int(started.read_text())]
    finally:
        release.touch()
        waiter.join(30)


@pytest.mark.timeout(60)
def test_wait_accepted_says_when_the_job_is_journaled(daemons) -> None:
    d = daemons().start()
    client = d.client()
    d.proc.signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        wait_until(lambda: stopped(d.pid), timeout=10, message="the daemon to stop")
        future = client.submit("_daemon_tasks:inc", 1)
        assert not future.wait_accepted(0.3) and not future.accepted()
        with pytest.raises(concurrent.futures.TimeoutError):
            client.result(future.job_id, timeout=0.3)  # a frozen daemon answers nothing
    finally:
        d.proc.signal(signal.SIGCONT)  # type: ignore[union-attr]
    assert future.wait_accepted(30) and future.accepted()
    assert future.result(timeout=30) == 2


# --- the client thread cannot die silently -------------------------------------------------

@pytest.mark.timeout(60)
def test_the_client_thread_sleeps_until_its_next_deadline(tmp_path: Path, daemons,
                                                          monkeypatch) -> None:
    """No fixed tick: while a job runs the client thread sleeps until its next
    re-ask (refetch_interval), and with nothing outstanding until woken."""
    d = daemons().start()
    waits: list[float | None] = []
    real_poll = ZmqChannel.poll

    def recording_poll(self: ZmqChannel, timeout: float | None, **kw: Any) -> bool:
        if threading.current_thread().name == "shmrunner-client":
            waits.append(timeout)
        return real_poll(self, timeout, **kw)

    monkeypatch.setattr(ZmqChannel, "poll", recording_poll)
    client = d.client(refetch_interval=20.0)
    started, release = tmp_path / "started", tmp_path / "release"
    future = client.submit("_daemon_tasks:hold", str(started), str(release))
    assert future.wait_accepted(30)
    wait_until(started.exists, timeout=30, message="the job to start")
    wait_until(lambda: len(waits) >= 2, timeout=30, message="the client thread to sleep")
    held = list(waits)
    # Its last sleep runs to the re-ask of the held job, ~20 s away (not 0.2 s).
    assert held[-1] is not None and held[-1] > 5.0
    release.touch()
    assert future.result(timeout=30) > 0
    wait_until(lambda: waits[-1] is None, timeout=30,
               message="the idle client thread to sleep without a deadline")
    assert client.status()["done"] >= 1   # a wake-up still serves it at once


@pytest.mark.timeout(60)
def test_the_client_thread_survives_an_unexpected_error(daemons, monkeypatch) -> None:
    d = daemons().start()
    real = Client._receive
    failures = []

    def receive_failing_once(self: Client, msg: object) -> None:
        if not failures:
            failures.append(msg)
            raise RuntimeError("injected fault")
        real(self, msg)  # type: ignore[arg-type]

    monkeypatch.setattr(Client, "_receive", receive_failing_once)
    client = d.client(refetch_interval=0.5)
    future = client.submit("_daemon_tasks:inc", 1)
    assert future.result(timeout=30) == 2  # its "accepted" was lost, its result was not
    assert failures
    assert client.submit("_daemon_tasks:inc", 2).result(timeout=30) == 3
    assert client.status()["done"] == 2


@pytest.mark.timeout(60)
def test_a_client_thread_that_keeps_failing_fails_every_future_clearly(
        tmp_path: Path, daemons, monkeypatch) -> None:
    d = daemons().start()
    client = d.client()
    started, release = tmp_path / "started", tmp_path / "release"
    future = client.submit("_daemon_tasks:hold", str(started), str(release))
    assert future.wait_accepted(30)

    def broken(self: Client) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Client, "_check_acks", broken)
    try:
        error = future.exception(timeout=30)
        assert isinstance(error, shmrunner.ShmrunnerError)
        assert "client connection" in str(error) and "injected fault" in str(error)
        later = client.submit("_daemon_tasks:inc", 1)  # settles at once, never hangs
        assert "injected fault" in str(later.exception(timeout=5))
        with pytest.raises(shmrunner.ShmrunnerError, match="injected fault"):
            client.status(timeout=5)
    finally:
        release.touch()
