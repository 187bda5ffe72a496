"""Pool callbacks, multiprocessing.Pool against shmrunner.Pool (2 workers).

python bench/bench_callbacks.py [--rounds 5] [--out FILE]

* ``tiny``: 5,000 ``apply_async(inc, (i,), callback=collect)``, then wait for
  the last: tasks per second when every result has a (cheap) callback.
* ``slow``: a 10 ms task whose callback takes 0.4 s (a file written, a plot
  redrawn), then 16 tasks of 50 ms: the wall time until all are done. On a
  thread of their own (multiprocessing's result handler) callbacks overlap
  the tasks: 16 x 50 ms / 2 workers, ~0.41 s. On the thread that reads the
  results and refills the workers, the workers idle while it runs: ~0.8 s.

Each round starts a fresh process per system, in alternated order; medians
and the ratio to multiprocessing are printed (and appended to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = 5_000
SLOW_TASKS, TASK_SECONDS, CALLBACK_SECONDS = 16, 0.05, 0.4


def child(system: str) -> None:
    sys.path.insert(0, str(HERE))
    import _tasks

    if system == "mp":
        import multiprocessing
        pool = multiprocessing.get_context("fork").Pool(2)
    else:
        import shmrunner
        pool = shmrunner.Pool(2)
    with pool:
        collected: list[int] = []
        for _ in range(2):  # warm-up
            pool.apply_async(_tasks.inc, (0,), callback=collected.append).get(60)
        start = time.perf_counter()
        pending = [pool.apply_async(_tasks.inc, (i,), callback=collected.append)
                   for i in range(TINY)]
        pending[-1].get(60)
        for r in pending:
            r.get(60)
        tiny = TINY / (time.perf_counter() - start)

        def slow_callback(_: object) -> None:
            time.sleep(CALLBACK_SECONDS)  # the callback's own work, not synchronisation

        start = time.perf_counter()
        pending = [pool.apply_async(time.sleep, (0.01,), callback=slow_callback)]
        pending += [pool.apply_async(time.sleep, (TASK_SECONDS,)) for _ in range(SLOW_TASKS)]
        for r in pending[1:]:
            r.get(60)
        slow = time.perf_counter() - start
    print(json.dumps({"tiny": tiny, "slow": slow}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    systems = ["mp", "shmrunner"]
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    for round_ in range(args.rounds):
        for system in systems if round_ % 2 == 0 else systems[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", system],
                                 capture_output=True, text=True, timeout=300, check=True)
            runs[system].append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [f"bench_callbacks.py --rounds {args.rounds}: medians [range]", "",
             "| system | tiny tasks/s | slow wall (s) |", "|---|---|---|"]
    med = {}
    for system in systems:
        tiny = [r["tiny"] for r in runs[system]]
        slow = [r["slow"] for r in runs[system]]
        med[system] = (statistics.median(tiny), statistics.median(slow))
        lines.append(f"| {system} | {med[system][0]:,.0f} [{min(tiny):,.0f}-{max(tiny):,.0f}] "
                     f"| {med[system][1]:.3f} [{min(slow):.3f}-{max(slow):.3f}] |")
    lines.append(f"| shmrunner / mp | {med['shmrunner'][0] / med['mp'][0]:.2f}x rate "
                 f"| {med['shmrunner'][1] / med['mp'][1]:.2f}x time |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
