"""Task logs: what tasks log and print reaches the caller as logging records on
``shmrunner.task`` (with worker, host, task_id), bounded, from real worker
processes: the Pool (opt-in), the Scheduler's local tier, a real remote agent
(``shmrunner worker`` subprocess), and the daemon, which keeps them per job for
``Client.job_log``. Raw ZeroMQ peers send garbage logs fields: refused, counted.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _log_tasks as tasks
import msgpack
import pytest
import zmq
from test_remote import Workers

from _daemon_tasks import run_cli
from _util import wait_until
from shmrunner import Pool, Scheduler, ShmrunnerError
from shmrunner.errors import ConfigError
from shmrunner.transport.protocol import PROTOCOL_VERSION, decode

RESULT = 30  # seconds: a healthy result arrives in well under one
BEAT, BEAT_TIMEOUT = 0.1, 1.0
MiB = 1 << 20
HOST = socket.gethostname()


def task_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shmrunner.task"]


def by_source(records: list[logging.LogRecord]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for record in records:
        found.setdefault(record.source, []).append(record.getMessage())  # type: ignore[attr-defined]
    return found


def assert_chatty(records: list[logging.LogRecord], x: int, worker: str | None = None,
                  host: str = HOST) -> None:
    """What tasks.chatty(x) logs, as re-emitted at INFO."""
    sources = by_source(records)
    assert sources["stdout"] == [f"printed {x}"]
    assert sources["myapp.part"] == [f"warned {x}"]
    assert sources["stderr"] == [f"complained {x}"]
    assert all("too fine" not in m for ms in sources.values() for m in ms)
    levels = {r.source: r.levelno for r in records}  # type: ignore[attr-defined]
    assert levels == {"stdout": logging.INFO, "myapp.part": logging.WARNING,
                      "stderr": logging.WARNING}
    for record in records:
        assert record.host == host  # type: ignore[attr-defined]
        if worker is not None:
            assert record.worker == worker  # type: ignore[attr-defined]
        assert record.task_id is not None  # type: ignore[attr-defined]


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# --- the capture itself (in this process) -----------------------------------------------


def test_capture_keeps_the_beginning_and_says_how_much_was_cut() -> None:
    from shmrunner._tasklogs import Capture

    capture = Capture(logging.INFO, limit=1000)
    for i in range(100):
        capture.add(1.0, logging.INFO, "n", f"line {i:03d} " + "z" * 50)
    records = capture.take()
    assert records[0][3].startswith("line 000")
    assert records[-1][2] == "shmrunner.task" and "characters truncated]" in records[-1][3]
    assert sum(len(r[3]) for r in records[:-1]) < 1000
    assert capture.take() == []  # the next task starts afresh


def test_yaml_off_is_off(tmp_path: Path) -> None:
    from shmrunner import config

    path = tmp_path / "c.yaml"
    path.write_text("scheduler:\n  task_logs: off\nworker:\n  task_logs: warning\n")
    settings = config.load(path)
    assert settings.scheduler.task_logs is False  # YAML's bare off
    with Scheduler(settings=settings.scheduler, local_workers=1) as sched:
        assert not sched.submit(tasks.capturing).result(RESULT)


def test_task_logs_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="task_logs"):
        Scheduler(local_workers=1, task_logs="LOUD")
    with pytest.raises(ConfigError, match="task_log_bytes"):
        Scheduler(local_workers=1, task_log_bytes=0)
    with pytest.raises(ConfigError, match="task_logs"):
        Pool(1, task_logs="verbose")


# --- Scheduler, local tier -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_scheduler_forwards_print_and_logging_by_default(caplog: pytest.LogCaptureFixture,
                                                         ) -> None:
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    with Scheduler(local_workers=1) as sched:
        assert sched.submit(tasks.chatty, 1).result(RESULT) == 2
        records = task_records(caplog)
        assert_chatty(records, 1)
        assert records[0].worker.startswith("local-")  # type: ignore[attr-defined]
        assert records[0].pid in {p.pid for p in sched._local.engine.processes()}  # type: ignore[attr-defined, union-attr]
        caplog.clear()
        with pytest.raises(ValueError, match="on purpose"):
            sched.submit(tasks.raises_after_logging).result(RESULT)
        assert by_source(task_records(caplog)) == {"myapp": ["about to fail"]}
        caplog.clear()
        assert sched.submit(tasks.quiet, 1).result(RESULT) == 2
        assert sched.submit(tasks.uses_fileno).result(RESULT) >= 0  # fd-level code still works
        assert task_records(caplog) == []


@pytest.mark.timeout(90)
def test_a_long_tasks_log_arrives_while_it_runs(caplog: pytest.LogCaptureFixture,
                                                tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    release = tmp_path / "release"
    with Scheduler(local_workers=1) as sched:
        future = sched.submit(tasks.long_task, str(release))
        wait_until(lambda: any(r.getMessage() == "still working" for r in task_records(caplog)),
                   RESULT, message="the running task's line")
        assert not future.done()
        release.touch()
        assert future.result(RESULT) == "released"
    assert [r.getMessage() for r in task_records(caplog)] == ["still working", "done"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("executor", ["scheduler", "pool"])
def test_a_quiet_tasks_first_line_arrives_while_it_runs(
        caplog: pytest.LogCaptureFixture, tmp_path: Path, executor: str) -> None:
    """A task that prints once and then computes without a word: its line
    must not wait for the task's end (a worker's flusher sends it)."""
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    release = tmp_path / "release"
    with (Scheduler(local_workers=1) if executor == "scheduler"
          else Pool(1, task_logs="INFO")) as runner:
        if isinstance(runner, Scheduler):
            future = runner.submit(tasks.print_then_wait, str(release))
            done = future.done
        else:
            result = runner.apply_async(tasks.print_then_wait, (str(release),))
            done = result.ready
        wait_until(lambda: any(r.getMessage() == "started" for r in task_records(caplog)),
                   RESULT, message="the running task's line")
        assert not done()
        release.touch()
        assert (future.result(RESULT) if isinstance(runner, Scheduler)
                else result.get(RESULT)) == "released"
    assert [r.getMessage() for r in task_records(caplog)] == ["started"]


def _helper_thread_switches(pid: int) -> int:
    """Voluntary context switches of a process's threads other than its main one."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) != pid:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    return total


@pytest.mark.timeout(60)
def test_a_busy_workers_log_flusher_sleeps_through_tiny_tasks() -> None:
    """The flusher thread wakes about once a second while tasks run; it once
    went back to sleep between two tiny tasks, so every task woke it (a
    quarter of a tiny task's throughput)."""
    with Pool(1, task_logs="INFO") as pool:
        pool.map(tasks.quiet, range(100), chunksize=1)
        (pid,) = [p.pid for p in pool._pool]
        before = _helper_thread_switches(pid)
        results = [pool.apply_async(tasks.quiet, (i,)) for i in range(3000)]
        assert [r.get(RESULT) for r in results] == [tasks.quiet(i) for i in range(3000)]
        woken = _helper_thread_switches(pid) - before
    assert woken < 300, f"the worker's helper threads woke {woken} times for 3000 tasks"


@pytest.mark.timeout(60)
def test_a_process_a_task_forks_never_sends_on_its_workers_channel(
        caplog: pytest.LogCaptureFixture) -> None:
    """The child shares the worker's channel: its records would interleave
    with the worker's frames. Its output is its own (uncaptured)."""
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    with Pool(1, task_logs="INFO") as pool:
        pid = pool.apply(os.getpid)
        assert pool.apply(tasks.fork_and_print) == 0
        assert pool.apply(os.getpid) == pid  # the same worker serves on
    assert [r.getMessage() for r in task_records(caplog)] == ["from the worker"]


@pytest.mark.timeout(60)
def test_scheduler_level_and_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shmrunner.task")
    with Scheduler(local_workers=1, task_logs="WARNING") as sched:
        assert sched.submit(tasks.chatty, 2).result(RESULT) == 3
        assert not sched.submit(tasks.capturing).result(RESULT)  # print stays on the terminal
    sources = by_source(task_records(caplog))
    assert sources == {"myapp.part": ["warned 2"], "stderr": ["complained 2"]}
    caplog.clear()
    with Scheduler(local_workers=1, task_logs="off") as sched:
        assert sched.submit(tasks.chatty, 3).result(RESULT) == 4
        assert not sched.submit(tasks.capturing).result(RESULT)  # nothing captured, nothing sent
    assert task_records(caplog) == []


@pytest.mark.timeout(120)
def test_a_task_printing_200_mb_sends_a_bounded_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    limit = 64 * 1024
    with Scheduler(local_workers=1, task_log_bytes=limit) as sched:
        sched.submit(tasks.quiet, 0).result(RESULT)  # the worker is up
        before = vm_hwm()
        assert sched.submit(tasks.flood, 200 * MiB, 64 * 1024).result(RESULT * 2) == 200 * MiB
        records = task_records(caplog)
        assert sum(len(r.getMessage()) for r in records) < limit + 100
        assert "characters truncated]" in records[-1].getMessage()
        assert records[-1].levelno == logging.WARNING
        caplog.clear()
        assert sched.submit(tasks.one_huge_line, 50 * MiB).result(RESULT) == 50 * MiB
        records = task_records(caplog)
        assert sum(len(r.getMessage()) for r in records) < limit + 100
        assert records[-1].getMessage().startswith("[... ")
        grown = vm_hwm() - before
        assert grown < 32 * MiB, f"the caller's peak memory grew by {grown >> 20} MiB"


# --- Pool: off by default (multiprocessing's children print on the terminal) ---------------


@pytest.mark.timeout(60)
def test_pool_forwards_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    with Pool(1) as pool:
        assert pool.apply(tasks.chatty, (4,)) == 5
        assert not pool.apply(tasks.capturing)
    assert task_records(caplog) == []
    with Pool(1, task_logs="INFO") as pool:
        assert pool.map(tasks.chatty, [5]) == [6]
    assert_chatty(task_records(caplog), 5)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_pool_forwards_under_every_start_method(caplog: pytest.LogCaptureFixture,
                                                method: str) -> None:
    import multiprocessing

    caplog.set_level(logging.INFO, logger="shmrunner.task")
    with Pool(1, context=multiprocessing.get_context(method), task_logs="INFO") as pool:
        assert pool.apply(tasks.chatty, (6,)) == 7
    assert_chatty(task_records(caplog), 6)


# --- a real remote agent ----------------------------------------------------------------


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


def hub(**options: Any) -> Scheduler:
    return Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", heartbeat_interval=BEAT,
                     heartbeat_timeout=BEAT_TIMEOUT, **options)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("slots", [False, True], ids=["pool", "slots"])
def test_remote_agent_sends_its_tasks_logs(caplog: pytest.LogCaptureFixture,
                                           workers: Workers, slots: bool) -> None:
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    sched = hub()
    try:
        assert sched.address is not None
        workers.start(sched.address, "agent-with-logs", *(["--slots"] if slots else []))
        # With slots: the agent and its one slot process, which runs the tasks.
        wait_until(lambda: len(sched.status()["workers"]) == 1 + slots, RESULT,
                   message="the agent to join")
        assert sched.submit("_log_tasks:chatty", 7).result(RESULT) == 8
        assert_chatty(task_records(caplog), 7,
                      worker="agent-with-logs/0" if slots else "agent-with-logs")
        caplog.clear()
        assert sched.submit("_log_tasks:quiet", 7).result(RESULT) == 8
        assert task_records(caplog) == []
        # Records the wire cannot carry as they are (they once failed the result's
        # send, and the task was reported lost): escaped, and the level clamped.
        assert sched.submit("_log_tasks:odd_records", 1).result(RESULT) == 2
        got = {(r.levelno, r.getMessage()) for r in task_records(caplog)}
        assert (logging.INFO, "bad bytes: \\udcff\\udcfe") in got, got
        assert (100, "level one-fifty") in got, got
        assert sched.status()["lost_workers"] == 0
    finally:
        sched.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("slots", [False, True], ids=["pool", "slots"])
def test_a_long_remote_tasks_log_arrives_while_it_runs(caplog: pytest.LogCaptureFixture,
                                                       workers: Workers, tmp_path: Path,
                                                       slots: bool) -> None:
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    release = tmp_path / "release"
    seen: list[tuple[str, bool]] = []  # (message, its future done yet) as on_task_log saw them
    sched = hub(on_task_log=lambda future, records, worker, host: seen.extend(
        (record[3], future.done()) for record in records))
    try:
        assert sched.address is not None
        workers.start(sched.address, "agent-long", *(["--slots"] if slots else []))
        wait_until(lambda: len(sched.status()["workers"]) == 1 + slots, RESULT,
                   message="the agent to join")
        future = sched.submit("_log_tasks:long_task", str(release))
        wait_until(lambda: any(r.getMessage() == "still working" for r in task_records(caplog)),
                   RESULT, message="the running task's line")
        assert not future.done()
        record = next(r for r in task_records(caplog) if r.getMessage() == "still working")
        assert record.worker == ("agent-long/0" if slots else "agent-long")  # type: ignore[attr-defined]
        release.touch()
        assert future.result(RESULT) == "released"
        assert [r.getMessage() for r in task_records(caplog)] == ["still working", "done"]
        assert seen == [("still working", False), ("done", False)]
        assert sched.status()["rejected"] == 0
    finally:
        sched.shutdown(wait=True, cancel_futures=True)


class RawAgent:
    """A fake agent on a raw DEALER: says hello, takes tasks, answers by hand."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self.sock: zmq.Socket[Any] = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvtimeo = self.sock.sndtimeo = RESULT * 1000
        self.sock.connect(address)
        self.sock.send_multipart([msgpack.packb([PROTOCOL_VERSION, "hello", {
            "name": "raw", "host": "attacker", "pid": 1, "capacity": 1}])])
        welcome = decode(self.sock.recv_multipart(), max_bytes=MiB, allow_pickle=False)
        assert welcome.type == "welcome"
        self.session = welcome.body["session"]

    def next_task(self) -> int:
        while True:
            msg = decode(self.sock.recv_multipart(), max_bytes=MiB, allow_pickle=False)
            if msg.type == "task":
                return int(msg.body["task_id"])
            if msg.type == "tasks":
                return int(msg.body["tasks"][0]["task_id"])

    def result(self, task_id: int, logs: Any) -> None:
        self.sock.send_multipart([msgpack.packb([PROTOCOL_VERSION, "result", {
            "session": self.session, "task_id": task_id, "ok": True, "value": task_id,
            "logs": logs}])])

    def early_logs(self, task_id: int, logs: Any, session: str | None = None) -> None:
        self.sock.send_multipart([msgpack.packb([PROTOCOL_VERSION, "logs", {
            "session": self.session if session is None else session, "task_id": task_id,
            "logs": logs}])])


GARBAGE = {
    "not a list": "printed",
    "a record too short": [[1.0, 20, "n"]],
    "a message not a str": [[1.0, 20, "n", 5]],
    "a level out of range": [[1.0, 500, "n", "m"]],
    "a time not finite": [[math.inf, 20, "n", "m"]],
    "a name too long": [[1.0, 20, "n" * 1000, "m"]],
    "too many characters": [[1.0, 20, "n", "m" * (2 * MiB)]],
    "too many records": [[1.0, 20, "n", ""]] * 40_000,
}


@pytest.fixture
def raw_peer() -> Iterator[tuple[Scheduler, RawAgent]]:
    """A hub and a fake agent joined to it on a raw DEALER."""
    sched = hub()
    context: zmq.Context[Any] = zmq.Context()
    try:
        assert sched.address is not None
        peer = RawAgent(context, sched.address)
        try:
            yield sched, peer
        finally:
            peer.sock.close(linger=0)
    finally:
        context.destroy(linger=0)
        sched.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(90)
def test_garbage_logs_from_a_raw_peer_are_refused(caplog: pytest.LogCaptureFixture,
                                                  raw_peer: tuple[Scheduler, RawAgent]) -> None:
    caplog.set_level(logging.INFO, logger="shmrunner.task")
    sched, peer = raw_peer
    future = sched.submit("_log_tasks:quiet", 1)
    task_id = peer.next_task()
    for count, logs in enumerate(GARBAGE.values(), 1):
        peer.result(task_id, logs)
        wait_until(lambda n=count: sched.status()["rejected"] >= n, RESULT,
                   message=f"garbage log {count} to be refused")
    # The same garbage as a running task's early log; then honest lines for a
    # task it does not hold, and for another session's task: all refused.
    line = [[1.5, logging.WARNING, "remote.app", "an honest line"]]
    refused = count
    for logs, other_id, session in [*((logs, task_id, None) for logs in GARBAGE.values()),
                                    (line, task_id + 1, None), (line, task_id, "0" * 32)]:
        peer.early_logs(other_id, logs, session)
        refused += 1
        wait_until(lambda n=refused: sched.status()["rejected"] >= n, RESULT,
                   message=f"bad early log {refused} to be refused")
    assert not future.done() and task_records(caplog) == []
    peer.early_logs(task_id, [[1.25, logging.INFO, "remote.app", "early"]])
    wait_until(lambda: len(task_records(caplog)) == 1, RESULT, message="the early line")
    assert not future.done()
    peer.result(task_id, line)
    assert future.result(RESULT) == task_id
    early, record = task_records(caplog)
    assert (early.getMessage(), early.created) == ("early", 1.25)
    assert record.getMessage() == "an honest line"
    assert (record.worker, record.host, record.created) == ("raw", "attacker", 1.5)  # type: ignore[attr-defined]


@pytest.mark.timeout(90)
def test_a_peer_cannot_flood_the_log_of_a_task_it_runs(caplog: pytest.LogCaptureFixture,
                                                       raw_peer: tuple[Scheduler, RawAgent]
                                                       ) -> None:
    """Early logs are bounded per task as an honest agent's capture bounds a
    whole task's log: past MAX_WIRE_CHARS the rest is refused (counted)."""
    from shmrunner._tasklogs import MAX_WIRE_CHARS

    caplog.set_level(logging.INFO, logger="shmrunner.task")
    sched, peer = raw_peer
    chunk = [[1.0, logging.INFO, "stdout", "x" * (MAX_WIRE_CHARS // 3 - 10)]]
    future = sched.submit("_log_tasks:quiet", 1)
    task_id = peer.next_task()
    for sent in range(1, 4):  # three thirds: within the bound
        peer.early_logs(task_id, chunk)
        wait_until(lambda n=sent: len(task_records(caplog)) == n, RESULT,
                   message=f"early log {sent}")
    peer.early_logs(task_id, chunk)  # a fourth: past it
    wait_until(lambda: sched.status()["rejected"] == 1, RESULT,
               message="the log past the bound to be refused")
    assert len(task_records(caplog)) == 3 and not future.done()
    peer.result(task_id, [[2.0, logging.INFO, "stdout", "the result's own"]])
    assert future.result(RESULT) == task_id
    assert task_records(caplog)[-1].getMessage() == "the result's own"
    # The next task has a budget of its own.
    future = sched.submit("_log_tasks:quiet", 2)
    task_id = peer.next_task()
    peer.early_logs(task_id, chunk)
    wait_until(lambda: len(task_records(caplog)) == 5, RESULT, message="the next task's log")
    peer.result(task_id, [])
    assert future.result(RESULT) == task_id and sched.status()["rejected"] == 1


# --- the daemon keeps each job's log ----------------------------------------------------


@pytest.mark.timeout(120)
def test_daemon_shows_a_running_remote_jobs_log(daemons, workers: Workers,
                                                tmp_path: Path) -> None:
    d = daemons(scheduler={"local_workers": 0}).start()
    workers.start(d.workers_address, "agent-d")
    client = d.client()
    wait_until(lambda: len(client.status()["workers"]) == 1, RESULT,
               message="the agent to join the daemon")
    release = tmp_path / "release"
    future = client.submit("_log_tasks:long_task", str(release), job_id="long")
    assert future.wait_accepted(RESULT)
    wait_until(lambda: "still working" in client.job_log("long"), RESULT,
               message="the running job's line in its log")
    assert not future.done()
    release.touch()
    assert future.result(timeout=RESULT) == "released"
    lines = client.job_log("long").splitlines()
    assert [line.split(" INFO stdout [agent-d@", 1)[1].split("] ", 1)[1]
            for line in lines] == ["still working", "done"], lines


@pytest.mark.timeout(120)
def test_daemon_keeps_a_jobs_log_for_the_client(daemons) -> None:
    d = daemons().start()
    client = d.client()
    assert client.submit("_log_tasks:chatty", 9, job_id="chat").result(timeout=RESULT) == 10
    assert client.submit("_log_tasks:quiet", 9, job_id="hush").result(timeout=RESULT) == 10
    log = client.job_log("chat")
    lines = log.splitlines()
    assert len(lines) == 3, log
    assert any(" INFO stdout " in line and line.endswith("printed 9") for line in lines)
    assert any(" WARNING myapp.part " in line and line.endswith("warned 9") for line in lines)
    assert any(" WARNING stderr " in line and line.endswith("complained 9") for line in lines)
    assert client.job_log("hush") == ""
    with pytest.raises(ShmrunnerError, match="does not know"):
        client.job_log("never-submitted")
    shown = run_cli("jobs", "--connect", d.address, "--log", "chat")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == log
    # Undecodable bytes printed: the log is still answered (it once never was).
    assert client.submit("_log_tasks:odd_records", 1, job_id="odd").result(RESULT) == 2
    assert "bad bytes: \\udcff\\udcfe" in client.job_log("odd")
    bad = run_cli("jobs", "--connect", d.address, "--log", "not an id")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "invalid job id" in bad.stderr


def test_daemon_job_logs_are_bounded_per_job_and_in_all() -> None:
    from concurrent.futures import Future

    from shmrunner._joblogs import JobLogs

    logs = JobLogs(per_job=1000, total=3000, max_jobs=2)
    line = (1.0, logging.INFO, "stdout", "x" * 100)
    futures = [Future() for _ in range(4)]  # type: ignore[var-annotated]
    for i, future in enumerate(futures):
        logs.add(future, [line] * 50, "w", "h")  # ~150 characters a line, 50 lines
        running = logs.text(f"job{i}", future)
        assert running is not None and len(running) < 1000 + 100
        assert running.endswith("characters truncated]\n")
        future.set_result(None)
        logs.settle(f"job{i}", future)
    assert logs.text("job0", None) is None and logs.text("job1", None) is None  # max_jobs
    assert logs.text("job3", None) is not None
    assert logs.text("never", Future()) == ""
