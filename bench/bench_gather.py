"""Gather without a copy: ``pool.map(f, xs, out=shmrunner.empty((n, k)))``
against ``np.stack(pool.map(f, xs))`` (and multiprocessing's), interleaved.

python bench/bench_gather.py [--reps 5]

Each worker builds a 64 MiB float64 row (``np.full``); the timed region
includes allocating the (16, 8M) result, as ``np.stack`` does, except for
"out=reused", which fills one array allocated once (the pattern for a loop).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks  # noqa: E402

ROWS = 16


def check(res: np.ndarray) -> None:
    assert res.shape == (ROWS, _tasks.N)
    assert all(float(res[k, 0] + res[k, -1]) == 2 * k for k in range(ROWS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import shmrunner

    pools = {"mp": multiprocessing.Pool(2), "shm": shmrunner.Pool(2)}
    runs: dict[str, Callable[[], np.ndarray]] = {
        "multiprocessing np.stack(map)": lambda: np.stack(pools["mp"].map(_tasks.make_array,
                                                                          range(ROWS))),
        "shmrunner np.stack(map)": lambda: np.stack(pools["shm"].map(_tasks.make_array,
                                                                     range(ROWS))),
        "shmrunner map(out=empty)": lambda: pools["shm"].map(
            _tasks.make_array, range(ROWS), out=shmrunner.empty((ROWS, _tasks.N))),
        "shmrunner map(out=reused)": lambda: pools["shm"].map(
            _tasks.make_array, range(ROWS), out=reused),
    }
    reused = shmrunner.empty((ROWS, _tasks.N))  # allocated once, outside the clock
    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for rep in range(args.reps + 1):
            names = list(runs)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                gc.collect()
                t0 = time.perf_counter()
                res = runs[name]()
                dt = time.perf_counter() - t0
                check(res)
                if res is not reused:
                    del res
                print(f"  rep {rep} {name}: {dt:.3f}", file=sys.stderr)
                if rep:
                    times[name].append(dt)
    finally:
        pools["mp"].terminate()
        pools["shm"].terminate()
    base = statistics.median(times["shmrunner np.stack(map)"])
    print(f"| gather of 16 x 64 MiB rows, 2 workers, median of {args.reps} | seconds | "
          "vs shmrunner np.stack |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} s | ×{med / base:.2f} |")


if __name__ == "__main__":
    main()
