"""What the docs promise of bad input: one-line errors for bad arguments to the
Pool, the Scheduler, the Client and the CLI, and the daemon's answers
matching the requests they answer (docs/protocol.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

import shmrunner
from _daemon_tasks import run_cli
from shmrunner.errors import ResultTimeoutError


def _inc(x: int) -> int:
    return x + 1


# --- the CLI -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [("status",), ("jobs",), ("cancel", "some-job")])
def test_cli_malformed_connect_address_is_one_usage_line(command: tuple[str, ...]) -> None:
    # As `worker --connect bogus` already is: a malformed value is exit 2, naming it.
    done = run_cli(*command, "--connect", "bogus", "--timeout", "1")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "bogus" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, words", [
    (("jobs", "--log", "one", "two"), ["--log one", "two"]),
    (("status", "--count", "2"), ["--count", "--watch"]),
])
def test_cli_options_that_would_be_ignored_are_refused(args: tuple[str, ...],
                                                       words: list[str]) -> None:
    done = run_cli(*args, "--connect", "tcp://127.0.0.1:1", "--timeout", "1")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


# --- the Pool ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_progress_that_is_neither_a_flag_nor_a_callable_is_named() -> None:
    with shmrunner.Pool(1) as pool:
        with pytest.raises(TypeError, match="progress must be"):
            pool.map(_inc, range(3), progress=5)  # type: ignore[arg-type]
    with shmrunner.Scheduler(local_workers=1) as sched:
        with pytest.raises(TypeError, match="progress must be"):
            sched.map(_inc, range(3), progress="yes")  # type: ignore[arg-type]
        assert list(sched.map(_inc, range(3), progress=None)) == [1, 2, 3]

@pytest.mark.timeout(60)
def test_pool_refuses_a_fractional_process_count() -> None:
    # multiprocessing.Pool(2.5) raises TypeError at once; this one made a pool
    # whose map() then failed with a TypeError about chunk sizes.
    with pytest.raises(TypeError, match="float"):
        shmrunner.Pool(2.5)  # type: ignore[arg-type]


# --- the Scheduler -----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_scheduler_settings_of_the_wrong_type_is_named() -> None:
    with pytest.raises(TypeError, match="settings"):
        shmrunner.Scheduler(local_workers=0, settings={"local_workers": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="settings"):
        shmrunner.Scheduler(local_workers=1, settings=5)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_scheduler_cancel_of_something_else_than_a_future_is_named() -> None:
    with shmrunner.Scheduler(local_workers=1) as sched:
        with pytest.raises(TypeError, match="cancel\\(\\) takes a future"):
            sched.cancel(5)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_scheduler_retry_on_that_is_no_list_is_named() -> None:
    with shmrunner.Scheduler(local_workers=1) as sched:
        with pytest.raises(TypeError, match="retry_on"):
            sched.submit(_inc, 1, retry_on=5)  # type: ignore[arg-type]
        assert sched.submit(_inc, 1).result(timeout=30) == 2


# --- the Client --------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("options", [{"refetch_interval": 0}, {"refetch_interval": -1},
                                     {"ack_timeout": 0}, {"ack_timeout": float("nan")},
                                     {"max_pending_bytes": -1}])
def test_client_refuses_timing_options_it_cannot_honour(options: dict[str, Any]) -> None:
    # refetch_interval=0 made the client thread spin at 100% CPU re-asking the
    # daemon; ack_timeout=0 failed every submit as "not acknowledged within 0 s".
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        shmrunner.connect("ipc:///nonexistent/shmrunner-audit.sock", **options)


@pytest.mark.timeout(90)
def test_client_submit_bad_retries_and_timeout_name_the_option(
        daemons: Callable[..., Any]) -> None:
    d = daemons().start()
    client = d.client()
    for kwargs, name in (({"timeout": -1}, "timeout"), ({"timeout": "1"}, "timeout"),
                         ({"retries": -1}, "retries"), ({"retries": "1"}, "retries")):
        with pytest.raises(ValueError, match=name) as info:
            client.submit("_daemon_tasks:inc", 1, **kwargs)
        # As Scheduler.submit says it, not the wire codec's field list.
        assert "cannot encode" not in str(info.value)
    assert client.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2


@pytest.mark.timeout(90)
def test_client_result_with_a_negative_timeout_times_out(daemons: Callable[..., Any]) -> None:
    # concurrent.futures: result(timeout=-1) is a timeout already expired.
    d = daemons().start()
    client = d.client()
    future = client.submit("time:sleep", 5)
    assert future.wait_accepted(timeout=30)
    with pytest.raises(ResultTimeoutError):
        client.result(future.job_id, timeout=-1)
    assert client.result(future.job_id, timeout=60) is None


@pytest.mark.timeout(120)
def test_job_queries_are_answered_with_their_own_jobs_after_cancels(
        daemons: Callable[..., Any]) -> None:
    # Cancelled futures send cancels the daemon answered after the next "jobs"
    # query of the same poll round, so that query got a cancel's answer: another
    # job's record from jobs(job_ids=...), a KeyError from job_state().
    d = daemons().start()
    client = d.client()
    for round_ in range(5):
        futures = [client.submit("time:sleep", 0.5) for _ in range(4)]
        for future in futures:
            future.cancel()
        assert client.job_state(f"nosuch-{round_}") == "unknown"
        assert client.jobs(job_ids=[f"other-{round_}"])[0]["job_id"] == f"other-{round_}"
        deadline = time.monotonic() + 30
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.01)
