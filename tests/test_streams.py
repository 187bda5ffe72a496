"""Lazy, bounded streams: Scheduler.map / imap / imap_unordered read their
input as results are consumed, never more than ``buffersize`` tasks ahead."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _sched_tasks as tasks
from shmrunner import Scheduler

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
RESULT = 30.0


@pytest.fixture(scope="module")
def sched() -> Iterator[Scheduler]:
    with Scheduler(local_workers=2) as s:
        yield s


class Counted:
    """An input generator that counts how many items were read from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.read = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            self.read += 1
            yield i


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_input_is_read_at_most_buffersize_ahead(sched: Scheduler, method: str) -> None:
    source = Counted(1000)
    results = getattr(sched, method)(tasks.square, source, buffersize=5, timeout=RESULT)
    # Like Executor.map, the first tasks are submitted at the call.
    assert source.read == 5
    taken = []
    for value in results:
        taken.append(value)
        assert source.read <= len(taken) + 5
        if len(taken) == 20:
            break
    assert source.read <= 25
    if method != "imap_unordered":
        assert taken == [i * i for i in range(20)]


@pytest.mark.parametrize(("option", "value", "error"), [
    ("chunksize", 0, ValueError), ("chunksize", 1.5, TypeError), ("chunksize", True, TypeError),
    ("buffersize", 0, ValueError), ("buffersize", -1, ValueError),
    ("buffersize", 2.0, TypeError)])
def test_bad_chunk_and_buffer_sizes_are_one_clear_error(sched: Scheduler, daemons: Any,
                                                       option: str, value: Any,
                                                       error: type[Exception]) -> None:
    """Scheduler and Client alike; a buffersize of 0 was once taken as the default."""
    client = daemons().start().client()
    for executor in (sched, client):
        with pytest.raises(error, match=f"{option} must be"):
            list(executor.map(tasks.square, range(3), **{option: value}))


def test_map_results_in_order_over_several_iterables_and_chunks(sched: Scheduler) -> None:
    assert list(sched.map(tasks.add, range(100), range(100), chunksize=7,
                          timeout=RESULT)) == [2 * i for i in range(100)]


def test_imap_unordered_yields_what_finishes_first(sched: Scheduler, tmp_path: Path) -> None:
    held, opened = tmp_path / "held", tmp_path / "opened"
    opened.touch()
    results = sched.imap_unordered(tasks.gated, [str(tmp_path / "s1"), str(tmp_path / "s2")],
                                   [str(held), str(opened)], ["held", "quick"], timeout=RESULT)
    # The second task's result comes first, while the first one still waits.
    assert next(results) == "quick"
    tasks.report(str(held))
    assert next(results) == "held"


def test_the_stream_timeout_counts_from_the_call(sched: Scheduler) -> None:
    results = sched.imap_unordered(tasks.sleep_for, [3.0], timeout=0.5)
    with pytest.raises(TimeoutError):
        next(results)
    results.close()  # cancels nothing running: the task goes on; shut down below


def test_breaking_out_cancels_the_tasks_not_started(tmp_path: Path) -> None:
    ran, gate = tmp_path / "ran", tmp_path / "gate"
    with Scheduler(local_workers=1) as sched:
        results = sched.imap(tasks.mark_run_then_hold, [str(ran)] * 50, [str(gate)] * 50,
                             range(50), buffersize=20, timeout=RESULT)
        assert next(results) == 0
        # The second task holds the only worker, so the queue cannot drain first.
        results.close()
        tasks.report(str(gate))
    # Submitted: 21 at most; the queued ones were cancelled.
    assert len(ran.read_text().splitlines()) < 21


def test_progress_callback_sees_every_result(sched: Scheduler) -> None:
    seen: list[tuple[int, int | None]] = []
    list(sched.map(tasks.square, range(10), progress=lambda d, t: seen.append((d, t))))
    assert seen == [(i, 10) for i in range(1, 11)]
    seen.clear()
    list(sched.imap_unordered(tasks.square, (i for i in range(6)), chunksize=4,
                              progress=lambda d, t: seen.append((d, t))))
    assert sorted(seen) == [(4, None), (6, None)] or sorted(seen) == [(2, None), (6, None)]


def test_progress_true_draws_a_tqdm_bar(sched: Scheduler,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")  # installed by the dev extra; optional for users
    assert list(sched.map(tasks.square, range(30), progress=True)) == [
        i * i for i in range(30)]
    assert "30/30" in capsys.readouterr().err


_STREAM = textwrap.dedent("""
    import functools
    import os
    import subprocess
    import sys
    import time
    import numpy as np
    import shmrunner
    from _stream_tasks import slow_checksum

    MIB = 1 << 20
    PAUSE = 0.2  # seconds each task sleeps: far slower than np.full makes an array

    def arrays(n, mib):
        for i in range(n):
            yield np.full(mib * MIB // 8, i, dtype=np.float64)

    def peak_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024

    def results(kind, n, mib, budget):
        if kind == "pool":
            with shmrunner.Pool(2) as pool:
                yield peak_mib()
                yield from pool.imap(functools.partial(slow_checksum, seconds=PAUSE),
                                     arrays(n, mib), buffersize=budget // mib)
            return
        if kind.startswith("tcp://"):  # a daemon's client address
            with shmrunner.connect(kind, max_pending_bytes=budget * MIB) as client:
                yield peak_mib()
                yield from client.map("_stream_tasks:slow_checksum", arrays(n, mib),
                                      [PAUSE] * n)
            return
        listen = "tcp://127.0.0.1:*" if kind == "remote" else None
        with shmrunner.Scheduler(local_workers=2 if kind == "local" else 0, listen=listen,
                                 max_pending_bytes=budget * MIB) as sched:
            agent = None
            if kind == "remote":
                agent = subprocess.Popen([sys.executable, "-m", "shmrunner.cli", "worker",
                                          "--connect", sched.address, "--processes", "2"])
                deadline = time.monotonic() + 60
                while not sched.status()["workers"]:
                    assert time.monotonic() < deadline, "the agent never joined"
                    time.sleep(0.05)
            try:
                yield peak_mib()
                # The default buffersize (64 tasks: all 60 here): the byte budget bounds it.
                yield from sched.map(slow_checksum, arrays(n, mib), [PAUSE] * n)
            finally:
                if agent is not None:
                    agent.terminate()
                    agent.wait(30)

    if __name__ == "__main__":
        kind = sys.argv[1]
        n, mib, budget = (int(a) for a in sys.argv[2:5])
        stream = results(kind, n, mib, budget)
        base = next(stream)
        total = sum(stream)
        assert total == mib * MIB // 8 * n * (n - 1) / 2, total
        print(base, peak_mib())
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["pool", "local", "remote"])
def test_a_stream_of_large_arrays_keeps_the_callers_memory_bounded(
        tmp_path: Path, kind: str) -> None:
    script = tmp_path / "stream.py"
    script.write_text(_STREAM)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, REPO, env.get("PYTHONPATH", "")])
    n, mib, budget = 60, 64, 256  # 3.75 GiB from a generator (15x the budget), a 256 MiB budget
    proc = subprocess.run([sys.executable, str(script), kind, str(n), str(mib), str(budget)],
                          capture_output=True, text=True, timeout=280, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    base, peak = (int(x) for x in proc.stdout.split())
    # Held at once: the arrays within the budget (each also copied once, into
    # shared memory or a socket buffer, while in flight) and the one being
    # generated: a small multiple of the budget, never the 60 of an eager map.
    assert peak - base < 3 * budget, (base, peak)


@pytest.mark.timeout(300)
def test_a_stream_of_large_arrays_through_the_daemon_keeps_the_client_bounded(
        tmp_path: Path) -> None:
    from _daemon_tasks import Daemon

    daemon = Daemon(tmp_path, scheduler={"local_workers": 2}).start()
    try:
        script = tmp_path / "stream.py"
        script.write_text(_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, REPO, env.get("PYTHONPATH", "")])
        # 960 MiB (15x the budget): every job is journaled (fsynced) before it
        # is accepted, so this run is disk-bound; 16 MiB arrays keep it short.
        n, mib, budget = 60, 16, 64
        proc = subprocess.run(
            [sys.executable, str(script), daemon.address, str(n), str(mib), str(budget)],
            capture_output=True, text=True, timeout=280, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        base, peak = (int(x) for x in proc.stdout.split())
        assert peak - base < 3 * budget, (base, peak)
    finally:
        assert not daemon.close()


def test_pool_maps_report_progress_too() -> None:
    import shmrunner

    with shmrunner.Pool(2) as pool:
        seen: list[tuple[int, int | None]] = []
        assert pool.map(tasks.square, range(40), chunksize=7,
                        progress=lambda d, t: seen.append((d, t))) == [i * i for i in range(40)]
        # One report per chunk as it comes in, ending at the whole.
        assert seen[-1] == (40, 40) and len(seen) == 6
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        seen.clear()
        assert pool.starmap(tasks.add, [(i, i) for i in range(5)],
                            progress=lambda d, t: seen.append((d, t))) == [0, 2, 4, 6, 8]
        assert seen[-1] == (5, 5)
        seen.clear()
        out = list(pool.imap_unordered(tasks.square, range(10), progress=lambda d, t: seen.append(
            (d, t))))
        assert sorted(out) == [i * i for i in range(10)]
        assert seen == [(i, 10) for i in range(1, 11)]
        seen.clear()
        with pytest.raises(ValueError, match="boom"):
            pool.map(tasks.raise_value_error, ["boom"] * 3,
                     progress=lambda d, t: seen.append((d, t)))
