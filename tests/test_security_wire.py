"""Attacks on the remote tier's wire: real hubs and real agents over real
sockets on 127.0.0.1, fed by raw ZeroMQ sockets that break the rules on purpose.

Each test checks that the attack is refused (counted in ``rejected``), that the
victim's memory stays bounded (RSS from /proc), and that it keeps serving.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from test_remote import Workers

import _sched_tasks as tasks
from _sched_tasks import Gates
from _util import wait_until
from shmrunner import Scheduler
from shmrunner.config import SchedulerSettings
from shmrunner.errors import ConfigError
from shmrunner.transport.protocol import MAX_CAPACITY, PROTOCOL_VERSION, Message, decode, encode

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
    options.setdefault("heartbeat_timeout", BEAT_TIMEOUT)
    return Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", heartbeat_interval=BEAT,
                     **options)


# --- capacity ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_advertised_capacity_is_bounded(raw: Raw) -> None:
    """A hello claiming 2**62 slots (it took every task, none completed) is
    refused and counted; the largest allowed capacity joins."""
    sched = hub_scheduler()
    try:
        assert sched.address is not None
        greedy = raw.dealer(sched.address)
        for capacity in (2**62, MAX_CAPACITY + 1, 0, -1):
            greedy.send_multipart(hello(capacity, "greedy"))
        wait_until(lambda: sched.status()["rejected"] == 4, RESULT,
                   message="the four bad hellos to be refused")
        assert sched.status()["workers"] == []
        honest = raw.dealer(sched.address)
        honest.send_multipart(hello(MAX_CAPACITY, "honest"))
        welcome = honest.recv_multipart()
        assert msgpack.unpackb(welcome[0])[1] == "welcome"
        (worker,) = sched.status()["workers"]
        assert worker["name"] == "honest" and worker["capacity"] == MAX_CAPACITY
        assert greedy.poll(0) == 0  # the refused peer was never welcomed
    finally:
        sched.shutdown(wait=True, cancel_futures=True)


def test_prefetch_is_bounded() -> None:
    """A worker holds at most capacity + prefetch tasks: both are bounded."""
    with pytest.raises(ConfigError, match="prefetch"):
        hub_scheduler(prefetch=MAX_CAPACITY + 1)
    assert SchedulerSettings(prefetch=MAX_CAPACITY).prefetch == MAX_CAPACITY


# --- a peer that stops reading ----------------------------------------------------------


class StuckWorker(threading.Thread):
    """A fake worker (a raw DEALER): says hello, then sends heartbeats forever and
    never reads a byte (its receive queue and buffer are tiny), so whatever the
    hub sends it piles up."""

    def __init__(self, context: zmq.Context[Any], address: str, capacity: int) -> None:
        super().__init__(name="stuck-worker", daemon=True)
        self.context, self.address, self.capacity = context, address, capacity
        self.stop = threading.Event()

    def run(self) -> None:
        sock: zmq.Socket[Any] = self.context.socket(zmq.DEALER)
        try:
            sock.linger = 0
            sock.rcvhwm = 1
            sock.setsockopt(zmq.RCVBUF, 4096)
            sock.sndtimeo = 1000
            sock.connect(self.address)
            sock.send_multipart(hello(self.capacity, "stuck"))
            beat = frames(Message("heartbeat"))
            while not self.stop.wait(BEAT):
                sock.send_multipart(beat)
        finally:
            sock.close(linger=0)


@pytest.mark.timeout(90)
def test_a_worker_that_stops_reading_never_blocks_the_hub(tmp_path: Path, raw: Raw) -> None:
    """Tasks with big arrays go to a worker that never reads (and keeps sending
    heartbeats): the hub loses it once nothing it was sent moves for a heartbeat
    timeout, never waits for it, and its tasks rerun on the real agent, whose
    heartbeats kept it alive all along."""
    sched = hub_scheduler()
    workers = Workers(tmp_path)
    stuck: StuckWorker | None = None
    try:
        assert sched.address is not None
        agent = workers.start(sched.address, "real")
        wait_until(lambda: len(sched.status()["workers"]) == 1, RESULT, message="the agent to join")
        stuck = StuckWorker(raw.context, sched.address, capacity=8)
        stuck.start()
        wait_until(lambda: len(sched.status()["workers"]) == 2, RESULT,
                   message="the stuck worker to join")
        big = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB: more than any socket buffers
        futures = [sched.submit(tasks.checksum, big, retries=3) for _ in range(12)]
        assert [f.result(RESULT) for f in futures] == [float(big.sum())] * 12
        status = sched.status()
        assert [w["pid"] for w in status["workers"]] == [agent.pid]
        assert status["lost_workers"] == 1  # the stuck one; never the real agent
    finally:
        if stuck is not None:
            stuck.stop.set()
            stuck.join(RESULT)
        workers.stop_all()
        sched.shutdown(wait=True, cancel_futures=True)


# --- limits hold before memory is spent ---------------------------------------------------


def expanding_header(n: int = MiB, empty: bytes = b"\x90") -> list[bytes]:
    """A valid-looking header of ``n`` bytes of empty lists (or maps): ~70 bytes
    each once decoded (1 MiB of them took 74 MiB)."""
    return [b"\x93" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("status_reply")
            + b"\xdd" + n.to_bytes(4, "big") + empty * n]


ATTACKS = [
    ("empty lists", lambda: expanding_header(), 32 * MiB),
    ("empty maps", lambda: expanding_header(empty=b"\x80"), 32 * MiB),
    ("300,000 empty frames", lambda: [b""] * 300_000, 96 * MiB),  # was 173 MiB each
]


def attack(send: Any, rejected: Any, pid: int | str) -> None:
    """Send each attack three times; each must be counted, and the victim's RSS
    must grow by less than the attack's bound."""
    for name, make, bound in ATTACKS:
        before, count = rss(pid), rejected()
        for _ in range(3):
            send(make())
        wait_until(lambda c=count: rejected() >= c + 3, RESULT,
                   message=f"the {name} to be rejected")
        grown = rss(pid) - before
        assert grown < bound, f"{name}: RSS grew by {grown / MiB:.0f} MiB"


@pytest.fixture
def hub_with_agent(tmp_path: Path, raw: Raw) -> Iterator[tuple[Scheduler, int, Any]]:
    """A hub (the file's 1 s heartbeat timeout), one real agent joined to it,
    and a raw DEALER connected to it as the attacker: (hub, agent pid, socket)."""
    sched = hub_scheduler()
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None
        agent = workers.start(sched.address, "real")
        wait_until(lambda: len(sched.status()["workers"]) == 1, RESULT, message="the agent to join")
        yield sched, agent.pid, raw.dealer(sched.address)
    finally:
        workers.stop_all()
        sched.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(120)
def test_hub_refuses_frame_floods_and_expanding_headers(
        hub_with_agent: tuple[Scheduler, int, Any]) -> None:
    sched, agent_pid, sock = hub_with_agent
    attack(sock.send_multipart, lambda: sched.status()["rejected"], "self")
    status = sched.status()
    assert [w["pid"] for w in status["workers"]] == [agent_pid]
    assert status["lost_workers"] == 0  # never blocked long enough to lose its agent
    assert sched.submit(tasks.add, 2, 3).result(RESULT) == 5


@pytest.mark.timeout(120)
def test_one_message_of_millions_of_frames_never_stops_the_hubs_heartbeats(
        hub_with_agent: tuple[Scheduler, int, Any]) -> None:
    """libzmq hands over a multipart message whole, so a refused one must be
    read to its end: 1.5 million empty frames (3 MB on the wire) take seconds,
    longer than the heartbeat timeout. The hub reads it a slice at a time, goes
    on with its heartbeats between slices, and does not count that time as
    its agent's silence: the agent is never lost, nor does it leave."""
    sched, agent_pid, sock = hub_with_agent
    (joined,) = sched.status()["workers"]
    sent = time.monotonic()
    sock.send_multipart([b""] * 1_500_000)
    wait_until(lambda: sched.status()["rejected"] >= 1, RESULT,
               message="the flood of frames to be refused")
    # What makes this a test: reading it took longer than the timeout.
    assert time.monotonic() - sent > BEAT_TIMEOUT
    status = sched.status()
    assert status["lost_workers"] == 0
    assert [(w["id"], w["pid"]) for w in status["workers"]] == [(joined["id"], agent_pid)]
    assert sched.submit(tasks.add, 2, 3).result(RESULT) == 5


class FakeScheduler:
    """A raw ROUTER a real agent connects to: welcomes it, then sends what the
    test says; answers heartbeats so the agent stays connected."""

    def __init__(self, raw: Raw) -> None:
        self.sock: zmq.Socket[Any] = raw.context.socket(zmq.ROUTER)
        raw.sockets.append(self.sock)
        self.sock.linger = 0
        self.sock.sndtimeo = self.sock.rcvtimeo = RESULT * 1000
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.peer = b""
        # The fake answers heartbeats only while a test reads from it: an agent
        # told 5 s would reconnect (a new identity, deaf to later sends) during a
        # long attack on a loaded machine.
        self.welcome = frames(Message("welcome", {
            "heartbeat_interval": BEAT, "heartbeat_timeout": 60.0, "session": "fake"}))

    def next(self) -> Message:
        peer, *parts = self.sock.recv_multipart(copy=False)
        msg = decode(parts, max_bytes=1 << 30, allow_pickle=False)
        if msg.type == "hello":
            self.peer = peer.bytes
            self.sock.send_multipart([self.peer, *self.welcome])
        elif msg.type == "heartbeat":
            self.sock.send_multipart([peer.bytes, *frames(Message("heartbeat"))])
        return msg

    def send(self, parts: list[bytes]) -> None:
        self.sock.send_multipart([self.peer, *parts])

    def result(self, task_id: int) -> dict[str, Any]:
        while True:
            msg = self.next()
            if msg.type == "result" and msg.body["task_id"] == task_id:
                return msg.body


def rejected_by(workers: Workers, name: str) -> Any:
    """The agent's rejected count, from its log: it logs every thousandth and the
    first ten, and these tests stay under ten."""
    return lambda: workers.log(name).count("rejected message")


@pytest.mark.timeout(120)
def test_agent_refuses_frame_floods_and_expanding_headers(tmp_path: Path, raw: Raw) -> None:
    fake = FakeScheduler(raw)
    workers = Workers(tmp_path)
    try:
        agent = workers.start(f"tcp://127.0.0.1:{fake.port}", "victim")
        while fake.next().type != "hello":
            pass
        attack(fake.send, rejected_by(workers, "victim"), agent.pid)
        fake.send(frames(Message("task", {"task_id": 7, "fn": "_sched_tasks:add",
                                          "args": [2, 3], "kwargs": {}})))
        assert fake.result(7) == {"session": "fake", "task_id": 7, "ok": True, "value": 5}
        assert agent.poll() is None
    finally:
        workers.stop_all()


# --- cancels and sessions at the agent --------------------------------------------------------


@pytest.mark.timeout(90)
def test_agent_stops_only_a_task_of_its_session_that_still_runs(tmp_path: Path,
                                                                raw: Raw) -> None:
    """Task ids repeat across sessions: a cancel stops task N only while task N
    of the connection's session runs there; a new session's welcome drops the
    old session's work, and its own task N gets its own result."""
    fake = FakeScheduler(raw)
    workers = Workers(tmp_path)
    gates = Gates(tmp_path)
    try:
        agent = workers.start(f"tcp://127.0.0.1:{fake.port}", "victim", "--processes", "2")
        while fake.next().type != "hello":
            pass

        def task(task_id: int, fn: str, *args: Any) -> list[bytes]:
            return frames(Message("task", {"task_id": task_id, "fn": fn, "args": list(args),
                                           "kwargs": {}}))

        def cancel(task_id: int) -> list[bytes]:
            return frames(Message("cancel", {"task_id": task_id}))

        started, gate = gates.new()
        fake.send(task(1, "_sched_tasks:gated", started, gate, "one"))
        gates.started(started)
        fake.send(cancel(2))                       # never sent: ignored
        fake.send(task(3, "_sched_tasks:add", 1, 2))
        assert fake.result(3)["value"] == 3        # task 1 was not stopped: it still runs
        fake.send(cancel(1))                       # running: stopped
        stopped = fake.result(1)
        assert stopped["ok"] is False and stopped["session"] == "fake"
        assert stopped["error"]["type"].endswith("TaskTimeoutError")
        fake.send(cancel(1))                       # finished: nothing to stop
        fake.send(task(4, "_sched_tasks:add", 2, 2))
        assert fake.result(4)["value"] == 4

        # A scheduler restart, as the agent sees it: a welcome with a new session
        # while the old one's task 5 runs. Task 5 of the new session is another task.
        started, gate = gates.new()
        fake.send(task(5, "_sched_tasks:gated", started, gate, "old"))
        gates.started(started)
        fake.welcome = frames(Message("welcome", {
            "heartbeat_interval": BEAT, "heartbeat_timeout": 60.0, "session": "new"}))
        fake.send(fake.welcome)
        fake.send(cancel(5))                       # the new session's 5 is not running yet
        fake.send(task(5, "_sched_tasks:add", 5, 5))
        gates.open(gate)
        new = fake.result(5)
        assert new == {"session": "new", "task_id": 5, "ok": True, "value": 10}
        fake.send(task(6, "_sched_tasks:add", 3, 3))
        assert fake.result(6) == {"session": "new", "task_id": 6, "ok": True, "value": 6}
        assert "dropped the work of session fake" in workers.log("victim")
        assert agent.poll() is None
    finally:
        gates.open_all()
        workers.stop_all()


@pytest.mark.timeout(60)
def test_agent_drains_on_sigterm_while_its_scheduler_is_gone(tmp_path: Path, raw: Raw) -> None:
    """Its scheduler fell silent while a task ran; the agent reconnected and was
    never welcomed again. The task's result has nowhere to go, yet SIGTERM still
    drains (the finished task is no longer running) and exits 0."""
    fake = FakeScheduler(raw)
    fake.welcome = frames(Message("welcome", {
        "heartbeat_interval": BEAT, "heartbeat_timeout": 0.5, "session": "fake"}))
    workers = Workers(tmp_path)
    gates = Gates(tmp_path)
    try:
        workers.start(f"tcp://127.0.0.1:{fake.port}", "orphan")
        while fake.next().type != "hello":
            pass
        started, gate = gates.new()
        fake.send(frames(Message("task", {"task_id": 1, "fn": "_sched_tasks:gated",
                                          "args": [started, gate, 1], "kwargs": {}})))
        gates.started(started)
        while True:   # no more answers from here on: the agent reconnects, unwelcomed
            _, *parts = fake.sock.recv_multipart()
            if decode(parts, max_bytes=1 << 20, allow_pickle=False).type == "hello":
                break
        gates.open(gate)
    finally:
        gates.open_all()
        workers.stop_all()   # asserts: exit 0 within its grace after SIGTERM


# --- fuzz ---------------------------------------------------------------------------------

FUZZ_MESSAGES = int(os.environ.get("SHMRUNNER_FUZZ_MESSAGES", "100000"))
FIELDS = ["name", "host", "pid", "capacity", "task_id", "job_id", "ok", "value", "error",
          "session", "results", "reason", "tasks", "fn", "args", "kwargs", "timeout", "x"]
TYPES = ["hello", "result", "results", "heartbeat", "bye", "task", "welcome", "submit", "nope"]


class Fuzzer:
    """Random messages, cheap enough to make 100,000 of them in a few seconds."""

    def __init__(self, seed: int, session: str) -> None:
        self.rng = random.Random(seed)
        self.session = session

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(12 if depth < 3 else 8)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice([0, 1, -1, 7, 2**31, 2**62, 2**64 - 1, -(2**63), MAX_CAPACITY])
        if kind == 3:
            return rng.random() * rng.choice([1, 1e300, -1])
        if kind == 4:
            return rng.choice(["", "s", self.session, "x" * 65, "_sched_tasks:add", "os:system"])
        if kind == 5:
            return rng.randbytes(rng.randrange(16))
        if kind == 6:
            return msgpack.ExtType(rng.choice([0, 1, 2, 3, 4, 127]), rng.randbytes(
                rng.randrange(12)))
        if kind == 7:
            return rng.randrange(1 << 16)
        if kind in (8, 9):
            return [self.value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(FIELDS): self.value(depth + 1) for _ in range(rng.randrange(4))}

    def body(self, type_: str) -> dict[str, Any]:
        rng = self.rng
        if type_ == "hello":
            return {"name": "fuzz", "host": "h", "pid": rng.randrange(100),
                    "capacity": rng.choice([0, 1, 4, MAX_CAPACITY, MAX_CAPACITY + 1, 2**62])}
        if type_ in ("result", "results"):
            one = {"session": rng.choice([self.session, "other", 3]),
                   "task_id": rng.choice([0, 1, 2, 99, -1, 2**63]),
                   "ok": rng.choice([True, False, 1]), "value": self.value(1)}
            return {"results": [one] * rng.randrange(3)} if type_ == "results" else one
        return {rng.choice(FIELDS): self.value(1) for _ in range(rng.randrange(5))}

    def message(self) -> list[bytes]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.3:      # random frames of random bytes
            return [rng.randbytes(rng.randrange(40)) for _ in range(1 + rng.randrange(4))]
        if roll < 0.55:     # a msgpack header of random values, with stray frames
            head = [rng.choice([PROTOCOL_VERSION, PROTOCOL_VERSION, 1, 3, "2"]),
                    rng.choice(TYPES), self.value()]
            extra = [rng.randbytes(rng.randrange(24)) for _ in range(rng.randrange(3))]
            return [msgpack.packb(head[:rng.choice([3, 3, 3, 2, 4])]), *extra]
        type_ = rng.choice(["hello", "result", "results", "heartbeat", "bye", "result"])
        header = msgpack.packb([PROTOCOL_VERSION, type_, self.body(type_)], use_bin_type=True)
        if rng.random() < 0.1:      # valid-looking, cut or flipped
            cut = bytearray(header[:rng.randrange(1, len(header) + 1)])
            cut[rng.randrange(len(cut))] ^= 1 << rng.randrange(8)
            header = bytes(cut)
        return [header]


@pytest.mark.timeout(120)
def test_fuzz_the_hub_with_random_messages(tmp_path: Path, raw: Raw) -> None:
    """FUZZ_MESSAGES random messages from a few raw peers at a real Scheduler's
    worker endpoint: the hub keeps running, counts what it refused, stays within
    a memory bound, and then runs a task on a real agent."""
    sched = hub_scheduler()
    workers = Workers(tmp_path)
    try:
        assert sched.address is not None
        agent = workers.start(sched.address, "real")
        wait_until(lambda: len(sched.status()["workers"]) == 1, RESULT, message="the agent to join")
        fuzzer = Fuzzer(20261202, sched.status()["session"])
        peers = [raw.dealer(sched.address) for _ in range(4)]
        before_rss, before = rss(), sched.status()["rejected"]
        for i in range(FUZZ_MESSAGES):
            peers[i % len(peers)].send_multipart(fuzzer.message())
        for i in range(20):   # a few over the frame limit among them
            peers[i % len(peers)].send_multipart([b""] * 10_000)
        wait_until(lambda: sched.status()["rejected"] - before >= FUZZ_MESSAGES // 2, 60,
                   message="at least half the messages to be refused")
        assert sched.status()["remote_alive"] and sched.status()["remote_errors"] == 0
        # The fuzzers that said a valid hello fall silent and are lost; the agent stays.
        wait_until(lambda: [w["pid"] for w in sched.status()["workers"]] == [agent.pid], RESULT,
                   message="only the real agent to remain")
        assert sched.submit(tasks.add, 20, 22).result(RESULT) == 42
        grown = rss() - before_rss
        assert grown < 128 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    finally:
        workers.stop_all()
        sched.shutdown(wait=True, cancel_futures=True)
