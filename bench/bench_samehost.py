"""Same-host clients (issue 9, item 2): W2 through a client on the daemon's host.

W2 = 16 x 64 MiB float64 in, the task returns float(a.sum()). Systems, all on
127.0.0.1, interleaved in rotating order, each started afresh every repetition
(start-up not timed), repetition 0 a warm-up that is not counted; medians:

* sched: ``Scheduler(local_workers=2)`` in this process (the local tier);
* shm-nj: ``connect(addr, durable=False)`` -> daemon(local_workers=2): arrays as
  memfds on the side channel, not journaled;
* shm-j: ``connect(addr)`` (durable, the default): memfds, arrays journaled
  (one spill write + fsync per job) before the ack;
* tcp: ``connect(addr, same_host=False)``: arrays as ZeroMQ frames over TCP
  (journaled), the path every client took before;
* disk: the limit of the journaled mode: write the same 16 x 64 MiB once to
  the journal's file system (one file per array, write + fsync each, then
  fsync the directory), in a fresh directory beside where the daemons'
  journals go.

Results by memfd (``--workload w3`` or ``w4``, systems sched,shm-nj,shm-j,tcp):
W3 = the worker makes 16 x 64 MiB float64 (``make_array``), returned; W4 = 16 x
64 MiB in, ``a += 1`` returned. Through a same-host client the result arrays
come back as memfds (checked: ``same_host["results"]`` counts 16); with
durable=True the daemon journals them too (the spill write + fsync).

python bench/bench_samehost.py [--reps 5] [--systems sched,shm-nj,shm-j,tcp,disk]
                               [--workload w2|w3|w4] [--out bench/RESULTS.md]
Prints a markdown section; with --out, appends it there.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)

import bench_daemon as BD  # noqa: E402
import numpy as np  # noqa: E402
import remote_systems as R  # noqa: E402
from bench_local import loadavg  # noqa: E402

import _tasks  # noqa: E402
import shmrunner  # noqa: E402

N_ARRAYS = 16
W2_BYTES = N_ARRAYS * _tasks.N * 8
TIMEOUT = 300.0
LABELS = {
    "sched": "Scheduler(local_workers=2)",
    "shm-nj": "same-host client, durable=False -> daemon(local_workers=2)",
    "shm-j": "same-host client, durable=True (default) -> daemon(local_workers=2)",
    "tcp": "client, same_host=False (frames over TCP) -> daemon(local_workers=2)",
    "disk": "write + fsync of the 16 arrays in the journal's directory (the limit)",
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Daemon:
    """A daemon subprocess (bench_daemon.DaemonProc) and a client with ``options``."""

    def __init__(self, root: Path, **options: Any) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-samehost-", dir=root))
        self.proc = BD.DaemonProc(self.tmp / "j.sqlite", self.tmp / "daemon.log",
                                  f"tcp://{R.LOOPBACK}:*", f"tcp://{R.LOOPBACK}:*", 2)
        try:
            clients, _ = self.proc.wait_ready(60.0)
            self.client = shmrunner.connect(clients, **options)
            self.client.submit(_tasks.inc, 0).result(60)
            # A large argument: the client finds the side channel (and its results connection).
            self.client.submit(_tasks.array_sum, np.ones(1 << 17)).result(60)
        except BaseException:
            self.close()
            raise

    def w2(self, arrays: list[np.ndarray]) -> list[float]:
        futures = [self.client.submit(_tasks.array_sum, a) for a in arrays]
        return [f.result(TIMEOUT) for f in futures]

    def w3(self, arrays: list[np.ndarray]) -> list[Any]:
        futures = [self.client.submit(_tasks.make_array, i) for i in range(len(arrays))]
        return [f.result(TIMEOUT) for f in futures]

    def w4(self, arrays: list[np.ndarray]) -> list[Any]:
        futures = [self.client.submit(_tasks.add_one, a) for a in arrays]
        return [f.result(TIMEOUT) for f in futures]

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.shutdown(wait=False)
        rc = self.proc.stop()
        if rc != 0:
            say(f"daemon exit code {rc}")
        shutil.rmtree(self.tmp, ignore_errors=True)


class Sched:
    def __init__(self, root: Path) -> None:
        self.s = shmrunner.Scheduler(local_workers=2)
        self.s.submit(_tasks.inc, 0).result(60)

    def w2(self, arrays: list[np.ndarray]) -> list[float]:
        futures = [self.s.submit(_tasks.array_sum, a) for a in arrays]
        return [f.result(TIMEOUT) for f in futures]

    def w3(self, arrays: list[np.ndarray]) -> list[Any]:
        futures = [self.s.submit(_tasks.make_array, i) for i in range(len(arrays))]
        return [f.result(TIMEOUT) for f in futures]

    def w4(self, arrays: list[np.ndarray]) -> list[Any]:
        futures = [self.s.submit(_tasks.add_one, a) for a in arrays]
        return [f.result(TIMEOUT) for f in futures]

    def close(self) -> None:
        self.s.shutdown(wait=True)


class Disk:
    """Write + fsync each array once in a fresh directory, then fsync the directory."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-disk-", dir=root))

    def w2(self, arrays: list[np.ndarray]) -> list[float]:
        for i, a in enumerate(arrays):
            fd = os.open(self.dir / f"a{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(a.view(np.uint8).reshape(-1))
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return [float(k * _tasks.N) for k in range(len(arrays))]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def make(key: str, root: Path) -> Any:
    if key == "sched":
        return Sched(root)
    if key == "disk":
        return Disk(root)
    options = {"shm-nj": {"durable": False}, "shm-j": {"durable": True},
               "tcp": {"same_host": False}}[key]
    return Daemon(root, **options)


def run(key: str, root: Path, arrays: list[np.ndarray], workload: str = "w2") -> float:
    system = make(key, root)
    try:
        gc.collect()
        before = system.client.same_host if isinstance(system, Daemon) else {}
        t0 = time.perf_counter()
        out = getattr(system, workload)(arrays)
        dt = time.perf_counter() - t0
        if workload == "w2":
            if out != [float(k * _tasks.N) for k in range(len(arrays))]:
                raise AssertionError(f"{key}: wrong sums")
        else:  # each result checked at two points (touching every page costs as much as W3)
            add = 1.0 if workload == "w4" else 0.0
            for k, a in enumerate(out):
                if a.shape != (_tasks.N,) or a[0] != k + add or a[-1] != k + add:
                    raise AssertionError(f"{key}: wrong result {k}")
        del out
        if isinstance(system, Daemon):  # the path claimed is the path taken
            after = system.client.same_host
            expected = 0 if key == "tcp" else len(arrays)
            if workload != "w3":
                by_memfd = after["submits"] - before["submits"]
                if by_memfd != expected:
                    raise AssertionError(f"{key}: {by_memfd} submits by memfd, "
                                         f"expected {expected}")
            if workload != "w2" and "results" in after:  # (a tree before results by memfd: none)
                back = after["results"] - before["results"]
                if back != expected:
                    raise AssertionError(f"{key}: {back} results by memfd, expected {expected}")
        return dt
    finally:
        system.close()


KILL_JOBS = 400  # jobs of one kill -9 trial, each with a 1 MiB array
KILL_ELEMENTS = 131_072


def memfds() -> int:
    """memfds this process holds (a leak check), the segment cache's free ones
    aside: those are kept on purpose, within its byte budget (a same-host
    client's recycled memfds among them)."""
    count = -shmrunner.shm_cache_info()["free_segments"]
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        except OSError:
            pass
    return count


def kill_trial(trial: int, durable: bool, root: Path) -> dict[str, Any]:
    """A same-host client streams KILL_JOBS jobs with explicit ids; kill -9 of the
    daemon once a random share of them has come back; restart on the same
    journal and port; a new client fetches every acknowledged id."""
    import random
    import threading

    import _daemon_tasks

    tmp = Path(tempfile.mkdtemp(prefix="bench-samehost-kill-", dir=root))
    journal, out = tmp / "j.sqlite", tmp / "ran.txt"
    rng = random.Random(trial)
    kill_after = rng.randrange(KILL_JOBS // 5, KILL_JOBS * 3 // 5)
    r: dict[str, Any] = {"durable": durable, "kill_after": kill_after}
    fds_before = memfds()
    d1 = BD.DaemonProc(journal, tmp / "d1.log", f"tcp://{R.LOOPBACK}:*",
                       f"tcp://{R.LOOPBACK}:*", 2)
    d2 = None
    try:
        clients, _ = d1.wait_ready(60)
        c1 = shmrunner.connect(clients, durable=durable, ack_timeout=3.0)
        c1.submit(_tasks.inc, 0).result(60)
        ids = [f"k{trial}-{i:04d}" for i in range(KILL_JOBS)]
        futures: list[Any] = []
        ok = [0]
        stop = threading.Event()

        def settled(f: Any) -> None:
            if not f.cancelled() and f.exception() is None:
                ok[0] += 1

        def stream() -> None:
            for i, job_id in enumerate(ids):
                if stop.is_set():
                    return
                a = np.full(KILL_ELEMENTS, float(i))
                f = c1.submit(_daemon_tasks.record_total, str(out), job_id, a, job_id=job_id)
                f.add_done_callback(settled)
                futures.append(f)

        feeder = threading.Thread(target=stream, daemon=True)
        feeder.start()
        deadline = time.monotonic() + 120
        while ok[0] < kill_after and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.2))
        d1.p.kill()
        d1.p.wait(10)
        stop.set()
        feeder.join(30)
        r["submitted"] = len(futures)
        r["by_memfd"] = c1.same_host["submits"]
        time.sleep(3.5)  # past ack_timeout: each future is acknowledged, or says it is not
        acked = [f.job_id for f in futures if f.accepted() or (f.done() and not (
            f.exception() and "acknowledge" in str(f.exception())))]
        r["acked"] = len(acked)
        r["done_at_kill"] = ok[0]
        c1.shutdown(wait=False)
        port = clients.rsplit(":", 1)[1]
        d2 = BD.DaemonProc(journal, tmp / "d2.log", f"tcp://{R.LOOPBACK}:{port}",
                           f"tcp://{R.LOOPBACK}:*", 2)
        d2.wait_ready(60)
        c2 = shmrunner.connect(clients)
        expected = {job_id: float(i * KILL_ELEMENTS) for i, job_id in enumerate(ids)}
        good = honest = lost = 0
        for job_id in acked:
            try:
                good += c2.result(job_id, timeout=120) == expected[job_id]
            except shmrunner.ShmrunnerError as exc:
                if "durable=False" in str(exc):
                    honest += 1  # said, not silently lost
                else:
                    lost += 1
                    r.setdefault("errors", []).append(str(exc)[:120])
        c2.shutdown(wait=False)
        runs = collections.Counter(line.split()[0] for line in out.read_text().splitlines())
        sums_ok = all(float(line.split()[1]) == expected[line.split()[0]]
                      for line in out.read_text().splitlines())
        r.update(good=good, failed_durable_false=honest, lost=lost,
                 duplicates=sum(c - 1 for c in runs.values()), sums_ok=sums_ok,
                 memfds_left=memfds() - fds_before)
        return r
    finally:
        for d in (d1, d2):
            if d is not None:
                d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--systems", default="sched,shm-nj,shm-j,tcp,disk")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workload", default="w2", choices=("w2", "w3", "w4"))
    ap.add_argument("--kill-trials", type=int, default=0,
                    help="kill -9 trials per durability mode (durable, then not)")
    args = ap.parse_args()
    keys = args.systems.split(",") if args.systems else []
    root = Path(tempfile.gettempdir())
    trials = []
    for trial in range(args.kill_trials):
        for durable in (True, False):
            trials.append(kill_trial(trial, durable, root))
            say(f"kill trial {trial} durable={durable}: {trials[-1]}")
    if not keys:
        print(kill_report(trials))
        return
    arrays = [np.full(_tasks.N, float(k)) for k in range(N_ARRAYS)]
    if args.workload != "w2":
        print(results_report(keys, args, root, arrays))
        return
    times: dict[str, list[float]] = {k: [] for k in keys}
    loads = [loadavg()]
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    t_start = time.monotonic()
    for rep in range(args.reps + 1):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for key in order:
            dt = run(key, root, arrays)
            say(f"rep {rep} {key}: {dt:.3f} s ({W2_BYTES / dt / 1e9:.2f} GB/s)")
            if rep > 0:
                times[key].append(dt)
        loads.append(loadavg())
    say(f"times: {json.dumps(times)}")
    section = report(keys, times, loads, commit + (" (dirty)" if dirty else ""),
                     time.monotonic() - t_start, root, args.reps)
    section += kill_report(trials)
    print(section)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + section)


def results_report(keys: list[str], args: Any, root: Path, arrays: list[np.ndarray]) -> str:
    """W3 or W4, interleaved, medians; a markdown section (appended to --out)."""
    times: dict[str, list[float]] = {k: [] for k in keys}
    loads = [loadavg()]
    for rep in range(args.reps + 1):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for key in order:
            dt = run(key, root, arrays, args.workload)
            say(f"{args.workload} rep {rep} {key}: {dt:.3f} s")
            if rep > 0:
                times[key].append(dt)
        loads.append(loadavg())
    say(f"times: {json.dumps(times)}")
    what = {"w3": "W3 (the worker makes 16 x 64 MiB, returned)",
            "w4": "W4 (16 x 64 MiB in, a += 1 returned)"}[args.workload]
    lines = [f"### {what}: results by memfd through a same-host client", "",
             f"`bench_samehost.py --workload {args.workload} --reps {args.reps}`; "
             "interleaved, rotating order, fresh systems, 1 warm-up; median [range]; "
             "load " + " → ".join(str(x) for x in loads), "",
             "| system | time | GB/s | vs Scheduler |", "|---|---|---|---|"]
    ref = statistics.median(times["sched"]) if "sched" in times else None
    for k in keys:
        ts = times[k]
        med = statistics.median(ts)
        lines.append(f"| {LABELS[k]} | {med:.3f} s [{min(ts):.3f}–{max(ts):.3f}] | "
                     f"{W2_BYTES / med / 1e9:.2f} | "
                     f"{'–' if ref is None else f'{ref / med * 100:.0f} %'} |")
    section = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + section)
    return section


def kill_report(trials: list[dict[str, Any]]) -> str:
    if not trials:
        return ""
    lines = ["", f"kill -9 of the daemon during a stream of {KILL_JOBS} same-host jobs "
             f"(each a 1 MiB array, by memfd), restart on the same journal and port, a new "
             "client fetches every acknowledged id:", "",
             "| mode | killed after results | submitted | by memfd | acknowledged | results "
             "right after restart | failed saying durable=False | **lost** | duplicate runs "
             "| memfds left here |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in trials:
        lines.append(f"| {'durable' if t['durable'] else 'durable=False'} | "
                     f"{t['done_at_kill']} | {t['submitted']} | {t['by_memfd']} | {t['acked']} | "
                     f"{t['good']} | {t['failed_durable_false']} | **{t['lost']}** | "
                     f"{t['duplicates']} | {t['memfds_left']} |")
    return "\n".join(lines) + "\n"


def gbs(dt: float) -> float:
    return W2_BYTES / dt / 1e9


def report(keys: list[str], times: dict[str, list[float]], loads: list[Any], commit: str,
           elapsed: float, root: Path, reps: int) -> str:
    fs = subprocess.run(["df", "-T", str(root)], capture_output=True, text=True).stdout
    fs_line = fs.splitlines()[-1].split()[:2] if fs else ["?", "?"]
    lines = [
        "## Same-host clients: arrays as memfds (issue 9, item 2)",
        "",
        f"- `bench/bench_samehost.py --reps {reps}`; shmrunner at {commit}; "
        f"{platform.python_version()}, numpy {np.__version__}; {os.cpu_count()} cores; "
        f"journal and disk-limit directories under {root} ({fs_line[1]} on {fs_line[0]}).",
        f"- W2 = 16 x 64 MiB float64 in, task returns float(a.sum()) ({W2_BYTES / 1e9:.2f} GB); "
        f"{reps} timed repetitions after 1 warm-up, systems started afresh each time, "
        "rotating order; median (time) [range]. Load average "
        + " → ".join(str(x) for x in loads) + f"; whole run {elapsed / 60:.1f} min.",
        "",
        "| system | W2 GB/s | time |",
        "|---|---|---|",
    ]
    for k in keys:
        ts = times[k]
        lines.append(f"| {LABELS[k]} | **{gbs(statistics.median(ts)):.2f}** "
                     f"[{gbs(max(ts)):.2f}–{gbs(min(ts)):.2f}] | {statistics.median(ts):.3f} s |")
    lines += ["", "| target | measured (ratio of medians [per-repetition range]) | goal "
              "| verdict |", "|---|---|---|---|"]

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        per = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
        return statistics.median(times[b]) / statistics.median(times[a]), min(per), max(per)

    if "sched" in keys:
        for k, goal in (("shm-nj", 0.70), ("shm-j", None), ("tcp", None)):
            if k in keys:
                r, lo, hi = ratio(k, "sched")  # GB/s of k as a share of sched's
                verdict = "–" if goal is None else ("met" if r >= goal else "**missed**")
                lines.append(f"| W2 {k} GB/s as % of the Scheduler's local tier | "
                             f"{100 * r:.0f} % [{100 * lo:.0f}–{100 * hi:.0f} %] | "
                             f"{'≥ 70 %' if goal else '(none)'} | {verdict} |")
    if "disk" in keys and "shm-j" in keys:
        per = [tj / td for tj, td in zip(times["shm-j"], times["disk"], strict=True)]
        r = statistics.median(times["shm-j"]) / statistics.median(times["disk"])
        lines.append(f"| W2 shm-j time ÷ the disk write + fsync of the same bytes | "
                     f"{r:.2f}x [{min(per):.2f}–{max(per):.2f}x] | ≤ 2x | "
                     f"{'met' if r <= 2 else '**missed**'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
