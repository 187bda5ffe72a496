"""Memory limits and OOM attribution, with real processes and real allocations.

A worker whose private memory passes its ``memory_limit`` is killed; the task
it ran fails with ``MemoryLimitError`` (a ``WorkerLostError``: the Scheduler
retries it), and a new worker takes its place: on the Pool, the Scheduler's
local tier, a remote agent, and through a daemon to its client. Shared arrays
a task maps are not charged to it. A worker the kernel's OOM killer kills
(a real memory cgroup with a real limit, when this host lets us make one) is
reported as such, not as an anonymous SIGKILL. Task functions live in
``_memory_tasks`` (on the daemons' and agents' PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _memory_tasks as tasks
import numpy as np
import pytest

import shmrunner
from _daemon_tasks import Worker, env, run_cli
from _util import wait_until
from shmrunner import MemoryLimitError, Scheduler, WorkerLostError, config
from shmrunner.errors import ConfigError
from shmrunner.transport.protocol import exception_from_wire, exception_to_wire

MiB = 1 << 20
LIMIT = 200 * MiB
HOG = 600  # MiB a hog task allocates: three times the limit
RESULT = 60  # seconds: far more than any result here takes


def assert_memory_limit_error(err: BaseException, limit: int = LIMIT) -> None:
    assert type(err) is MemoryLimitError, repr(err)
    assert isinstance(err, WorkerLostError)
    assert not err.oom_killer
    assert err.limit == limit
    assert err.size is not None and err.size > limit
    assert err.signal == 9
    assert err.task is not None and "hog" in str(err.task)
    text = str(err)
    assert f"memory limit of {limit // MiB}.0 MiB" in text and "\n" not in text, text
    assert f"worker pid {err.pid}" in text


# --- the error itself -------------------------------------------------------------------------


def test_memory_limit_error_carries_its_evidence_through_pickle_and_the_wire() -> None:
    err = MemoryLimitError(1234, -9, "7 (hog)", limit=LIMIT, size=300 * MiB)
    assert (err.pid, err.exitcode, err.task, err.limit, err.size, err.oom_killer) == (
        1234, -9, "7 (hog)", LIMIT, 300 * MiB, False)
    assert str(err) == ("worker pid 1234 exceeded its memory limit of 200.0 MiB (private "
                        "memory 300.0 MiB) while running task 7 (hog); it was killed and "
                        "replaced")
    oom = MemoryLimitError(1234, -9, "7 (hog)", oom_killer=True,
                           evidence="the system's oom_kill count rose from 3 to 4 while it ran")
    assert "killed by the kernel's OOM killer while running task 7 (hog)" in str(oom)
    assert "oom_kill count rose from 3 to 4" in str(oom)
    for original in (err, oom):
        for back in (pickle.loads(pickle.dumps(original)),
                     exception_from_wire(exception_to_wire(original))):
            assert type(back) is MemoryLimitError
            assert back.args == original.args and str(back) == str(original)


# --- the Pool ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_pool_task_over_the_limit_fails_and_its_worker_is_replaced(ctx: Any) -> None:
    with shmrunner.Pool(1, memory_limit="200MiB", context=ctx) as pool:
        before = pool.apply(tasks.where)
        with pytest.raises(MemoryLimitError) as caught:
            pool.apply(tasks.hog, (HOG,))
        assert_memory_limit_error(caught.value)
        assert caught.value.pid == before
        after = pool.apply(tasks.where)  # the replacement runs the next task
        assert after != before
        # a task below the limit runs as ever, on the new worker
        assert pool.apply(tasks.hog, (20, 0.0)) == after


@pytest.mark.timeout(120)
def test_pool_other_tasks_the_killed_worker_held_run_again() -> None:
    # One worker holds the hog and, queued behind it, innocent tasks: only the hog fails.
    with shmrunner.Pool(1, memory_limit=LIMIT) as pool:
        hog = pool.apply_async(tasks.hog, (HOG,))
        small = [pool.apply_async(tasks.where) for _ in range(4)]
        with pytest.raises(MemoryLimitError) as caught:
            hog.get(RESULT)
        assert_memory_limit_error(caught.value)
        assert caught.value.pid not in {r.get(RESULT) for r in small}


@pytest.mark.timeout(120)
def test_shared_input_arrays_are_not_charged_to_the_worker(ctx: Any) -> None:
    # 256 MiB of shared input, read whole by a worker limited to 128 MiB of its own,
    # and held mapped across many readings of its memory: it is not killed. Under
    # fork the worker also shares the parent's 256 MiB plain array copy-on-write
    # (RssAnon counts it): not its own either.
    limit = 128 * MiB
    shared = shmrunner.zeros(256 * MiB // 8)
    shared += 1.0
    plain = np.ones(256 * MiB // 8)  # copied into shared memory once when sent
    with shmrunner.Pool(1, memory_limit=limit, context=ctx) as pool:
        for array in (shared, plain):
            report = pool.apply(tasks.hold_shared, (array, 1.0))
            assert report["sum"] == array.size
            assert report["shmem_mib"] >= 255  # mapped, and counted as shared by the kernel
        # ... while a task's own memory over the limit is still found
        with pytest.raises(MemoryLimitError) as caught:
            pool.apply(tasks.hog, (300,))
        assert_memory_limit_error(caught.value, limit)
    del shared, array


@pytest.mark.timeout(60)
def test_an_anonymous_sigkill_is_still_a_plain_worker_lost_error() -> None:
    with shmrunner.Pool(1, memory_limit=LIMIT) as pool:
        with pytest.raises(WorkerLostError) as caught:
            pool.apply(tasks.die_by_sigkill)
        assert type(caught.value) is WorkerLostError
        assert "memory" not in str(caught.value)


# --- the Scheduler's local tier ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_scheduler_local_task_over_the_limit_fails_then_retries_apply(tmp_path: Path) -> None:
    with Scheduler(local_workers=1, memory_limit=LIMIT) as sched:
        with pytest.raises(MemoryLimitError) as caught:
            sched.submit(tasks.hog, HOG).result(RESULT)
        assert_memory_limit_error(caught.value)
        # Over the limit on its first attempt only: the retry succeeds.
        marker = tmp_path / "first-attempt"
        assert sched.submit(tasks.hog_once, str(marker), HOG, retries=1).result(RESULT) == "done"
        assert marker.exists()
        status = sched.status()
        assert status["memory_kills"] == 2 and status["oom_kills"] == 0
        assert status["local_workers"] == 1
        # Without retries left, a task that keeps exceeding fails with the error.
        with pytest.raises(MemoryLimitError):
            sched.submit(tasks.hog, HOG, retries=1).result(RESULT)
        assert sched.status()["memory_kills"] == 4


@pytest.mark.timeout(120)
def test_an_idle_worker_left_over_the_limit_is_replaced() -> None:
    # A task that leaves memory behind (returned, or killed while still running:
    # either way the memory is not kept by a live worker) and the next task runs.
    with Scheduler(local_workers=1, memory_limit=LIMIT) as sched:
        leaker = sched.submit(tasks.leak, HOG)
        wait_until(lambda: sched.status()["memory_kills"] == 1, timeout=RESULT,
                   message="the worker holding the leaked memory to be killed")
        error = leaker.exception(RESULT)
        pid = error.pid if isinstance(error, MemoryLimitError) else leaker.result()
        assert sched.submit(tasks.where).result(RESULT) != pid
        assert sched.status()["memory_kills"] == 1


@pytest.mark.timeout(120)
def test_a_fraction_of_the_host_memory_is_a_limit_in_bytes() -> None:
    from shmrunner.worker._memwatch import cgroup_limit

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = cgroup_limit()
    if cgroup is not None and cgroup < physical:
        pytest.skip("this process's memory cgroup is smaller than the host: fractions are of it")
    fraction = LIMIT / physical
    with shmrunner.Pool(1, memory_limit=fraction) as pool:
        with pytest.raises(MemoryLimitError) as caught:
            pool.apply(tasks.hog, (HOG,))
    assert caught.value.limit == int(fraction * physical)


# --- remote: an agent, and a daemon's client --------------------------------------------------


def _agent_config(tmp_path: Path, name: str, limit: str = "200MiB") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text("worker:\n  heartbeat_interval: 0.2\n  heartbeat_timeout: 1.0\n"
                    f"  memory_limit: {limit}\n")
    return path


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    leftovers = [pid for w in started for pid in w.stop()]
    assert not leftovers, f"processes outlived their worker agent and were killed: {leftovers}"


@pytest.mark.timeout(120)
def test_remote_agent_enforces_its_memory_limit(tmp_path: Path,
                                                agents: list[Worker]) -> None:
    with Scheduler(local_workers=0, listen="tcp://127.0.0.1:*", heartbeat_interval=0.2,
                   heartbeat_timeout=1.0) as sched:
        assert sched.address is not None
        agents.append(Worker(tmp_path, sched.address, "limited",
                             config=_agent_config(tmp_path, "limited")))
        wait_until(lambda: len(sched.status()["workers"]) == 1, timeout=30,
                   message="the agent to join")
        with pytest.raises(MemoryLimitError) as caught:
            sched.submit(tasks.hog, HOG).result(RESULT)
        assert_memory_limit_error(caught.value)
        marker = tmp_path / "remote-first-attempt"
        assert sched.submit(tasks.hog_once, str(marker), HOG, retries=1).result(RESULT) == "done"
        assert sched.submit(tasks.where).result(RESULT) != caught.value.pid
        assert sched.status()["lost_workers"] == 0  # the agent itself stayed


@pytest.mark.timeout(120)
def test_daemon_client_gets_the_memory_limit_error_of_a_remote_worker(
        tmp_path: Path, daemons: Any, agents: list[Worker]) -> None:
    d = daemons(scheduler={"local_workers": 0}).start()
    agents.append(Worker(tmp_path, d.workers_address, "remote",
                         config=_agent_config(tmp_path, "remote")))
    wait_until(lambda: len(d.status()["workers"]) == 1, timeout=30,
               message="the agent to join the daemon")
    client = d.client()
    with pytest.raises(MemoryLimitError) as caught:
        client.submit("_memory_tasks:hog", HOG).result(timeout=RESULT)
    assert_memory_limit_error(caught.value)
    assert client.submit("_memory_tasks:where").result(timeout=RESULT) != caught.value.pid


@pytest.mark.timeout(120)
def test_daemon_local_workers_take_scheduler_memory_limit(daemons: Any) -> None:
    d = daemons(scheduler={"local_workers": 1, "memory_limit": "200MiB"}).start()
    client = d.client()
    with pytest.raises(MemoryLimitError) as caught:
        client.submit("_memory_tasks:hog", HOG).result(timeout=RESULT)
    assert_memory_limit_error(caught.value)
    assert client.submit("_memory_tasks:where").result(timeout=RESULT) != caught.value.pid
    status = d.status()
    assert (status["memory_kills"], status["oom_kills"]) == (1, 0)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 1000, -5, True, "lots", "0%", "150%", 1.5, 0.0,
                                   "2 parsecs", [1]])
def test_bad_memory_limits_are_one_clear_line(value: Any) -> None:
    with pytest.raises(ValueError, match="^memory_limit: expected bytes") as caught:
        shmrunner.Pool(1, memory_limit=value)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="worker.memory_limit: expected bytes") as bad:
        config.parse({"worker": {"memory_limit": value}})
    assert "\n" not in str(bad.value)
    with pytest.raises(ConfigError, match="scheduler.memory_limit: expected"):
        Scheduler(local_workers=1, memory_limit=value)


@pytest.mark.parametrize("value", [512 * MiB, "512MiB", "2GB", "1.5 GiB", 0.5, "50%", 1.0, None])
def test_good_memory_limits_are_accepted_everywhere(value: Any) -> None:
    assert config.parse({"worker": {"memory_limit": value},
                         "scheduler": {"memory_limit": value}}).worker.memory_limit == value


def test_memory_limit_from_the_environment() -> None:
    settings = config.resolve(environ={"SHMRUNNER_WORKER__MEMORY_LIMIT": "25%",
                                       "SHMRUNNER_SCHEDULER__MEMORY_LIMIT": "1GiB"})
    assert settings.worker.memory_limit == "25%"
    assert settings.scheduler.memory_limit == "1GiB"
    with pytest.raises(ConfigError, match="SHMRUNNER_WORKER__MEMORY_LIMIT"):
        config.resolve(environ={"SHMRUNNER_WORKER__MEMORY_LIMIT": "much"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", [["--set", "worker.memory_limit=lots"],
                                    ["--memory-limit", "lots"], ["--memory-limit", "2"]])
def test_worker_command_refuses_a_bad_memory_limit_in_one_line(option: list[str]) -> None:
    done = run_cli("worker", "--connect", "tcp://127.0.0.1:9", *option)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ("memory_limit" in lines[0] or "--memory-limit" in lines[0]), \
        done.stderr


# --- the kernel's OOM killer ------------------------------------------------------------------


_OOM_SCRIPT = """
import json, os, sys
import shmrunner, _memory_tasks as tasks
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))  # this process and the workers it starts: in the cgroup
if __name__ == "__main__":
    with shmrunner.Pool(2) as pool:  # no memory_limit of its own: the cgroup's is the bound
        try:
            pool.apply(tasks.hog, (int(sys.argv[2]),))
            out = {"error": None}
        except shmrunner.WorkerLostError as err:
            out = {"error": type(err).__name__, "oom_killer": getattr(err, "oom_killer", None),
                   "text": str(err), "pid": err.pid}
        out["next"] = pool.apply(tasks.where)
        # Then both workers (the one that lived through the OOM kill, and its new
        # neighbour) die of a plain SIGKILL: one OOM kill explains one death only.
        later = [pool.apply_async(tasks.die_by_sigkill) for _ in range(2)]
        out["later"] = []
        for result in later:
            try:
                result.get(60)
            except shmrunner.WorkerLostError as err:
                out["later"].append(type(err).__name__)
    print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_a_worker_killed_by_the_kernel_oom_killer_is_reported_as_such(
        tmp_path: Path, oom_cgroup: str) -> None:
    done = subprocess.run([sys.executable, "-c", _OOM_SCRIPT, oom_cgroup, "1024"],
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["error"] == "MemoryLimitError", out
    assert out["oom_killer"] is True
    assert f"worker pid {out['pid']} was killed by the kernel's OOM killer" in out["text"]
    assert "oom_kill count rose" in out["text"] and os.path.basename(oom_cgroup) in out["text"]
    assert out["next"] != out["pid"]  # replaced, and the next task ran
    assert out["later"] == ["WorkerLostError", "WorkerLostError"]
