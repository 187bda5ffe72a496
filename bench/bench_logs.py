"""Task-log forwarding: what it costs on W1b tiny tasks (issue 12).

python bench/bench_logs.py [--reps 7] [--workers 2]

W1b = 5,000 single submits of inc(i), then collect all. Each repetition runs
every configuration once, in rotating order (interleaved: the machine is
noisy), each on a fresh Scheduler or Pool after a warm-up; medians, and the
ratio forwarding-on / forwarding-off (the target: < 1.05 when tasks log
nothing). "Remote" is a Scheduler(local_workers=0) on an ipc socket with one
real agent (``shmrunner worker``) of the same number of processes, task_logs
set on both ends. Wall time on a shared 2-core machine swings by 2x from one run to
the next, so each run also records the CPU time it cost: the caller process
(all its threads) plus its worker processes (utime + stime from /proc) per
task, which contention does not inflate; that ratio is the overhead figure.
The "prints" row has tasks that print one line each (what forwarding costs
when there is something to forward). The A/A row compares the two halves of
the "off" runs: the noise of this run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _tasks  # noqa: E402
import shmrunner  # noqa: E402

N = 5_000
WARM = 200


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its live descendants
    (workers, remote agents and theirs; /proc/PID/task/*/schedstat: nanoseconds,
    not 10 ms ticks)."""
    total = time.process_time()
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = [], [os.getpid()]
    while frontier:
        current = frontier.pop()
        kids = [pid for pid, ppid in parent.items() if ppid == current]
        found += kids
        frontier += kids
    for pid in found:
        try:
            for thread in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{thread}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError):
            continue
    return total


def take_cost() -> float:
    """Nanoseconds the worker adds per task when forwarding is on and the task
    logged nothing (Capture.begin() and take() on an empty capture), measured here."""
    from shmrunner._tasklogs import Capture

    capture = Capture(20)
    capture._stream("stdout", 20, sys.stdout)  # as installed, without replacing sys.stdout
    capture._stream("stderr", 30, sys.stderr)
    n = 200_000
    t0 = time.perf_counter()
    capture.sender = lambda task_id, records: None
    for i in range(n):
        capture.begin(i)
        capture.take()
    return (time.perf_counter() - t0) / n * 1e9


def printing_inc(x: int) -> int:
    print("task", x)
    return x + 1


Run = tuple[float, float]  # (wall seconds, CPU seconds of caller + workers)


def w1b_scheduler(workers: int, logs: str, fn: Callable[[int], int]) -> Run:
    with shmrunner.Scheduler(local_workers=workers, task_logs=logs) as sched:
        for f in [sched.submit(fn, i) for i in range(WARM)]:
            f.result()
        c0, t0 = cpu_seconds(), time.perf_counter()
        futures = [sched.submit(fn, i) for i in range(N)]
        results = [f.result() for f in futures]
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert results[-1] == N
    return elapsed, cpu


def w1b_remote(workers: int, logs: str, fn: Callable[[int], int]) -> Run:
    """A Scheduler(local_workers=0) on an ipc socket and one real agent
    (``shmrunner worker --processes N``), both with ``task_logs=logs``."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, \
            shmrunner.Scheduler(local_workers=0, listen=f"ipc://{tmp}/w.sock",
                                task_logs=logs) as sched:
        assert sched.address is not None
        agent = subprocess.Popen(
            [sys.executable, "-m", "shmrunner.cli", "worker", "--connect", sched.address,
             "--processes", str(workers), "--set", f"worker.task_logs={logs}"],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])},
            stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not sched.status()["workers"]:
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the agent did not join")
                time.sleep(0.02)
            for f in [sched.submit(fn, i) for i in range(WARM)]:
                f.result()
            c0, t0 = cpu_seconds(), time.perf_counter()
            futures = [sched.submit(fn, i) for i in range(N)]
            results = [f.result() for f in futures]
            elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        finally:
            agent.terminate()
            agent.wait(30)
    assert results[-1] == N
    return elapsed, cpu


def w1b_pool(workers: int, logs: str | None, fn: Callable[[int], int]) -> Run:
    with shmrunner.Pool(workers, task_logs=logs) as pool:
        for r in [pool.apply_async(fn, (i,)) for i in range(WARM)]:
            r.get()
        c0, t0 = cpu_seconds(), time.perf_counter()
        handles = [pool.apply_async(fn, (i,)) for i in range(N)]
        results = [r.get() for r in handles]
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert results[-1] == N
    return elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    import logging

    # Forwarded prints go to a handler that drops them (not to the terminal).
    logging.getLogger("shmrunner.task").addHandler(logging.NullHandler())
    logging.getLogger("shmrunner.task").propagate = False
    w = args.workers
    configs: dict[str, Callable[[], Run]] = {
        "Scheduler off": lambda: w1b_scheduler(w, "off", _tasks.inc),
        "Scheduler on (INFO, default)": lambda: w1b_scheduler(w, "INFO", _tasks.inc),
        "Pool off (default)": lambda: w1b_pool(w, None, _tasks.inc),
        "Pool on (INFO)": lambda: w1b_pool(w, "INFO", _tasks.inc),
        "Scheduler on, tasks print one line": lambda: w1b_scheduler(w, "INFO", printing_inc),
        "Remote off": lambda: w1b_remote(w, "off", _tasks.inc),
        "Remote on (INFO, default)": lambda: w1b_remote(w, "INFO", _tasks.inc),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpus: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    load0 = os.getloadavg()[0]
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            wall, cpu = configs[name]()
            times[name].append(wall)
            cpus[name].append(cpu)
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    load1 = os.getloadavg()[0]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cpu = {name: statistics.median(cs) for name, cs in cpus.items()}

    def row(name: str, base: str | None = None) -> str:
        m = med[name]
        cells = (f"| {name} | {m:.3f} s ({N / m / 1000:.1f}k tasks/s) | "
                 f"{min(times[name]):.3f}-{max(times[name]):.3f} s | "
                 f"{cpu[name] / N * 1e6:.1f} µs |")
        if base is not None:
            cells += f" {m / med[base]:.3f} | **{cpu[name] / cpu[base]:.3f}** |"
        else:
            cells += " | |"
        return cells

    off, off_cpu = times["Scheduler off"], cpus["Scheduler off"]
    half = len(off) // 2

    def aa_of(xs: list[float]) -> float:
        return statistics.median(xs[half:]) / statistics.median(xs[:half]) if half else math.nan

    aa, aa_cpu = aa_of(off), aa_of(off_cpu)
    lines = [
        f"- {args.reps} interleaved repetitions (rotating order), {w} local workers, "
        f"W1b = {N:,} single submits of inc(i) then collect all, {WARM} warm-up tasks; "
        f"medians. 1-min load average {load0:.2f} at start, {load1:.2f} at end.",
        "",
        "| configuration | W1b wall median | wall range | CPU per task (caller + workers) "
        "| wall ratio vs off | CPU ratio vs off |",
        "|---|---|---|---|---|---|",
        row("Scheduler off"),
        row("Scheduler on (INFO, default)", "Scheduler off"),
        row("Scheduler on, tasks print one line", "Scheduler off"),
        row("Pool off (default)"),
        row("Pool on (INFO)", "Pool off (default)"),
        row("Remote off"),
        row("Remote on (INFO, default)", "Remote off"),
        "",
        f"- A/A (second half of the 'Scheduler off' runs over the first half): wall "
        f"{aa:.3f}, CPU {aa_cpu:.3f} (the noise of this run).",
        f"- What the worker adds per task that logs nothing (Capture.begin() + take(), "
        f"timed in a loop): {take_cost():.0f} ns.",
        f"- Command: `python bench/bench_logs.py --reps {args.reps} --workers {w}`",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
