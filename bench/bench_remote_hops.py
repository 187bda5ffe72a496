"""Where one remote round trip (W5 through the Scheduler's remote tier) spends its time.

A diagnostic, not a comparison: it wraps three private methods of the remote
tier and the ZeroMQ channel in this process only (nothing in the package is
changed) to stamp each call at four points, and reads every thread's CPU time
from /proc (schedstat: nanoseconds actually run), so the figures hold on a
loaded machine better than wall-clock rates do:

    submit() returns ......... the caller's submit, up to its own send
    task sent -> result read . the hop to the worker and back: the network,
                               the worker's receive, run and reply, the hub's
                               wake-up and read (the part raw pyzmq also pays)
    result handled ........... the hub's decode, bookkeeping and settle
    settled -> caller awake .. the Future's wake-up of the waiting caller

plus who sent each task (the caller through the socket gate, or the hub
thread), and a raw pyzmq DEALER round trip of a small message in the same run.

python bench/bench_remote_hops.py [--calls 3000] [--reps 3] [--no-slots]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_local import loadavg  # noqa: E402

import _tasks  # noqa: E402
from shmrunner import Scheduler  # noqa: E402
from shmrunner.tiers import remote as _remote  # noqa: E402
from shmrunner.transport import zmqchannel as _zmqchannel  # noqa: E402

_stamps: dict[str, float] = {}
_senders: Counter[str] = Counter()


def _instrument() -> None:
    result, start, send = (_remote.RemoteTier._result, _remote.RemoteTier.start,
                           _zmqchannel.ZmqChannel._send)

    def stamped_result(self: Any, *args: Any, **kwargs: Any) -> Any:
        _stamps["read"] = time.perf_counter()
        try:
            return result(self, *args, **kwargs)
        finally:
            _stamps["settled"] = time.perf_counter()

    def stamped_start(self: Any, jobs: Any) -> Any:
        try:
            return start(self, jobs)
        finally:
            _stamps.setdefault("sent", time.perf_counter())

    def counted_send(self: Any, msg: Any, *args: Any) -> Any:
        if msg.type in ("task", "tasks"):
            _senders[threading.current_thread().name] += 1
            _stamps["sent"] = time.perf_counter()
        return send(self, msg, *args)

    _remote.RemoteTier._result = stamped_result  # type: ignore[method-assign]
    _remote.RemoteTier.start = stamped_start  # type: ignore[method-assign]
    _zmqchannel.ZmqChannel._send = counted_send  # type: ignore[method-assign]


def _runtime(tid: int | str) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def _tree_runtime(pid: int) -> int:
    """Nanoseconds run by ``pid`` and its descendants (their threads too)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    for child in os.popen(f"pgrep -P {pid}").read().split():
        total += _tree_runtime(int(child))
    return total


def _one_run(calls: int, slots: bool) -> dict[str, float]:
    sched = Scheduler(local_workers=0, listen="tcp://127.0.0.1:*")
    args = [sys.executable, "-m", "shmrunner.cli", "worker", "--connect", str(sched.address),
            "--processes", "1", "--log-level", "ERROR"] + (["--slots"] if slots else [])
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}"}
    agents = [subprocess.Popen(args, env=env) for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(sched.status()["workers"]) < (4 if slots else 2):
            if time.monotonic() > deadline:
                raise RuntimeError("the agents did not join")
            time.sleep(0.05)
        for _ in range(300):
            sched.submit(_tasks.inc, 1).result(10)
        names = {str(t.native_id): t.name for t in threading.enumerate()}
        tids = os.listdir("/proc/self/task")
        before = {tid: _runtime(tid) for tid in tids}
        agents_before = sum(_tree_runtime(a.pid) for a in agents)
        _senders.clear()
        parts: list[tuple[float, ...]] = []
        for _ in range(calls):
            _stamps.clear()
            t0 = time.perf_counter()
            future = sched.submit(_tasks.inc, 1)
            t1 = time.perf_counter()
            future.result(10)
            t2 = time.perf_counter()
            parts.append((t1 - t0, _stamps["read"] - _stamps["sent"],
                          _stamps["settled"] - _stamps["read"], t2 - _stamps["settled"], t2 - t0))
        out = {name: statistics.median(c) * 1e6 for name, c in zip(
            ("submit", "sent->read", "handled", "->caller", "total"), zip(*parts, strict=True),
            strict=True)}
        for tid in tids:
            name = names.get(tid, "zmq I/O")
            name = {"MainThread": "caller", "shmrunner-hub": "hub"}.get(name, "zmq I/O")
            out[f"cpu {name}"] = out.get(f"cpu {name}", 0.0) + (
                _runtime(tid) - before[tid]) / calls / 1e3
        out["cpu agents+workers"] = (sum(_tree_runtime(a.pid) for a in agents)
                                     - agents_before) / calls / 1e3
        out["sent by the caller %"] = 100 * _senders["MainThread"] / max(1, sum(_senders.values()))
        return out
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(10)
        sched.shutdown()


def _zmq_round_trip(calls: int) -> float:
    """Median µs of a raw pyzmq DEALER -> echo -> DEALER round trip (bench_remote's zmq peer)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    echo = subprocess.Popen([sys.executable, "-c", (
        "import sys, zmq\n"
        "s = zmq.Context().socket(zmq.DEALER); s.connect(sys.argv[1])\n"
        "while (m := s.recv_multipart()) != [b'stop']: s.send_multipart(m)\n"),
        f"tcp://127.0.0.1:{port}"])
    try:
        for _ in range(300):
            sock.send_multipart([b"x" * 40])
            sock.recv_multipart()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            sock.send_multipart([b"x" * 40])
            sock.recv_multipart()
            times.append(time.perf_counter() - t0)
        sock.send_multipart([b"stop"])
        echo.wait(10)
        return statistics.median(times) * 1e6
    finally:
        if echo.poll() is None:
            echo.kill()
        sock.close(linger=0)
        ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-slots", action="store_true", help="default agents, not --slots")
    opts = parser.parse_args()
    _instrument()
    print(f"load {loadavg()}; {opts.calls} calls x {opts.reps} reps, "
          f"{'default agents' if opts.no_slots else 'agents with --slots'}, medians")
    runs, raw = [], []
    for _ in range(opts.reps):  # interleaved with the raw round trip
        runs.append(_one_run(opts.calls, not opts.no_slots))
        raw.append(_zmq_round_trip(opts.calls))
    keys = list(runs[0])
    for key in keys:
        values = [run.get(key, 0.0) for run in runs]
        unit = "" if key.endswith("%") else " µs"
        print(f"  {key:22s} {statistics.median(values):8.1f}{unit}   "
              f"[{min(values):.1f} - {max(values):.1f}]")
    zmq_rtt = statistics.median(raw)
    total = statistics.median(run["total"] for run in runs)
    print(f"  {'raw pyzmq round trip':22s} {zmq_rtt:8.1f} µs   [{min(raw):.1f} - {max(raw):.1f}]")
    print(f"  total / raw: {total / zmq_rtt:.2f}x; sent->read / raw: "
          f"{statistics.median(run['sent->read'] for run in runs) / zmq_rtt:.2f}x; "
          f"load {loadavg()}")


if __name__ == "__main__":
    main()
