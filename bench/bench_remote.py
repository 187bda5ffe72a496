"""Remote-tier benchmark: shmrunner's ZeroMQ tier against Dask distributed, Ray and
the raw pyzmq loopback limit, plus the Scheduler's local tier against shmrunner.Pool;
interleaved in one run, everything on 127.0.0.1.

python bench/bench_remote.py [--reps 5] [--only W1b,W2,W5]
                             [--systems remote,dask,ray,zmq,sched,pool]
                             [--out bench/RESULTS.md] [--timeout 300]

Each repetition starts every system afresh (start-up is never timed), runs the
workloads, checks which sockets listen (`ss -ltnup`) while it is up, and stops it;
the order of systems rotates from one repetition to the next, and round 0 is a
warm-up that is not counted. Writes (or replaces) the "Remote tier" section of
--out.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `_tasks` must import by reference in every worker process:
os.environ["PYTHONPATH"] = os.pathsep.join(  # agents, Dask's and Ray's workers inherit this
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import remote_systems as R  # noqa: E402
from bench_local import _tree, loadavg  # noqa: E402

import _tasks  # noqa: E402

N_ARRAYS = 16
W1B_N, W5_N, W5_WARM = 5_000, 300, 30
# Bursts of W1B_N per repetition, after one untimed burst, the median one
# counted: a burst of tiny local tasks lasts ~70 ms, and one scheduling hiccup
# then moves a repetition by a fifth; the first burst of a fresh system also
# allocates the memory its bookkeeping reuses afterwards (5 bursts and a
# warm-up since 2026-12-05; 3 and none before).
W1B_BURSTS = 5
W2_BYTES = N_ARRAYS * _tasks.N * 8

WORKLOADS: dict[str, str] = {
    "W1b": f"5,000 single submits of inc(i), then collect all (median of {W1B_BURSTS} bursts "
           "after one untimed)",
    "W2": "16 x 64 MiB float64 in, task returns float(a.sum())",
    "W5": f"single-task latency: inc(1), median of {W5_N} calls",
}
NA = "n/a"


def short(e: BaseException) -> str:
    """One table-safe line for a cell."""
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text[:120].replace("|", "/").replace("\n", " ")


class StepTimeout(Exception):
    """A whole step (start, one workload, stop) ran past its deadline."""


def _alarm(signum: int, frame: Any) -> None:
    raise StepTimeout("step deadline passed")


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Last resort above the per-call timeouts: SIGALRM interrupts the main thread."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def install_handlers() -> None:
    """(Re)install SIGALRM and SIGTERM handlers, and SIGINT's unless it is ignored (a
    background job): ray.init replaces SIGTERM's, and ray.shutdown resets the C-level
    dispositions while Python still reports its own handlers."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Mismatch(AssertionError):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Mismatch(what)


def run_one(s: R.System, h: Any, w: str, arrays: list[np.ndarray], timeout: float) -> float:
    """Seconds for W1b and W2, microseconds for W5; inputs exist before the clock starts."""
    if w == "W1b":
        s.w1b(h, W1B_N, timeout)  # warm-up, untimed
        times = []
        for _ in range(W1B_BURSTS):
            t0 = time.perf_counter()
            res = s.w1b(h, W1B_N, timeout)
            times.append(time.perf_counter() - t0)
            check(len(res) == W1B_N and res[-1] == W1B_N and res[0] == 1, "W1b results")
        return statistics.median(times)
    if w == "W2":
        gc.collect()
        t0 = time.perf_counter()
        res = s.w2(h, arrays, timeout)
        dt = time.perf_counter() - t0
        if s.sums:
            check(res == [float(k * _tasks.N) for k in range(N_ARRAYS)], "W2 sums")
        return dt
    if w == "W5":
        for _ in range(W5_WARM):
            s.call(h, timeout)
        lat = []
        for _ in range(W5_N):
            t0 = time.perf_counter()
            r = s.call(h, timeout)
            lat.append(time.perf_counter() - t0)
            check(r == 2, "W5 result")
        return statistics.median(lat) * 1e6
    raise ValueError(w)


# --- the loopback check -----------------------------------------------------------------


def _host(local: str) -> str:
    host = local.rsplit(":", 1)[0].strip("[]")
    return host.split("%", 1)[0]  # "127.0.0.53%lo" -> the address


def _is_loopback(host: str) -> bool:
    if host in ("*", ""):
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def listen_check() -> tuple[list[tuple[str, str, str]], list[str]]:
    """`ss -ltnup`: this run's listeners as (proto, host, process name), and the other
    listeners on the machine as 'proto addr:port process', NON-LOOPBACK marked."""
    out = subprocess.run(
        ["ss", "-H", "-ltnup"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    ours = _tree(os.getpid())
    mine, others = [], []
    for line in out.splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        proto, local = f[0], f[4]
        procs = " ".join(f[6:]) if len(f) > 6 else ""
        pids = {int(p) for p in re.findall(r"pid=(\d+)", procs)}
        names = ",".join(sorted(set(re.findall(r'\(\("([^"]+)"', procs)))) or "?"
        host = _host(local)
        if pids & ours:
            mine.append((proto, host, names))
        else:
            others.append(f"{proto} {local} {names}{'' if _is_loopback(host) else ' NON-LOOPBACK'}")
    return mine, others


def describe_listeners(seen: dict[str, dict[tuple[str, str, str], int]]) -> str:
    """Per system: the most listeners seen at one check, grouped by address (ports are
    ephemeral and change every start)."""
    parts = []
    for key, groups in seen.items():
        if not groups:
            parts.append(f"{key}: none")
            continue
        txt = ", ".join(
            f"{n} × {proto} {host} ({names})" + ("" if _is_loopback(host) else " **NON-LOOPBACK**")
            for (proto, host, names), n in sorted(groups.items())
        )
        parts.append(f"{key}: {txt}")
    return "; ".join(parts)


# --- report -------------------------------------------------------------------------------


def versions() -> str:
    vers = []
    for p in ("numpy", "pyzmq", "msgpack", "dask", "distributed", "ray", "shmrunner"):
        try:
            vers.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            vers.append(f"{p} not installed")
    try:
        import zmq

        vers.append(f"libzmq {zmq.zmq_version()}")
    except ImportError:
        pass
    return ", ".join(vers)


def machine() -> list[str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(
        re.search(
            r"MemTotal:\s+(\d+)",  # type: ignore[union-attr]
            Path("/proc/meminfo").read_text(),
        ).group(1)
    )
    import multiprocessing

    try:
        git = ["git", "-C", str(HERE.parent)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "shmrunner"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        rev = f"shmrunner at commit {head}" + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        rev = "shmrunner commit unknown"
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; RAM {mem_kb / 2**20:.1f} GiB; "
        f"{platform.system()} {platform.release()}; {rev}",
        f"Python {platform.python_version()} ({multiprocessing.get_start_method()} start "
        f"method); {versions()}",
    ]


def fmt(w: str, v: float) -> str:
    if w == "W1b":
        return f"{W1B_N / v:,.0f}"
    if w == "W2":
        return f"{W2_BYTES / v / 1e9:.2f}"
    return f"{v:,.0f}"


def cell(w: str, vals: list[float]) -> str:
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    if w == "W1b":  # higher is better: the range reads slowest..fastest rate
        return f"**{fmt(w, med)} tasks/s** ({med:.3f} s) [{fmt(w, hi)}–{fmt(w, lo)}]"
    if w == "W2":
        return f"**{fmt(w, med)} GB/s** ({med:.3f} s) [{fmt(w, hi)}–{fmt(w, lo)}]"
    return f"**{fmt(w, med)} µs** [{fmt(w, lo)}–{fmt(w, hi)}]"


def paired(
    vals: dict[str, dict[str, list[tuple[int, float]]]], w: str, a: str, b: str
) -> list[float]:
    """Per-repetition a/b of values from the same repetition (interleaved, so paired)."""
    bv = dict(vals[w].get(b, []))
    return [v / bv[rep] for rep, v in vals[w].get(a, []) if rep in bv]


def med(vals: dict[str, dict[str, list[tuple[int, float]]]], w: str, k: str) -> float | None:
    xs = [v for _, v in vals[w].get(k, [])]
    return statistics.median(xs) if xs else None


def targets(vals: dict[str, dict[str, list[tuple[int, float]]]]) -> list[str]:
    """The issue's targets as ratios of the medians, with the per-repetition range."""
    rows = []

    def row(
        name: str,
        w: str,
        a: str,
        b: str,
        goal: str,
        conv: Callable[[float], float],
        form: str,
        ok: Callable[[float], bool],
    ) -> None:
        # conv turns a time ratio t_a / t_b into the quantity the target names
        ma, mb = med(vals, w, a), med(vals, w, b)
        if ma is None or mb is None:
            rows.append(f"| {name} | {NA} | {goal} | {NA} |")
            return
        x = conv(ma / mb)
        per = sorted(conv(r) for r in paired(vals, w, a, b))
        rng = f" [{form.format(per[0])} … {form.format(per[-1])}]" if len(per) > 1 else ""
        rows.append(
            f"| {name} | {form.format(x)}{rng} | {goal} | {'met' if ok(x) else '**missed**'} |"
        )

    def inv(r: float) -> float:
        return 1 / r

    def same(r: float) -> float:
        return r

    def pct(r: float) -> float:
        return 100 / r

    def diff(r: float) -> float:
        return (r - 1) * 100

    row(
        "W1b: remote tasks/s ÷ Dask's",
        "W1b",
        "remote",
        "dask",
        "≥ 20×",
        inv,
        "{:.1f}×",
        lambda x: x >= 20,
    )
    row(
        "W1b: remote tasks/s ÷ Ray's",
        "W1b",
        "remote",
        "ray",
        "≥ 5×",
        inv,
        "{:.1f}×",
        lambda x: x >= 5,
    )
    row(
        "W5: remote latency ÷ raw pyzmq round trip",
        "W5",
        "remote",
        "zmq",
        "≤ 3×",
        same,
        "{:.1f}×",
        lambda x: x <= 3,
    )
    row(
        "W5 (issue 9, item 3): --slots latency ÷ raw pyzmq round trip",
        "W5",
        "slots",
        "zmq",
        "≤ 3×",
        same,
        "{:.1f}×",
        lambda x: x <= 3,
    )
    row(
        "W1b (issue 9, item 4): remote tasks/s ÷ Pool(2)'s",
        "W1b",
        "remote",
        "pool",
        "≥ 1×",
        inv,
        "{:.2f}×",
        lambda x: x >= 1,
    )
    row(
        "W1b (issue 9, item 4): --slots tasks/s ÷ Pool(2)'s",
        "W1b",
        "slots",
        "pool",
        "≥ 1×",
        inv,
        "{:.2f}×",
        lambda x: x >= 1,
    )
    row(
        "W2: remote throughput as % of raw pyzmq 64 MiB",
        "W2",
        "remote",
        "zmq",
        "≥ 70 %",
        pct,
        "{:.0f} %",
        lambda x: x >= 70,
    )
    row(
        "W2: remote throughput ÷ Dask's",
        "W2",
        "remote",
        "dask",
        "> 1× (ahead)",
        inv,
        "{:.1f}×",
        lambda x: x > 1,
    )
    row(
        "W1b: Scheduler(local) time vs Pool's",
        "W1b",
        "sched",
        "pool",
        "at most +10 %",
        diff,
        "{:+.0f} %",
        lambda x: x <= 10,
    )
    row(
        "W2: Scheduler(local) time vs Pool's",
        "W2",
        "sched",
        "pool",
        "at most +10 %",
        diff,
        "{:+.0f} %",
        lambda x: x <= 10,
    )
    row(
        "W2: Scheduler(local) throughput ÷ Ray's (one host: shared memory vs object store)",
        "W2",
        "sched",
        "ray",
        "> 1× (beat Ray)",
        inv,
        "{:.1f}×",
        lambda x: x > 1,
    )
    return rows


def report(
    args: argparse.Namespace,
    systems: list[R.System],
    skipped: dict[str, str],
    wl: list[str],
    vals: dict[str, dict[str, list[tuple[int, float]]]],
    errs: dict[str, dict[str, str]],
    loads: list[str],
    seen: dict[str, dict[tuple[str, str, str], int]],
    others: set[str],
    checks: int,
    leftovers: list[str],
) -> str:
    bad = any(not _is_loopback(host) for g in seen.values() for (_, host, _) in g)
    cols = [s.label for s in systems] + list(skipped)
    out = [
        "## Remote tier",
        "",
        *(f"- {m}" for m in machine()),
        f"- {args.reps} timed repetitions after 1 warm-up round; every system started afresh "
        "each repetition (start-up not timed), systems interleaved in rotating order, 2 "
        "worker processes each, all on 127.0.0.1. Cells: **median**, (median time), "
        "[range over repetitions]. GB = 10^9 bytes; W2 moves 16 × 64 MiB = 1.07 GB.",
        f"- Machine shared with other engineers' test runs: 1-min load average "
        f"{loads[0]} at start, {' → '.join(loads[1:-1]) or '-'} at each repetition's start, "
        f"{loads[-1]} at end (the run itself keeps ~2 busy; more means others competed "
        "for the 2 cores).",
        "",
        "| workload | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for w in wl:
        row = []
        for s in systems:
            if s.key in errs[w]:
                row.append(f"error: {errs[w][s.key]}")
            elif vals[w].get(s.key):
                row.append(cell(w, [v for _, v in vals[w][s.key]]))
            else:
                row.append(NA)
        row += ["skipped"] * len(skipped)
        out.append(f"| **{w}** {WORKLOADS[w]} | " + " | ".join(row) + " |")
    out += [
        "",
        "Targets (issue 3), as ratios of the medians above; [range] = the same ratio "
        "computed within each repetition (systems were interleaved, so pairs compare like "
        "with like):",
        "",
        "| target | measured | goal | verdict |",
        "|---|---|---|---|",
        *targets(vals),
        "",
        "Notes:",
        "",
        '- **shmrunner remote**: `Scheduler(local_workers=0, listen="tcp://127.0.0.1:*")` '
        "in the benchmark process, two `python -m shmrunner.cli worker --connect ADDR "
        "--processes 1` agents (each runs its task in a pool process of its own, so a task "
        "crosses the TCP hop and then the agent's shared-memory queue); `submit()` + "
        "`result()`; timing starts once both agents said hello and one task ran. Default "
        "settings: an agent holds at most capacity + prefetch = 2 tasks, and every task is "
        "its own message.",
        "- **prototype (inline)**, when run: the same two agents, but each runs its tasks "
        "in its own loop thread (`bench/_inline_agent.py`: no pool process, no manager "
        "thread, no supervision: no kill on timeout or cancel, a crash takes the agent). "
        "Not a product mode: the ceiling of a task process that holds its own hub "
        "connection (docs/scaling.md, slots).",
        "- **Dask**: `LocalCluster(n_workers=2, threads_per_worker=1, processes=True, "
        'host="127.0.0.1", dashboard_address=None)`; `client.submit(fn, x, pure=False)` '
        "then `wait`/`gather`. W2 passes each array as a `submit` argument, so it travels "
        "inside the task (client → scheduler → worker); scattering first would be another "
        "workload.",
        "- **Ray**: `ray.init(num_cpus=2, include_dashboard=False, "
        '_node_ip_address="127.0.0.1")`, `@ray.remote` tasks. On one host Ray\'s W2 is not a '
        "network transfer: each `.remote(a)` copies the array into the node's shared-memory "
        "object store and the worker reads it in place; its fair comparison is the "
        "Scheduler's local tier, not the remote tier.",
        "- **raw pyzmq** is the loopback limit, not a scheduler: one DEALER pair between this "
        "process and one peer process. W5 = one tiny message echoed at a time (the round "
        "trip); W2 = the 16 arrays sent as 64 MiB frames with `copy=False`, received with "
        "`copy=False` and acked with 8 bytes, the data never touched (no sum); W1b = 5,000 "
        "tiny echoes with up to 256 in flight (a ceiling for pipelined tiny tasks, no target "
        "names it). One TCP stream; the remote tier uses two (one per agent).",
        "- **Scheduler(local_workers=2) vs shmrunner.Pool(2)**: the same single-task shape on "
        "both: `sched.submit(fn, x)` vs `pool.apply_async(fn, (x,))` for every item (W2's "
        "plain arrays are copied into shared memory once per call by both).",
        f"- Loopback check: `ss -ltnup` ran {checks} times, once per system per repetition "
        "while it was up. Most listening sockets seen at once in this run's process tree, "
        "per system: "
        + describe_listeners(seen)
        + (" — **NON-LOOPBACK LISTENER FOUND**" if bad else " — **all on loopback**")
        + ". Listeners of other processes on the machine (not this run's, e.g. other "
        "engineers' test runs): "
        + ("; ".join(sorted(o for o in others if "NON-LOOPBACK" in o)) or "none off loopback")
        + f", and {sum('NON-LOOPBACK' not in o for o in others)} on loopback.",
        "- Leftover processes at the end (killed by the final sweep): "
        + ("; ".join(leftovers) if leftovers else "none")
        + ".",
    ]
    out += [f"- {k} skipped: {why}" for k, why in skipped.items()]
    out.append(
        f"- Command: `bench/.venv/bin/python bench/bench_remote.py {' '.join(sys.argv[1:])}`"
    )
    return "\n".join(out) + "\n"


def write_section(path: Path, section: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(r"^## Remote tier\n.*?(?=^## |\Z)", re.S | re.M)
    new = (
        pat.sub(lambda _: section + "\n", old, count=1)
        if pat.search(old)
        else old.rstrip("\n") + "\n\n" + section
    )
    path.write_text(new)


def sweep() -> list[str]:
    """Kill whatever this process started that is still alive (by pid); name each."""
    left, targets = [], []
    for pid in sorted(_tree(os.getpid()) - {os.getpid()}):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            continue
        if name.startswith("ss ") or "multiprocessing.resource_tracker" in name:
            continue  # resource_tracker: multiprocessing's helper; it exits with this process
        left.append(f"{pid} {name.strip()}")
        targets.append(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if left:
        time.sleep(3)
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument(
        "--systems",
        default="remote,dask,ray,zmq,sched,pool",
        help="remote (shmrunner ZeroMQ tier), dask, ray, zmq (raw pyzmq limit), "
        "sched (Scheduler, local workers), pool (shmrunner.Pool), slots (agents with "
        "--slots), inline (a prototype's "
        "ceiling: agents that run tasks in their own thread, bench/_inline_agent.py)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    args = ap.parse_args()
    wl = [w for w in WORKLOADS if w in args.only.split(",")]
    if unknown := set(args.only.split(",")) - set(WORKLOADS):
        raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")

    install_handlers()
    step = args.timeout + 120.0  # a step may take one call's timeout plus start/stop slack

    systems, skipped = R.load(args.systems.split(","))
    for k, why in skipped.items():
        print(f"note: {k} skipped ({why})", file=sys.stderr)
    arrays = [np.full(_tasks.N, k, dtype=np.float64) for k in range(N_ARRAYS)] if "W2" in wl else []

    vals: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    errs: dict[str, dict[str, str]] = defaultdict(dict)
    loads = [loadavg()]
    seen: dict[str, dict[tuple[str, str, str], int]] = {}
    others: set[str] = set()
    checks = 0
    live: dict[str, tuple[R.System, Any]] = {}
    print(f"load average at start: {loads[0]}", file=sys.stderr, flush=True)
    try:
        for rep in range(args.reps + 1):  # round 0 warms imports, caches, page tables
            if rep:
                loads.append(loadavg())
            print(
                f"rep {rep}{' (warm-up)' if rep == 0 else ''}: load average {loadavg()}",
                file=sys.stderr,
                flush=True,
            )
            shift = rep % len(systems) if systems else 0
            for s in systems[shift:] + systems[:shift]:
                h = None
                try:
                    with deadline(step):
                        h = s.start(args.timeout)
                    live[s.key] = (s, h)
                except Exception as e:
                    traceback.print_exc()
                    for w in wl:
                        errs[w].setdefault(s.key, "start: " + short(e))
                    continue
                finally:
                    install_handlers()
                for w in wl:
                    try:
                        with deadline(step):
                            v = run_one(s, h, w, arrays, args.timeout)
                    except R.Unsupported:
                        continue
                    except Exception as e:
                        traceback.print_exc()
                        errs[w].setdefault(s.key, short(e))
                        continue
                    print(
                        f"  rep {rep} {s.key:6} {w:4} {fmt(w, v):>8} "
                        f"{'tasks/s' if w == 'W1b' else 'GB/s' if w == 'W2' else 'µs'}"
                        f"  ({v:.4f})",
                        file=sys.stderr,
                        flush=True,
                    )
                    if rep > 0:
                        vals[w][s.key].append((rep, v))
                try:
                    m, o = listen_check()
                    checks += 1
                    others.update(o)
                    groups = seen.setdefault(s.key, {})
                    for g in set(m):
                        groups[g] = max(groups.get(g, 0), m.count(g))
                    bad = [f"{p} {host} {n}" for p, host, n in m if not _is_loopback(host)]
                    print(
                        f"  listen check ({s.key} up): {len(m)} listeners of this run, "
                        f"{'NON-LOOPBACK: ' + '; '.join(bad) if bad else 'all on loopback'}",
                        file=sys.stderr,
                        flush=True,
                    )
                except Exception as e:
                    print(f"  listen check failed: {short(e)}", file=sys.stderr)
                try:
                    with deadline(step):
                        s.stop(h)
                except Exception:
                    traceback.print_exc()
                    try:
                        with deadline(60):
                            s.stop(h, kill=True)
                    except Exception:
                        traceback.print_exc()
                live.pop(s.key, None)
                install_handlers()
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: stopping every system", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s, h in live.values():
            try:
                with deadline(30):
                    s.stop(h, kill=True)
            except BaseException:
                traceback.print_exc()
        left = sweep()
        print(f"killed leftovers: {left or 'none'}", file=sys.stderr)
        raise SystemExit(130) from None
    loads.append(loadavg())
    leftovers = sweep()
    section = report(args, systems, skipped, wl, vals, errs, loads, seen, others, checks, leftovers)
    print(section)
    write_section(args.out, section)
    print(f"(written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
