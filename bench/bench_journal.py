"""What the daemon's journal can write: jobs per second by group size, and
spilled array bytes per second against the disk's own write + fsync limit.

The daemon commits every job that arrived in one poll round in one
transaction; the group size is therefore how many jobs one round carries.
This measures the journal alone (no sockets, no workers), so its numbers are
a ceiling for one daemon's accept-and-settle rate, independent of the front
thread's other work.

    python bench/bench_journal.py [--dir /tmp] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from shmrunner._journal import Journal

TINY = [b"\x93\xa6submit\xa3inc\x01"]  # about the size of a tiny job's header frame


def jobs_per_second(directory: str, group: int, total: int) -> float:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        journal = Journal(Path(tmp) / "j.sqlite")
        try:
            t0 = time.perf_counter()
            n = 0
            while n < total:
                ids = [f"job-{n + i}" for i in range(group)]
                journal.add([(job_id, list(TINY)) for job_id in ids])
                journal.finish([(job_id, True, list(TINY)) for job_id in ids])
                n += group
            return n / (time.perf_counter() - t0)
        finally:
            journal.close()


def spill_seconds(directory: str, count: int, size: int) -> float:
    payload = os.urandom(1 << 20) * (size >> 20)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        journal = Journal(Path(tmp) / "j.sqlite")
        try:
            t0 = time.perf_counter()
            for i in range(count):
                journal.add([(f"arr-{i}", [b"hdr", memoryview(payload)])])
            return time.perf_counter() - t0
        finally:
            journal.close()


def raw_write_seconds(directory: str, count: int, size: int) -> float:
    """The disk's limit for the same bytes: write each file once, fsync it and its directory."""
    payload = os.urandom(1 << 20) * (size >> 20)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        t0 = time.perf_counter()
        for i in range(count):
            fd = os.open(os.path.join(tmp, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the journal lives")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    groups = (1, 10, 100, 1000)
    rates: dict[int, list[float]] = {g: [] for g in groups}
    spill: list[float] = []
    raw: list[float] = []
    count, size = 16, 64 << 20
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for g in groups:
            r = jobs_per_second(args.dir, g, total=max(2000, 20 * g))
            if rep:
                rates[g].append(r)
        s, w = spill_seconds(args.dir, count, size), raw_write_seconds(args.dir, count, size)
        if rep:
            spill.append(s)
            raw.append(w)
    print(f"journal in {args.dir}; {args.reps} repetitions after one warm-up; medians [range]")
    print()
    print("| jobs per transaction | jobs/s (journaled and finished) |")
    print("|---|---|")
    for g in groups:
        r = rates[g]
        print(f"| {g} | {statistics.median(r):,.0f} [{min(r):,.0f}-{max(r):,.0f}] |")
    gb = count * size / 1e9
    ms, mw = statistics.median(spill), statistics.median(raw)
    print()
    print(f"| {count} x {size >> 20} MiB spilled | seconds | GB/s |")
    print("|---|---|---|")
    print(f"| journal (spill file + fsync + row) | {ms:.3f} | {gb / ms:.2f} |")
    print(f"| disk limit (write + fsync each file) | {mw:.3f} | {gb / mw:.2f} |")
    print(f"| journal / limit | x{ms / mw:.2f} | |")


if __name__ == "__main__":
    main()
