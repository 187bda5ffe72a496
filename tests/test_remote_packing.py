"""The remote tier's packing rule (``tiers/_packing.py``), with real agents:
calls of a function known to be tiny fill one busy agent instead of waking
every idle one; calls of a function never seen or known to be slow still
spread over the idle agents, and nothing is packed behind a call that has
run past the window. Observed through ``Scheduler.status()`` (each worker's
``busy`` count); tasks are held by gate files the test opens.

Whether a function is tiny is the pacing rule's verdict on its results, a
matter of time: these tests set the threshold so the verdict is certain
(``_FAST_TASK``), and the window a busy agent counts as turning tasks over
(``_HEAD_WINDOW``), instead of depending on the machine's speed.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from test_remote import RESULT, start_cluster, stop_cluster

import _sched_tasks as tasks
from _sched_tasks import Gates
from _util import wait_until
from shmrunner import Scheduler
from shmrunner.tiers import _packing, _peers

AGENTS = 4
ALWAYS = 3600.0  # seconds: every result counts as fast / every busy agent as moving


def _busy(sched: Scheduler) -> list[int]:
    return sorted(w["busy"] for w in sched.status()["workers"])


def _warm(sched: Scheduler, gates: Gates) -> int:
    """Run one ``gated`` call to the end, so the hub has a verdict on that
    function; the pid of the agent that ran it."""
    started, gate = gates.new()
    gates.open(gate)
    sched.submit(tasks.gated, started, gate).result(RESULT)
    return gates.started(started)["ppid"]


def _hold(sched: Scheduler, gates: Gates, n: int) -> list[tuple[str, Future[Any]]]:
    """Submit ``n`` gated calls (held until their gates open) and wait until
    the agents hold them all."""
    before = sum(_busy(sched))
    held = []
    for _ in range(n):
        started, gate = gates.new()
        held.append((started, sched.submit(tasks.gated, started, gate)))
    wait_until(lambda: sum(_busy(sched)) == before + n, RESULT,
               message=f"the agents to hold {n} calls")
    return held


@pytest.mark.timeout(120)
def test_tiny_calls_fill_one_agent(tmp_path: Path, gates: Gates,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A function known to be tiny: six calls go to the one agent known to be
    fast (it ran the function), none to the three idle ones; they all run there."""
    monkeypatch.setattr(_peers, "_FAST_TASK", ALWAYS)
    monkeypatch.setattr(_packing, "_HEAD_WINDOW", ALWAYS)
    sched, workers = start_cluster(tmp_path, gates, n=AGENTS)
    try:
        fast = _warm(sched, gates)
        held = _hold(sched, gates, 6)
        assert _busy(sched) == [0, 0, 0, 6]
        gates.open_all()
        for _, f in held:
            f.result(RESULT)
        assert {gates.started(started)["ppid"] for started, _ in held} == {fast}
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(120)
def test_calls_of_a_new_or_slow_function_spread(tmp_path: Path, gates: Gates,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A function never seen, then one known to be slow: one call per idle
    agent, none queued behind another while an agent idles."""
    monkeypatch.setattr(_peers, "_FAST_TASK", 0.0)  # every result counts as slow
    monkeypatch.setattr(_packing, "_HEAD_WINDOW", ALWAYS)
    sched, workers = start_cluster(tmp_path, gates, n=AGENTS)
    try:
        held = _hold(sched, gates, AGENTS)  # never seen
        assert _busy(sched) == [1] * AGENTS
        gates.open_all()
        for _, f in held:
            f.result(RESULT)
        wait_until(lambda: sum(_busy(sched)) == 0, RESULT, message="the agents to be idle")
        _warm(sched, gates)  # now known, and slow
        _hold(sched, gates, AGENTS)
        assert _busy(sched) == [1] * AGENTS
    finally:
        stop_cluster(sched, workers, gates)


@pytest.mark.timeout(120)
def test_nothing_packed_behind_a_call_past_the_window(tmp_path: Path, gates: Gates,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny function's call that has run past the window (stretched at
    most AGENTS times, on a host with one core): the next call goes to an
    idle agent, not behind it."""
    window = 0.05
    monkeypatch.setattr(_peers, "_FAST_TASK", ALWAYS)
    monkeypatch.setattr(_packing, "_HEAD_WINDOW", window)
    sched, workers = start_cluster(tmp_path, gates, n=AGENTS)
    try:
        _warm(sched, gates)
        (started, _), = _hold(sched, gates, 1)
        gates.started(started)
        since = time.monotonic()
        # The rule is about elapsed time: let the held call run past the window.
        wait_until(lambda: time.monotonic() - since > 2 * AGENTS * window, RESULT)
        _hold(sched, gates, 1)
        assert _busy(sched) == [0] * (AGENTS - 2) + [1, 1]
    finally:
        stop_cluster(sched, workers, gates)
