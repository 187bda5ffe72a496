"""Slots: ``shmrunner worker --slots``, whose processes each hold their own
connection to the scheduler while the agent supervises them.

Real agents (``python -m shmrunner.cli worker --slots``) against a real
Scheduler over 127.0.0.1: results, arrays and errors travel; a slot killed
(by a test, a timeout, a cancel, its memory limit, the kernel's OOM killer in
a real memory cgroup) fails only the task it ran, the tasks queued behind it
run on its replacement, and nothing outlives the agent. Hostile hellos and
reports are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _memory_tasks
import msgpack
import numpy as np
import pytest
import zmq
from test_remote import BEAT_TIMEOUT, JOIN, RESULT, Workers, remote_scheduler, stop_cluster
from test_timeouts import _stress

import _failure_tasks
import _sched_tasks as tasks
import _timeout_tasks
from _daemon_tasks import env
from _sched_tasks import Gates
from _util import children, is_alive, wait_until
from shmrunner import (
    FunctionNotAllowedError,
    MemoryLimitError,
    Scheduler,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerLostError,
)
from shmrunner.transport.protocol import MAX_EVIDENCE, PROTOCOL_VERSION, Message, decode, encode
from shmrunner.worker._slots import Ended, lost_body


class SlotCluster:
    """A Scheduler and one ``--slots`` agent of ``processes`` slots."""

    def __init__(self, tmp_path: Path, processes: int, *extra: str,
                 **options: Any) -> None:
        self.sched = remote_scheduler(**options)
        self.workers = Workers(tmp_path)
        assert self.sched.address is not None
        self.agent = self.workers.start(self.sched.address, "a", "--slots",
                                        "--processes", str(processes), *extra)
        self.processes = processes
        try:
            wait_until(lambda: len(self.slot_pids()) == processes, JOIN,
                       message=f"the agent and its {processes} slots to join")
        except BaseException:
            self.close()
            raise

    def slots(self) -> list[dict[str, Any]]:
        return [w for w in self.sched.status()["workers"] if w["name"].startswith("a/")]

    def slot_pids(self) -> list[int]:
        return sorted(w["pid"] for w in self.slots())

    def close(self) -> None:
        try:
            self.workers.stop_all()
        finally:
            self.sched.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def slot_cluster(tmp_path: Path, gates: Gates, processes: int) -> Iterator[SlotCluster]:
    cluster = SlotCluster(tmp_path, processes)
    try:
        yield cluster
    finally:
        gates.open_all()
        cluster.close()


@pytest.fixture
def one_slot(tmp_path: Path, gates: Gates) -> Iterator[SlotCluster]:
    with slot_cluster(tmp_path, gates, 1) as cluster:
        yield cluster


@pytest.fixture
def two_slots(tmp_path: Path, gates: Gates) -> Iterator[SlotCluster]:
    with slot_cluster(tmp_path, gates, 2) as cluster:
        yield cluster


def started_pid(gates: Gates, name: str) -> int:
    """The pid a gated task reported when it started."""
    path = gates.path(name)
    wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, RESULT,
               message=f"task {name} to start")
    return int(json.loads(Path(path).read_text())["pid"])


# --- what travels ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_results_arrays_and_errors_travel_through_slots(two_slots: SlotCluster,
                                                        gates: Gates) -> None:
    sched = two_slots.sched
    assert sched.submit(tasks.add, 2, 3).result(RESULT) == 5
    assert sched.submit("_sched_tasks:square", 7).result(RESULT) == 49
    arr = np.arange(300_000, dtype=np.float64)  # 2.4 MB: its own frame, both ways
    np.testing.assert_array_equal(sched.submit(tasks.double, arr).result(RESULT), arr * 2)
    with pytest.raises(ValueError, match="bad input"):
        sched.submit(tasks.raise_value_error, "bad input").result(RESULT)
    squares = [sched.submit(tasks.square, i) for i in range(500)]
    assert [f.result(RESULT) for f in squares] == [i * i for i in range(500)]
    # Two tasks that finish only when both run at once: both slots take work,
    # each in its own process, the agent's children.
    a, b = gates.path("a"), gates.path("b")
    pids = {f.result(RESULT)["pid"] for f in [sched.submit(tasks.all_started, a, [b]),
                                              sched.submit(tasks.all_started, b, [a])]}
    assert pids == set(two_slots.slot_pids())
    assert set(pids) <= set(children(two_slots.agent.pid))


@pytest.mark.timeout(60)
def test_status_shows_the_agent_and_its_slots(two_slots: SlotCluster) -> None:
    workers = two_slots.sched.status()["workers"]
    (agent,) = [w for w in workers if w["name"] == "a"]
    assert agent["capacity"] == 0 and agent["pid"] == two_slots.agent.pid  # runs nothing itself
    assert sorted(w["name"] for w in two_slots.slots()) == ["a/0", "a/1"]
    assert all(w["capacity"] == 1 for w in two_slots.slots())


# --- a slot that ends ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_killed_slot_fails_only_its_task_and_is_replaced(one_slot: SlotCluster,
                                                           gates: Gates) -> None:
    sched = one_slot.sched
    (before,) = one_slot.slot_pids()
    running = sched.submit(tasks.gated, gates.path("started"), gates.path("never"))
    queued = [sched.submit(tasks.square, i) for i in range(5)]  # behind it, on the same slot
    pid = started_pid(gates, "started")
    assert pid == before
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError):
        running.result(RESULT)
    assert [f.result(RESULT) for f in queued] == [i * i for i in range(5)]
    wait_until(lambda: len(one_slot.slot_pids()) == 1 and one_slot.slot_pids() != [before],
               JOIN, message="a new slot process to join")
    assert sched.status()["lost_workers"] == 1
    assert sched.submit(tasks.add, 1, 1).result(RESULT) == 2


@pytest.mark.timeout(90)
def test_a_slot_that_dies_while_a_process_it_forked_lives_is_replaced(
        one_slot: SlotCluster, tmp_path: Path) -> None:
    """The helper holds the slot's copies of its sentinel pipe and sockets; the
    agent still sees the slot end (its pidfd at once; its waitpid each round)."""
    sched = one_slot.sched
    (before,) = one_slot.slot_pids()
    release = tmp_path / "release"
    helper = sched.submit(_failure_tasks.fork_helper, str(release)).result(RESULT)
    try:
        with pytest.raises(WorkerLostError):
            sched.submit(_failure_tasks.exit_with, 3).result(RESULT)
        wait_until(lambda: len(one_slot.slot_pids()) == 1 and one_slot.slot_pids() != [before],
                   JOIN, message="a new slot process to join while the helper lives")
        assert is_alive(helper)
        assert sched.submit(tasks.add, 1, 1).result(RESULT) == 2
    finally:
        release.touch()
        wait_until(lambda: not is_alive(helper), timeout=30, message="the helper to exit")


@pytest.mark.timeout(90)
def test_a_timeout_kills_its_slot_and_spares_the_tasks_behind_it(
        one_slot: SlotCluster) -> None:
    sched = one_slot.sched
    (before,) = one_slot.slot_pids()
    slow = sched.submit(tasks.sleep_for, 60.0, timeout=0.5)
    after = [sched.submit(tasks.square, i) for i in range(3)]
    started = time.monotonic()
    with pytest.raises(TaskTimeoutError):
        slow.result(RESULT)
    assert time.monotonic() - started < 20
    assert [f.result(RESULT) for f in after] == [0, 1, 4]
    wait_until(lambda: one_slot.slot_pids() not in ([], [before]), JOIN,
               message="a new slot process to join")
    assert sched.status()["lost_workers"] == 0  # stopped on purpose, not lost


@pytest.mark.timeout(90)
def test_cancel_stops_a_running_slot_task(one_slot: SlotCluster, gates: Gates) -> None:
    sched = one_slot.sched
    running = sched.submit(tasks.gated, gates.path("started"), gates.path("never"))
    started_pid(gates, "started")
    assert sched.cancel(running)
    with pytest.raises(TaskCancelledError):
        running.result(RESULT)
    assert sched.submit(tasks.add, 2, 2).result(RESULT) == 4


@pytest.mark.timeout(90)
def test_a_slot_over_its_memory_limit_is_killed(tmp_path: Path, gates: Gates) -> None:
    cluster = SlotCluster(tmp_path, 1, "--memory-limit", "150MiB")
    try:
        with pytest.raises(MemoryLimitError) as info:
            cluster.sched.submit(_memory_tasks.hog, 400).result(RESULT)
        assert info.value.limit == 150 * (1 << 20)
        assert cluster.sched.submit(tasks.add, 1, 2).result(RESULT) == 3
    finally:
        cluster.close()


# Joins the memory cgroup argv[1] (its slots, forked later, start there too), then
# becomes the agent with the rest of argv.
_AGENT_IN_CGROUP = """
import os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "shmrunner.cli", *sys.argv[2:]])
"""


@pytest.mark.timeout(120)
def test_a_slot_killed_by_the_kernel_oom_killer_is_reported_as_such(
        tmp_path: Path, gates: Gates, oom_cgroup: str) -> None:
    # Default heartbeats: the agent shares the cgroup that runs out of memory.
    sched = Scheduler(local_workers=0, listen="tcp://127.0.0.1:*")
    workers = Workers(tmp_path)  # stop_all: SIGTERM, exit 0, its slots gone
    try:
        assert sched.address is not None
        with open(workers.log_path("a"), "wb") as log:
            workers.procs.append(subprocess.Popen(
                [sys.executable, "-c", _AGENT_IN_CGROUP, oom_cgroup, "--log-level", "INFO",
                 "worker", "--connect", sched.address, "--processes", "2", "--name", "a",
                 "--slots"], env=env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log))

        def slot_pids() -> list[int]:
            return sorted(w["pid"] for w in sched.status()["workers"]
                          if w["name"].startswith("a/"))

        wait_until(lambda: len(slot_pids()) == 2, JOIN, message="the agent's 2 slots to join")
        first = slot_pids()
        workers.note_pool()
        with open(os.path.join(oom_cgroup, "cgroup.procs")) as f:
            assert set(first) <= {int(pid) for pid in f.read().split()}

        # 1 GiB in a cgroup of 256 MiB: the kernel's OOM killer kills that slot.
        with pytest.raises(MemoryLimitError) as caught:
            sched.submit(_memory_tasks.hog, 1024).result(RESULT)
        err = caught.value
        assert err.oom_killer is True and err.pid in first
        assert f"worker pid {err.pid} was killed by the kernel's OOM killer" in str(err)
        assert "oom_kill count rose" in str(err) and os.path.basename(oom_cgroup) in str(err)
        (survivor,) = set(first) - {err.pid}

        # Replaced: both slots (the survivor and the new one) run tasks.
        wait_until(lambda: len(slot_pids()) == 2 and err.pid not in slot_pids(), JOIN,
                   message="a new slot process to join")
        a, b = gates.path("a"), gates.path("b")
        pids = {f.result(RESULT)["pid"] for f in [sched.submit(tasks.all_started, a, [b]),
                                                  sched.submit(tasks.all_started, b, [a])]}
        assert pids == set(slot_pids()) and survivor in pids
        workers.note_pool()

        # Then both die of a plain SIGKILL. The survivor's OOM-kill counter was
        # read before the OOM kill, but that kill explained one death only.
        running = [sched.submit(tasks.gated, gates.path(f"started{i}"), gates.path("never"))
                   for i in range(2)]
        started = [started_pid(gates, f"started{i}") for i in range(2)]
        assert set(started) == pids
        for pid in started:
            os.kill(pid, signal.SIGKILL)
        for future in running:
            with pytest.raises(WorkerLostError) as lost:
                future.result(RESULT)
            assert type(lost.value) is WorkerLostError
        assert sched.status()["lost_workers"] == 3  # the OOM-killed slot counts as lost
        assert sched.submit(tasks.add, 1, 1).result(RESULT) == 2
        workers.note_pool()
        assert "killed by the kernel's OOM killer" in workers.log("a")
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(90)
def test_a_task_that_kills_its_slot_runs_again_on_the_replacement(
        one_slot: SlotCluster, gates: Gates) -> None:
    attempts = gates.path("attempts")
    got = one_slot.sched.submit(tasks.kill_self_first_time, gates.path("marker"), attempts,
                                retries=1).result(RESULT)
    runs = [json.loads(line) for line in Path(attempts).read_text().splitlines()]
    assert len(runs) == 2 and runs[0]["pid"] != runs[1]["pid"] == got["pid"]
    assert got["ppid"] == one_slot.agent.pid  # both slots were the agent's children
    assert one_slot.sched.status()["lost_workers"] == 1


@pytest.mark.timeout(90)
def test_a_slot_that_keeps_dying_is_forked_again_ever_later(one_slot: SlotCluster,
                                                             tmp_path: Path) -> None:
    # Each attempt ends its slot at once: the agent re-forks it after 0.05 s,
    # then 0.1, 0.2, 0.4, 0.8 (a slot that cannot start must not fork in a loop).
    journal = tmp_path / "runs"
    with pytest.raises(WorkerLostError):
        one_slot.sched.submit(_timeout_tasks.note_and_exit, str(journal),
                              retries=5).result(RESULT)
    starts = [float(line.split()[2]) for line in journal.read_text().splitlines()]
    assert len(starts) == 6
    assert starts[-1] - starts[0] >= 0.05 + 0.1 + 0.2 + 0.4 + 0.8
    # It still serves once a task lets it live.
    assert one_slot.sched.submit(tasks.add, 1, 1).result(RESULT) == 2


@pytest.mark.timeout(90)
def test_slots_run_pickled_lambdas_and_refuse_what_their_list_does_not_name(
        tmp_path: Path, gates: Gates) -> None:
    cluster = SlotCluster(tmp_path, 1, "--allow-pickle", allow_pickle=True)
    try:
        offset = 10
        assert cluster.sched.submit(lambda x: x + offset, 1).result(RESULT) == 11
        assert cluster.sched.submit(tasks.union, frozenset({1}), frozenset({2})).result(
            RESULT) == frozenset({1, 2})
    finally:
        cluster.close()
    strict = tmp_path / "strict"
    strict.mkdir()
    cluster = SlotCluster(strict, 1, "--set", "worker.allowed_functions=[_sched_tasks:add]")
    try:
        assert cluster.sched.submit("_sched_tasks:add", 1, 2).result(RESULT) == 3
        marker = tmp_path / "pwned"
        with pytest.raises(FunctionNotAllowedError, match="worker.allowed_functions"):
            cluster.sched.submit("builtins:exec", f"open({str(marker)!r}, 'w')").result(RESULT)
        assert not marker.exists()
        assert cluster.sched.submit("_sched_tasks:add", 2, 2).result(RESULT) == 4
    finally:
        cluster.close()


@pytest.mark.timeout(90)
def test_sigkill_of_the_agent_ends_its_slots(tmp_path: Path, gates: Gates) -> None:
    cluster = SlotCluster(tmp_path, 2)
    try:
        running = cluster.sched.submit(tasks.gated, gates.path("started"), gates.path("never"))
        started_pid(gates, "started")
        slots = cluster.slot_pids()
        cluster.agent.kill()
        cluster.agent.wait(RESULT)
        wait_until(lambda: not any(is_alive(pid) for pid in slots), 10,
                   message="the slots to die with their agent")
        with pytest.raises(WorkerLostError):
            running.result(RESULT)
        wait_until(lambda: not cluster.sched.status()["workers"], 10,
                   message="the scheduler to forget the agent and its slots")
    finally:
        gates.open_all()
        cluster.close()


@pytest.mark.timeout(90)
def test_sigterm_drains_the_slots(two_slots: SlotCluster) -> None:
    sched = two_slots.sched
    futures = [sched.submit(tasks.sleep_for, 0.5) for _ in range(4)]
    wait_until(lambda: sum(w["busy"] for w in two_slots.slots()) == 4, RESULT,
               message="the slots to hold the tasks")
    slots = two_slots.slot_pids()
    two_slots.agent.terminate()
    assert [f.result(RESULT) for f in futures] == ["slept"] * 4
    assert two_slots.agent.wait(RESULT) == 0
    assert not any(is_alive(pid) for pid in slots)


@pytest.mark.timeout(300)
def test_timeouts_at_the_deadline_fail_only_their_own_task_slots(tmp_path: Path) -> None:
    cluster = SlotCluster(tmp_path, 2)
    try:
        _stress(cluster.sched, tmp_path / "journal", 400)
    finally:
        cluster.close()


# --- hostile peers -------------------------------------------------------------------------


def _say(sock: zmq.Socket[Any], type_: str, body: dict[str, Any]) -> None:
    """Send a message as a hostile peer would: unchecked by our own encoder."""
    sock.send_multipart([msgpack.packb([PROTOCOL_VERSION, type_, body])])


@contextlib.contextmanager
def raw_peer(address: str | None) -> Iterator[zmq.Socket[Any]]:
    """A DEALER connected to ``address``, speaking the protocol by hand."""
    assert address is not None
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    try:
        peer.connect(address)
        yield peer
    finally:
        peer.close(linger=0)
        ctx.term()


@pytest.mark.timeout(60)
def test_a_slot_hello_for_an_unknown_agent_gets_nothing(two_slots: SlotCluster) -> None:
    sched = two_slots.sched
    with raw_peer(sched.address) as peer:
        hello = {"name": "intruder", "host": "x", "pid": 1, "capacity": 1}
        rejected = sched.status()["rejected"]
        _say(peer, "hello", {**hello, "slot": {"group": secrets.token_hex(16), "index": 0}})
        _say(peer, "hello", {**hello, "slot": {"group": "../../etc", "index": 0}})
        _say(peer, "hello", {**hello, "slot": {"group": secrets.token_hex(16), "index": -1}})
        wait_until(lambda: sched.status()["rejected"] >= rejected + 3, 10,
                   message="the hellos to be refused")
        assert not peer.poll(300), "a refused slot was answered"
        assert "intruder" not in {w["name"] for w in sched.status()["workers"]}
        # A "lost" report from a peer that supervises nothing is ignored.
        _say(peer, "lost", {"slot": 0, "reason": "died", "task_id": 0})
        assert sched.submit(tasks.add, 1, 2).result(RESULT) == 3
        assert sorted(w["name"] for w in two_slots.slots()) == ["a/0", "a/1"]


@pytest.mark.timeout(60)
def test_a_hello_that_is_both_a_slot_and_an_agent_of_slots_is_refused(
        two_slots: SlotCluster) -> None:
    """Such peers, each the slot of the one before, once chained a thousand deep
    and the hub's loss of the head recursed until its thread died."""
    sched = two_slots.sched
    head_group, link_group = secrets.token_hex(16), secrets.token_hex(16)
    with raw_peer(sched.address) as head, raw_peer(sched.address) as link:
        _say(head, "hello", {"name": "head", "host": "x", "pid": 1, "capacity": 1,
                             "slots": {"group": head_group, "count": 1}})
        wait_until(lambda: "head" in {w["name"] for w in sched.status()["workers"]}, 10,
                   message="the head to join")
        rejected = sched.status()["rejected"]
        _say(link, "hello", {"name": "link", "host": "x", "pid": 2, "capacity": 1,
                             "slot": {"group": head_group, "index": 0},
                             "slots": {"group": link_group, "count": 1}})
        wait_until(lambda: sched.status()["rejected"] > rejected, 10,
                   message="the hybrid hello to be refused")
        assert not link.poll(300), "a hybrid hello was welcomed"
        assert "link" not in {w["name"] for w in sched.status()["workers"]}
        _say(head, "hello", {"name": "head", "host": "x", "pid": 1, "capacity": 1})  # again
        assert sched.submit(tasks.add, 1, 2).result(RESULT) == 3


@pytest.mark.timeout(60)
def test_a_quiet_slot_that_died_keeps_its_tasks_until_its_agent_reports(one_slot: SlotCluster,
                                                                         gates: Gates) -> None:
    """A slot says nothing while it runs a long task. When it dies and the hub
    finds its connection gone (a send to it fails) before its agent's report,
    the slot is set aside: heartbeat rounds meanwhile must not declare it lost
    on its own old silence, which would fail the task queued behind, unstarted."""
    c = one_slot
    running = c.sched.submit(tasks.gated, gates.path("started"), gates.path("never"))
    pid = started_pid(gates, "started")
    time.sleep(BEAT_TIMEOUT + 0.4)  # the state under test: silent past the heartbeat timeout
    os.kill(c.agent.pid, signal.SIGSTOP)  # its report on the slot waits
    try:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not is_alive(pid), RESULT, message="the slot to die")
        innocent = c.sched.submit(tasks.add, 1, 1)
        # Heartbeat rounds pass (every BEAT) while the agent cannot report; less
        # than BEAT_TIMEOUT, so the agent itself is not lost meanwhile.
        time.sleep(BEAT_TIMEOUT / 2)
        assert c.sched.status()["lost_workers"] == 0
    finally:
        os.kill(c.agent.pid, signal.SIGCONT)
    assert innocent.result(RESULT) == 2  # rerun on the replacement slot
    error = running.exception(RESULT)
    assert isinstance(error, WorkerLostError) and "silent" not in str(error), error


@pytest.mark.timeout(60)
def test_a_lost_report_for_a_slot_of_another_agent_is_ignored(two_slots: SlotCluster,
                                                              gates: Gates) -> None:
    # An agent of our own, speaking the protocol by hand: it may only report on
    # its own slots, never on the real agent's.
    sched = two_slots.sched
    with raw_peer(sched.address) as peer:
        _say(peer, "hello", {"name": "other", "host": "x", "pid": 1, "capacity": 1,
                             "slots": {"group": secrets.token_hex(16), "count": 2}})
        assert peer.poll(10_000)
        assert decode(peer.recv_multipart(copy=False), max_bytes=1 << 20,
                      allow_pickle=False).type == "welcome"
        running = sched.submit(tasks.gated, gates.path("started"), gates.path("go"))
        pid = started_pid(gates, "started")
        _say(peer, "lost", {"slot": 0, "reason": "timeout", "task_id": 0})
        _say(peer, "lost", {"slot": 1, "reason": "died"})
        time.sleep(0.3)  # nothing to wait for: the reports must change nothing
        assert not running.done()
        assert pid in two_slots.slot_pids()
        gates.open(gates.path("go"))
        assert running.result(RESULT) is None


def test_slot_messages_are_checked_by_the_schema() -> None:
    good = {"name": "n", "host": "h", "pid": 1, "capacity": 1}
    for bad in ({"group": "x" * 32, "index": 0}, {"group": "a" * 32, "index": 4096},
                {"group": "a" * 32}, ["a" * 32, 0]):
        with pytest.raises(ValueError, match="slot"):
            encode(Message("hello", {**good, "slot": bad}))
    for bad_lost in ({"slot": 0, "reason": "bored"}, {"slot": -1, "reason": "died"},
                     {"reason": "died"}):
        with pytest.raises(ValueError):
            encode(Message("lost", bad_lost))
    encode(Message("lost", {"slot": 3, "reason": "memory", "task_id": 9, "size": 1, "limit": 1}))
    # An OOM kill's evidence names a cgroup directory, which may be long: the agent
    # clips it to what the schema takes rather than fail its report.
    body = lost_body(Ended(2, 77, 9, "oom", evidence="x" * 5000), 1 << 30)
    assert body["limit"] == 1 << 30 and len(body["evidence"]) == MAX_EVIDENCE
    encode(Message("lost", body))



@pytest.mark.timeout(120)
def test_an_agent_stopped_while_it_forks_its_slots_exits_promptly(tmp_path: Path) -> None:
    # SIGTERM right after the welcome reaches the agent while its slots are
    # being forked: a slot that had not installed its own SIGTERM handler yet
    # lost the agent's drain signal and lived on until its welcome wait ran out
    # (10 s), and the agent with it. Several trials: the window is short.
    for trial in range(5):
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        (tmp_path / str(trial)).mkdir()
        workers = Workers(tmp_path / str(trial))
        try:
            port = router.bind_to_random_port("tcp://127.0.0.1")
            proc = workers.start(f"tcp://127.0.0.1:{port}", "a", "--slots")
            assert router.poll(JOIN * 1000), "no hello from the agent"
            agent = router.recv_multipart()[0]
            router.send_multipart([agent, *encode(Message("welcome", {
                "heartbeat_interval": 1.0, "heartbeat_timeout": 30.0, "session": "s"}))])
            time.sleep(0.002 * trial)  # (a spread of moments in the forks)
            proc.terminate()
            proc.wait(5.0)  # TimeoutExpired: it did not drain
            assert proc.returncode == 0
        finally:
            router.close(linger=0)
            ctx.term()
            workers.stop_all()


@pytest.mark.timeout(60)
def test_a_scheduler_that_does_not_know_slots_gets_an_error_not_silence(
        tmp_path: Path) -> None:
    # An older scheduler takes the agent for a worker and sends it a task: the
    # agent answers it with an error naming the cause.
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    workers = Workers(tmp_path)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        workers.start(f"tcp://127.0.0.1:{port}", "a", "--slots")

        def receive() -> tuple[bytes, Message]:
            assert router.poll(JOIN * 1000), "no message from the agent"
            identity, *frames = router.recv_multipart(copy=False)
            return identity.bytes, decode(frames, max_bytes=1 << 20, allow_pickle=False)

        agent, hello = receive()
        assert hello.type == "hello" and "slots" in hello.body
        router.send_multipart([agent, *encode(Message("welcome", {
            "heartbeat_interval": 1.0, "heartbeat_timeout": 30.0, "session": "old"}))])
        router.send_multipart([agent, *encode(Message("task", {
            "task_id": 7, "fn": "_sched_tasks:square", "args": [3], "kwargs": {}}))])
        while True:
            identity, msg = receive()
            if identity == agent and msg.type in ("result", "results"):
                break
        assert msg.type == "result" and msg.body["task_id"] == 7 and not msg.body["ok"]
        assert "--slots" in msg.body["error"]["message"]
    finally:
        router.close(linger=0)
        ctx.term()
        workers.stop_all()


@pytest.mark.timeout(120)
def test_slots_come_back_after_a_scheduler_restart(tmp_path: Path) -> None:
    # The agent reconnects to the new scheduler by itself and brings new slots
    # (a new group): the old ones are ended, none is left behind.
    from test_remote import free_port, rebind

    address = f"tcp://127.0.0.1:{free_port()}"
    first = remote_scheduler(listen=address)
    workers = Workers(tmp_path)
    second = None
    try:
        agent = workers.start(address, "a", "--slots", "--processes", "2")

        def slot_pids(sched: Any) -> list[int]:
            return sorted(w["pid"] for w in sched.status()["workers"] if "/" in w["name"])

        wait_until(lambda: len(slot_pids(first)) == 2, JOIN, message="two slots to join")
        old = slot_pids(first)
        assert first.submit(tasks.add, 1, 2).result(RESULT) == 3
        first.shutdown(wait=True)
        second = rebind(address)
        wait_until(lambda: len(slot_pids(second)) == 2, JOIN,
                   message="the agent and two new slots to join the new scheduler")
        assert not set(slot_pids(second)) & set(old)
        wait_until(lambda: not any(is_alive(pid) for pid in old), 10,
                   message="the old slots to end")
        assert sorted(slot_pids(second)) == sorted(children(agent.pid))
        assert list(second.map(tasks.square, range(20))) == [i * i for i in range(20)]
    finally:
        try:
            workers.stop_all()
        finally:
            first.shutdown(wait=True, cancel_futures=True)
            if second is not None:
                second.shutdown(wait=True, cancel_futures=True)
