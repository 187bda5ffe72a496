"""W6 by phase: pool start, one tiny task, close, join; multiprocessing.Pool
and shmrunner.Pool interleaved in one process, medians.

python bench/bench_pool_start.py [--rounds 20] [--light]

By default the process imports torch and ray first, as bench_local.py does:
a fork copies the page tables of a large process, so forks dominate W6
there (~10 ms each here). ``--light`` imports neither. Each phase is timed
on the caller's thread; ``fork`` is the median of ``os.fork()`` itself
(in whichever thread forks), per pool kind.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _tasks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--light", action="store_true", help="do not import torch and ray")
    args = ap.parse_args()
    if not args.light:
        _tasks.import_torch_and_ray()
    import shmrunner

    forks: dict[str, list[float]] = collections.defaultdict(list)
    current = [""]
    real_fork = os.fork

    def timed_fork() -> int:
        t0 = time.perf_counter()
        pid = real_fork()
        if pid:
            forks[current[0]].append(time.perf_counter() - t0)
        return pid

    os.fork = timed_fork
    pools: dict[str, Any] = {"mp": multiprocessing.Pool, "shmrunner": shmrunner.Pool}
    phases: dict[str, list[list[float]]] = collections.defaultdict(list)
    load0 = os.getloadavg()[0]
    for rnd in range(args.rounds + 1):  # round 0 warms up, not counted
        order = list(pools) if rnd % 2 else list(pools)[::-1]
        for key in order:
            current[0] = key if rnd else "warm-up"
            t0 = time.perf_counter()
            pool = pools[key](2)
            t1 = time.perf_counter()
            pool.apply_async(_tasks.inc, (0,)).get(60)
            t2 = time.perf_counter()
            pool.close()
            t3 = time.perf_counter()
            pool.join()
            t4 = time.perf_counter()
            if rnd:
                phases[key].append([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0])
    os.fork = real_fork
    print(f"{args.rounds} rounds, {'light' if args.light else 'torch and ray imported'}, "
          f"1-min load {load0:.2f} -> {os.getloadavg()[0]:.2f}; medians in ms")
    print("| pool | start | apply | close | join | total | one fork |")
    print("|---|---|---|---|---|---|---|")
    for key, rows in phases.items():
        med = [statistics.median(col) * 1e3 for col in zip(*rows, strict=True)]
        fork = statistics.median(forks[key]) * 1e3
        print(f"| {key} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {fork:.2f} |")


if __name__ == "__main__":
    main()
