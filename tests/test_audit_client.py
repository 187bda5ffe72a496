"""Audit of the daemon's Client and its same-host path: defects found by the
client audit, each pinned by a test against a real daemon subprocess."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _util import wait_until


@pytest.mark.timeout(90)
def test_a_fetch_waiting_when_a_non_durable_memfd_result_comes_gets_the_result(
        tmp_path: Path, daemons: Any) -> None:
    """durable=False only means the result is not journaled: a client already
    waiting for the job when it finishes must get the result the daemon has in
    hand, not "the result is lost" (that is for a *later* fetch)."""
    d = daemons(scheduler={"local_workers": 1}).start()
    owner = d.client(durable=False)
    other = d.client()
    assert owner.submit("_daemon_tasks:inc", 1).result(timeout=30) == 2  # side channel known
    release = tmp_path / "release"
    a = np.arange(100_000, dtype=np.float64)  # 800 kB: its result comes back as a memfd
    future = owner.submit("_audit_client_tasks:gated_scale", a, str(release))
    assert future.wait_accepted(timeout=30)
    out: dict[str, Any] = {}

    def fetch() -> None:
        try:
            out["value"] = other.result(future.job_id, timeout=60)
        except Exception as exc:  # noqa: BLE001 (the assertion below shows it)
            out["value"] = exc

    waiter = threading.Thread(target=fetch)
    waiter.start()
    # The other client's fetch has reached the daemon once it says the job runs
    # (its fetch is sent before, and the daemon answers in order).
    wait_until(lambda: d.status()["running"] == 1, timeout=30, message="the job to run")
    wait_until(lambda: other.job_state(future.job_id) == "running", timeout=30,
               message="the job to run")
    release.touch()
    np.testing.assert_array_equal(future.result(timeout=60), a * 2)
    assert owner.same_host["results"] == 1  # it did come back as a memfd
    waiter.join(60)
    assert not isinstance(out.get("value"), Exception), out
    np.testing.assert_array_equal(out["value"], a * 2)

