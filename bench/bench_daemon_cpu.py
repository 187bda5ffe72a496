"""CPU per tiny job through client -> daemon -> 2 agents, by process and thread.

On a shared 2-core machine W1b's jobs/s follows the CPU each job costs in every
process it crosses, and that is steadier than a rate. Each repetition starts
bench_daemon.py's daemon system (a CLI daemon, two agents x 1 process, a
Client in this process) and, unless --no-remote, bench_remote.py's Scheduler
remote tier; runs --jobs submits of inc(i), then collects all; and reads
``/proc`` CPU times (user + system) before and after, per thread of this
process and of the daemon, and for each agent with its pool processes.
Prints µs per job, medians over --reps (one warm-up round not counted).

It also prints each path's CPU ceiling: the jobs/s it would reach if every one
of the machine's cores did nothing but its work (cores ÷ total CPU per job),
and what the daemon path's ceiling is as a share of the remote tier's measured
rate. A share below a target says no scheduling of the same work on this
machine can meet it; only less CPU per job can.

python bench/bench_daemon_cpu.py [--jobs 5000] [--reps 3] [--no-remote] [--agent-slots]
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


def _ceilings(rows: dict[str, list[dict[str, float]]], cores: int) -> None:
    """Each path's jobs/s with all ``cores`` busy on its work alone, and the daemon
    path's ceiling as a share of the remote tier's measured rate."""
    ceiling = {key: statistics.median(cores * 1e6 / r["total"] for r in rs if r["total"] > 0)
               for key, rs in rows.items() if rs}
    rate = {key: statistics.median(r["jobs/s"] for r in rs) for key, rs in rows.items() if rs}
    print(f"CPU ceilings ({cores} cores ÷ total CPU per job):")
    for key, c in ceiling.items():
        print(f"  {key:28s} {c:9.0f} jobs/s (measured {rate[key]:.0f}, "
              f"{100 * rate[key] / c:.0f} % of it)")
    remote = next((k for k in rate if k != "daemon"), None)
    if "daemon" in ceiling and remote is not None:
        print(f"  daemon path's ceiling as a share of the {remote} tier's measured rate: "
              f"{100 * ceiling['daemon'] / rate[remote]:.0f} %")
        # The daemon's threads share one interpreter lock, so its own CPU per job
        # bounds the rate even on a machine with cores to spare.
        own = statistics.median(r["daemon process"] for r in rows["daemon"])
        print(f"  the daemon process alone, one core: {1e6 / own:.0f} jobs/s, "
              f"{100e6 / own / rate[remote]:.0f} % of the {remote} tier's rate; "
              f"80 % of that rate needs at most {1e6 / (0.8 * rate[remote]):.1f} µs "
              f"of daemon CPU per job (measured {own:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-remote", action="store_true")
    ap.add_argument("--agent-slots", action="store_true",
                    help="agents with --slots, on both paths (bench_daemon.py's --agent-slots)")
    args = ap.parse_args()
    if args.agent_slots:
        BD.AGENT_OPTIONS.append("--slots")
    systems: list[Any] = [BD.DaemonSys("daemon", "client -> daemon -> 2 agents", 0, BD.AGENTS)]
    if not args.no_remote:
        systems.append(R.ShmSlots() if args.agent_slots else R.ShmRemote())
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
    _ceilings(rows, os.cpu_count() or 1)
    _ = _tasks  # imported for the systems' task references


if __name__ == "__main__":
    main()
