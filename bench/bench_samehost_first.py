"""A same-host client's very first W2 burst in a fresh process (issue 9 item 2).

bench_samehost.py times repetitions after a warm-up, in a process whose
segment cache the Scheduler (or the warm-up) filled; this times the worst
case for recycled memfds: a new process, a daemon(local_workers=2) and a
client(durable=False) started, one 1 MiB submit, then 16 x 64 MiB
``array_sum`` submitted at once and timed once. Prints GB/s and the cache's
counters (hits: deposits that reused a memfd the daemon had released).

Alternate it with another tree by hand, e.g. three times each:
PYTHONPATH=TREE bench/.venv/bin/python bench/bench_samehost_first.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_samehost as B  # noqa: E402
import numpy as np  # noqa: E402

import _tasks  # noqa: E402
import shmrunner  # noqa: E402


def main() -> None:
    arrays = [np.full(_tasks.N, float(k)) for k in range(B.N_ARRAYS)]
    root = Path(tempfile.mkdtemp(prefix="bench-first-"))
    d = B.Daemon(root, durable=False)
    try:
        t0 = time.perf_counter()
        out = d.w2(arrays)
        dt = time.perf_counter() - t0
        assert out == [float(k * _tasks.N) for k in range(len(arrays))]
        info = shmrunner.shm_cache_info()
        print(f"{B.W2_BYTES / dt / 1e9:.2f} GB/s; cache hits {info['hits']}, "
              f"misses {info['misses']}, recycled {info['recycled']}")
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
