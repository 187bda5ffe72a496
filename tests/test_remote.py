"""Scheduler, remote tier: ``Scheduler(local_workers=0, listen="tcp://127.0.0.1:*")``
and real ``python -m shmrunner.cli worker`` subprocesses over real sockets.

The ``cluster`` fixture starts the scheduler and two single-process workers,
waits until both joined, and on teardown opens every gate, stops the workers
(SIGTERM: each must drain and exit 0 within a grace period, else it is
SIGKILLed and the test fails), checks that the pool processes they started
have exited too, and shuts the scheduler down. The
``no_leaks`` fixture (conftest.py) then checks that no process or shmrunner
memfd is left.

Workers get short heartbeats through a ``--config`` file (``worker:`` section):
(they also adopt the settings the scheduler sends in its welcome).
Task functions live in ``_sched_tasks``, on the workers' ``PYTHONPATH``.

Some of these tests found bugs, since fixed; they stay as regression tests.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from multiprocessing.pool import RemoteTraceback
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import _sched_tasks as tasks
from _sched_tasks import Gates
from _util import children, is_alive, wait_until
from shmrunner import Scheduler, ShmrunnerError, TaskTimeoutError, WorkerLostError
from shmrunner.transport.protocol import PROTOCOL_VERSION as V
from shmrunner.transport.protocol import Message, decode, encode
from shmrunner.transport.zmqchannel import ChannelError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
MiB = 1 << 20
RESULT = 30  # seconds: a healthy result arrives in well under one
HANG = 5  # seconds: where a test probes for a hang
JOIN = 20  # seconds for workers to start and say hello
BEAT, BEAT_TIMEOUT = 0.1, 0.6



# --- helpers --------------------------------------------------------------------------------


class Workers:
    """``shmrunner worker`` subprocesses; ``stop_all`` ends them and checks that
    they, and the pool processes they started, have exited."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.grandchildren: set[int] = set()
        self.config = root / "worker.yaml"
        self.config.write_text(f"worker:\n  heartbeat_interval: {BEAT}\n"
                               f"  heartbeat_timeout: {BEAT_TIMEOUT}\n")

    def start(self, address: str, name: str, *extra: str,
              config: Path | None | bool = True) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [TESTS_DIR, REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONFAULTHANDLER"] = "1"  # a stuck one's threads go to its log (stop_all)
        cfg: list[str] = []
        if config is True:
            cfg = ["--config", str(self.config)]
        elif isinstance(config, Path):
            cfg = ["--config", str(config)]
        with open(self.log_path(name), "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shmrunner.cli", "--log-level", "INFO", "worker",
                 "--connect", address, "--processes", "1", "--name", name, *cfg, *extra],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def _log_of(self, pid: int) -> str:
        proc = self.by_pid(pid)
        name = proc.args[proc.args.index("--name") + 1]  # type: ignore[union-attr]
        return f"--- log of {name} (pid {pid}) ---\n{self.log(name)}"

    def by_pid(self, pid: int) -> subprocess.Popen[bytes]:
        (proc,) = [p for p in self.procs if p.pid == pid]
        return proc

    def note_pool(self) -> None:
        """Remember the pool processes of every live worker (checked at the end)."""
        for proc in self.procs:
            if proc.poll() is None:
                self.grandchildren.update(children(proc.pid))

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every live worker: each must drain and exit 0 within ``grace``
        (else it is SIGKILLed and the test fails); then its pool processes must be
        gone too."""
        self.note_pool()
        terminated = [proc for proc in self.procs if proc.poll() is None]
        for proc in terminated:
            proc.terminate()
        stuck = []
        for proc in self.procs:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                # SIGABRT: faulthandler writes where every thread is to its log.
                proc.send_signal(signal.SIGABRT)
                try:
                    proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(RESULT)
                stuck.append(proc.pid)
        wait_until(lambda: not any(is_alive(pid) for pid in self.grandchildren), 10,
                   message="the workers' pool processes to exit")
        logs = "".join(self._log_of(pid)[-6000:] for pid in stuck)
        assert not stuck, f"workers {stuck} did not exit within {grace} s of SIGTERM:\n{logs}"
        codes = {proc.pid: proc.returncode for proc in terminated}
        assert all(code == 0 for code in codes.values()), f"exit codes after SIGTERM: {codes}"


def registered(sched: Scheduler) -> list[int]:
    """Pids of the remote workers the scheduler currently knows."""
    return sorted(w["pid"] for w in sched.status()["workers"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remote_scheduler(**options: Any) -> Scheduler:
    options.setdefault("listen", "tcp://127.0.0.1:*")
    return Scheduler(local_workers=0, heartbeat_interval=BEAT, heartbeat_timeout=BEAT_TIMEOUT,
                     **options)


def rebind(address: str) -> Scheduler:
    """A remote scheduler on ``address`` once it is free again: libzmq may
    release the port a moment after shutdown() returns (or after its old
    owner was killed; see test_port_is_free_when_shutdown_returns)."""
    bound: list[Scheduler] = []

    def bind() -> bool:
        try:
            bound.append(remote_scheduler(listen=address))
        except ChannelError:
            return False
        return True

    wait_until(bind, 10, message="the port to be free again")
    return bound[0]


class Cluster:
    def __init__(self, sched: Scheduler, workers: Workers, gates: Gates) -> None:
        self.sched = sched
        self.workers = workers
        self.gates = gates

    @property
    def pids(self) -> list[int]:
        return sorted(p.pid for p in self.workers.procs)

    def both_serve(self) -> None:
        """Two tasks that can only finish when they run at the same time, on
        different workers: proves both workers take work."""
        a, b = self.gates.path(f"both-{time.monotonic_ns()}-a"), self.gates.path(
            f"both-{time.monotonic_ns()}-b")
        futures = [self.sched.submit(tasks.all_started, a, [b]),
                   self.sched.submit(tasks.all_started, b, [a])]
        ppids = sorted(f.result(RESULT)["ppid"] for f in futures)
        assert ppids == sorted(p.pid for p in self.workers.procs if p.poll() is None)


def start_cluster(tmp_path: Path, gates: Gates, n: int = 2,
                  **options: Any) -> tuple[Scheduler, Workers]:
    sched = remote_scheduler(**options)
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None and sched.address.startswith("tcp://127.0.0.1:")
        for i in range(n):
            workers.start(sched.address, f"w{i + 1}")
        wait_until(lambda: registered(sched) == sorted(p.pid for p in workers.procs), JOIN,
                   message=f"{n} workers to join")
        workers.note_pool()
    except BaseException:
        stop_cluster(sched, workers, gates)
        raise
    return sched, workers


def stop_cluster(sched: Scheduler, workers: Workers, gates: Gates) -> None:
    gates.open_all()
    try:
        workers.stop_all()
    finally:
        sched.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def gates(tmp_path: Path) -> Gates:
    d = tmp_path / "gates"
    d.mkdir()
    return Gates(d)


@pytest.fixture
def cluster(tmp_path: Path, gates: Gates) -> Iterator[Cluster]:
    sched, workers = start_cluster(tmp_path, gates)
    try:
        yield Cluster(sched, workers, gates)
    finally:
        stop_cluster(sched, workers, gates)


# --- results, arrays, functions -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_results_through_the_remote_tier(cluster: Cluster) -> None:
    sched = cluster.sched
    assert sched.submit(tasks.add, 2, 3).result(RESULT) == 5
    assert sched.submit(tasks.add, "a", b="b").result(RESULT) == "ab"
    assert sched.submit(tasks.add, (1, 2), (3,)).result(RESULT) == (1, 2, 3)
    assert list(sched.map(tasks.square, range(200))) == [i * i for i in range(200)]
    cluster.both_serve()
    # Every task really ran on a remote worker's pool process.
    ppids = {f.result(RESULT)["ppid"] for f in [sched.submit(tasks.where) for _ in range(20)]}
    assert ppids <= set(cluster.pids)


@pytest.mark.timeout(60)
def test_map_with_chunksize_through_the_remote_tier(cluster: Cluster) -> None:
    got = list(cluster.sched.map(tasks.square, range(50), chunksize=8))
    assert got == [i * i for i in range(50)]


@pytest.mark.timeout(60)
def test_task_exception_comes_back_as_itself(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="far away") as info:
        cluster.sched.submit(tasks.raise_value_error, "far away").result(RESULT)
    assert type(info.value) is ValueError and info.value.args == ("far away",)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_value_error" in str(info.value.__cause__)
    assert cluster.sched.submit(tasks.square, 3).result(RESULT) == 9


@pytest.mark.timeout(60)
def test_arrays_through_the_remote_tier(cluster: Cluster) -> None:
    sched = cluster.sched
    rng = np.random.default_rng(7)
    small = rng.integers(0, 1000, size=100, dtype=np.int32)
    np.testing.assert_array_equal(sched.submit(tasks.double, small).result(RESULT), small * 2)
    mid = rng.random((300, 500))
    got = sched.submit(tasks.double, mid).result(RESULT)
    assert got.dtype == mid.dtype and got.shape == mid.shape
    np.testing.assert_array_equal(got, mid * 2)
    np.testing.assert_array_equal(sched.submit(tasks.double, mid.T[::2]).result(RESULT),
                                  mid.T[::2] * 2)
    np.testing.assert_array_equal(sched.submit(tasks.double, np.asfortranarray(mid))
                                  .result(RESULT), mid * 2)
    # 64 MiB each way.
    big = rng.random(64 * MiB // 8)
    assert sched.submit(tasks.checksum, big).result(RESULT) == pytest.approx(
        float(big.sum()), rel=1e-9)
    out = sched.submit(tasks.double, big).result(RESULT)
    assert out.nbytes == 64 * MiB
    np.testing.assert_array_equal(out, big * 2)
    del out
    made = sched.submit(tasks.arange, 64 * MiB // 8).result(RESULT)
    np.testing.assert_array_equal(made, np.arange(64 * MiB // 8, dtype=np.float64))
    del made


@pytest.mark.timeout(60)
def test_string_function_references(cluster: Cluster) -> None:
    sched = cluster.sched
    assert sched.submit("numpy:add", 2, 3).result(RESULT) == 5
    np.testing.assert_array_equal(
        sched.submit("numpy:add", np.ones(3), np.arange(3.0)).result(RESULT),
        np.array([1.0, 2.0, 3.0]))
    assert sched.submit("_sched_tasks:square", 12).result(RESULT) == 144
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        sched.submit("no_such_module_xyz:fn").result(RESULT)
    with pytest.raises(ImportError, match="nothing_here") as info:
        sched.submit("_sched_tasks:nothing_here").result(RESULT)
    # The worker's own error carries its traceback, as through the daemon.
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "ImportError: cannot resolve function" in str(info.value.__cause__)
    assert sched.submit(tasks.square, 5).result(RESULT) == 25


@pytest.mark.timeout(60)
def test_unimportable_functions_are_refused_with_a_clear_type_error(cluster: Cluster) -> None:
    sched = cluster.sched
    with pytest.raises(TypeError, match="lambda"):
        sched.submit(lambda x: x, 1).result(RESULT)

    def closure(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="closure"):
        sched.submit(closure, 1).result(RESULT)
    in_main = types.FunctionType(tasks.square.__code__, {}, "in_main")
    in_main.__module__ = "__main__"
    with pytest.raises(TypeError, match="__main__"):
        sched.submit(in_main, 2).result(RESULT)
    # Nothing broke.
    assert sched.submit(tasks.square, 4).result(RESULT) == 16


@pytest.mark.timeout(60)
def test_allow_pickle_sends_python_objects(tmp_path: Path, gates: Gates) -> None:
    sched = remote_scheduler(allow_pickle=True)
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None
        workers.start(sched.address, "pickles", "--allow-pickle")
        wait_until(lambda: len(registered(sched)) == 1, JOIN, message="the worker to join")
        # A set is no msgpack type: it travels as a pickle, both ways.
        assert sched.submit(tasks.union, frozenset({1, 2}), frozenset({3})).result(RESULT) \
            == frozenset({1, 2, 3})
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(60)
def test_allow_pickle_runs_lambdas_and_closures(tmp_path: Path, gates: Gates) -> None:
    sched = remote_scheduler(allow_pickle=True)
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None
        workers.start(sched.address, "pickles", "--allow-pickle")
        wait_until(lambda: len(registered(sched)) == 1, JOIN, message="the worker to join")
        offset = 10
        assert sched.submit(lambda x: x + offset, 1).result(RESULT) == 11
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(60)
def test_pickled_task_to_a_worker_that_refuses_pickles_fails(tmp_path: Path,
                                                             gates: Gates) -> None:
    sched = remote_scheduler(allow_pickle=True)
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None
        workers.start(sched.address, "nopickles")
        wait_until(lambda: len(registered(sched)) == 1, JOIN, message="the worker to join")
        fut = sched.submit(lambda x: x + 1, 1)
        # Any outcome but "pending forever": a result or an error.
        concurrent.futures.wait([fut], HANG)
        assert fut.done()
    finally:
        stop_cluster(sched, workers, gates)


# --- lost workers -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkilled_worker_task_completes_elsewhere(cluster: Cluster) -> None:
    sched, gates = cluster.sched, cluster.gates
    marker, started, attempts = gates.path("marker"), gates.path("started"), gates.path("att")
    _, gate = gates.new()
    fut = sched.submit(tasks.block_first_time, marker, started, attempts, gate, retries=1)
    first = gates.started(started)
    victim = cluster.workers.by_pid(first["ppid"])  # the agent whose pool runs it
    survivor = [p for p in cluster.workers.procs if p is not victim][0]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert victim.wait(RESULT) == -signal.SIGKILL
    wait_until(lambda: registered(sched) == [survivor.pid], BEAT_TIMEOUT + 2.0,
               message="the lost worker to be detected")
    detected = time.monotonic() - killed_at
    assert detected <= BEAT_TIMEOUT + 2.0
    got = fut.result(RESULT)
    assert got["ppid"] == survivor.pid and "first" not in got
    runs = [json.loads(line) for line in Path(attempts).read_text().splitlines()]
    assert [r["ppid"] for r in runs] == [victim.pid, survivor.pid]
    # The dead agent's pool process did not outlive it.
    wait_until(lambda: not is_alive(first["pid"]), 10,
               message="the killed worker's pool process to exit")
    # The survivor keeps serving.
    assert list(sched.map(tasks.square, range(10))) == [i * i for i in range(10)]


@pytest.mark.timeout(60)
def test_sigkilled_worker_without_retries_fails_with_worker_lost(cluster: Cluster) -> None:
    sched, gates = cluster.sched, cluster.gates
    marker, started, attempts = gates.path("marker"), gates.path("started"), gates.path("att")
    _, gate = gates.new()
    fut = sched.submit(tasks.block_first_time, marker, started, attempts, gate, retries=0)
    first = gates.started(started)
    victim = cluster.workers.by_pid(first["ppid"])
    victim.send_signal(signal.SIGKILL)
    with pytest.raises(WorkerLostError):
        fut.result(BEAT_TIMEOUT + RESULT)
    assert len(Path(attempts).read_text().splitlines()) == 1
    wait_until(lambda: victim.pid not in registered(sched), RESULT,
               message="the lost worker to be removed")
    wait_until(lambda: not is_alive(first["pid"]), 10,
               message="the killed worker's pool process to exit")
    assert sched.submit(tasks.square, 7).result(RESULT) == 49


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_settles_a_task_waiting_for_retry(tmp_path: Path,
                                                                  gates: Gates) -> None:
    sched, workers = start_cluster(tmp_path, gates, n=1)
    try:
        marker, started, attempts = gates.path("marker"), gates.path("started"), gates.path("a")
        _, gate = gates.new()
        fut = sched.submit(tasks.block_first_time, marker, started, attempts, gate, retries=1)
        gates.started(started)
        workers.procs[0].send_signal(signal.SIGKILL)
        workers.procs[0].wait(RESULT)
        # Lost, requeued for its retry, and no worker left to run it.
        wait_until(lambda: not registered(sched) and sched.status()["queued"] == 1, RESULT,
                   message="the task to be requeued")
        sched.shutdown(wait=True, cancel_futures=True)
        concurrent.futures.wait([fut], HANG)
        assert fut.done()
    finally:
        stop_cluster(sched, workers, gates)


# --- scheduler restart ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_tasks_submitted_while_no_worker_has_room_run_when_one_joins(tmp_path: Path,
                                                                     gates: Gates) -> None:
    """Submits behind a queue that found every tier full do not place it
    themselves: the worker that joins later must start all of them."""
    sched = remote_scheduler()
    workers = Workers(tmp_path)
    try:
        futures = [sched.submit(tasks.square, i) for i in range(50)]
        assert sched.status()["queued"] == 50  # no worker: nothing could start
        assert sched.address is not None
        workers.start(sched.address, "late")
        assert [f.result(RESULT) for f in futures] == [i * i for i in range(50)]
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(60)
def test_workers_reconnect_after_a_scheduler_restart(tmp_path: Path, gates: Gates) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    first = remote_scheduler(listen=address)
    workers = Workers(tmp_path)
    second: Scheduler | None = None
    try:
        assert first.address == address
        for name in ("w1", "w2"):
            workers.start(address, name)
        pids = sorted(p.pid for p in workers.procs)
        wait_until(lambda: registered(first) == pids, JOIN, message="both workers to join")
        Cluster(first, workers, gates).both_serve()
        first.shutdown(wait=True)

        second = rebind(address)
        assert second.address == address
        wait_until(lambda: registered(second) == pids, JOIN,
                   message="the same workers to reconnect by themselves")
        assert all(p.poll() is None for p in workers.procs)
        Cluster(second, workers, gates).both_serve()
        assert list(second.map(tasks.square, range(20))) == [i * i for i in range(20)]
    finally:
        gates.open_all()
        try:
            workers.stop_all()
        finally:
            first.shutdown(wait=True, cancel_futures=True)
            if second is not None:
                second.shutdown(wait=True, cancel_futures=True)


_SCHEDULER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import _sched_tasks as tasks
from shmrunner import Scheduler
sched = Scheduler(local_workers=0, listen={address!r}, heartbeat_interval={beat},
                  heartbeat_timeout={timeout})
sched.submit(tasks.gated, {started!r}, {gate!r}, "old session").result()
"""


@pytest.mark.timeout(90)
def test_a_restarted_schedulers_tasks_get_their_own_results(tmp_path: Path,
                                                            gates: Gates) -> None:
    """Task ids restart at 0 in every Scheduler. A scheduler process is killed
    while the agent runs its task 0; a new one on the same port sends its own
    task 0 (and more) to the same agent: each gets its own result, never the
    old task's."""
    address = f"tcp://127.0.0.1:{free_port()}"
    started, gate = gates.new()
    old = subprocess.Popen([sys.executable, "-c", _SCHEDULER_SCRIPT.format(
        tests=TESTS_DIR, address=address, beat=BEAT, timeout=BEAT_TIMEOUT, started=started,
        gate=gate)], cwd=REPO, stdin=subprocess.DEVNULL)
    workers = Workers(tmp_path)
    second: Scheduler | None = None
    try:
        agent = workers.start(address, "w1")
        assert gates.started(started)["ppid"] == agent.pid  # the old task 0 runs there
        old.kill()
        old.wait(RESULT)
        second = rebind(address)
        wait_until(lambda: registered(second) == [agent.pid], JOIN,
                   message="the agent to join the new scheduler")
        futures = [second.submit(tasks.add, i, 1000) for i in range(6)]
        gates.open(gate)  # the old task may finish now: its result must go nowhere
        assert [f.result(RESULT) for f in futures] == [i + 1000 for i in range(6)]
        assert list(second.map(tasks.square, range(10))) == [i * i for i in range(10)]
        assert agent.poll() is None
        assert "dropped the work of session" in workers.log("w1")
    finally:
        if old.poll() is None:
            old.kill()
            old.wait(RESULT)
        gates.open_all()
        try:
            workers.stop_all()
        finally:
            if second is not None:
                second.shutdown(wait=True, cancel_futures=True)


# --- threads that cannot die silently -------------------------------------------------------


@pytest.mark.timeout(60)
def test_hub_recovers_from_an_unexpected_error(tmp_path: Path, gates: Gates,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A round of the hub thread raises once, after tasks went out: the tasks the
    workers held are rerun (or fail with WorkerLostError), none stays pending, the
    workers rejoin and the hub serves on."""
    from shmrunner.tiers.remote import RemoteTier

    sched, workers = start_cluster(tmp_path, gates, n=1)
    try:
        original = RemoteTier._assign
        raised: list[bool] = []

        def assign_then_fail(self: RemoteTier) -> None:
            busy = bool(self._inbox)
            original(self)
            if busy and not raised:
                raised.append(True)
                raise RuntimeError("injected failure")

        monkeypatch.setattr(RemoteTier, "_assign", assign_then_fail)
        rerun = sched.submit(tasks.add, 1, 2, retries=2)
        concurrent.futures.wait([rerun], RESULT)
        assert rerun.result(0) == 3 and raised
        once = sched.submit(tasks.add, 2, 2, retries=0)
        assert once.result(RESULT) == 4
        status = sched.status()
        assert status["remote_errors"] == 1 and status["remote_alive"]
        wait_until(lambda: registered(sched) == [workers.procs[0].pid], JOIN,
                   message="the worker to rejoin")
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(60)
def test_hub_that_keeps_failing_fails_every_future(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub thread that fails round after round gives up: every future it held,
    and every one submitted after, fails with a clear error instead of pending."""
    from shmrunner.tiers.remote import RemoteTier

    sched = remote_scheduler()
    try:
        queued = sched.submit(tasks.add, 1, 1)  # no worker: waits in the hub

        def fail(self: RemoteTier) -> None:
            raise RuntimeError("injected, every round")

        monkeypatch.setattr(RemoteTier, "_heartbeat", fail)
        wait_until(lambda: sched.status()["remote_alive"] is False, RESULT,
                   message="the hub to give up")
        with pytest.raises(ShmrunnerError, match="remote tier crashed"):
            queued.result(RESULT)
        later = sched.submit(tasks.add, 2, 2)
        with pytest.raises(ShmrunnerError, match="remote tier crashed"):
            later.result(RESULT)
    finally:
        sched.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(60)
def test_agent_recovers_from_an_unexpected_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's loop raises once while sending a result: the agent logs it,
    counts it and reconnects; the task is rerun and nothing stays pending."""
    from shmrunner.config import WorkerSettings
    from shmrunner.worker import remote

    sched = remote_scheduler()
    assert sched.address is not None
    agent = remote.Agent(WorkerSettings(connect=sched.address, processes=1, name="inproc",
                                        heartbeat_interval=BEAT,
                                        heartbeat_timeout=BEAT_TIMEOUT))
    original = remote.result_body
    raised: list[bool] = []

    def fail_once(*args: Any) -> dict[str, Any]:
        if not raised:
            raised.append(True)
            raise RuntimeError("injected failure")
        return original(*args)

    monkeypatch.setattr(remote, "result_body", fail_once)
    thread = threading.Thread(target=agent.run, name="agent", daemon=True)
    thread.start()
    try:
        wait_until(lambda: registered(sched) == [os.getpid()], JOIN, message="the agent to join")
        assert sched.submit(tasks.add, 3, 4, retries=2).result(RESULT) == 7
        assert raised and agent.errors == 1 and thread.is_alive()
        assert sched.submit(tasks.add, 5, 5).result(RESULT) == 10
    finally:
        agent.stop()
        thread.join(RESULT)
        sched.shutdown(wait=True, cancel_futures=True)
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_port_is_free_when_shutdown_returns() -> None:
    # With a few peers connected a round fails about a third of the time (here, on
    # 2 cores): 100 rounds (~2 s) make the failure certain while the bug exists.
    hello = [bytes(f) for f in encode(Message("hello", {"name": "p", "host": "h", "pid": 1,
                                                        "capacity": 1}))]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        for _ in range(100):
            address = f"tcp://127.0.0.1:{free_port()}"
            sched = remote_scheduler(listen=address)
            peers = [_raw_dealer(ctx, address) for _ in range(5)]
            for peer in peers:
                peer.send_multipart(hello)
            wait_until(lambda s=sched: len(s.status()["workers"]) == 5, RESULT,
                       message="the peers to connect")
            sched.shutdown(wait=True)
            try:
                remote_scheduler(listen=address).shutdown(wait=True)
            finally:
                for peer in peers:
                    peer.close(linger=0)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(30)
def test_second_shutdown_touches_no_foreign_file_descriptor() -> None:
    sched = remote_scheduler()
    sched.shutdown(wait=True)
    r, w = os.pipe()  # takes the lowest free fds: those the hub just closed
    try:
        sched.shutdown(wait=True)  # e.g. an explicit shutdown, then the with-block's
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 16)
    finally:
        os.close(r)
        os.close(w)


# --- garbage ----------------------------------------------------------------------------------


def _raw_dealer(ctx: zmq.Context[Any], address: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = sock.rcvtimeo = RESULT * 1000
    sock.connect(address)
    return sock


def _garbage(max_bytes: int) -> list[list[bytes]]:
    """Messages that break the protocol, each one a list of frames."""
    header_with_array, array_frame = encode(Message("result", {
        "session": "s", "task_id": 1, "ok": True, "value": np.arange(1000, dtype=np.int64)}))
    hello = bytes(encode(Message("hello", {"name": "x", "host": "h", "pid": 1,
                                           "capacity": 1}))[0])
    half = max_bytes // 2 + 1
    return [
        [os.urandom(64)],                                           # random bytes
        [b""],                                                      # empty header
        [hello[: len(hello) // 2]],                                 # truncated header
        [bytes(header_with_array), bytes(array_frame)[:100]],       # truncated array frame
        [bytes(header_with_array)],                                 # array frame missing
        [msgpack.packb([99, "hello", {}])],                         # wrong version
        [msgpack.packb([V, "no_such_type", {}])],                   # unknown type
        [msgpack.packb([V, "task", {"task_id": 1, "fn": "m:f",      # not for a scheduler
                                    "args": [], "kwargs": {}}])],
        [msgpack.packb([V, "hello", {"name": 1}])],                 # bad body
        [msgpack.packb([V, "heartbeat", {}]), b"x" * half, b"y" * half],  # oversized total
        [msgpack.packb({"not": "a list"})],                         # header not a list
        [msgpack.packb([V, "heartbeat", {}]) + b"trailing"],        # trailing bytes
    ]


@pytest.mark.timeout(60)
def test_garbage_to_the_scheduler_is_rejected_and_counted(tmp_path: Path, gates: Gates) -> None:
    limit = 1 * MiB
    sched, workers = start_cluster(tmp_path, gates, max_message_bytes=limit)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        cluster = Cluster(sched, workers, gates)
        assert sched.address is not None
        before = sched.status()["rejected"]
        garbage = _garbage(limit)
        sock = _raw_dealer(ctx, sched.address)
        for frames in garbage:
            sock.send_multipart(frames)
        wait_until(lambda: sched.status()["rejected"] == before + len(garbage), RESULT,
                   message="every bad message to be counted")
        # A well-formed message from a stranger is not a worker: its result is
        # ignored (and counted), its heartbeat ignored.
        sock.send_multipart([bytes(f) for f in encode(Message("result", {
            "session": sched.status()["session"], "task_id": 0, "ok": True, "value": 1}))])
        sock.send_multipart([bytes(f) for f in encode(Message("heartbeat"))])
        wait_until(lambda: sched.status()["rejected"] == before + len(garbage) + 1, RESULT,
                   message="the stranger's result to be counted")
        before += 1
        # One frame over the limit: libzmq (MAXMSGSIZE) drops the connection before
        # the channel sees it (docs/protocol.md, Limits); the scheduler serves on.
        sock.send(b"z" * (limit + 1))
        # More garbage on a fresh connection still counts, and the flood did not
        # disturb the real workers.
        sock2 = _raw_dealer(ctx, sched.address)
        for frames in garbage:
            sock2.send_multipart(frames)
        wait_until(lambda: sched.status()["rejected"] == before + 2 * len(garbage), RESULT,
                   message="the second round of bad messages to be counted")
        assert registered(sched) == cluster.pids
        cluster.both_serve()
        assert list(sched.map(tasks.square, range(30))) == [i * i for i in range(30)]
        big_ok = np.arange(limit // 16, dtype=np.float64)  # half the limit: fits
        np.testing.assert_array_equal(sched.submit(tasks.double, big_ok).result(RESULT),
                                      big_ok * 2)
        assert sched.status()["rejected"] == before + 2 * len(garbage)
    finally:
        ctx.destroy(linger=0)
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(60)
def test_garbage_to_a_worker_is_rejected_and_it_keeps_serving(tmp_path: Path) -> None:
    """A fake scheduler (a raw ROUTER) talks to a real worker: garbage first,
    then a real task, which the worker must still run."""
    limit = 1 * MiB
    config = tmp_path / "small.yaml"
    config.write_text(f"worker:\n  heartbeat_interval: {BEAT}\n  heartbeat_timeout: 2.0\n"
                      f"  max_message_bytes: {limit}\n")
    ctx: zmq.Context[Any] = zmq.Context()
    router: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.sndtimeo = router.rcvtimeo = RESULT * 1000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    workers = Workers(tmp_path)
    try:
        proc = workers.start(f"tcp://127.0.0.1:{port}", "victim", config=config)

        def next_message() -> tuple[bytes, Message]:
            peer, *frames = router.recv_multipart(copy=False)
            return peer.bytes, decode(frames, max_bytes=limit, allow_pickle=False)

        peer, msg = next_message()
        assert msg.type == "hello" and msg.body["pid"] == proc.pid
        garbage = _garbage(limit) + [
            [msgpack.packb([V, "result", {"session": "s", "task_id": 1, "ok": True,
                                          "value": 1}])],                          # not for it
            [msgpack.packb([V, "task", {"task_id": -1, "fn": "m:f", "args": [],
                                        "kwargs": {}}])],                          # bad id
        ]
        welcome = [bytes(f) for f in encode(Message("welcome", {
            "heartbeat_interval": BEAT, "heartbeat_timeout": 2.0, "session": "fake"}))]
        router.send_multipart([peer, *welcome])
        for frames in garbage:
            router.send_multipart([peer, *frames])
        # Then a real task; the worker may have reconnected (new identity) meanwhile.
        task = [bytes(f) for f in encode(Message("task", {
            "task_id": 7, "fn": "_sched_tasks:add", "args": [2, 3], "kwargs": {}}))]
        router.send_multipart([peer, *task])
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + RESULT
        while 7 not in results and time.monotonic() < deadline:
            sender, msg = next_message()
            if msg.type == "result":
                results[msg.body["task_id"]] = msg.body
            elif msg.type == "hello":
                router.send_multipart([sender, *welcome])
                router.send_multipart([sender, *task])
            elif msg.type == "heartbeat":
                router.send_multipart([sender, *[bytes(f) for f in encode(Message("heartbeat"))]])
        assert results.get(7) == {"session": "fake", "task_id": 7, "ok": True, "value": 5}
        # The one well-formed task among the garbage ("m:f") failed cleanly.
        assert results[1]["ok"] is False and "ImportError" in results[1]["error"]["type"]
        assert proc.poll() is None
        wait_until(lambda: workers.log("victim").count("rejected message") >= 10, RESULT,
                   message="the worker to log the rejected messages")
        assert "Traceback" not in workers.log("victim")
    finally:
        router.close(linger=0)
        ctx.destroy(linger=0)
        workers.stop_all()
    assert proc.returncode == 0


# --- timeouts ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_task_timeout_through_the_remote_tier(cluster: Cluster) -> None:
    sched, gates = cluster.sched, cluster.gates
    attempts = gates.path("attempts")
    t0 = time.monotonic()
    fut = sched.submit(tasks.count_and_sleep, attempts, 60, timeout=1.0)
    with pytest.raises(TaskTimeoutError):
        fut.result(RESULT)
    # Stopped by its timeout, long before its 60 s sleep would end (a bound loose
    # enough for a loaded 2-core machine: not a timing measurement).
    assert time.monotonic() - t0 < 1.0 + 10.0
    (run,) = [json.loads(line) for line in Path(attempts).read_text().splitlines()]
    assert run["ppid"] in cluster.pids
    wait_until(lambda: not is_alive(run["pid"]), 10,
               message="the agent to kill the process running the task")
    # Both workers are still registered and serving (the pool process was replaced).
    assert registered(sched) == cluster.pids
    cluster.workers.note_pool()
    cluster.both_serve()
    # With a retry, the task runs (and times out) twice.
    attempts2 = gates.path("attempts2")
    with pytest.raises(TaskTimeoutError):
        sched.submit(tasks.count_and_sleep, attempts2, 60, timeout=0.5,
                     retries=1).result(RESULT)
    assert len(Path(attempts2).read_text().splitlines()) == 2
    cluster.workers.note_pool()


@pytest.mark.timeout(60)
def test_timeout_of_a_task_queued_behind_another_on_a_worker(cluster: Cluster) -> None:
    sched, gates = cluster.sched, cluster.gates
    held = []
    for _ in range(2):  # one gated task running on each worker
        s, g = gates.new()
        held.append((sched.submit(tasks.gated, s, g, "held"), s, g))
    for _, s, _ in held:
        gates.started(s)
    attempts = gates.path("attempts")
    # Goes to a worker's prefetch slot, behind a gated task; its timeout expires there.
    # (6 s: long enough to tell, short enough for the worker to drain at teardown.)
    fut = sched.submit(tasks.count_and_sleep, attempts, 6, timeout=0.5)
    wait_until(lambda: sum(w["busy"] for w in sched.status()["workers"]) == 3, RESULT,
               message="the third task to reach a worker")
    expired = time.monotonic() + 0.5 + 0.5
    # An observation window, not a synchronisation: the timeout must expire (and the
    # hub send its cancel) while the task is still queued; nothing to wait *for*.
    while time.monotonic() < expired:
        assert not fut.done()
        time.sleep(0.05)
    for _, _, g in held:
        gates.open(g)
    assert [f.result(RESULT) for f, _, _ in held] == ["held", "held"]
    # Whatever the deadline counts from, a 6 s task with timeout=0.5 must be stopped
    # within its timeout (plus a margin) of starting.
    with pytest.raises(TaskTimeoutError):
        fut.result(0.5 + 3.0)


# --- draining and shutdown --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_worker_finishes_its_task_and_exits_0(cluster: Cluster) -> None:
    sched, gates = cluster.sched, cluster.gates
    s, g = gates.new()
    fut = sched.submit(tasks.gated, s, g, "drained")
    holder = cluster.workers.by_pid(gates.started(s)["ppid"])
    other = [p for p in cluster.workers.procs if p is not holder][0]
    holder.send_signal(signal.SIGTERM)
    # The worker says bye: the scheduler sends it nothing new.
    wait_until(lambda: any(w["draining"] for w in sched.status()["workers"]
                           if w["pid"] == holder.pid), RESULT,
               message="the worker to announce it is draining")
    assert [f.result(RESULT)["ppid"] for f in [sched.submit(tasks.where) for _ in range(4)]] \
        == [other.pid] * 4
    assert holder.poll() is None and not fut.done()
    gates.open(g)
    assert fut.result(RESULT) == "drained"
    assert holder.wait(RESULT) == 0
    wait_until(lambda: registered(sched) == [other.pid], RESULT,
               message="the drained worker to be forgotten")
    assert sched.submit(tasks.square, 8).result(RESULT) == 64


@pytest.mark.timeout(60)
def test_shutdown_waits_and_runs_queued_tasks(cluster: Cluster) -> None:
    sched, gates = cluster.sched, cluster.gates
    held = []
    for i in range(4):  # capacity 1 + prefetch 1 on each of two workers
        s, g = gates.new()
        held.append((sched.submit(tasks.gated, s, g, i), s, g))
    queued = [sched.submit(tasks.square, i) for i in range(6)]
    stopper = threading.Thread(target=sched.shutdown, kwargs={"wait": True})
    stopper.start()
    wait_until(lambda: sched.status()["shutdown"], RESULT, message="shutdown to begin")
    with pytest.raises(RuntimeError):
        sched.submit(tasks.square, 1)
    assert stopper.is_alive()
    for _, _, g in held:
        gates.open(g)
    stopper.join(RESULT)
    assert not stopper.is_alive()
    assert [f.result(0) for f, _, _ in held] == [0, 1, 2, 3]
    assert [f.result(0) for f in queued] == [i * i for i in range(6)]


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_cancels_queued_tasks(cluster: Cluster) -> None:
    sched, gates = cluster.sched, cluster.gates
    held = []
    for i in range(4):
        s, g = gates.new()
        held.append((sched.submit(tasks.gated, s, g, i), s, g))
    wait_until(lambda: sum(w["busy"] for w in sched.status()["workers"]) == 4, RESULT,
               message="both workers to hold two tasks")
    ran = [gates.path(f"victim-{i}") for i in range(5)]
    victims = [sched.submit(tasks.mark_run, p) for p in ran]
    assert victims[0].cancel()  # Future.cancel() on a queued remote task
    stopper = threading.Thread(target=sched.shutdown,
                               kwargs={"wait": True, "cancel_futures": True})
    stopper.start()
    wait_until(lambda: all(v.cancelled() for v in victims), RESULT,
               message="the queued tasks to be cancelled")
    for _, _, g in held:
        gates.open(g)
    stopper.join(RESULT)
    assert not stopper.is_alive()
    assert [f.result(0) for f, _, _ in held] == [0, 1, 2, 3]
    assert not any(os.path.exists(p) for p in ran)


@pytest.mark.timeout(60)
def test_worker_follows_the_schedulers_heartbeat_settings(tmp_path: Path,
                                                         gates: Gates) -> None:
    sched = remote_scheduler()
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None
        proc = workers.start(sched.address, "defaults", config=None)
        wait_until(lambda: registered(sched) == [proc.pid], JOIN, message="the worker to join")
        (first,) = sched.status()["workers"]
        # Observe for several heartbeat timeouts: the same registration stays.
        until = time.monotonic() + 3 * BEAT_TIMEOUT
        while time.monotonic() < until:
            assert [w["id"] for w in sched.status()["workers"]] == [first["id"]]
            time.sleep(0.05)
        assert "lost" not in Path(workers.log_path("defaults")).read_text()
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(90)
def test_sigkilled_pool_process_loses_only_the_running_task_of_a_batch(
        tmp_path: Path, gates: Gates) -> None:
    """An agent holds a running task and a batch queued behind it (tasks travel
    many per message, and the agent's one process may hold many); its pool
    process is SIGKILLed: exactly the running task fails with WorkerLostError,
    the queued ones run on the replacement process, and the agent stays."""
    sched, workers = start_cluster(tmp_path, gates, n=1, prefetch=8)
    try:
        started, gate = gates.new()
        running = sched.submit(tasks.gated, started, gate, "held", retries=0)
        victim = gates.started(started)["pid"]
        queued = [sched.submit(tasks.where) for _ in range(8)]
        wait_until(lambda: sum(w["busy"] for w in sched.status()["workers"]) == 9, RESULT,
                   message="the batch to reach the agent")
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            running.result(RESULT)
        ran = [f.result(RESULT) for f in queued]
        assert {r["pid"] for r in ran} and victim not in {r["pid"] for r in ran}
        assert {r["ppid"] for r in ran} == {workers.procs[0].pid}
        assert sched.status()["lost_workers"] == 0  # the agent itself was not lost
        assert registered(sched) == [workers.procs[0].pid]
        workers.note_pool()
    finally:
        stop_cluster(sched, workers, gates)
