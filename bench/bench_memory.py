"""Memory stays bounded: a long imap over arrays, peak RSS of the parent and
the workers and peak shared memory in use, sampled every 10 ms.

python bench/bench_memory.py [--arrays 300] [--mib 8] [--label after]

Run it once per code version (e.g. PYTHONPATH=<old checkout> for "before")
and compare the printed lines; bench/RESULTS.md records both.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks  # noqa: E402


def kib(pid: int | str, field: str) -> int:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def memfd_kib(pids: list[int | str]) -> int:
    """Pages allocated to the shmrunner memfds these processes hold (each counted once)."""
    seen: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith("/memfd:shmrunner"):
                    st = os.stat(path)
                    seen[st.st_ino] = st.st_blocks * 512
            except OSError:
                continue
    return sum(seen.values()) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrays", type=int, default=300)
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    import shmrunner

    n = args.mib * (1 << 20) // 8
    base = np.arange(n, dtype=np.float64)

    def inputs() -> Iterator[np.ndarray]:
        for k in range(args.arrays):
            yield base + k  # a fresh private array each time

    peaks = {"parent": 0, "workers": 0, "shmem": 0}
    stop = threading.Event()
    with shmrunner.Pool(2) as pool:
        pids = [p.pid for p in pool._pool]

        def sample() -> None:
            while not stop.is_set():
                peaks["parent"] = max(peaks["parent"], kib("self", "VmRSS"))
                peaks["workers"] = max(peaks["workers"], sum(kib(p, "VmRSS") for p in pids))
                peaks["shmem"] = max(peaks["shmem"], memfd_kib(["self", *pids]))
                time.sleep(0.01)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        total = sum(pool.imap(_tasks.array_sum, inputs()))
        dt = time.perf_counter() - t0
        stop.set()
        t.join()
        hwm = sum(kib(p, "VmHWM") for p in pids)
    expected = args.arrays * float(base.sum()) + n * args.arrays * (args.arrays - 1) / 2
    assert total == expected, (total, expected)
    cache = getattr(shmrunner, "shm_cache_info", lambda: {})()
    print(f"{args.label or os.environ.get('PYTHONPATH', '')}: imap over {args.arrays} x "
          f"{args.mib} MiB in {dt:.2f} s; peak RSS parent {peaks['parent'] / 1024:.0f} MiB "
          f"(ru_maxrss {kib('self', 'VmHWM') / 1024:.0f}), workers {peaks['workers'] / 1024:.0f} "
          f"MiB (sum of VmHWM {hwm / 1024:.0f}); peak shared memory held "
          f"(memfds of the parent and workers) "
          f"{peaks['shmem'] / 1024:.0f} MiB; cache after: "
          f"{cache.get('free_bytes', 0) / (1 << 20):.0f} MiB in {cache.get('free_segments', 0)} "
          f"segments, limit {cache.get('limit', 0) / (1 << 20):.0f} MiB")


if __name__ == "__main__":
    main()
