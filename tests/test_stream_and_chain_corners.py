"""Lazy streams and chains in the corners: wide fan-ins, deep chains that must
still print, refused submits mid-stream, imaps ended by terminate(), futures
given to the wrong executor (each test failed before its fix). Real worker
processes; the daemon tests run a real ``shmrunner daemon`` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import _chain_tasks as ct
from shmrunner import Pool, Scheduler, TaskCancelledError

RESULT = 30  # seconds: a healthy result arrives in well under one
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


@pytest.mark.timeout(60)
def test_a_fan_in_past_the_search_limit_names_that_limit() -> None:
    # 12,000 futures in one list: those past the first 10,000 objects are not
    # searched, so the task fails when they reach pickling. The error used to
    # say "futures are resolved only ... inside lists ...; put it there",
    # which is where they were: it must name the limit that was hit.
    with Scheduler(local_workers=1) as sched:
        first, last = sched.submit(ct.inc, 0), sched.submit(ct.inc, 1)
        # (the search looks at a list's first 10,000 items: ``last`` is past them)
        total = sched.submit(ct.echo, [first] * 12_000 + [last])
        with pytest.raises(TypeError) as info:
            total.result(RESULT)
    message = str(info.value)
    assert "10000" in message or "10,000" in message, message


_STALLED_INPUT = """
import sys, threading
sys.path.insert(0, {tests!r})
import _chain_tasks as ct
from shmrunner import Pool

"""


def _stalled(release: threading.Event) -> Iterator[int]:
    """Two items, then an input that waits (a queue, a socket) until released."""
    yield 1
    yield 2
    release.wait(60)
    yield 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["imap", "imap_unordered"])
def test_terminate_ends_an_imap_whose_input_is_stalled(kind: str) -> None:
    # README: terminate() fails what it drops with TaskCancelledError "instead
    # of leaving their results pending forever". An imap whose feeder was
    # blocked reading the caller's input left next() waiting until the input
    # yielded again (forever, for a queue nobody feeds any more).
    release = threading.Event()
    pool = Pool(2)
    try:
        results = getattr(pool, kind)(ct.inc, _stalled(release))
        assert sorted([next(results), next(results)]) == [2, 3]
        pool.terminate()
        outcome: list[BaseException | object] = []

        def consume() -> None:
            try:
                outcome.append(next(results))
            except BaseException as exc:  # noqa: BLE001 (what the consumer sees)
                outcome.append(exc)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        consumer.join(10)
        assert outcome, "next() still waits for the input 10 s after terminate()"
        assert isinstance(outcome[0], TaskCancelledError), outcome
    finally:
        release.set()
        pool.terminate()


_DEEP_FAILURE = """
import sys
sys.path.insert(0, {tests!r})
import _chain_tasks as ct
from shmrunner import Scheduler

if __name__ == "__main__":
    with Scheduler(local_workers=1) as sched:
        link = sched.submit(ct.fail, "the root cause")
        for _ in range(1500):
            link = sched.submit(ct.inc, link)
        link.exception({timeout})
    link.result()  # uncaught: Python prints it
"""


@pytest.mark.timeout(90)
def test_an_uncaught_failure_at_the_end_of_a_deep_chain_is_printed(tmp_path: Any) -> None:
    script = tmp_path / "deep.py"
    script.write_text(_DEEP_FAILURE.format(tests=TESTS_DIR, timeout=RESULT))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, REPO, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=80, env=env, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "lost sys.stderr" not in proc.stderr, proc.stderr[-2000:]
    assert "ValueError: the root cause" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.timeout(120)
def test_a_client_job_on_a_withdrawn_job_is_cancelled_not_failed(
        daemons: Callable[..., Any]) -> None:
    # README (daemon chaining): "a cancelled one cancels the job
    # (TaskCancelledError)". A dependency cancelled before the daemon accepted
    # it (withdrawn) failed the dependent with DependencyError instead, while
    # one cancelled after acceptance gave TaskCancelledError.
    daemon = daemons(scheduler={"local_workers": 1}).start()
    client = daemon.client()
    client.status(timeout=RESULT)  # connected
    os.kill(daemon.pid, signal.SIGSTOP)  # so the job cannot be accepted before its cancel
    try:
        dep = client.submit("_daemon_tasks:inc", 1)
        assert dep.cancel()  # withdrawn: not accepted yet
        dependent = client.submit("_daemon_tasks:inc", dep)
        with pytest.raises(TaskCancelledError):
            dependent.result(RESULT)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["map", "imap_unordered"])
def test_an_item_submit_refuses_fails_in_its_place(method: str) -> None:
    # An exception the input raises comes after the results of the items
    # read before it (README, _streams.py); one that submit raises for an item
    # (a future of another executor among its arguments, say) came buffersize
    # items early instead, dropping results already computed.
    import concurrent.futures

    with Scheduler(local_workers=1) as sched, \
            concurrent.futures.ThreadPoolExecutor(1) as other:
        foreign = other.submit(int, 7)
        got = []
        with pytest.raises(TypeError, match="another executor"):
            for value in getattr(sched, method)(ct.echo, [0, 1, 2, 3, foreign],
                                                buffersize=2):
                got.append(value[0][0])
    assert sorted(got) == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_a_scheduler_future_given_to_a_pool_says_a_pool_does_not_resolve_it() -> None:
    """The chaining advice ("put it there (an argument)") was wrong for a Pool,
    which never resolves futures: the error says so."""
    with Scheduler(local_workers=1) as sched, Pool(1) as pool:
        future = sched.submit(abs, -1)
        with pytest.raises(TypeError, match="a Pool or another executor never resolves"):
            pool.apply(abs, (future,))
        assert pool.apply(abs, (future.result(RESULT),)) == 1
