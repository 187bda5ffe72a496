"""Attacks on the local shared-memory tier: a fork() child using its parent's
pool, and a process that tries to turn shared memory into a SIGBUS.

Real processes, real fork(), real memfds. Whatever the attacker does, the
victim (the parent of the pool) must keep its results correct and survive.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import _failure_tasks as tasks
import shmrunner
from shmrunner import ProtocolError, ShmrunnerError
from shmrunner.transport import pickling

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
RESULT = 30  # seconds: a healthy result arrives in well under one


# --- fork() after creating a Pool or a Scheduler -------------------------------------------


def _in_fork_child(action: Callable[[], object]) -> tuple[int, str]:
    """Run ``action`` in a real fork() child; return (pid, what it reported).

    The child reports one line through a pipe and always ends with os._exit,
    so nothing of the parent (atexit hooks, pytest) runs twice.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(r)
            try:
                value = action()
                report = f"returned {value!r}"
            except ShmrunnerError as exc:
                report = f"ShmrunnerError: {exc}"
            except BaseException as exc:  # noqa: BLE001 (reported to the parent)
                report = f"{type(exc).__name__}: {exc}"
            os.write(w, report.encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, _read_report(r, pid)


def _read_report(r: int, pid: int) -> str:
    try:
        ready, _, _ = select.select([r], [], [], RESULT)
        if not ready:  # the child hangs: that is the bug
            os.kill(pid, signal.SIGKILL)
            return "no report: the child hung"
        return os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def _expect_refused(report: str, owner: str) -> None:
    assert report.startswith("ShmrunnerError: "), report
    assert f"this {owner} was created in process {os.getpid()}" in report, report
    assert f"create a new {owner} in the child" in report, report


@pytest.mark.timeout(90)
def test_fork_child_cannot_use_the_parents_pool() -> None:
    with shmrunner.Pool(2) as pool:
        assert pool.apply(tasks.add_one, (1,)) == 2
        # The child tries every way in; each must refuse, none may reach a worker.
        _, report = _in_fork_child(lambda: pool.apply_async(tasks.add_one, (100,)).get(10))
        _expect_refused(report, "Pool")
        _, report = _in_fork_child(lambda: pool.map(tasks.add_one, range(100, 110)))
        _expect_refused(report, "Pool")
        _, report = _in_fork_child(lambda: list(pool.imap(tasks.add_one, range(100, 110))))
        _expect_refused(report, "Pool")

        def stop_it() -> str:
            pool.terminate()
            pool.join()
            return "stopped"

        # Stopping its copy is harmless to the parent.
        _, report = _in_fork_child(stop_it)
        assert report == "returned 'stopped'", report
        # The parent's results stay its own, and its workers keep serving it.
        results = [pool.apply_async(tasks.add_one, (i,)) for i in range(50)]
        assert [r.get(RESULT) for r in results] == list(range(1, 51))
        assert pool.map(tasks.add_one, range(20)) == list(range(1, 21))


@pytest.mark.timeout(90)
def test_fork_child_cannot_use_the_parents_scheduler() -> None:
    with shmrunner.Scheduler(local_workers=1) as sched:
        assert sched.submit(tasks.add_one, 1).result(RESULT) == 2
        _, report = _in_fork_child(lambda: sched.submit(tasks.add_one, 100).result(10))
        _expect_refused(report, "Scheduler")
        _, report = _in_fork_child(lambda: list(sched.map(tasks.add_one, range(5))))
        _expect_refused(report, "Scheduler")
        futures = [sched.submit(tasks.add_one, i) for i in range(20)]
        assert [f.result(RESULT) for f in futures] == list(range(1, 21))


def test_fork_child_cannot_use_the_parents_remote_only_scheduler() -> None:
    with shmrunner.Scheduler(local_workers=0, listen="tcp://127.0.0.1:*") as sched:
        _, report = _in_fork_child(lambda: sched.submit(tasks.add_one, 100))
        _expect_refused(report, "Scheduler")
        assert sched.status()["queued"] == 0  # nothing of the child's reached the parent


# --- shared memory cannot be turned into a SIGBUS --------------------------------------------

RESIZE_SCRIPT = """
import json, multiprocessing, sys
import numpy as np
import shmrunner
import _failure_tasks as tasks

def main():
    with shmrunner.Pool(1, context=multiprocessing.get_context(sys.argv[1])) as pool:
        shared = shmrunner.zeros(1 << 18)  # 2 MiB: the parent maps it
        shared[:] = 1.0
        plain = np.ones(1 << 18)  # travels as a fresh copy
        report = {
            "shared": pool.apply(tasks.try_to_resize, (shared,)),
            "copy": pool.apply(tasks.try_to_resize, (plain,)),
        }
        # Touch every page the worker tried to take away (SIGBUS if it had).
        report["sum"] = float(shared.sum())
        report["after"] = pool.apply(tasks.add_one, (1,))
    print(json.dumps(report))

if __name__ == "__main__":
    main()
"""

REFUSED = {"shrink": "EPERM", "grow": "EPERM", "shrink-reopened": "EPERM",
           "add-seal": "EPERM"}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_cannot_resize_a_segment_under_the_parent(method: str, tmp_path: Path) -> None:
    script = tmp_path / "resize.py"
    script.write_text(textwrap.dedent(RESIZE_SCRIPT))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True,
                          timeout=60, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, f"the parent died ({done.returncode}): {done.stderr}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"shared": REFUSED, "copy": REFUSED, "sum": float(1 << 18), "after": 2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "match"), [("unsealed", "not sealed against resizing"),
                                             ("short", "holds 8 bytes but its handle says 8000")])
def test_worker_sending_an_unsealed_or_short_segment_is_refused(kind: str, match: str) -> None:
    with shmrunner.Pool(1) as pool:
        with pytest.raises(ProtocolError, match=match):
            pool.apply(tasks.return_crafted_segment, (kind,))
        assert pool.apply(tasks.add_one, (1,)) == 2


def test_crafted_fds_are_refused_before_mapping() -> None:
    arr = shmrunner.zeros(1000)
    enc = pickling.dumps(arr, 1024)
    try:
        r, w = os.pipe()
        os.close(w)
        with pytest.raises(ProtocolError, match="not a shared memory segment"):
            pickling.loads(enc.data, [r])  # loads consumes (closes) every fd it is given
        unsealed = os.memfd_create("shmrunner", os.MFD_CLOEXEC)
        os.ftruncate(unsealed, arr.nbytes)
        with pytest.raises(ProtocolError, match="not sealed"):
            pickling.loads(enc.data, [unsealed])
    finally:
        enc.release()
    del arr
