"""The cost of fresh pages: copying 64 MiB into a new memfd (pages allocated
and zeroed by the kernel on the way) against into a reused one (pages exist).

This is the gap between a same-host client's arrays (a fresh memfd each) and
the local tier's (recycled segments): bench/RESULTS.md, "Where issues 9 and 10
stand (evening)".

python bench/bench_fresh_pages.py [--reps 15] [--mib 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    data = memoryview(np.ones(args.mib * 1024 * 1024 // 8)).cast("B")
    reused = os.memfd_create("bench-reused")
    os.pwrite(reused, data, 0)

    def into_fresh() -> float:
        fd = os.memfd_create("bench-fresh")
        try:
            t0 = time.perf_counter()
            os.pwrite(fd, data, 0)
            return time.perf_counter() - t0
        finally:
            os.close(fd)

    def into_reused() -> float:
        t0 = time.perf_counter()
        os.pwrite(reused, data, 0)
        return time.perf_counter() - t0

    into_fresh(), into_reused()  # warm-up
    fresh, again = [], []
    for _ in range(args.reps):  # interleaved
        fresh.append(into_fresh())
        again.append(into_reused())
    os.close(reused)
    load = os.getloadavg()[0]
    print(f"pwrite of {args.mib} MiB, medians of {args.reps} (1-min load {load:.2f}): "
          f"fresh memfd {statistics.median(fresh) * 1e3:.1f} ms, "
          f"reused memfd {statistics.median(again) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
