"""W2 (16 x 64 MiB in, a.sum()) through the Scheduler's local tier against
shmrunner.Pool, interleaved, 2 workers, medians of 3.

python bench/bench_sched_local.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks  # noqa: E402


def main() -> None:
    import shmrunner

    arrs = [np.full(_tasks.N, k, dtype=np.float64) for k in range(16)]
    expected = [float(k * _tasks.N) for k in range(16)]
    out: dict[str, list[float]] = {"pool": [], "sched": []}
    for rep in range(4):
        for kind in ("pool", "sched") if rep % 2 else ("sched", "pool"):
            if kind == "pool":
                with shmrunner.Pool(2) as p:
                    p.apply(_tasks.inc, (1,))
                    t0 = time.perf_counter()
                    r = p.map(_tasks.array_sum, arrs)
                    dt = time.perf_counter() - t0
            else:
                with shmrunner.Scheduler(local_workers=2) as s:
                    s.submit(_tasks.inc, 1).result()
                    t0 = time.perf_counter()
                    r = list(s.map(_tasks.array_sum, arrs))
                    dt = time.perf_counter() - t0
            assert r == expected
            if rep:
                out[kind].append(dt)
    pool, sched = statistics.median(out["pool"]), statistics.median(out["sched"])
    print(f"W2 Pool {pool:.3f} s, Scheduler local tier {sched:.3f} s, ratio {sched / pool:.2f}")


if __name__ == "__main__":
    main()
