"""Local-tier benchmark: shmrunner.Pool against its peers, interleaved in one run.

python bench/bench_local.py [--reps 5] [--only W2,W3] [--systems mp,shmrunner]
                            [--out bench/RESULTS.md] [--timeout 300]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # so `_tasks` and `systems` import here and in spawned workers

import numpy as np  # noqa: E402
import systems as S  # noqa: E402

import _tasks  # noqa: E402
from shmrunner import _hugepages  # noqa: E402

N_ARRAYS = 16
W1_N, W1B_N, W5_N, W5_WARM = 20_000, 5_000, 2_000, 100

WORKLOADS: dict[str, str] = {
    "W1": "tiny map: map(inc, range(20000)), default chunking",
    "W1b": "5,000 single submits, then collect all",
    "W2": "16 x 64 MiB float64 in, worker returns a.sum()",
    "W2s": "W2 with inputs already in shared memory (ratio vs mp W2)",
    "W3": "16 x 64 MiB float64 out (np.full)",
    "W4": "round trip: 16 x 64 MiB in, a += 1, returned",
    "W5": "single-task latency: apply(inc, (1,)), median per call",
    "W6": "pool start + one tiny task + close/join",
}
NA = "n/a"


def short(e: BaseException) -> str:
    """One table-safe line for a cell."""
    return f"{type(e).__name__}: {e}"[:120].replace("|", "/").replace("\n", " ")


class Mismatch(AssertionError):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Mismatch(what)


def run_one(s: S.System, h: Any, w: str, arrays: list[np.ndarray], timeout: float) -> float | str:
    """Seconds for one workload (µs for W5); inputs are prepared before the clock starts."""
    if w in ("W2", "W2s", "W4"):
        inputs = s.wrap(arrays) if w != "W2s" else s.share(arrays)
        if inputs is None:
            return NA
        fn = _tasks.add_one if w == "W4" else _tasks.array_sum
        gc.collect()
        t0 = time.perf_counter()
        res = s.map(h, fn, inputs, timeout)
        if w == "W4":
            check(all(float(r[0]) == k + 1 for k, r in enumerate(res)), "W4 values")
        else:
            check(res == [float(k * _tasks.N) for k in range(N_ARRAYS)], "W2 sums")
        return time.perf_counter() - t0
    if w == "W3":
        gc.collect()
        t0 = time.perf_counter()
        res = s.map(h, s.make_fn, range(N_ARRAYS), timeout)
        check(all(float(r[0] + r[-1]) == 2 * k for k, r in enumerate(res)), "W3 values")
        return time.perf_counter() - t0
    if w in ("W1", "W1b"):
        n = W1_N if w == "W1" else W1B_N
        op = s.map if w == "W1" else s.submit_all
        t0 = time.perf_counter()
        res = op(h, _tasks.inc, range(n), timeout)
        dt = time.perf_counter() - t0
        check(len(res) == n and res[-1] == n, f"{w} results")
        return dt
    if w == "W5":
        for _ in range(W5_WARM):
            s.call(h, _tasks.inc, 1, timeout)
        lat = []
        for _ in range(W5_N):
            t0 = time.perf_counter()
            r = s.call(h, _tasks.inc, 1, timeout)
            lat.append(time.perf_counter() - t0)
            check(r == 2, "W5 result")
        return statistics.median(lat) * 1e6
    raise ValueError(w)


def pipe_floor(n: int = W5_N) -> float:
    """Median microseconds for a tiny message's round trip over a raw Pipe: the floor under W5."""
    parent, child = multiprocessing.Pipe()
    p = multiprocessing.Process(target=_tasks.pipe_echo, args=(child,), daemon=True)
    p.start()
    try:
        for _ in range(W5_WARM):
            parent.send(1)
            parent.recv()
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            parent.send(1)
            parent.recv()
            lat.append(time.perf_counter() - t0)
        return statistics.median(lat) * 1e6
    finally:
        parent.send(None)
        p.join(10)


def copy_floor(arrays: list[np.ndarray]) -> float:
    """Seconds to allocate fresh memory for ``arrays`` and copy them into it on
    one thread (page faults + memcpy): what any one-copy system pays at least,
    unless it reuses populated pages or copies on several threads."""
    gc.collect()
    t0 = time.perf_counter()
    copies = []
    for a in arrays:
        b = np.empty_like(a)
        np.copyto(b, a)
        copies.append(b)
    dt = time.perf_counter() - t0
    del copies
    return dt


def _read_shared(conn: Any, fds: list[int], nbytes: int) -> None:
    """A reader process of :func:`shared_read_floor`: on each "go", map, sum and
    unmap its memfds, then send the sums."""
    import mmap

    while conn.recv():
        sums = []
        for fd in fds:
            with mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
                a = np.frombuffer(m, dtype=np.float64)
                sums.append(float(a.sum()))
                del a
        conn.send(sums)


def shared_read_floor(arrays: list[np.ndarray], rounds: int = 3) -> float:
    """Seconds for 2 processes, already running and holding the arrays' memfds,
    to map, sum and unmap 8 of the 16 each: W2s's work with nothing between the
    caller and the readers but one pipe message (median of ``rounds``). The
    memfds get huge pages wherever shmrunner's segments would (``_hugepages``)."""
    fds = []
    for a in arrays:
        fd = os.memfd_create("w2s-floor")
        os.ftruncate(fd, a.nbytes)
        _hugepages.populate(fd, a.nbytes, a.nbytes)
        view, done = memoryview(a).cast("B"), 0
        while done < a.nbytes:
            done += os.pwrite(fd, view[done:], done)
        fds.append(fd)
    ctx = multiprocessing.get_context("fork")
    links, procs = [], []
    try:
        for k in range(S.WORKERS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_read_shared, daemon=True,
                            args=(child, fds[k :: S.WORKERS], arrays[0].nbytes))
            p.start()
            links.append(parent)
            procs.append(p)
        times = []
        for _ in range(rounds + 1):  # the first round warms the readers
            gc.collect()
            t0 = time.perf_counter()
            for c in links:
                c.send(True)
            sums = [c.recv() for c in links]
            times.append(time.perf_counter() - t0)
            check(sorted(x for part in sums for x in part)
                  == [float(k * _tasks.N) for k in range(N_ARRAYS)], "W2s floor sums")
        return statistics.median(times[1:])
    finally:
        for c in links:
            c.send(False)
        for p in procs:
            p.join(10)
        for fd in fds:
            os.close(fd)


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(d))
    seen, todo = {root}, [root]
    while todo:
        for c in children[todo.pop()]:
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def settle(before: set[int], deadline: float = 30.0) -> None:
    """Wait until the processes a system started (``before``: this process's
    tree while it ran) are gone, so that one system's teardown (Ray's takes
    seconds) is not charged to the system measured next."""
    end = time.monotonic() + deadline
    alive = before - {os.getpid()}
    while alive and time.monotonic() < end:
        alive = {p for p in alive if _running(p)}
        if alive:
            time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def order(systems: list[S.System], rep: int) -> list[S.System]:
    """The systems' order in round ``rep``: rotated, and reversed every other
    round, so each system follows each other one (a plain rotation keeps the
    cyclic order: the same system would always run right after Ray)."""
    shift = rep % len(systems) if systems else 0
    rotated = systems[shift:] + systems[:shift]
    return rotated[::-1] if rep % 2 == 0 else rotated


def listeners() -> list[str]:
    """TCP/UDP sockets listening in this process or its workers, as 'proto addr:port pid'."""
    owner: dict[str, int] = {}
    for pid in _tree(os.getpid()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if m:
                    owner[m.group(1)] = pid
        except OSError:
            continue
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] not in owner or (proto.startswith("tcp") and f[3] != "0A"):
                continue
            hexaddr, port = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc/net prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            mapped = getattr(addr, "ipv4_mapped", None)
            loop = addr.is_loopback or (mapped is not None and mapped.is_loopback)
            found.append(
                f"{proto} {addr}:{int(port, 16)} pid {owner[f[9]]}{'' if loop else ' NON-LOOPBACK'}"
            )
    return found


def machine() -> list[str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    vers = []
    for p in ("numpy", "torch", "joblib", "shmrunner"):
        try:
            vers.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            vers.append(f"{p} not installed")
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; RAM {mem_kb / 2**20:.1f} GiB; "
        # Under within_size/always (or advise, asked for) memfds get 2 MiB pages:
        # the W2s limit moves about threefold. /dev/shm (torch, Ray) has its own.
        f"shmem huge pages: {_hugepages.policy()}",
        f"Python {platform.python_version()} ({multiprocessing.get_start_method()} start method); "
        + ", ".join(vers),
    ]


def cell(w: str, vals: list[float], base: list[float] | None) -> str:
    med = statistics.median(vals)
    if w == "W5":
        txt = f"{med:.0f} µs"
    elif w == "W1b":
        txt = f"{med:.3f} s ({W1B_N / med / 1e3:.1f}k tasks/s)"
    else:
        txt = f"{med:.3f} s"
    if base is None:
        return txt
    r = med / statistics.median(base)
    rel = "same" if 0.95 <= r <= 1.05 else (f"{1 / r:.1f}x faster" if r < 1 else f"{r:.1f}x slower")
    return f"{txt}, ×{r:.2f} = {rel}"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def report(
    args: argparse.Namespace,
    systems: list[S.System],
    skipped: dict[str, str],
    wl: list[str],
    vals: dict[str, dict[str, list[float]]],
    errs: dict[str, dict[str, str]],
    floor: list[float],
    heard: set[str],
    load0: str,
    copies: list[float] | None = None,
    reads: list[float] | None = None,
) -> str:
    cols = [s.label for s in systems] + [k for k in skipped]
    out = [
        "## Local tier",
        "",
        *(f"- {m}" for m in machine()),
        f"- {args.reps} timed repetitions after 1 warm-up round, systems interleaved in rotating "
        "order, "
        f"{S.WORKERS} workers each; medians. Ratio = system time / multiprocessing.Pool time "
        f"(below 1 is faster). 1-min load average {load0} at start, {loadavg()} at end "
        "(the run itself adds ~1-2; more means something else competed for the 2 cores).",
        "",
        "| workload | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for w in wl:
        base = vals[w if w != "W2s" else "W2"].get("mp")
        row = []
        for s in systems:
            if s.key in errs[w]:
                row.append(f"error: {errs[w][s.key]}")
            elif vals[w].get(s.key):
                row.append(cell(w, vals[w][s.key], None if s.key == "mp" and w != "W2s" else base))
            else:
                row.append(NA)
        row += ["skipped"] * len(skipped)
        out.append(f"| **{w}** {WORKLOADS[w]} | " + " | ".join(row) + " |")
    if copies and "W2" in wl:
        lim = statistics.median(copies)
        row = [f"W2 = ×{statistics.median(vals['W2'][s.key]) / lim:.2f} of the limit"
               if vals["W2"].get(s.key) else NA for s in systems] + ["skipped"] * len(skipped)
        out.append(f"| **W2 limit** allocate + copy the same bytes once: {lim:.3f} s | "
                   + " | ".join(row) + " |")
    if reads and "W2s" in wl:
        lim = statistics.median(reads)
        mp_w2 = vals["W2"].get("mp")
        ceiling = f", at most {statistics.median(mp_w2) / lim:.1f}x mp's W2" if mp_w2 else ""
        row = [f"W2s = ×{statistics.median(vals['W2s'][s.key]) / lim:.2f} of the limit"
               if vals["W2s"].get(s.key) else NA for s in systems] + ["skipped"] * len(skipped)
        out.append(f"| **W2s limit** 2 running processes map, sum, unmap the shared inputs: "
                   f"{lim:.3f} s{ceiling} | " + " | ".join(row) + " |")
    out.append("")
    if floor:
        out.append(
            f"- W5 floor: raw `multiprocessing.Pipe` round trip of a tiny message: "
            f"{statistics.median(floor):.0f} µs (median)."
        )
    if copies:
        out.append(
            f"- W2 limit: allocating fresh memory for the 16 x 64 MiB inputs and copying them "
            f"once on one thread: {statistics.median(copies):.3f} s (median)."
        )
    if reads:
        out.append(
            f"- W2s limit: two processes, started and holding the 16 inputs' memfds, each "
            f"map, sum and unmap 8 of them on one pipe message: {statistics.median(reads):.3f} s "
            "(median). No system doing W2s in fresh mappings can beat it, so mp's W2 divided "
            "by it is the highest W2s ratio this run allowed."
        )
    out += [f"- {k} skipped: {why}" for k, why in skipped.items()]
    out.append(
        "- joblib has no single submit: W1b and W5 go through "
        "`Parallel(...)(delayed(inc)(i) ...)`, which batches (batch_size='auto'); "
        "its W4 task copies the read-only memmap before `a += 1`."
    )
    out.append(
        "- Ray: `f.remote(a)` on `ray.init(num_cpus=2)`; W2s passes `ray.put(a)` references; "
        "its W4 task copies the read-only object-store array before `a += 1`, as joblib's."
    )
    out.append(
        "- torch: W2/W4 pass fresh `torch.from_numpy` tensors (pickling moves them into shared "
        "memory once); W2s uses `.share_memory_()` first; W3 workers return "
        "`torch.from_numpy(...)`; workers run "
        "`torch.set_num_threads(1)` (forked libgomp deadlocks otherwise)."
    )
    non_loop = [h for h in heard if "NON-LOOPBACK" in h]
    out.append(
        "- Listening sockets opened by the run: "
        + ("; ".join(sorted(heard)) if heard else "none")
        + (" — **non-loopback listener found**" if non_loop else "")
        + "."
    )
    out.append(f"- Command: `python bench/bench_local.py {' '.join(sys.argv[1:])}`")
    return "\n".join(out) + "\n"


def write_section(path: Path, section: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(r"^## Local tier\n.*?(?=^## |\Z)", re.S | re.M)
    new = (
        pat.sub(lambda _: section + "\n", old, count=1)
        if pat.search(old)
        else old.rstrip("\n") + "\n\n" + section
    )
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--systems", default="mp,ppe,torch,joblib,ray,shmrunner")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per pool call")
    args = ap.parse_args()
    wl = [w for w in WORKLOADS if w in args.only.split(",")]
    if unknown := set(args.only.split(",")) - set(WORKLOADS):
        raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
    systems, skipped = S.load(args.systems.split(","))
    for k, why in skipped.items():
        print(f"note: {k} skipped ({why})", file=sys.stderr)

    arrays = (
        [np.full(_tasks.N, k, dtype=np.float64) for k in range(N_ARRAYS)]
        if {"W2", "W2s", "W4"} & set(wl)
        else []
    )
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    errs: dict[str, dict[str, str]] = defaultdict(dict)
    floor: list[float] = []
    copies: list[float] = []
    reads: list[float] = []
    heard: set[str] = set()
    load0 = loadavg()

    def record(rep: int, w: str, s: S.System, f: Callable[[], float | str]) -> None:
        try:
            v = f()
        except Exception as e:
            traceback.print_exc()
            errs[w].setdefault(s.key, short(e))
            raise
        print(
            f"  rep {rep}{' (warm-up)' if rep == 0 else ''} {s.key:9} {w:4} "
            f"{v if isinstance(v, str) else f'{v:.4f}'}",
            file=sys.stderr,
            flush=True,
        )
        if rep > 0 and not isinstance(v, str):
            vals[w][s.key].append(v)

    for rep in range(args.reps + 1):  # round 0 warms caches, imports and page tables; not counted
        for s in order(systems, rep):
            if "W6" in wl:

                def lifecycle(s: S.System = s) -> float:
                    t0 = time.perf_counter()
                    h = s.start(args.timeout)
                    started = _tree(os.getpid())
                    s.stop(h)
                    elapsed = time.perf_counter() - t0
                    settle(started)
                    return elapsed

                try:
                    record(rep, "W6", s, lifecycle)
                except Exception:
                    pass
            h = None
            for w in (w for w in wl if w != "W6"):
                try:
                    if h is None:
                        h = s.start(args.timeout)
                    record(rep, w, s, partial(run_one, s, h, w, arrays, args.timeout))
                except Exception as e:
                    errs[w].setdefault(s.key, short(e))
                    if h is not None:
                        try:
                            s.stop(h, kill=True)
                        except Exception:
                            traceback.print_exc()
                    h = None  # a fresh pool for the next workload
            if h is not None:
                heard.update(listeners())  # while this system's workers are alive
                started = _tree(os.getpid())
                try:
                    s.stop(h)
                except Exception:
                    traceback.print_exc()
                settle(started)
        if "W5" in wl and rep > 0:
            floor.append(pipe_floor())
        if arrays and rep > 0:
            copies.append(copy_floor(arrays))
        if "W2s" in wl and rep > 0:
            reads.append(shared_read_floor(arrays))

    section = report(args, systems, skipped, wl, vals, errs, floor, heard, load0, copies, reads)
    print(section)
    write_section(args.out, section)
    print(f"(written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
