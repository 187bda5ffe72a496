"""Tiny tasks through Pool(2).apply_async and Scheduler(local_workers=2).submit:
CPU per task of each thread of the caller's process, and the rate.

python bench/bench_thread_cpu.py [--rounds 3] [--bursts 40]

Each round runs one process per system (alternated), which times ``--bursts``
bursts of 5,000 calls after 3 untimed ones and reads its threads' CPU from
``/proc/self/task``. The threads share the interpreter lock, so their sum per
task bounds the rate; the rest of the time the lock sat idle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 5_000


def thread_cpu() -> dict[int, float]:
    """Seconds of CPU per thread of this process, by thread id."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def child(kind: str, bursts: int) -> None:
    sys.path.insert(0, str(HERE))
    import _tasks
    import shmrunner

    if kind == "pool":
        h: object = shmrunner.Pool(2)
        pool = h

        def burst() -> None:
            pending = [pool.apply_async(_tasks.inc, (i,)) for i in range(N)]
            for r in pending:
                r.get(60)
    else:
        h = sched = shmrunner.Scheduler(local_workers=2)

        def burst() -> None:
            futures = [sched.submit(_tasks.inc, i) for i in range(N)]
            for f in futures:
                f.result(60)

    for _ in range(3):
        burst()
    before, t0 = thread_cpu(), time.perf_counter()
    for _ in range(bursts):
        burst()
    wall, after = time.perf_counter() - t0, thread_cpu()
    n = bursts * N
    used = {tid: (v - before.get(tid, 0.0)) * 1e6 / n for tid, v in after.items()}
    # The caller's thread is the process's main thread; the others are the pool's.
    cells = ", ".join(f"{'caller' if tid == os.getpid() else 'other'} {us:.2f}"
                      for tid, us in used.items() if us > 0.01)
    print(f"| {kind} | {n / wall:,.0f} | {sum(used.values()):.2f} | {cells} |")
    if kind == "pool":
        pool.close()
        pool.join()
    else:
        sched.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bursts", type=int, default=40)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bursts)
        return
    print("| system | tasks/s | µs of CPU per task, all threads | per thread (µs) |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        for kind in ("pool", "sched") if r % 2 == 0 else ("sched", "pool"):
            subprocess.run([sys.executable, __file__, "--child", kind,
                            "--bursts", str(args.bursts)], check=True)


if __name__ == "__main__":
    main()
