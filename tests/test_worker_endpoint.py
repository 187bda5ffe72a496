"""A ``shmrunner worker`` pointed at the wrong thing says so and exits.

Real ``shmrunner worker`` processes against a daemon's clients endpoint, a
plain TCP listener that accepts and says nothing, a port nobody listens on and
a ZeroMQ peer that answers with garbage: each ends in one line naming the
address, and exit status 1. A worker that was welcomed once keeps
reconnecting past its join_timeout while its scheduler is away.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import _sched_tasks as tasks
from _daemon_tasks import Daemon, Proc, free_port
from _util import wait_until
from shmrunner import Scheduler
from shmrunner.transport.zmqchannel import ChannelError

# Short heartbeats and a short join_timeout, given as the operators would: the
# environment and --set.
BEATS = {"SHMRUNNER_WORKER__HEARTBEAT_INTERVAL": "0.1",
         "SHMRUNNER_WORKER__HEARTBEAT_TIMEOUT": "0.5"}
EXIT = 30  # seconds a wrong-endpoint worker may take at most here (it takes ~join_timeout)


@pytest.fixture
def beats(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BEATS.items():
        monkeypatch.setenv(name, value)


def run_worker(tmp_path: Path, address: str, *extra: str) -> tuple[int, list[str]]:
    """Run a worker to its end; its exit status and stderr lines."""
    proc = Proc(["worker", "--connect", address, "--processes", "1", *extra],
                tmp_path / "worker.err")
    try:
        proc.popen.wait(EXIT)
    finally:
        leftovers = proc.stop()
    assert not leftovers, leftovers
    return proc.popen.returncode, proc.text().splitlines()


def assert_wrong_endpoint(code: int, lines: list[str], address: str) -> str:
    assert code == 1, lines
    assert lines and not any("Traceback" in line for line in lines), lines
    last = lines[-1]
    assert last.startswith(f"shmrunner worker: {address} did not answer as a shmrunner "
                           "scheduler"), last
    assert "workers address" in last and "daemon.clients" in last, last
    return last


@pytest.mark.timeout(90)
def test_a_worker_at_a_daemons_clients_address_says_so_and_exits_1(tmp_path: Path,
                                                                   beats: None) -> None:
    daemon = Daemon(tmp_path)
    try:
        daemon.start()
        code, lines = run_worker(tmp_path, daemon.address, "--set", "worker.join_timeout=1.5",
                                 "--log-level", "ERROR")  # a global option after the command
        last = assert_wrong_endpoint(code, lines, daemon.address)
        assert "1.5 s" in last and "worker.join_timeout" in last, last
        assert len(lines) == 1, lines  # --log-level ERROR hid the reconnect warnings
        # It heard a hello it had no use for (counted when read: poll, do not race it).
        wait_until(lambda: daemon.status()["rejected"] >= 1, 30,
                   message="the daemon to count the worker's hello as rejected")
    finally:
        assert not daemon.close()


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)  # held open, never written to

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()
        assert accepted, "the worker never connected to the listener"


@pytest.mark.timeout(60)
def test_a_worker_at_a_silent_tcp_listener_says_so_and_exits_1(tmp_path: Path, beats: None,
                                                               silent_listener: str) -> None:
    code, lines = run_worker(tmp_path, silent_listener, "--set", "worker.join_timeout=1.5")
    assert_wrong_endpoint(code, lines, silent_listener)
    # Before giving up it said what it was doing (the default level shows warnings).
    assert any("reconnecting" in line for line in lines[:-1]), lines


@pytest.mark.timeout(60)
def test_a_worker_at_nothing_at_all_exits_1(tmp_path: Path, beats: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("SHMRUNNER_WORKER__JOIN_TIMEOUT", "1")  # the environment's turn
    code, lines = run_worker(tmp_path, address)
    assert "within 1 s" in assert_wrong_endpoint(code, lines, address)


@pytest.mark.timeout(60)
def test_a_peer_answering_garbage_ends_the_worker_without_waiting(tmp_path: Path,
                                                                  beats: None) -> None:
    """A ZeroMQ peer that answers the hello with something that is not the
    protocol's: the worker gives up at once, even with join_timeout null."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            if router.poll(50):
                peer = router.recv_multipart()[0]
                router.send_multipart([peer, b"HTTP/1.1 400 Bad Request\r\n\r\n"])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        code, lines = run_worker(tmp_path, address, "--set", "worker.join_timeout=null")
    finally:
        stop.set()
        thread.join(5)
        router.close()
        ctx.term()
    last = assert_wrong_endpoint(code, lines, address)
    assert "not a scheduler's welcome" in last, last


@pytest.mark.timeout(90)
def test_a_welcomed_worker_keeps_reconnecting_past_its_join_timeout(tmp_path: Path,
                                                                    beats: None) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    options = {"local_workers": 0, "heartbeat_interval": 0.1, "heartbeat_timeout": 0.5}
    first: Scheduler | None = Scheduler(listen=address, **options)
    second: Scheduler | None = None
    worker = Proc(["worker", "--connect", address, "--processes", "1",
                   "--set", "worker.join_timeout=0.5"], tmp_path / "worker.err")
    try:
        assert first is not None
        wait_until(lambda: len(first.status()["workers"]) == 1, 30,  # type: ignore[union-attr]
                   message="the worker to join")
        assert first.submit(tasks.square, 3).result(timeout=30) == 9
        first.shutdown(wait=True)
        first = None
        # Away for several reconnects, each longer than join_timeout.
        wait_until(lambda: worker.text().count("reconnecting") >= 4, 30,
                   message="the worker to try again a few times")
        assert worker.alive(), worker.text()

        def bind_again() -> bool:
            nonlocal second
            try:
                second = Scheduler(listen=address, **options)
            except ChannelError:  # libzmq may hold the port a moment longer
                return False
            return True

        wait_until(bind_again, 10, message="the port to be free again")
        assert second is not None
        assert second.submit(tasks.square, 4).result(timeout=30) == 16
        assert worker.alive()
    finally:
        leftovers = worker.stop()
        for sched in (first, second):
            if sched is not None:
                sched.shutdown(wait=True, cancel_futures=True)
    assert worker.popen.returncode == 0, worker.text()  # SIGTERM: drained, exit 0
    assert not leftovers, leftovers
    assert "did not answer" not in worker.text()


def test_the_default_join_timeout_is_bounded() -> None:
    from shmrunner.config import WorkerSettings

    timeout = WorkerSettings().join_timeout
    assert timeout is not None and 0 < timeout <= 60
    assert "SHMRUNNER_WORKER__JOIN_TIMEOUT" not in os.environ
