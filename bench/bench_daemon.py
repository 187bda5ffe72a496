"""Runner-daemon benchmark (issue 4's targets), in one run, everything on 127.0.0.1:

1. Tiny jobs (W1b: 5,000 submits of inc(i), then collect all) through
   client -> daemon -> two remote worker agents, side by side with the
   Scheduler's own remote tier (Scheduler(local_workers=0, listen=...) + two
   agents, as in bench_remote.py).
2. W2 (16 x 64 MiB float64 in, task returns float(a.sum())) through the same
   systems, plus a daemon with local_workers=2 next to the Scheduler's local tier.
   In the daemon every array crosses the client's TCP socket and is written to
   the journal's spill files before it runs.
3. Durability: a stream of 10,000 jobs, each appending its id to a file; kill -9
   of the daemon partway, restart on the same journal and ports, fetch every
   acknowledged job's result by id: acknowledged, lost, duplicates, time to recover.

python bench/bench_daemon.py [--reps 5] [--systems daemon,dlocal,remote,sched]
                             [--only W1b,W2] [--jobs 10000] [--kill-at 2000,4000,6000]
                             [--out bench/RESULTS.md] [--timeout 300] [--keep]

Parts 1-2: each repetition starts every system afresh (start-up never timed),
the order of systems rotates from one repetition to the next, round 0 is a
warm-up that is not counted; medians. `ss -ltnup` checks the listeners while
each system is up. Part 3 runs once per --kill-at value, after the repetitions.
Writes (or replaces) the "Runner daemon" section of --out. Ctrl-C or SIGTERM
stops every process the run started.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `_tasks`, `_daemon_tasks` import by reference in every
os.environ["PYTHONPATH"] = os.pathsep.join(  # worker process: the daemon and agents inherit
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)

import bench_remote as BR  # noqa: E402  (shared helpers: loopback check, cells, sweep, ...)
import numpy as np  # noqa: E402
import remote_systems as R  # noqa: E402
from bench_local import loadavg  # noqa: E402

import _daemon_tasks  # noqa: E402
import _tasks  # noqa: E402

LOOPBACK = R.LOOPBACK
AGENTS = 2
READY = re.compile(r"shmrunner daemon: clients on (\S+), workers on (\S+)")
WORKLOADS = {k: BR.WORKLOADS[k] for k in ("W1b", "W2")}
NA = "n/a"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " / ".join(lines[-n:])


# --- processes --------------------------------------------------------------------------


class DaemonProc:
    """`python -m shmrunner.cli daemon --set ...` as a child in a session of its own
    (setpriv --pdeathsig TERM when available: it cannot outlive this process);
    stderr appended to ``log``."""

    def __init__(self, journal: Path, log: Path, clients: str, workers: str,
                 local_workers: int) -> None:
        argv = [sys.executable, "-m", "shmrunner.cli", "daemon",
                "--set", f"daemon.clients={clients}", "--set", f"daemon.workers={workers}",
                "--set", f"daemon.journal={journal}", "--set", "daemon.allow_unauthenticated=true",
                "--set", f"scheduler.local_workers={local_workers}"]
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as err:
            self.p = subprocess.Popen(R.child_argv(argv), stdin=subprocess.DEVNULL, stdout=err,
                                      stderr=err, start_new_session=True, cwd=str(HERE.parent))
        self.pid = self.p.pid
        self.clients = self.workers = ""

    def text(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_ready(self, timeout: float) -> tuple[str, str]:
        """Parse the "clients on X, workers on Y" line from its stderr."""
        deadline = time.monotonic() + timeout
        while True:
            m = READY.search(self.text())
            if m:
                self.clients, self.workers = m.group(1), m.group(2)
                for a in (self.clients, self.workers):
                    if not a.startswith(f"tcp://{LOOPBACK}:"):
                        raise RuntimeError(f"daemon bound {a!r}, not loopback")
                return self.clients, self.workers
            if self.p.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.p.returncode}: {tail(self.log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ready line from the daemon in {timeout} s")
            time.sleep(0.005)

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.p.wait(10)

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (the daemon drains, exits 0), SIGKILL after ``grace``; the exit code."""
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        rc = self.p.poll()
        R.stop_process(self.p, grace=2.0)  # and anything left in its process group
        return rc


AGENT_OPTIONS: list[str] = []  # --agent-slots: ["--slots"]


def start_agent(addr: str, name: str, log: Path) -> subprocess.Popen[Any]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            R.child_argv([sys.executable, "-m", "shmrunner.cli", "worker", "--connect", addr,
                          "--processes", "1", "--name", name, *AGENT_OPTIONS]),
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=err, stderr=err)


def wait_workers(client: Any, n: int, timeout: float, procs: list[Any] = ()) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = client.status(timeout=max(1.0, deadline - time.monotonic()))
        if len(st["workers"]) >= n * (2 if AGENT_OPTIONS else 1):  # slots: agent + its slot
            return st
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"worker agent exited: {dead[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(st['workers'])} of {n} agents said hello")
        time.sleep(0.02)


def shutdown_client(client: Any, timeout: float = 15.0) -> bool:
    """client.shutdown(wait=False) in a thread: True if it returned within ``timeout``
    (a client thread blocked in a send would hang it)."""
    t = threading.Thread(target=client.shutdown, kwargs={"wait": False}, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def dir_stats(path: Path) -> tuple[int, int]:
    """(files, bytes) under path."""
    files = size = 0
    for p in path.rglob("*"):
        if p.is_file():
            files += 1
            size += p.stat().st_size
    return files, size


# --- systems for parts 1-2 (remote_systems.System interface) ----------------------------


class _H:
    """A running daemon, its agents and one client."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemon: DaemonProc | None = None
        self.agents: list[subprocess.Popen[Any]] = []
        self.client: Any = None


class DaemonSys(R._Executor):
    """The daemon as a real subprocess of the CLI; a client from shmrunner.connect."""

    notes: list[str] = []  # anomalies seen while stopping (exit codes, spill files left)

    def __init__(self, key: str, label: str, local_workers: int, agents: int) -> None:
        import shmrunner

        self.mod = shmrunner
        self.key, self.label = key, label
        self.local_workers, self.n_agents = local_workers, agents

    def start(self, timeout: float) -> Any:
        h = _H(Path(tempfile.mkdtemp(prefix=f"bench-{self.key}-")))
        try:
            h.daemon = DaemonProc(h.tmp / "j.sqlite", h.tmp / "daemon.log",
                                  f"tcp://{LOOPBACK}:*", f"tcp://{LOOPBACK}:*",
                                  self.local_workers)
            clients, workers = h.daemon.wait_ready(min(timeout, 60.0))
            for i in range(self.n_agents):
                h.agents.append(start_agent(workers, f"bench-{self.key}-{i}",
                                            h.tmp / f"agent-{i}.log"))
            h.client = self.mod.connect(clients)
            wait_workers(h.client, self.n_agents, min(timeout, 60.0), h.agents)
            h.client.submit(_tasks.inc, 0).result(timeout)
        except BaseException:
            self.stop(h, kill=True)
            raise
        return h

    def ex(self, h: Any) -> Any:
        return h.client

    def stop(self, h: Any, kill: bool = False) -> None:
        try:
            if h.daemon is not None and not kill:  # spill files must go with their jobs
                spill = h.tmp / "j.sqlite.spill"
                deadline = time.monotonic() + 2.0
                while dir_stats(spill)[0] and time.monotonic() < deadline:
                    time.sleep(0.05)
                files, size = dir_stats(spill)
                if files:
                    self.notes.append(f"{self.key}: {files} journal spill files "
                                      f"({size / 2**20:.0f} MiB) still there 2 s after the "
                                      "last job finished")
            if h.client is not None and not shutdown_client(h.client):
                self.notes.append(f"{self.key}: client.shutdown() hung")
            if h.daemon is not None:
                if kill:
                    R.stop_process(h.daemon.p, grace=5.0)
                else:
                    rc = h.daemon.stop()
                    if rc != 0:
                        self.notes.append(f"{self.key}: daemon exit code {rc} after SIGTERM "
                                          f"({tail(h.daemon.log, 3)})")
        finally:
            for p in h.agents:
                R.stop_process(p, grace=5.0 if not kill else 2.0)
            shutil.rmtree(h.tmp, ignore_errors=True)


# --- part 3: durability -------------------------------------------------------------------


ACK_TIMEOUT = 3.0  # the first client's: a future unacknowledged this long fails


def durability(trial: int, n: int, kill_at: int, rate: float, timeout: float,
               keep: bool, jitter: float) -> dict[str, Any]:
    """One kill -9 / restart trial; returns its numbers (and notes)."""
    import shmrunner

    tmp = Path(tempfile.mkdtemp(prefix="bench-durability-"))
    journal, out, log = tmp / "j.sqlite", tmp / "ran.txt", tmp / "daemon.log"
    r: dict[str, Any] = {"n": n, "kill_at": kill_at, "notes": [], "tmp": str(tmp)}
    d1 = d2 = None
    agents: list[subprocess.Popen[Any]] = []
    c1 = c2 = None
    stop_stream = threading.Event()
    try:
        d1 = DaemonProc(journal, log, f"tcp://{LOOPBACK}:*", f"tcp://{LOOPBACK}:*", 0)
        clients, workers = d1.wait_ready(60)
        agents = [start_agent(workers, f"bench-dur-{i}", tmp / f"agent-{i}.log")
                  for i in range(AGENTS)]
        c1 = shmrunner.connect(clients, ack_timeout=ACK_TIMEOUT)
        wait_workers(c1, AGENTS, 60, agents)
        c1.submit(_tasks.inc, 0).result(timeout)  # warm-up (counts 1 in status "done")

        ids = [f"t{trial}-{i:05d}" for i in range(n)]
        futs: list[tuple[str, Any]] = []
        lock = threading.Lock()
        ok = [0]

        def settled(f: Any) -> None:
            if not f.cancelled() and f.exception() is None:
                with lock:
                    ok[0] += 1

        def stream() -> None:  # ~rate jobs/s in chunks of 50, until stopped
            chunk, t0 = 50, time.monotonic()
            for start in range(0, n, chunk):
                if stop_stream.is_set():
                    return
                for job_id in ids[start:start + chunk]:
                    try:
                        f = c1.submit(_daemon_tasks.record, str(out), job_id, job_id=job_id)
                    except RuntimeError:  # the client was shut down (interrupted run)
                        return
                    f.add_done_callback(settled)
                    futs.append((job_id, f))
                ahead = t0 + (start + chunk) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

        last_status: list[dict[str, Any]] = []

        def poll_status() -> None:  # the last answer before the kill: a lower bound
            while not stop_stream.is_set():
                try:
                    last_status.append(c1.status(timeout=2))
                except Exception:  # noqa: BLE001  (the daemon died: stop asking)
                    return
                time.sleep(0.1)

        submitter = threading.Thread(target=stream, name="bench-stream", daemon=True)
        poller = threading.Thread(target=poll_status, name="bench-status", daemon=True)
        t_stream = time.monotonic()
        submitter.start()
        poller.start()
        deadline = time.monotonic() + timeout
        while ok[0] < kill_at:
            if not submitter.is_alive() and all(f.done() for _, f in list(futs)):
                raise RuntimeError(f"every job settled before {kill_at} succeeded")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {ok[0]} results after {timeout} s")
            time.sleep(0.002)
        # Results arrive in bursts (one per settle round), so killing right at the
        # threshold would always hit the same phase of the daemon's loop: wait a
        # random moment more (seeded: reproducible).
        r["jitter_ms"] = random.Random(trial).uniform(0, jitter) * 1000
        time.sleep(r["jitter_ms"] / 1000)
        d1.kill9()
        t_kill = time.monotonic()
        stop_stream.set()
        submitter.join(30)
        poller.join(10)
        # Cross-check: accepted >= done + failed + running in the last status answer (the
        # warm-up job counts 1 in "done").
        st = last_status[-1] if last_status else {"done": 1, "failed": 0, "running": 0}
        r["status_accepted"] = st["done"] + st["failed"] + st["running"] - 1
        r["stream_s"] = t_kill - t_stream
        r["ok_at_kill"] = ok[0]
        r["submitted"] = len(futs)
        r["lines_at_kill"] = len(out.read_text().splitlines()) if out.exists() else 0

        # Classify the first client's futures: a result = acknowledged and done; still
        # pending after the ack timeout = acknowledged (the ack came), no result yet;
        # failed with the ack-timeout error = not known to be acknowledged.
        while (time.monotonic() < t_kill + ACK_TIMEOUT + 1.5
               and not all(f.done() for _, f in futs)):
            time.sleep(0.05)
        done_ok, pending, unacked, other = [], [], [], []
        for job_id, f in futs:
            if not f.done():
                pending.append(job_id)
            elif f.exception() is None:
                done_ok.append(job_id)
                if f.result() != job_id:
                    r["notes"].append(f"{job_id}: result {f.result()!r}")
            elif "did not acknowledge" in str(f.exception()):
                unacked.append(job_id)
            else:
                other.append(job_id)
                if len(other) <= 3:
                    r["notes"].append(f"first client, {job_id}: {BR.short(f.exception())}")
        acked = done_ok + pending + other  # other: a result message came (an error)
        r.update(done_ok=len(done_ok), pending=len(pending), unacked=len(unacked),
                 other=len(other), acked=len(acked))
        if not shutdown_client(c1):
            r["notes"].append("first client: shutdown() hung (its thread blocked)")
        c1 = None
        agents_alive = sum(p.poll() is None for p in agents)
        r["lines_before_restart"] = len(out.read_text().splitlines()) if out.exists() else 0
        r["down_s"] = time.monotonic() - t_kill

        # Restart on the same journal and the same ports; the agents reconnect by themselves.
        t0 = time.monotonic()
        d2 = DaemonProc(journal, log, clients, workers, 0)
        d2.wait_ready(60)
        r["t_ready"] = time.monotonic() - t0
        c2 = shmrunner.connect(clients)
        c2.status(timeout=30)
        r["t_status"] = time.monotonic() - t0
        st = wait_workers(c2, AGENTS, 60, agents)
        r["t_workers"] = time.monotonic() - t0
        r["agents_alive"] = agents_alive

        fetched: dict[str, Any] = {}
        errors: dict[str, str] = {}

        def fetch(job_id: str) -> None:
            try:
                fetched[job_id] = c2.result(job_id, timeout=timeout)
            except Exception as e:  # noqa: BLE001  (counted, reported)
                errors[job_id] = BR.short(e)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(fetch, acked))
        r["t_acked"] = time.monotonic() - t0
        bad = [j for j in acked if j in fetched and fetched[j] != j]
        if bad:
            r["notes"].append(f"{len(bad)} fetched results differ from the job id, e.g. "
                              f"{bad[0]}: {fetched[bad[0]]!r}")

        # The rest of the stream: unacknowledged and never-sent jobs, submitted again with
        # the same ids (the documented recovery: idempotent if the daemon had them).
        known = set(acked)
        rest = [j for j in ids if j not in known]
        r["resubmitted"] = len(rest)
        r["resubmitted_known"] = 0
        futs2 = [(j, c2.submit(_daemon_tasks.record, str(out), j, job_id=j)) for j in rest]
        for j, f in futs2:
            try:
                fetched[j] = f.result(timeout)
            except Exception as e:  # noqa: BLE001
                errors[j] = BR.short(e)
        r["t_all"] = time.monotonic() - t0
        time.sleep(0.5)  # let any straggler append land

        counts = collections.Counter(out.read_text().split())
        in_file = set(counts)
        lost = [j for j in acked if j not in in_file and fetched.get(j) != j]
        r["lost"] = len(lost)
        r["lost_ids"] = lost[:5]
        r["acked_not_fetchable"] = sum(1 for j in acked if fetched.get(j) != j)
        r["fetch_errors"] = sorted(set(errors.values()))[:3]
        r["n_fetch_errors"] = len(errors)
        dups = {j: c for j, c in counts.items() if c > 1}
        r["dup_ids"] = len(dups)
        r["dup_runs"] = sum(c - 1 for c in dups.values())
        r["dups_acked_before_kill"] = sum(1 for j in dups if j in known)
        had_result = set(done_ok)
        r["dups_had_result"] = sum(1 for j in dups if j in had_result)
        r["never_ran"] = sum(1 for j in ids if j not in in_file)
        r["not_done"] = sum(1 for j in ids if fetched.get(j) != j)
        r["strangers"] = len(in_file - set(ids))
        m = re.search(r"re-running (\d+) journaled jobs", d2.text())
        r["replayed"] = int(m.group(1)) if m else 0
        st = c2.status(timeout=10)
        r["status_after"] = {k: st[k] for k in ("done", "failed", "running", "queued",
                                                "rejected")}
        r["journal_mib"] = sum(p.stat().st_size for p in tmp.glob("j.sqlite*")
                               if p.is_file()) / 2**20
        warn = [ln for i in range(AGENTS) for ln in
                (tmp / f"agent-{i}.log").read_text(errors="replace").splitlines()
                if " WARNING " in ln or " ERROR " in ln]
        r["agent_warnings"] = len(warn)
        r["agent_warning_sample"] = sorted({re.sub(r"^\S+ \S+ ", "", w)[:160] for w in warn})[:3]
        dwarn = [ln for ln in d2.text().splitlines() if " WARNING " in ln or " ERROR " in ln]
        r["daemon_warnings"] = sorted({re.sub(r"^\S+ \S+ ", "", w)[:160] for w in dwarn})[:3]
        try:
            m2, _ = BR.listen_check()
            r["listeners"] = sorted({f"{p} {h} ({n})" for p, h, n in m2})
            r["nonloopback"] = [x for x in m2 if not BR._is_loopback(x[1])]
        except Exception as e:  # noqa: BLE001
            r["listeners"] = [f"check failed: {BR.short(e)}"]
            r["nonloopback"] = []
        return r
    finally:
        stop_stream.set()
        for c in (c1, c2):
            if c is not None and not shutdown_client(c):
                r["notes"].append("a client's shutdown() hung")
        for d in (d1, d2):
            if d is not None:
                R.stop_process(d.p, grace=10.0)
        for p in agents:
            R.stop_process(p, grace=5.0)
        if keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# --- report -----------------------------------------------------------------------------


def section(args: argparse.Namespace, systems: list[R.System], wl: list[str],
            vals: dict[str, dict[str, list[tuple[int, float]]]], errs: dict[str, dict[str, str]],
            loads: list[str], seen: dict[str, Any], others: set[str], checks: int,
            trials: list[dict[str, Any]], leftovers: list[str], minutes: float,
            src: list[str]) -> str:
    out = [
        "## Runner daemon",
        "",
        *(f"- {m}" for m in BR.machine()),
        (f"- shmrunner source for the whole run: {src[0]}." if src[0] == src[-1] else
         f"- **shmrunner's source changed during the run** (another session edited it): "
         f"{src[0]} at start, {src[-1]} at end; processes started later ran newer code."),
        f"- Parts 1-2: {args.reps} timed repetitions after 1 warm-up round; every system "
        "started afresh each repetition (start-up not timed), systems interleaved in rotating "
        "order, all on 127.0.0.1. Cells: **median**, (median time), [range over repetitions]. "
        "GB = 10^9 bytes; W2 moves 16 × 64 MiB = 1.07 GB.",
        f"- Machine shared with other engineers' runs: 1-min load average {loads[0]} at start, "
        f"{' → '.join(loads[1:-1]) or '-'} at each repetition's start and before each "
        f"durability trial, {loads[-1]} at end (the run itself keeps 2 cores busy). Whole run "
        f"{minutes:.1f} min.",
        "",
        "| workload | " + " | ".join(s.label for s in systems) + " |",
        "|---" * (len(systems) + 1) + "|",
    ]
    for w in wl:
        row = []
        for s in systems:
            if s.key in errs[w]:
                row.append(f"error: {errs[w][s.key]}")
            elif vals[w].get(s.key):
                row.append(BR.cell(w, [v for _, v in vals[w][s.key]]))
            else:
                row.append(NA)
        out.append(f"| **{w}** {WORKLOADS[w]} | " + " | ".join(row) + " |")

    def ratio(w: str, a: str, b: str) -> tuple[float, list[float]] | None:
        """Throughput of a as a fraction of b's (b's time / a's time), per-rep range."""
        ma, mb = BR.med(vals, w, a), BR.med(vals, w, b)
        if ma is None or mb is None:
            return None
        return mb / ma, sorted(1 / x for x in BR.paired(vals, w, a, b))

    def pct_row(name: str, w: str, a: str, b: str, goal: str, ok: Any) -> str:
        got = ratio(w, a, b)
        if got is None:
            return f"| {name} | {NA} | {goal} | {NA} |"
        x, per = got
        rng = f" [{per[0] * 100:.0f} % … {per[-1] * 100:.0f} %]" if len(per) > 1 else ""
        verdict = "–" if ok is None else ("met" if ok(x) else "**missed**")
        return f"| {name} | {x * 100:.0f} %{rng} | {goal} | {verdict} |"

    lost = sum(t.get("lost", 0) for t in trials if "error" not in t)
    remote = "slots" if AGENT_OPTIONS else "remote"  # the remote tier's system key
    out += [
        "",
        "Targets (issues 4 and 9) and comparisons, as ratios of the medians; [range] = the "
        "same ratio within each repetition (systems interleaved, so pairs compare like with like):",
        "",
        "| target | measured | goal | verdict |",
        "|---|---|---|---|",
        pct_row("W1b: client → daemon → agents tasks/s as % of the Scheduler's remote tier",
                "W1b", "daemon", remote, "≥ 80 % (issue 9 item 1)", lambda x: x >= 0.8),
        pct_row("W2: client → daemon → agents GB/s as % of the Scheduler's remote tier",
                "W2", "daemon", remote, "(none)", None),
        pct_row("W2: client → daemon(local_workers=2) GB/s as % of the Scheduler's local tier",
                "W2", "dlocal", "sched", "(none)", None),
        pct_row("W1b: client → daemon(local_workers=2) tasks/s as % of the Scheduler's "
                "local tier", "W1b", "dlocal", "sched", "(none)", None),
    ]
    ok_trials = [t for t in trials if "error" not in t]
    if ok_trials:
        out.append(f"| kill -9 of the daemon during a stream of {args.jobs:,} jobs: "
                   "acknowledged jobs lost | "
                   + ", ".join(str(t["lost"]) for t in ok_trials)
                   + f" (in {len(ok_trials)} trial{'s' * (len(ok_trials) > 1)}) | 0 | "
                   + ("met" if lost == 0 else "**missed**") + " |")
        out.append("| … duplicates (ids run more than once) | "
                   + ", ".join(str(t["dup_ids"]) for t in ok_trials) + " | reported | – |")
    out += [
        "",
        f"Durability (part 3): a stream of {args.jobs:,} jobs `_daemon_tasks.record(path, "
        f"job_id)` (one O_APPEND line per run) submitted at ≤ {args.rate:,.0f} jobs/s with "
        "explicit ids through a client with `ack_timeout="
        f"{ACK_TIMEOUT:g}`; `kill -9` of the daemon a random 0–{args.kill_jitter * 1000:.0f} ms "
        "after that many results had come back; "
        "restart on the same journal and ports; a new client fetches every acknowledged id "
        "with `client.result(job_id)`, then submits the unacknowledged and never-sent ids "
        "again with the same ids. \"Re-run\" is the restarted daemon's own count (its log "
        "line \"re-running N journaled jobs\"). Times after the restart: its ready line, "
        "the first `status` answer, both agents listed again, every acknowledged id's "
        "result fetched, all jobs done. The agents only say hello again after "
        "`heartbeat_timeout` (5 s default) without word from the daemon, counted from the "
        "kill, so \"agents back\" is bounded by that, not by the restart; kill → restart "
        "here includes the wait that classifies the first client's futures.",
        "",
        "| trial | killed after results | submitted before kill | acknowledged before kill "
        "(with result + pending) | `status` lower bound at kill | not acknowledged | "
        "re-run by the restarted daemon | lost | duplicate ids (extra runs; of them whose "
        "result the first client already had) | all jobs done after recovery | "
        "down (kill → restart) | ready / status / agents back / acked results fetched / "
        "all done (s after restart) |",
        "|---" * 12 + "|",
    ]
    for i, t in enumerate(trials, 1):
        if "error" in t:
            out.append(f"| {i} | error: {t['error']} |" + " |" * 11)
            continue
        errors = f" + {t['other']} errors" if t["other"] else ""
        all_done = "yes" if t["not_done"] == 0 else f"**no: {t['not_done']} not**"
        out.append(
            f"| {i} | {t['ok_at_kill']:,} | {t['submitted']:,} | **{t['acked']:,}** "
            f"({t['done_ok']:,} + {t['pending']:,}{errors}) | "
            f"{t['status_accepted']:,} | {t['unacked']:,} | {t['replayed']:,} | "
            f"**{t['lost']}** | {t['dup_ids']} ({t['dup_runs']}; {t['dups_had_result']}) | "
            f"{all_done} | {t['down_s']:.1f} s | {t['t_ready']:.2f} / {t['t_status']:.2f} / "
            f"{t['t_workers']:.2f} / {t['t_acked']:.2f} / {t['t_all']:.2f} |")
    notes = []
    for i, t in enumerate(trials, 1):
        if "error" in t:
            continue
        extra = []
        if t["acked_not_fetchable"]:
            extra.append(f"{t['acked_not_fetchable']} acknowledged ids not fetchable "
                         f"({t['n_fetch_errors']} fetch errors: {'; '.join(t['fetch_errors'])})")
        if t["strangers"]:
            extra.append(f"{t['strangers']} unknown ids in the file")
        extra += t["notes"]
        notes.append(
            f"- Trial {i}: the kill came {t['jitter_ms']:.0f} ms after the threshold; the "
            f"stream had run {t['stream_s']:.2f} s; "
            f"{t['lines_at_kill']:,} lines in the file at the kill, "
            f"{t['lines_before_restart']:,} just before the "
            f"restart (agents finish what they held); {t['resubmitted']:,} ids submitted again "
            f"after the restart; status after: {t['status_after']}; journal files "
            f"{t['journal_mib']:.1f} MiB; agent log warnings: {t['agent_warnings']}"
            + (f" (e.g. {' / '.join(t['agent_warning_sample'])})" if t["agent_warning_sample"]
               else "")
            + (f"; restarted daemon warnings: {' / '.join(t['daemon_warnings'])}"
               if t["daemon_warnings"] else "")
            + (f"; {'; '.join(extra)}" if extra else "") + ".")
    had = sum(t["dups_had_result"] for t in ok_trials)
    if had:
        notes.append(
            f"- {had:,} of the duplicates (all trials) are jobs whose result the first client "
            "had already received before the kill, yet the restarted daemon ran them again: "
            "the daemon sends a result to its client before committing it to the journal "
            "(daemon.py `_settle` replies inside its loop and calls `journal.finish` after "
            "it), so a kill between the two leaves the job pending. At-least-once allows "
            "it; committing first would leave only jobs still running at the kill to re-run.")
    unacked = [t["unacked"] for t in ok_trials]
    if any(unacked):
        notes.append(
            "- Not acknowledged at the kill: " + ", ".join(f"{u:,}" for u in unacked)
            + " jobs the client had sent: the daemon accepts only as fast as its one front "
            "thread journals, acknowledges, dispatches and settles jobs (compare the W1b "
            "rate above), so in a faster stream submissions wait unacknowledged in ZeroMQ "
            "queues. The benchmark submitted them again after the restart with the same ids "
            "(idempotent); none was lost.")
    bad = any(not BR._is_loopback(h) for g in seen.values() for (_, h, _) in g) or any(
        t.get("nonloopback") for t in trials)
    dur_listeners = "; ".join(", ".join(t.get("listeners", [])) for t in ok_trials)
    out += [
        "",
        "Notes:",
        "",
        "- **client → daemon → agents** (`daemon` column): `python -m shmrunner.cli daemon "
        "--set daemon.clients=tcp://127.0.0.1:* --set daemon.workers=tcp://127.0.0.1:* --set "
        "daemon.journal=TMP/j.sqlite --set scheduler.local_workers=0` as a subprocess "
        "(addresses parsed from its stderr line), two `python -m shmrunner.cli worker --connect "
        "WORKERS --processes 1` agents, `shmrunner.connect(CLIENTS)` in the benchmark process; "
        "`submit()` all, then `result()` each. A job crosses client → daemon (journaled: one "
        "SQLite commit per poll round, then acknowledged) → agent → the agent's pool process, "
        "and the result comes back the same way (journaled again). TMP is under /tmp: "
        f"{fs_of(Path(tempfile.gettempdir()))}.",
        "- **daemon(local_workers=2)** (`dlocal`): the same daemon with `scheduler."
        "local_workers=2` and no agents: the daemon's own shared-memory workers, the "
        "like-for-like partner of the Scheduler's local tier. The client does not pass arrays "
        "through shared memory (client.py sends them as frames on the socket), so in W2 each "
        "64 MiB array crosses the loopback TCP socket, is written to a journal spill file "
        "(`j.sqlite.spill/ID.request`, > 256 KiB messages) before the ack, is copied into "
        "shared memory for the worker, and its spill file is unlinked when the job finishes; "
        "the Scheduler's local tier only does the shared-memory copy.",
        "- **Scheduler remote tier** (`remote`) and **local tier** (`sched`): exactly "
        "bench_remote.py's adapters (`Scheduler(local_workers=0, listen=\"tcp://127.0.0.1:*\")` "
        "+ two agents; `Scheduler(local_workers=2)`), in the benchmark process.",
        f"- Loopback check: `ss -ltnup` ran {checks} times (once per system per repetition "
        "while it was up) and once in each durability trial after the restart. Most listening "
        "sockets seen at once in this run's process tree, per system: "
        + BR.describe_listeners(seen)
        + (f"; durability: {dur_listeners}" if dur_listeners else "")
        + (" — **NON-LOOPBACK LISTENER FOUND**" if bad else " — **all on loopback**")
        + ". Listeners of other processes on the machine: "
        + ("; ".join(sorted(o for o in others if "NON-LOOPBACK" in o)) or "none off loopback")
        + f", and {sum('NON-LOOPBACK' not in o for o in others)} on loopback.",
        *notes,
        *(f"- Anomaly: {n}" for n in DaemonSys.notes),
        "- Leftover processes at the end (killed by the final sweep): "
        + ("; ".join(leftovers) if leftovers else "none") + ".",
        f"- Command: `bench/.venv/bin/python bench/bench_daemon.py {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(out) + "\n"


def source_state() -> str:
    """A fingerprint of shmrunner's source as this run sees it: the commit, and a hash
    of the uncommitted changes under shmrunner/ (other sessions may edit the tree)."""
    import hashlib

    git = ["git", "-C", str(HERE.parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        diff = subprocess.run([*git, "diff", "HEAD", "--", "shmrunner"], capture_output=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not diff:
        return f"{head} (clean)"
    return f"{head} + uncommitted diff {hashlib.sha1(diff).hexdigest()[:10]}"


def fs_of(path: Path) -> str:
    try:
        out = subprocess.run(["findmnt", "-n", "-T", str(path), "-o", "FSTYPE,SOURCE"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return f"{out[0]} on {out[1]}" if len(out) >= 2 else "unknown filesystem"
    except (OSError, subprocess.SubprocessError):
        return "unknown filesystem"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(r"^## Runner daemon\n.*?(?=^## |\Z)", re.S | re.M)
    new = (pat.sub(lambda _: text + "\n", old, count=1) if pat.search(old)
           else old.rstrip("\n") + "\n\n" + text)
    path.write_text(new)


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--agent-slots", action="store_true",
                    help="agents (the daemon's and the remote tier's) run with --slots")
    ap.add_argument("--only", default="W1b,W2", help="workloads of parts 1-2: W1b,W2")
    ap.add_argument("--systems", default="daemon,dlocal,remote,sched",
                    help="daemon (client -> daemon -> 2 agents), dlocal (daemon with 2 local "
                         "workers), remote (Scheduler remote tier), sched (Scheduler local tier)")
    ap.add_argument("--jobs", type=int, default=10_000, help="durability stream length")
    ap.add_argument("--kill-at", default="2000,4000,6000",
                    help="one durability trial per value: kill -9 once this many results came "
                         "back (empty: no durability trial)")
    ap.add_argument("--kill-jitter", type=float, default=0.2,
                    help="seconds: the kill comes a random 0..this after the threshold")
    ap.add_argument("--rate", type=float, default=5000.0, help="durability stream jobs/s cap")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    ap.add_argument("--keep", action="store_true", help="keep durability trials' temp dirs")
    args = ap.parse_args()
    if args.agent_slots:
        AGENT_OPTIONS.append("--slots")
    wl = [w for w in WORKLOADS if w in args.only.split(",")]
    kill_at = [int(x) for x in args.kill_at.split(",") if x.strip()]
    makers = {
        "daemon": lambda: DaemonSys("daemon", "client → daemon → 2 agents × 1 proc"
                                    + (" (--slots)" if args.agent_slots else ""), 0, AGENTS),
        "dlocal": lambda: DaemonSys("dlocal", "client → daemon(local_workers=2)", 2, 0),
        "remote": R.ShmSlots if args.agent_slots else R.ShmRemote,
        "sched": R.ShmLocal,
    }
    systems = [makers[k]() for k in args.systems.split(",") if k]
    R.ShmRemote.label = "Scheduler remote tier (2 agents × 1 proc)"
    R.ShmSlots.label = "Scheduler remote tier (2 agents × 1 slot, --slots)"

    BR.install_handlers()
    step = args.timeout + 120.0
    arrays = ([np.full(_tasks.N, k, dtype=np.float64) for k in range(BR.N_ARRAYS)]
              if "W2" in wl else [])
    vals: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    errs: dict[str, dict[str, str]] = defaultdict(dict)
    loads = [loadavg()]
    seen: dict[str, dict[tuple[str, str, str], int]] = {}
    others: set[str] = set()
    checks = 0
    live: dict[str, tuple[R.System, Any]] = {}
    trials: list[dict[str, Any]] = []
    t_start = time.monotonic()
    src = [source_state()]
    say(f"load average at start: {loads[0]}; shmrunner source {src[0]}")
    try:
        for rep in range(args.reps + 1 if systems else 0):  # round 0: warm-up, not counted
            if rep:
                loads.append(loadavg())
            say(f"rep {rep}{' (warm-up)' if rep == 0 else ''}: load average {loadavg()}")
            shift = rep % len(systems)
            for s in systems[shift:] + systems[:shift]:
                try:
                    with BR.deadline(step):
                        h = s.start(args.timeout)
                    live[s.key] = (s, h)
                except Exception as e:
                    traceback.print_exc()
                    for w in wl:
                        errs[w].setdefault(s.key, "start: " + BR.short(e))
                    continue
                finally:
                    BR.install_handlers()
                for w in wl:
                    try:
                        with BR.deadline(step):
                            v = BR.run_one(s, h, w, arrays, args.timeout)
                    except Exception as e:
                        traceback.print_exc()
                        errs[w].setdefault(s.key, BR.short(e))
                        continue
                    say(f"  rep {rep} {s.key:6} {w:4} {BR.fmt(w, v):>8} "
                        f"{'tasks/s' if w == 'W1b' else 'GB/s'}  ({v:.4f})")
                    if rep > 0:
                        vals[w][s.key].append((rep, v))
                try:
                    m, o = BR.listen_check()
                    checks += 1
                    others.update(o)
                    groups = seen.setdefault(s.key, {})
                    for g in set(m):
                        groups[g] = max(groups.get(g, 0), m.count(g))
                    bad = [f"{p} {host} {n}" for p, host, n in m if not BR._is_loopback(host)]
                    say(f"  listen check ({s.key} up): {len(m)} listeners of this run, "
                        f"{'NON-LOOPBACK: ' + '; '.join(bad) if bad else 'all on loopback'}")
                except Exception as e:
                    say(f"  listen check failed: {BR.short(e)}")
                try:
                    with BR.deadline(step):
                        s.stop(h)
                except Exception:
                    traceback.print_exc()
                    try:
                        with BR.deadline(60):
                            s.stop(h, kill=True)
                    except Exception:
                        traceback.print_exc()
                live.pop(s.key, None)
                BR.install_handlers()
        for i, k in enumerate(kill_at, 1):
            loads.append(loadavg())
            say(f"durability trial {i}: kill -9 after {k:,} of {args.jobs:,} results; "
                f"load average {loads[-1]}")
            try:
                with BR.deadline(args.timeout * 3 + 120):
                    t = durability(i, args.jobs, k, args.rate, args.timeout, args.keep,
                                   args.kill_jitter)
            except Exception as e:
                traceback.print_exc()
                t = {"error": BR.short(e)}
            printable = {k2: v for k2, v in t.items() if k2 not in ("listeners",)}
            say(f"  {printable}")
            trials.append(t)
    except (KeyboardInterrupt, SystemExit):
        say("interrupted: stopping every process this run started")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s, h in live.values():
            try:
                with BR.deadline(30):
                    s.stop(h, kill=True)
            except BaseException:
                traceback.print_exc()
        say(f"killed leftovers: {BR.sweep() or 'none'}")
        raise SystemExit(130) from None
    loads.append(loadavg())
    leftovers = BR.sweep()
    src.append(source_state())
    text = section(args, systems, wl, vals, errs, loads, seen, others, checks, trials,
                   leftovers, (time.monotonic() - t_start) / 60, src)
    print(text)
    write_section(args.out, text)
    say(f"(written to {args.out})")


if __name__ == "__main__":
    main()
