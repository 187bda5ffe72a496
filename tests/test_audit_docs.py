"""Audit of what the docs promise: one-line errors for bad arguments to the
Pool, the Scheduler, the Client and the CLI, and the daemon's answers
matching the requests they answer (docs/protocol.md)."""

from __future__ import annotations

import pytest

import shmrunner
from _daemon_tasks import run_cli


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


# --- the Pool ----------------------------------------------------------------------------

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
def test_scheduler_retry_on_that_is_no_list_is_named() -> None:
    with shmrunner.Scheduler(local_workers=1) as sched:
        with pytest.raises(TypeError, match="retry_on"):
            sched.submit(_inc, 1, retry_on=5)  # type: ignore[arg-type]
        assert sched.submit(_inc, 1).result(timeout=30) == 2
