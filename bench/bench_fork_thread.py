"""What a fork costs from the main thread and from another thread, in a
process as large as the benchmarks' (torch and Ray imported).

python bench/bench_fork_thread.py [--forks 60] [--light]

Each child only calls ``os._exit(0)``; the parent waits for it. Per fork:
wall time (fork + reap), and from ``getrusage``: the parent's and the
children's system time and page faults. shmrunner forks its workers on the
pool's manager thread (a fork on a thread that ran OpenMP code deadlocks the
child); multiprocessing forks on the caller's, usually the main thread.
``--light`` imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _tasks  # noqa: E402


def forks(n: int) -> None:
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def measure(n: int, on_main: bool) -> str:
    def usage() -> tuple[float, int, float, int]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_stime, me.ru_minflt, kids.ru_stime, kids.ru_minflt

    before, t0 = usage(), time.perf_counter()
    if on_main:
        forks(n)
    else:
        thread = threading.Thread(target=forks, args=(n,))
        thread.start()
        thread.join()
    wall, after = time.perf_counter() - t0, usage()
    d = [(a - b) / n for a, b in zip(after, before, strict=True)]
    return (f"| {'main' if on_main else 'another'} | {wall / n * 1e3:.2f} ms | "
            f"{d[0] * 1e3:.2f} ms, {d[1]:.0f} | {d[2] * 1e3:.2f} ms, {d[3]:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forks", type=int, default=60)
    ap.add_argument("--light", action="store_true", help="do not import torch and ray")
    args = ap.parse_args()
    if not args.light:
        _tasks.import_torch_and_ray()
    forks(3)  # warm-up
    print("| forking thread | wall per fork | parent: system time, page faults "
          "| child: system time, page faults |")
    print("|---|---|---|---|")
    for on_main in (True, False, True, False):
        print(measure(args.forks, on_main))


if __name__ == "__main__":
    main()
