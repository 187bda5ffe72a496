"""Mapping a 64 MiB memfd: MAP_POPULATE against lazy faults, then sum it, add
1 to it, or read 2 elements, and unmap; interleaved rounds, medians of wall
and CPU time (CPU time moves less with the machine's load).

python bench/bench_map_populate.py [--rounds 30]

What a worker pays per array argument (W2, W2s, W4) besides the task itself.
shmem here has 4 KiB pages (transparent_hugepage/shmem_enabled is "never"):
a read fault maps 16 of them at once (fault-around).
"""

from __future__ import annotations

import argparse
import collections
import mmap
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

N = 8_388_608  # float64 elements in 64 MiB
USES: dict[str, Callable[[np.ndarray[Any, Any]], object]] = {
    "sum": lambda a: a.sum(),
    "a += 1": lambda a: np.add(a, 1, out=a),
    "read 2": lambda a: a[0] + a[-1],
}


def once(fd: int, populate: bool, use: Callable[[np.ndarray[Any, Any]], object],
         ) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.thread_time()
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    m = mmap.mmap(fd, N * 8, flags=flags)
    a = np.frombuffer(m, dtype=np.float64)
    use(a)
    del a
    m.close()
    return time.perf_counter() - w0, time.thread_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, N * 8)
    os.pwrite(fd, np.full(N, 3.0).tobytes(), 0)
    kinds = [(use, populate) for use in USES for populate in (True, False)]
    rows: dict[tuple[str, bool], list[tuple[float, float]]] = collections.defaultdict(list)
    load0 = os.getloadavg()[0]
    for rnd in range(args.rounds + 1):
        shift = rnd % len(kinds)
        for use, populate in kinds[shift:] + kinds[:shift]:
            took = once(fd, populate, USES[use])
            if rnd:
                rows[(use, populate)].append(took)
    os.close(fd)
    print(f"{args.rounds} rounds, 1-min load {load0:.2f} -> {os.getloadavg()[0]:.2f}; "
          "medians per 64 MiB, map + use + unmap")
    print("| use | MAP_POPULATE wall / CPU | lazy wall / CPU |")
    print("|---|---|---|")
    for use in USES:
        cells = []
        for populate in (True, False):
            wall, cpu = (statistics.median(col) * 1e3 for col in zip(*rows[(use, populate)],
                                                                     strict=True))
            cells.append(f"{wall:.2f} / {cpu:.2f} ms")
        print(f"| {use} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
