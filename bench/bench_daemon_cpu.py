"""CPU per tiny job through client -> daemon -> 2 agents, by process and thread.

On a shared 2-core machine W1b's jobs/s follows the CPU each job costs in every
process it crosses, and that is steadier than a rate. Each repetition starts
bench_daemon.py's daemon system (a CLI daemon, two agents x 1 process, a
Client in this process) and, unless --no-remote, bench_remote.py's Scheduler
remote tier; runs --jobs submits of inc(i), then collects all; and reads
``/proc`` CPU times (user + system) before and after, per thread of this
process and of the daemon, and for each agent with its pool processes.
Prints µs per job, medians over --reps (one warm-up round not counted).

python bench/bench_daemon_cpu.py [--jobs 5000] [--reps 3] [--no-remote]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_daemon as BD  # noqa: E402  (its daemon system; sets PYTHONPATH for children)
import remote_systems as R  # noqa: E402
from bench_local import loadavg  # noqa: E402

import _tasks  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, int, float] | None:
    """(name, ppid, cpu seconds) of /proc/.../stat, or None if it is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _threads(pid: int) -> dict[str, float]:
    """Thread name -> CPU seconds of process ``pid`` (same names summed)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        st = _stat(f"/proc/{pid}/task/{tid}/stat")
        if st is not None:
            name = "main" if int(tid) == pid else st[0]
            out[name] = out.get(name, 0.0) + st[2]
    return out


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(f"/proc/{entry}/stat")
            if st is not None:
                parent[int(entry)], cpu[int(entry)] = st[1], st[2]
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def _snapshot(daemon_pid: int | None, agents: list[int]) -> dict[str, float]:
    snap = {f"bench:{k}": v for k, v in _threads(os.getpid()).items()}
    if daemon_pid is not None:
        snap.update({f"daemon:{k}": v for k, v in _threads(daemon_pid).items()})
    snap["agents"] = sum(_tree_cpu(a) for a in agents)
    return snap


def _run(system: Any, jobs: int) -> dict[str, float]:
    h = system.start(120.0)
    try:
        if isinstance(system, BD.DaemonSys):
            daemon_pid, agents = h.daemon.pid, [a.pid for a in h.agents]
        else:
            daemon_pid, agents = None, [a.pid for a in h[1]]
        before = _snapshot(daemon_pid, agents)
        t0 = time.perf_counter()
        res = system.w1b(h, jobs, 300.0)
        wall = time.perf_counter() - t0
        after = _snapshot(daemon_pid, agents)
        assert res[-1] == jobs, res[-1]
    finally:
        system.stop(h)
    out = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1e6 / jobs for k in after}
    out["jobs/s"] = jobs / wall
    return out


def _groups(row: dict[str, float]) -> dict[str, float]:
    g = {"jobs/s": row["jobs/s"],
         "bench process": sum(v for k, v in row.items() if k.startswith("bench:")),
         "daemon process": sum(v for k, v in row.items() if k.startswith("daemon:")),
         "agents": row["agents"]}
    g["total"] = g["bench process"] + g["daemon process"] + g["agents"]
    for k, v in row.items():
        if ":" in k and v >= 1.0:
            g[k] = v
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-remote", action="store_true")
    args = ap.parse_args()
    systems: list[Any] = [BD.DaemonSys("daemon", "client -> daemon -> 2 agents", 0, BD.AGENTS)]
    if not args.no_remote:
        systems.append(R.ShmRemote())
    rows: dict[str, list[dict[str, float]]] = {s.key: [] for s in systems}
    print(f"load at start {loadavg()}", file=sys.stderr)
    for rep in range(args.reps + 1):
        for s in systems if rep % 2 == 0 else systems[::-1]:
            g = _groups(_run(s, args.jobs))
            if rep:
                rows[s.key].append(g)
            print(f"rep {rep} {s.key}: " + ", ".join(f"{k} {v:.1f}" for k, v in g.items()),
                  file=sys.stderr)
    print(f"load at end {loadavg()}")
    for key, rs in rows.items():
        names = sorted({k for r in rs for k in r}, key=lambda k: (k != "jobs/s", k))
        print(f"{key} ({args.jobs} jobs, medians of {len(rs)}; µs per job):")
        for k in names:
            print(f"  {k:28s} {statistics.median(r.get(k, 0.0) for r in rs):9.1f}")
    _ = _tasks  # imported for the systems' task references


if __name__ == "__main__":
    main()
