"""Scheduler retries on the task's own exceptions (``retry_on``, as Celery's
``autoretry_for``) and the exponential ``retry_backoff`` between retries.

Real worker processes; each task counts its attempts in a file and records
when it started and failed (``_retry_tasks``), so the tests read how often a
task ran and that no retry started before its backoff was over. No sleeps as
synchronisation: a test waits on futures or polls ``status()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import _retry_tasks as tasks
from _util import wait_until
from shmrunner import Scheduler
from shmrunner.config import SchedulerSettings, parse, resolve
from shmrunner.errors import ConfigError, TaskCancelledError

RESULT = 30  # seconds: a healthy result arrives in well under one


def starts(path: Path) -> list[float]:
    return [t for event, t in tasks.attempts(str(path)) if event == "start"]


def fails(path: Path) -> list[float]:
    return [t for event, t in tasks.attempts(str(path)) if event == "fail"]


# --- which exceptions are retried ---------------------------------------------------


def test_listed_exception_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    with Scheduler(local_workers=1, retries=3, retry_on=["ConnectionError"]) as sched:
        fut = sched.submit(tasks.fail_first, str(log), 2, "ConnectionError")
        assert fut.result(timeout=RESULT) == "ok after 3"
    assert len(starts(log)) == 3


def test_without_retry_on_an_exception_is_not_retried(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    with Scheduler(local_workers=1, retries=3) as sched:
        fut = sched.submit(tasks.fail_first, str(log), 2, "ConnectionError")
        with pytest.raises(ConnectionError, match="attempt 1 failed"):
            fut.result(timeout=RESULT)
    assert len(starts(log)) == 1


def test_unlisted_exception_is_not_retried(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    with Scheduler(local_workers=1, retries=3, retry_on=["ConnectionError"]) as sched:
        fut = sched.submit(tasks.fail_first, str(log), 2, "ValueError")
        with pytest.raises(ValueError, match="attempt 1 failed"):
            fut.result(timeout=RESULT)
    assert len(starts(log)) == 1


def test_spent_retries_fail_with_the_tasks_own_last_exception(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    with Scheduler(local_workers=1, retries=2, retry_on=["ConnectionError"]) as sched:
        fut = sched.submit(tasks.fail_first, str(log), 10, "ConnectionError")
        with pytest.raises(ConnectionError, match="attempt 3 failed"):
            fut.result(timeout=RESULT)
    assert len(starts(log)) == 3


@pytest.mark.parametrize("retry_on, error", [
    (["_retry_tasks:Flaky"], "Flaky"),           # module:qualname
    (["_retry_tasks.Flaky"], "Flaky"),           # module.Name
    (["_retry_tasks:Flaky"], "FlakyChild"),      # a subclass of a listed class
    (["OSError"], "ConnectionRefusedError"),     # a builtin base by its bare name
    (["json:JSONDecodeError"], "JSONDecodeError"),  # re-exported by the module named
    (["json.JSONDecodeError"], "JSONDecodeError"),
])
def test_retry_on_names_match_the_class_and_its_bases(
        tmp_path: Path, retry_on: list[str], error: str) -> None:
    log = tmp_path / "attempts"
    with Scheduler(local_workers=1, retries=1, retry_on=retry_on) as sched:
        fut = sched.submit(tasks.fail_first, str(log), 1, error)
        assert fut.result(timeout=RESULT) == "ok after 2"


def test_per_call_retry_on_takes_classes_and_names(tmp_path: Path) -> None:
    with Scheduler(local_workers=1) as sched:
        by_class = sched.submit(tasks.fail_first, str(tmp_path / "a"), 1, "FlakyChild",
                                retries=1, retry_on=(tasks.Flaky,))
        by_name = sched.submit(tasks.fail_first, str(tmp_path / "b"), 1, "ConnectionError",
                               retries=1, retry_on=["ConnectionError"])
        assert by_class.result(timeout=RESULT) == "ok after 2"
        assert by_name.result(timeout=RESULT) == "ok after 2"


def test_per_call_retry_on_replaces_the_setting(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    with Scheduler(local_workers=1, retries=3, retry_on=["ConnectionError"]) as sched:
        fut = sched.submit(tasks.fail_first, str(log), 2, "ConnectionError", retry_on=())
        with pytest.raises(ConnectionError):
            fut.result(timeout=RESULT)
    assert len(starts(log)) == 1


def test_remote_exception_not_rebuilt_matches_by_its_type_name(tmp_path: Path) -> None:
    # A remote task's exception of a class this process cannot import arrives
    # as RemoteTaskError naming it: retry_on still matches that name.
    with Scheduler(local_workers=1, retries=1, retry_on=["mypkg.errors:Flaky"]) as sched:
        fut = sched.submit(tasks.fail_remote_first, str(tmp_path / "a"), 1,
                           "mypkg.errors:Flaky")
        assert fut.result(timeout=RESULT) == "ok after 2"


@pytest.mark.parametrize("retry_on", ["ConnectionError", [1], [ValueError, 2.0], ConnectionError])
def test_per_call_retry_on_must_be_classes_or_names(retry_on: object) -> None:
    with Scheduler(local_workers=1) as sched:
        with pytest.raises(TypeError, match="retry_on"):
            sched.submit(tasks.fail_first, "/nonexistent", 0, "ValueError",
                         retry_on=retry_on)  # type: ignore[arg-type]
        assert sched.status()["submitted"] == 0


def test_per_call_retry_on_names_are_checked() -> None:
    with Scheduler(local_workers=1) as sched:
        with pytest.raises(ValueError, match="not an exception class name"):
            sched.submit(tasks.fail_first, "/nonexistent", 0, "ValueError",
                         retry_on=["not a name"])
        # A bare name that is no builtin exception could never match: refused.
        with pytest.raises(ValueError, match="'Flaky' is not an exception class name"):
            sched.submit(tasks.fail_first, "/nonexistent", 0, "ValueError",
                         retry_on=["Flaky"])
        assert sched.status()["submitted"] == 0


# --- backoff -----------------------------------------------------------------------


def test_backoff_delays_each_retry_and_doubles(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    backoff = 0.2
    with Scheduler(local_workers=1, retries=2, retry_on=["ConnectionError"],
                   retry_backoff=backoff, retry_backoff_max=10.0) as sched:
        fut = sched.submit(tasks.fail_first, str(log), 2, "ConnectionError")
        assert fut.result(timeout=RESULT) == "ok after 3"
    started, failed = starts(log), fails(log)
    assert len(started) == 3 and len(failed) == 2
    assert started[1] - failed[0] >= backoff
    assert started[2] - failed[1] >= 2 * backoff


def test_backoff_applies_to_lost_worker_retries(tmp_path: Path) -> None:
    import _sched_tasks

    with Scheduler(local_workers=1, retries=1, retry_backoff=0.1) as sched:
        fut = sched.submit(_sched_tasks.kill_self_first_time, str(tmp_path / "marker"),
                           str(tmp_path / "attempts"))
        fut.result(timeout=RESULT)
    assert len((tmp_path / "attempts").read_text().splitlines()) == 2


def test_shutdown_waits_for_a_task_in_backoff_and_runs_its_retry(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    # The backoff is the window in which this test must see the task wait (and
    # shut down): long enough that a loaded machine's polling cannot miss it.
    sched = Scheduler(local_workers=1, retries=1, retry_on=["ConnectionError"],
                      retry_backoff=3.0)
    try:
        fut = sched.submit(tasks.fail_first, str(log), 1, "ConnectionError")
        wait_until(lambda: sched.status()["retry_waiting"] == 1, timeout=RESULT,
                   message="the task waiting out its backoff")
        assert sched.status()["running"] == 0  # it holds no worker meanwhile
    finally:
        sched.shutdown(wait=True)
    assert fut.result(timeout=0) == "ok after 2"


def test_shutdown_cancel_futures_fails_a_task_in_backoff(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    sched = Scheduler(local_workers=1, retries=1, retry_on=["ConnectionError"],
                      retry_backoff=60.0)
    try:
        fut = sched.submit(tasks.fail_first, str(log), 1, "ConnectionError")
        wait_until(lambda: sched.status()["retry_waiting"] == 1, timeout=RESULT,
                   message="the task waiting out its backoff")
    finally:
        sched.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(TaskCancelledError, match="waiting for a retry"):
        fut.result(timeout=0)
    assert len(starts(log)) == 1


# --- settings ----------------------------------------------------------------------


def test_settings_read_retry_on_and_backoff() -> None:
    settings = parse({"scheduler": {"retry_on": ["ConnectionError", "mypkg.errors:Flaky"],
                                    "retry_backoff": 1, "retry_backoff_max": 30}})
    assert settings.scheduler.retry_on == ("ConnectionError", "mypkg.errors:Flaky")
    assert settings.scheduler.retry_backoff == 1
    defaults = SchedulerSettings()
    assert (defaults.retry_on, defaults.retry_backoff, defaults.retry_backoff_max) == \
        ((), 0.0, 60.0)
    resolved = resolve(sets=["scheduler.retry_on=[ConnectionError]",
                             "scheduler.retry_backoff=0.5"], environ={})
    assert resolved.scheduler.retry_on == ("ConnectionError",)
    assert resolved.scheduler.retry_backoff == 0.5


@pytest.mark.parametrize("values, key", [
    ({"retry_on": "ConnectionError"}, "scheduler.retry_on"),
    ({"retry_on": [1]}, "scheduler.retry_on"),
    ({"retry_on": ["not a name"]}, "scheduler.retry_on"),
    ({"retry_on": ["x"] * 101}, "scheduler.retry_on"),
    ({"retry_on": None}, "scheduler.retry_on"),
    ({"retry_backoff": -1}, "scheduler.retry_backoff"),
    ({"retry_backoff": "1s"}, "scheduler.retry_backoff"),
    ({"retry_backoff": True}, "scheduler.retry_backoff"),
    ({"retry_backoff_max": 0}, "scheduler.retry_backoff_max"),
    ({"retry_backoff_max": [1]}, "scheduler.retry_backoff_max"),
    ({"retry_backoff": 10, "retry_backoff_max": 5}, "scheduler.retry_backoff"),
])
def test_bad_retry_settings_are_one_line_config_errors(values: dict[str, object],
                                                       key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"scheduler": values}, "my.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"my.yaml: {key}")
