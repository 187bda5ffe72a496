"""How the Scheduler and the Client end, held side by side with
``concurrent.futures.ProcessPoolExecutor``: the interpreter's exit, shutdown
with and without wait, terminate, streams read after shutdown, and a submit
the daemon would refuse (real processes, a real daemon on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import _sched_tasks as tasks
import shmrunner
from _util import run_script

RESULT = 30  # seconds: a healthy result arrives in well under one


@pytest.mark.timeout(120)
def test_a_scheduler_left_in_a_global_lets_the_interpreter_exit(tmp_path: Path) -> None:
    """A script that never calls shutdown() (a Scheduler in a module global,
    as one keeps a ProcessPoolExecutor) must exit. Its __del__ ran during
    interpreter finalization and started a shutdown thread there: Thread.start()
    then waited forever for a thread that can no longer run, so the process
    hung after its last line."""
    done = run_script(tmp_path, """
        import faulthandler, sys
        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, exit 1
        import _sched_tasks as tasks
        import shmrunner

        sched = shmrunner.Scheduler(local_workers=1)
        print(sched.submit(tasks.square, 3).result(30), flush=True)
    """)
    assert done.stdout.strip() == "9", done.stderr
    assert done.returncode == 0, done.stderr
    assert "Timeout" not in done.stderr, done.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sched.shutdown(wait=False)", "del sched"])
def test_tasks_left_to_a_scheduler_run_before_the_program_exits(tmp_path: Path,
                                                                how: str) -> None:
    """concurrent.futures: "regardless of the value of wait, the entire Python
    program will not exit until all pending futures are done executing" (a
    ProcessPoolExecutor runs both tasks here), and the README: a Scheduler
    dropped without shutdown() "finishes what it was given". The shutdown
    thread was a daemon thread, so the interpreter did not wait for it and its
    exit killed the workers: the queued task never ran."""
    trace = tmp_path / "ran"
    done = run_script(tmp_path, f"""
        import _sched_tasks as tasks
        import shmrunner

        sched = shmrunner.Scheduler(local_workers=1)
        sched.submit(tasks.sleep_for, 0.5)
        sched.submit(tasks.mark_run, {str(trace)!r})  # queued behind it
        {how}
    """)
    assert done.returncode == 0, done.stderr
    assert trace.exists(), "the queued task never ran: the program exited first"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["map", "imap_unordered"])
def test_a_stream_read_after_shutdown_yields_what_ran_then_says_why_it_stops(
        method: str) -> None:
    """A map consumed after its ``with`` block (fine with a ProcessPoolExecutor,
    which submits every item at once). The Scheduler's map is lazy (README),
    so the items past its window cannot be submitted any more; but the tasks
    submitted before the shutdown ran (shutdown waited for them) and their
    results were dropped: the first next() raised "cannot schedule new futures
    after shutdown", naming neither the stream nor the fix."""
    with shmrunner.Scheduler(local_workers=2) as sched:
        results = getattr(sched, method)(tasks.square, range(40), buffersize=8)
    got = []
    with pytest.raises(RuntimeError, match="after shutdown") as info:
        for value in results:
            got.append(value)
    assert sorted(got) == [i * i for i in range(8)]
    assert "buffersize" in str(info.value)


@pytest.mark.timeout(90)
@pytest.mark.timeout(90)
def test_client_shutdown_without_wait_fails_its_futures_and_the_jobs_run_on(
        daemons: Any) -> None:
    """The README's documented difference from concurrent.futures: the
    connection closes at once, a pending future fails saying how to fetch its
    result, and the job runs on in the daemon, fetched by id later."""
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client()
    future = client.submit("_daemon_tasks:inc", 41, job_id="left-running")
    assert future.wait_accepted(timeout=RESULT)
    client.shutdown(wait=False)
    assert future.done()
    with pytest.raises(shmrunner.ShmrunnerError, match=r"result\(job_id\)"):
        future.result(0)
    later = d.client()
    assert later.result("left-running", timeout=RESULT) == 42


@pytest.mark.timeout(90)
def test_a_submit_whose_header_the_daemon_would_refuse_fails_at_once(daemons: Any) -> None:
    """A 65 MiB bytes argument travels in the message's header, over the
    daemon's 64 MiB header limit (docs/protocol.md): the daemon only logged
    the rejection, and the future waited ack_timeout (30 s) before failing
    with "it may or may not have been accepted", which it never was."""
    d = daemons(scheduler={"local_workers": 1}).start()
    client = d.client()
    with pytest.raises(shmrunner.ProtocolError, match="np.frombuffer"):
        client.submit("builtins:len", b"x" * (65 << 20))
    assert client.submit("builtins:len", b"x" * (1 << 20)).result(RESULT) == 1 << 20


@pytest.mark.timeout(120)
def test_terminate_stops_now_and_the_program_exits_without_waiting(tmp_path: Path) -> None:
    """Scheduler.terminate() (Pool.terminate's counterpart, what the daemon
    calls at the end of its drain): the running task fails with
    TaskCancelledError and its worker is killed, the queued one is cancelled,
    new submits are refused, and the program exits at once although the task
    would have held forever."""
    started, gate = tmp_path / "started", tmp_path / "never-opened"
    done = run_script(tmp_path, f"""
        import faulthandler, json, os
        faulthandler.dump_traceback_later(40, exit=True)  # a hang: the stack, exit 1
        import _sched_tasks as tasks
        import shmrunner
        from _util import is_alive, wait_until

        sched = shmrunner.Scheduler(local_workers=1)
        running = sched.submit(tasks.gated, {str(started)!r}, {str(gate)!r})
        queued = [sched.submit(tasks.square, i) for i in range(10)]
        wait_until(lambda: os.path.exists({str(started)!r}), 30, message="the task to start")
        pid = json.load(open({str(started)!r}))["pid"]
        sched.terminate()
        try:
            running.result(10)
        except shmrunner.TaskCancelledError as exc:
            print("running:", type(exc).__name__)
        # (One may have gone to the worker already, behind the running one.)
        print("queued:", all(f.cancelled() or isinstance(f.exception(10),
                                                         shmrunner.TaskCancelledError)
                             for f in queued), sum(f.cancelled() for f in queued) >= 8)
        try:
            sched.submit(tasks.square, 2)
        except RuntimeError as exc:
            print("submit:", exc)
        print("worker alive:", is_alive(pid))
    """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["running: TaskCancelledError", "queued: True True"], done.stdout
    assert lines[2].startswith("submit: cannot schedule new futures"), done.stdout
    assert lines[3] == "worker alive: False", done.stdout
