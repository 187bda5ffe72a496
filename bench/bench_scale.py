"""Scale of one hub: how many remote workers one Scheduler serves, on this machine.

python bench/bench_scale.py [--agents 1,2,4,8,16,32,64] [--tasks 20000] [--reps 3]
                            [--idle 1000] [--idle-seconds 60] [--out bench/RESULTS.md]

Part 1, a stream of tiny tasks: for each agent count N, a
``Scheduler(local_workers=0, listen="tcp://127.0.0.1:*")`` and N real
``shmrunner worker --processes 1`` agents (each with its own pool process);
once all said hello, ``--tasks`` submits of ``inc(i)`` and collect them all:
tasks/s, the hub thread's CPU (from /proc/self/task/TID/stat), the CPU
per task of the agents (each agent and its pool process, from /proc) and of
this process (submit, Scheduler, hub: getrusage), and the workers the hub
declared lost (``Scheduler.status()["lost_workers"]``: must be 0). CPU per
task depends far less than tasks/s on what else the machine runs.
Repetitions are interleaved over agent counts; medians.

Part 2, idle workers: ``--idle`` simulated workers (DEALER sockets speaking the
real protocol: hello, then a heartbeat every interval, answering nothing else;
a few threads in one helper process) held for ``--idle-seconds``: the hub's
CPU over that time as a share of one core, and lost-worker verdicts.

Everything binds 127.0.0.1. On 2 cores, 64 agents are 128 processes sharing
them with the hub: the curve shows where one machine, not one hub, runs out.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)

import _tasks  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
BEAT, BEAT_TIMEOUT = 1.0, 5.0  # the defaults: what a deployment would run


def thread_cpu(tid: int) -> float:
    """CPU seconds used so far by this process's thread ``tid``."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def hub_thread() -> int:
    """The kernel thread id of the Scheduler's remote-tier thread."""
    for thread in threading.enumerate():
        if thread.name.startswith(("shmrunner-hub", "shmrunner-remote")) and thread.native_id:
            return thread.native_id
    raise LookupError("the hub thread is not running")


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its children's threads
    (an agent and its pool process); 0 for one that is gone."""
    total = 0.0
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    for p in (pid, *kids):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_agents(address: str, n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(
        [sys.executable, "-m", "shmrunner.cli", "--log-level", "WARNING", "worker",
         "--connect", address, "--processes", "1", "--name", f"scale-{i}"],
        stdin=subprocess.DEVNULL, start_new_session=True) for i in range(n)]


def stop_agents(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stream(n: int, tasks: int) -> dict[str, float]:
    import shmrunner

    sched = shmrunner.Scheduler(local_workers=0, listen="tcp://127.0.0.1:*",
                                heartbeat_interval=BEAT, heartbeat_timeout=BEAT_TIMEOUT)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        assert sched.address is not None
        procs = start_agents(sched.address, n)
        deadline = time.monotonic() + 60 + 2 * n
        while len(sched.status()["workers"]) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(sched.status()['workers'])} of {n} agents joined")
            time.sleep(0.05)
        for f in [sched.submit(_tasks.inc, i) for i in range(4 * n)]:  # warm every agent
            f.result(60)
        hub = hub_thread()
        agents0 = sum(process_cpu(p.pid) for p in procs)
        cpu0, own0, t0 = thread_cpu(hub), own_cpu(), time.perf_counter()
        futures = [sched.submit(_tasks.inc, i) for i in range(tasks)]
        results = [f.result(300) for f in futures]
        elapsed = time.perf_counter() - t0
        hub_cpu, own = thread_cpu(hub) - cpu0, own_cpu() - own0
        agents = sum(process_cpu(p.pid) for p in procs) - agents0
        assert results[-1] == tasks, results[-1]
        return {"tasks_per_s": tasks / elapsed, "hub_cpu_share": hub_cpu / elapsed,
                "agents_us": 1e6 * agents / tasks, "caller_us": 1e6 * own / tasks,
                "lost": float(sched.status()["lost_workers"])}
    finally:
        stop_agents(procs)
        sched.shutdown(wait=False, cancel_futures=True)


_IDLE = r'''
import sys, threading, time, os, socket
import zmq
from shmrunner.transport.protocol import Message, encode

address, count = sys.argv[1], int(sys.argv[2])
beat, seconds = float(sys.argv[3]), float(sys.argv[4])
ctx = zmq.Context(io_threads=2)

def group(first, size):
    socks = []
    for i in range(first, first + size):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        s.send_multipart(encode(Message("hello", {"name": f"idle-{i}", "host": socket.gethostname(),
                                                   "pid": os.getpid(), "capacity": 1})))
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    end = time.monotonic() + seconds
    next_beat = time.monotonic() + beat
    heartbeat = encode(Message("heartbeat", {}))
    while time.monotonic() < end:
        for s, _ in poller.poll(max(0, next_beat - time.monotonic()) * 1000):
            while s.poll(0):
                s.recv_multipart()  # welcome, heartbeats: nothing to answer
        if time.monotonic() >= next_beat:
            next_beat += beat
            for s in socks:
                s.send_multipart(heartbeat)
    for s in socks:
        s.close()

threads = [threading.Thread(target=group, args=(i * 250, min(250, count - i * 250)))
           for i in range((count + 249) // 250)]
for t in threads: t.start()
for t in threads: t.join()
print("idle workers done", flush=True)
'''


def idle(count: int, seconds: float) -> dict[str, float]:
    import shmrunner

    sched = shmrunner.Scheduler(local_workers=0, listen="tcp://127.0.0.1:*",
                                heartbeat_interval=BEAT, heartbeat_timeout=BEAT_TIMEOUT)
    proc = None
    try:
        assert sched.address is not None
        proc = subprocess.Popen([sys.executable, "-c", _IDLE, sched.address, str(count),
                                 str(BEAT), str(seconds + 30)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(sched.status()["workers"]) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(sched.status()['workers'])} of {count} joined")
            time.sleep(0.1)
        hub = hub_thread()
        cpu0, t0 = thread_cpu(hub), time.perf_counter()
        time.sleep(seconds)  # the measurement window: the hub works, we watch
        elapsed = time.perf_counter() - t0
        hub_cpu = thread_cpu(hub) - cpu0
        status = sched.status()
        return {"workers": float(len(status["workers"])), "hub_cpu_share": hub_cpu / elapsed,
                "lost": float(status["lost_workers"])}
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        sched.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="1,2,4,8,16,32,64")
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=None, help="append the tables to this file")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 peers: 1,000+ fds
    counts = [int(x) for x in args.agents.split(",") if x]
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for rep in range(args.reps):
        for n in (counts if rep % 2 == 0 else counts[::-1]):  # interleaved, both directions
            r = stream(n, args.tasks)
            runs[n].append(r)
            print(f"rep {rep} agents {n:3}: {r['tasks_per_s']:8.0f} tasks/s, hub "
                  f"{100 * r['hub_cpu_share']:5.1f} % of a core, CPU per task: agents "
                  f"{r['agents_us']:4.0f} us, caller {r['caller_us']:4.0f} us, lost "
                  f"{r['lost']:.0f}; load {Path('/proc/loadavg').read_text().split()[0]}",
                  file=sys.stderr, flush=True)
    best = max(statistics.median(r["tasks_per_s"] for r in runs[n]) for n in counts)
    lines = ["## Scale of one hub", "",
             f"- {os.cpu_count()} cores; load average at end "
             f"{Path('/proc/loadavg').read_text().split()[0]}; {args.tasks} tiny tasks "
             f"(`inc(i)`) per run, {args.reps} interleaved repetitions, medians; heartbeats "
             f"every {BEAT} s, lost after {BEAT_TIMEOUT} s.", "",
             "| agents (1 process each) | tasks/s | share of the best | hub CPU (% of one core) "
             "| CPU per task: agents, caller (µs) | workers declared lost |",
             "|---|---|---|---|---|---|"]
    for n in counts:
        tps = statistics.median(r["tasks_per_s"] for r in runs[n])
        cpu = statistics.median(r["hub_cpu_share"] for r in runs[n])
        lost = sum(r["lost"] for r in runs[n])
        agents = statistics.median(r["agents_us"] for r in runs[n])
        caller = statistics.median(r["caller_us"] for r in runs[n])
        lines.append(f"| {n} | {tps:,.0f} | {100 * tps / best:.0f} % | {100 * cpu:.1f} | "
                     f"{agents:.0f}, {caller:.0f} | {lost:.0f} |")
    if args.idle:
        r = idle(args.idle, args.idle_seconds)
        lines += ["", f"- {r['workers']:.0f} simulated idle workers (hello, heartbeats) held "
                  f"{args.idle_seconds:.0f} s: the hub used {100 * r['hub_cpu_share']:.1f} % "
                  f"of one core; workers declared lost: {r['lost']:.0f}."]
    lines.append(f"- Command: `python bench/bench_scale.py {' '.join(sys.argv[1:])}`")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
