"""``Pool.apply`` reads its own result: with a worker idle, the calling thread
sends the task and reads the worker's reply itself (no hand-off through the
manager thread). These tests hold that path to the Pool's guarantees: a
death, a terminate, a Ctrl-C or a large message while the caller reads must
fail or finish the call, never hang it, and the pool goes on afterwards."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

import _failure_tasks as tasks
import shmrunner
from _util import is_alive, wait_until
from shmrunner import TaskCancelledError, WorkerLostError

TIMEOUT = 30.0  # a healthy result or a death is seen in well under a second


def pool_pids(pool: shmrunner.Pool) -> list[int]:
    return [process.pid for process in pool._pool]


def read_pid(path: Path) -> int:
    wait_until(path.exists, TIMEOUT, message=f"a task to write its pid to {path}")
    return int(path.read_text())


def open_gate(gate: Path) -> None:
    with open(gate, "w") as f:  # blocks until the task opened it for reading
        f.write("open")


class Call(threading.Thread):
    """``pool.apply(...)`` on a thread of its own; ``outcome`` once it returns."""

    def __init__(self, pool: shmrunner.Pool, fn: Any, args: tuple[Any, ...]) -> None:
        super().__init__(daemon=True)
        self.pool, self.fn, self.args = pool, fn, args
        self.outcome: tuple[bool, Any] | None = None

    def run(self) -> None:
        try:
            self.outcome = (True, self.pool.apply(self.fn, self.args))
        except BaseException as exc:  # noqa: BLE001 (the test looks at it)
            self.outcome = (False, exc)

    def result(self) -> tuple[bool, Any]:
        self.join(TIMEOUT)
        assert not self.is_alive(), "apply() still waits"
        assert self.outcome is not None
        return self.outcome


@pytest.mark.timeout(90)
@pytest.mark.parametrize("processes", [1, 2])
def test_apply_fails_when_its_worker_exits_and_the_pool_goes_on(
        ctx: multiprocessing.context.BaseContext, processes: int) -> None:
    with shmrunner.Pool(processes, context=ctx) as pool:
        for _ in range(3):
            before = pool_pids(pool)
            with pytest.raises(WorkerLostError) as info:
                pool.apply(tasks.exit_with, (3,))
            assert info.value.exitcode == 3 and info.value.pid in before
            assert pool.apply(tasks.add_one, (41,)) == 42
        wait_until(lambda: len(pool_pids(pool)) == processes, TIMEOUT,
                   message="the workers to be replaced")


@pytest.mark.timeout(60)
def test_apply_fails_when_its_worker_is_killed_from_outside(tmp_path: Path) -> None:
    with shmrunner.Pool(2) as pool:
        call = Call(pool, tasks.hold_and_block, (str(tmp_path / "pid"),))
        call.start()
        pid = read_pid(tmp_path / "pid")
        os.kill(pid, signal.SIGKILL)
        ok, error = call.result()
        assert not ok and isinstance(error, WorkerLostError)
        assert error.signal == signal.SIGKILL and error.pid == pid
        assert pool.apply(tasks.add_one, (1,)) == 2


@pytest.mark.timeout(60)
def test_apply_sees_its_worker_die_while_a_process_it_forked_holds_the_channel(
        tmp_path: Path) -> None:
    """The helper keeps the worker's end of the channel open: no EOF comes;
    the caller must see the death (the process's end) all the same."""
    release = tmp_path / "release"
    helpers: list[int] = []
    try:
        with shmrunner.Pool(1) as pool:
            helpers.append(pool.apply(tasks.fork_helper, (str(release),)))
            with pytest.raises(WorkerLostError) as info:
                pool.apply(tasks.exit_with, (5,))
            assert info.value.exitcode == 5
            assert pool.apply(tasks.add_one, (1,)) == 2
            assert is_alive(helpers[0])  # the death was seen while the helper lived
    finally:
        release.touch()
        wait_until(lambda: not any(is_alive(pid) for pid in helpers), TIMEOUT,
                   message="the helper to exit")


@pytest.mark.timeout(60)
def test_terminate_fails_an_apply_that_waits(tmp_path: Path) -> None:
    pool = shmrunner.Pool(2)
    call = Call(pool, tasks.hold_and_block, (str(tmp_path / "pid"),))
    call.start()
    pid = read_pid(tmp_path / "pid")
    pool.terminate()
    ok, error = call.result()
    assert not ok and isinstance(error, TaskCancelledError)
    pool.join()
    assert not is_alive(pid)


@pytest.mark.timeout(60)
def test_ctrl_c_during_apply_leaves_a_pool_that_finishes_the_task(tmp_path: Path) -> None:
    """KeyboardInterrupt reaches the main thread while it reads its worker's
    reply; the task's result must still be taken (by the manager thread), so
    the pool serves on and close() + join() end."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    pid_file = tmp_path / "pid"

    def interrupt() -> None:
        read_pid(pid_file)
        os.kill(os.getpid(), signal.SIGINT)

    with shmrunner.Pool(1) as pool:
        interrupter = threading.Thread(target=interrupt, daemon=True)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            pool.apply(tasks.report_then_wait_gate, (str(pid_file), str(gate)))
        interrupter.join(TIMEOUT)
        queued = pool.apply_async(tasks.add_one, (1,))  # waits behind the gated task
        open_gate(gate)
        assert queued.get(TIMEOUT) == 2
        assert pool.apply(tasks.add_one, (2,)) == 3
        pool.close()
        pool.join()


@pytest.mark.timeout(90)
def test_apply_moves_messages_larger_than_the_socket_buffer() -> None:
    """A task the socket cannot take at once is sent on as it drains; the
    caller, reading its own reply, must also do that sending."""
    big = b"x" * (48 << 20)  # bytes travel inline (pickled), not by shared memory
    with shmrunner.Pool(2) as pool:
        assert pool.apply(len, (big,)) == len(big)
        assert pool.apply(bytes, (len(big),)) == bytes(len(big))


@pytest.mark.timeout(120)
def test_apply_from_many_threads_beside_a_map() -> None:
    with shmrunner.Pool(2) as pool:
        mapped = pool.map_async(tasks.add_one, range(3000), chunksize=1)
        results: dict[int, list[int]] = {}

        def caller(k: int) -> None:
            results[k] = [pool.apply(tasks.add_one, (k * 1000 + i,)) for i in range(150)]

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 2)
            assert not thread.is_alive()
        assert mapped.get(TIMEOUT) == list(range(1, 3001))
        for k, got in results.items():
            assert got == [k * 1000 + i + 1 for i in range(150)]
        pool.close()
        pool.join()


@pytest.mark.timeout(60)
def test_apply_with_maxtasksperchild_one_runs_each_call_in_a_new_worker() -> None:
    with shmrunner.Pool(1, maxtasksperchild=1) as pool:
        pids = [pool.apply(os.getpid) for _ in range(4)]
        assert len(set(pids)) == 4
        assert pool.apply(tasks.add_one, (1,)) == 2


@pytest.mark.timeout(60)
def test_an_exception_while_apply_handles_its_reply_costs_the_worker_not_the_pool() -> None:
    """A KeyboardInterrupt can strike between reading the reply and settling
    it (here: raised by a logging handler for the task's printed line, which
    the caller's thread re-emits first). The task must fail and its worker
    be replaced, not be left held forever (close() + join() would hang)."""
    import logging

    class Interrupting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise KeyboardInterrupt

    logger = logging.getLogger("shmrunner.task")
    handler = Interrupting()
    with shmrunner.Pool(1, task_logs="INFO") as pool:
        pid = pool.apply(os.getpid)
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            with pytest.raises(KeyboardInterrupt):
                pool.apply(print, ("a line",))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        assert pool.apply(tasks.add_one, (1,)) == 2
        assert pool.apply(os.getpid) != pid  # replaced
        pool.close()
        pool.join()


@pytest.mark.timeout(60)
def test_apply_waiting_on_a_long_task_does_not_burn_the_callers_cpu() -> None:
    """After tiny tasks, apply polls for a while before it sleeps (their
    replies come sooner than a wake-up would): for a long task, that while is
    bounded, and the caller then sleeps."""
    import time

    with shmrunner.Pool(1) as pool:
        for _ in range(20):
            pool.apply(tasks.add_one, (1,))
        start = time.thread_time()
        pool.apply(time.sleep, (0.5,))
        assert time.thread_time() - start < 0.1  # the whole wait spun would be 0.5 s
