"""Lifecycle accounting with a fake spawn function: no processes, no sockets."""

from __future__ import annotations

import dataclasses

import pytest

from shmrunner.worker.lifecycle import Lifecycle, Loss, Worker


@dataclasses.dataclass(frozen=True)
class Task:
    id: int


class FakeSpawner:
    """Records every spawn; endpoints are plain strings naming the worker id."""

    def __init__(self) -> None:
        self.spawned: list[int] = []

    def __call__(self, worker_id: int) -> str:
        self.spawned.append(worker_id)
        return f"endpoint-{worker_id}"


def make(size: int = 2, capacity: int = 1, max_tasks: int | None = None,
         ) -> tuple[Lifecycle[Task], FakeSpawner]:
    spawn = FakeSpawner()
    life: Lifecycle[Task] = Lifecycle(spawn, size=size, capacity=capacity, max_tasks=max_tasks)
    return life, spawn


def tasks(*ids: int) -> list[Task]:
    return [Task(i) for i in ids]


# --- populate ------------------------------------------------------------------------


def test_populate_spawns_up_to_size_once() -> None:
    life, spawn = make(size=3, capacity=2, max_tasks=5)
    assert len(life) == 0 and life.pick() is None
    new = life.populate()
    assert [w.id for w in new] == [0, 1, 2] == spawn.spawned
    assert [w.endpoint for w in new] == ["endpoint-0", "endpoint-1", "endpoint-2"]
    assert all((w.capacity, w.max_tasks, w.sent, list(w.tasks)) == (2, 5, 0, []) for w in new)
    assert len(life) == 3
    assert list(life) == new
    assert life.populate() == []  # already full: nothing spawned
    assert spawn.spawned == [0, 1, 2]


def test_populate_refills_to_size_with_fresh_ids() -> None:
    life, spawn = make(size=3)
    w0, w1, w2 = life.populate()
    life.lose(w1)
    assert len(life) == 2
    (new,) = life.populate()
    assert new.id == 3  # ids are never reused: a late message from worker 1 cannot match
    assert spawn.spawned == [0, 1, 2, 3]
    assert {w.id for w in life} == {0, 2, 3}
    life.lose(w0)
    life.lose(w2)
    assert [w.id for w in life.populate()] == [4, 5]
    assert len(life) == 3


def test_populate_follows_a_changed_size() -> None:
    life, spawn = make(size=1)
    life.populate()
    life.size = 3
    assert [w.id for w in life.populate()] == [1, 2]
    assert spawn.spawned == [0, 1, 2]


def test_iteration_is_a_snapshot() -> None:
    life, _ = make(size=3)
    life.populate()
    for worker in life:
        life.lose(worker)  # must not break the loop
    assert len(life) == 0


# --- pick --------------------------------------------------------------------------


def test_pick_prefers_an_idle_worker() -> None:
    life, _ = make(size=3, capacity=2)
    w0, w1, w2 = life.populate()
    life.assign(w0, Task(1))
    life.assign(w1, Task(2))
    assert life.pick() is w2
    life.assign(w2, Task(3))
    # Nobody idle: any worker with room will do (all have one slot left).
    assert life.pick() in (w0, w1, w2)
    life.finish(w1, 2)
    assert life.pick() is w1  # idle again, so preferred over half-full ones


def test_pick_prefers_an_idle_worker_over_one_with_more_room() -> None:
    life, _ = make(size=2, capacity=4)
    w0, w1 = life.populate()
    w1.capacity = 1  # an idle worker with little room still beats a busy one
    life.assign(w0, Task(1))
    assert w0.free == 3 and w1.free == 1
    assert life.pick() is w1


def test_pick_prefers_the_most_room_when_none_is_idle() -> None:
    life, _ = make(size=3, capacity=4)
    w0, w1, w2 = life.populate()
    for i, (worker, n) in enumerate([(w0, 3), (w1, 1), (w2, 2)]):
        for j in range(n):
            life.assign(worker, Task(10 * i + j))
    assert [w.free for w in (w0, w1, w2)] == [1, 3, 2]
    assert life.pick() is w1


def test_pick_respects_capacity() -> None:
    life, _ = make(size=2, capacity=2)
    w0, w1 = life.populate()
    for i in range(4):
        worker = life.pick()
        assert worker is not None
        life.assign(worker, Task(i))
    assert len(w0.tasks) == len(w1.tasks) == 2
    assert w0.free == w1.free == 0
    assert life.pick() is None
    assert life.busy() == 4
    assert life.finish(w0, 0) == Task(0)
    assert life.pick() is w0
    assert life.busy() == 3


def test_pick_respects_max_tasks() -> None:
    life, _ = make(size=1, capacity=2, max_tasks=3)
    (w,) = life.populate()
    life.assign(w, Task(1))
    life.assign(w, Task(2))
    assert w.free == 0
    life.finish(w, 1)
    assert w.free == 1  # room for one more: min(capacity left 1, max_tasks left 1)
    life.assign(w, Task(3))
    life.finish(w, 2)
    life.finish(w, 3)
    assert not w.tasks and w.sent == 3
    # Idle, but it will retire after three tasks: never given a fourth.
    assert w.free == 0
    assert life.pick() is None


def test_max_tasks_caps_free_below_capacity() -> None:
    life, _ = make(size=1, capacity=5, max_tasks=2)
    (w,) = life.populate()
    assert w.free == 2
    life.assign(w, Task(1))
    assert w.free == 1


def test_retiring_worker_is_never_picked() -> None:
    life, _ = make(size=2, capacity=2)
    w0, w1 = life.populate()
    w0.retiring = True
    assert w0.free == 0
    assert life.pick() is w1
    life.assign(w1, Task(1))
    life.assign(w1, Task(2))
    assert life.pick() is None


def test_free_is_never_negative() -> None:
    life, _ = make(size=1, capacity=1)
    (w,) = life.populate()
    for i in range(3):  # a tier may over-assign (e.g. requeue onto a worker)
        life.assign(w, Task(i))
    assert w.free == 0
    assert life.pick() is None


# --- finish --------------------------------------------------------------------------


def test_finish_returns_the_task_in_or_out_of_order() -> None:
    life, _ = make(size=1, capacity=3)
    (w,) = life.populate()
    for t in tasks(1, 2, 3):
        life.assign(w, t)
    assert life.finish(w, 2) == Task(2)
    assert list(w.tasks) == tasks(1, 3)
    assert life.finish(w, 1) == Task(1)
    assert life.finish(w, 1) is None  # already finished
    assert life.finish(w, 99) is None  # never assigned
    assert list(w.tasks) == tasks(3)
    assert w.sent == 3


# --- lose --------------------------------------------------------------------------


def test_lose_returns_first_outstanding_task_as_running_and_the_rest_unstarted() -> None:
    life, _ = make(size=2, capacity=3)
    w0, w1 = life.populate()
    for t in tasks(1, 2, 3):
        life.assign(w0, t)
    life.assign(w1, Task(4))
    loss = life.lose(w0)
    assert isinstance(loss, Loss)
    assert loss.worker is w0
    assert loss.running == Task(1)
    assert loss.unstarted == tasks(2, 3)
    assert w0.id not in life.workers and len(life) == 1
    assert not w0.tasks
    assert list(w1.tasks) == tasks(4)  # the other worker is untouched
    assert life.busy() == 1


def test_lose_after_the_first_task_finished() -> None:
    life, _ = make(size=1, capacity=3)
    (w,) = life.populate()
    for t in tasks(1, 2, 3):
        life.assign(w, t)
    life.finish(w, 1)
    loss = life.lose(w)
    assert (loss.running, loss.unstarted) == (Task(2), tasks(3))


def test_lose_an_idle_worker_loses_nothing() -> None:
    life, _ = make(size=1)
    (w,) = life.populate()
    loss = life.lose(w)
    assert (loss.worker, loss.running, loss.unstarted) == (w, None, [])
    assert len(life) == 0


@pytest.mark.parametrize("max_tasks", [None, 2])
def test_retiring_worker_with_no_tasks_loses_nothing(max_tasks: int | None) -> None:
    life, _ = make(size=2, capacity=2, max_tasks=max_tasks)
    w0, w1 = life.populate()
    life.assign(w0, Task(1))
    life.finish(w0, 1)
    w0.retiring = True
    loss = life.lose(w0)
    assert (loss.worker, loss.running, loss.unstarted) == (w0, None, [])
    assert len(life) == 1
    assert [w.id for w in life.populate()] == [2]


def test_retiring_worker_that_still_held_tasks_loses_them() -> None:
    life, _ = make(size=1, capacity=2)
    (w,) = life.populate()
    life.assign(w, Task(1))
    life.assign(w, Task(2))
    w.retiring = True
    loss = life.lose(w)
    assert (loss.running, loss.unstarted) == (Task(1), tasks(2))


def test_lose_twice_is_harmless() -> None:
    life, _ = make(size=2)
    w0, w1 = life.populate()
    life.assign(w0, Task(1))
    assert life.lose(w0).running == Task(1)
    again = life.lose(w0)
    assert (again.running, again.unstarted) == (None, [])
    assert list(life) == [w1]


def test_full_cycle_accounts_for_every_task() -> None:
    # Every task assigned ends up exactly once in: finished, running-when-lost,
    # or unstarted-when-lost.
    life, _ = make(size=3, capacity=2, max_tasks=4)
    life.populate()
    finished: list[Task] = []
    lost_running: list[Task] = []
    requeue = tasks(*range(40))
    assigned = 0
    step = 0
    while requeue and step < 1000:
        step += 1
        worker = life.pick()
        if worker is not None:
            life.assign(worker, requeue.pop(0))
            assigned += 1
            continue
        # Everyone is full: two times in three a task finishes, else a worker dies.
        victim: Worker[Task] = next(iter(life))
        if step % 3:
            finished.append(life.finish(victim, victim.tasks[0].id))
            if victim.free == 0 and not victim.tasks:
                victim.retiring = True
                assert life.lose(victim).running is None
        else:
            loss = life.lose(victim)
            if loss.running is not None:
                lost_running.append(loss.running)
            requeue[:0] = loss.unstarted
        life.populate()
    for worker in life:
        while worker.tasks:
            finished.append(life.finish(worker, worker.tasks[0].id))
    assert not requeue
    assert sorted(t.id for t in finished + lost_running) == list(range(40))


# --- pacing: one rule for every tier ----------------------------------------------------


def test_pace_gives_a_fast_worker_its_fast_capacity_and_a_slow_one_its_base() -> None:
    life: Lifecycle[Task] = Lifecycle(FakeSpawner(), size=1, capacity=2, fast_capacity=16,
                                      fast_task=0.001)
    (w,) = life.populate()
    assert (w.capacity, w.base_capacity, w.fast_capacity) == (2, 2, 16)
    life.pace(w, 1, now=10.0)  # the first results: long after "time 0"
    assert w.capacity == 2
    life.pace(w, 1, now=10.0005)  # 0.5 ms for one task: fast
    assert w.capacity == 16
    life.pace(w, 10, now=10.0125)  # 1.2 ms each for ten tasks: slow
    assert w.capacity == 2
    life.pace(w, 10, now=10.0175)  # 0.5 ms each
    assert w.capacity == 16
    life.pace(w, 0, now=99.0)  # no results: nothing learnt
    assert w.capacity == 16


def test_pace_is_the_same_rule_for_a_remote_worker() -> None:
    # A remote worker's base and fast capacity are its own (advertised + prefetch).
    life: Lifecycle[Task] = Lifecycle(None, 0, fast_task=0.002)
    w = life.add("peer", capacity=5, fast_capacity=36)
    life.pace(w, 1, now=1.0)
    assert w.capacity == 5
    life.pace(w, 4, now=1.006)  # 1.5 ms per task
    assert w.capacity == 36 and w.free == 36
    life.pace(w, 1, now=2.0)
    assert w.capacity == 5


def test_a_worker_without_a_fast_capacity_is_never_paced() -> None:
    life, _ = make(size=1, capacity=2)
    (w,) = life.populate()
    life.pace(w, 1, now=1.0)
    life.pace(w, 100, now=1.0)
    assert w.capacity == 2


def test_retire_stops_new_work_and_losing_it_loses_nothing() -> None:
    life, _ = make(size=1, capacity=2)
    (w,) = life.populate()
    life.retire(w)
    assert w.free == 0 and life.pick() is None
    assert life.lose(w).running is None


# --- the head-of-line rule (prefetch_window) -----------------------------------------


@dataclasses.dataclass(frozen=True)
class KindTask:
    id: int
    fn: object


def _quick() -> None: ...


def _never_run_here() -> None: ...


def test_a_task_is_queued_behind_the_head_only_while_its_function_is_known_quick() -> None:
    """Each time the head changes (a task assigned to an idle worker, the head
    finishing) the rule looks at the new head's function: nothing goes behind
    one that has never run on this worker, even right after a quick one."""
    life: Lifecycle[KindTask] = Lifecycle(FakeSpawner(), size=1, capacity=4,
                                          prefetch_window=10.0)
    (worker,) = life.populate()
    assert worker.free == 1  # idle, nothing known yet: one task, not a burst
    life.assign(worker, KindTask(1, _quick))
    assert worker.free == 0  # _quick has never run here: nothing queued behind it
    life.finish(worker, 1)
    life.assign(worker, KindTask(2, _quick))
    assert worker.free == 3  # _quick is known quick now: the rest may queue behind it
    life.assign(worker, KindTask(3, _never_run_here))
    life.finish(worker, 2)
    assert worker.free == 0  # the head is now _never_run_here: nothing more behind it
    life.finish(worker, 3)
    life.assign(worker, KindTask(4, _quick))
    assert worker.free == 3
