"""Adapters for the remote-tier benchmark: the same three operations (W1b, W2, W5)
over shmrunner's ZeroMQ tier, Dask distributed, Ray, raw pyzmq, and the
Scheduler's local tier next to shmrunner.Pool. Two workers each, 127.0.0.1 only.

Every adapter: ``start(timeout) -> handle`` (workers up, one tiny task run, never
timed), ``stop(handle, kill=False)``, and the workloads it supports:
``w1b(h, n, timeout)``, ``w2(h, arrays, timeout)``, ``call(h, timeout)`` (W5:
one ``inc(1)`` round trip). Every wait has a timeout.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import _tasks

HERE = Path(__file__).resolve().parent
WORKERS = 2
LOOPBACK = "127.0.0.1"


class Unsupported(Exception):
    """The system has no like-for-like form of this workload (an n/a cell)."""


def child_argv(argv: list[str]) -> list[str]:
    """Prefix a command so the child gets SIGTERM if this process dies (even by
    SIGKILL), when util-linux's setpriv is there: no orphaned agents or peers."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *argv] if setpriv else argv


def stop_process(p: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the child's process group (it was started in a session of its own,
    so its pool processes are in it too), then SIGKILL after ``grace`` seconds."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if p.poll() is not None:
            break
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader (pool processes mid-exit): make sure.
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class System:
    key = ""
    label = ""
    sums = True  # w2 returns the arrays' sums (raw pyzmq returns byte counts, checked itself)

    def start(self, timeout: float) -> Any:
        raise NotImplementedError

    def stop(self, h: Any, kill: bool = False) -> None:
        raise NotImplementedError

    def w1b(self, h: Any, n: int, timeout: float) -> list[Any]:
        raise Unsupported

    def w2(self, h: Any, arrays: Sequence[np.ndarray], timeout: float) -> list[Any]:
        raise Unsupported

    def call(self, h: Any, timeout: float) -> Any:
        raise Unsupported


# --- shmrunner -------------------------------------------------------------------------


class _Executor(System):
    """Anything with ``submit(fn, *args) -> concurrent.futures.Future``."""

    def ex(self, h: Any) -> Any:
        return h

    def w1b(self, h: Any, n: int, timeout: float) -> list[Any]:
        h = self.ex(h)
        futures = [h.submit(_tasks.inc, i) for i in range(n)]
        deadline = time.monotonic() + timeout
        return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]

    def w2(self, h: Any, arrays: Sequence[np.ndarray], timeout: float) -> list[Any]:
        h = self.ex(h)
        futures = [h.submit(_tasks.array_sum, a) for a in arrays]
        deadline = time.monotonic() + timeout
        return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]

    def call(self, h: Any, timeout: float) -> Any:
        return self.ex(h).submit(_tasks.inc, 1).result(timeout)


class ShmRemote(_Executor):
    """Scheduler(local_workers=0) + two `shmrunner worker --processes 1` agents."""

    key, label = "remote", "shmrunner remote (2 agents x 1 proc)"
    agent = ["-m", "shmrunner.cli", "worker"]
    joined = WORKERS  # workers in the scheduler's status once every agent is up

    def __init__(self) -> None:
        import shmrunner

        self.mod = shmrunner

    def start(self, timeout: float) -> Any:
        sched = self.mod.Scheduler(local_workers=0, listen=f"tcp://{LOOPBACK}:*")
        h = (sched, [])
        try:
            addr = sched.address
            if not addr or not addr.startswith(f"tcp://{LOOPBACK}:"):
                raise RuntimeError(f"scheduler bound {addr!r}, not loopback")
            for i in range(WORKERS):
                h[1].append(
                    subprocess.Popen(
                        child_argv(
                            [
                                sys.executable,
                                *self.agent,
                                "--connect",
                                addr,
                                "--processes",
                                "1",
                                "--name",
                                f"bench-agent-{i}",
                            ]
                        ),
                        start_new_session=True,
                        stdin=subprocess.DEVNULL,
                    )
                )
            deadline = time.monotonic() + min(timeout, 60.0)
            while len(sched.status()["workers"]) < self.joined:
                dead = [p.args for p in h[1] if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"worker agent exited during start-up: {dead[0]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"only {len(sched.status()['workers'])} of {WORKERS} agents said hello"
                    )
                time.sleep(0.02)
            sched.submit(_tasks.inc, 0).result(timeout)
        except BaseException:
            self.stop(h, kill=True)
            raise
        return h

    def stop(self, h: Any, kill: bool = False) -> None:
        sched, procs = h
        try:
            if kill:
                # Agents first: with them gone every held task fails (heartbeat
                # timeout), so the scheduler's own shutdown cannot wait forever.
                for p in procs:
                    stop_process(p, grace=2.0)
                sched.shutdown(wait=False, cancel_futures=True)
            else:
                sched.shutdown(wait=True)
        finally:
            for p in procs:
                stop_process(p)

    def ex(self, h: Any) -> Any:
        return h[0]


class ShmInline(ShmRemote):
    """A prototype's ceiling, not a product: the same, with agents that run each
    task in their own loop thread (bench/_inline_agent.py: no pool process, no
    supervision), i.e. what removing the agent -> pool process hop can buy."""

    key, label = "inline", "prototype: tasks run in the agent (no pool process)"
    agent = [str(HERE / "_inline_agent.py")]


class ShmSlots(ShmRemote):
    """The same agents with ``--slots``: each pool process holds its own
    connection to the scheduler, the agent supervises (worker/_slots.py)."""

    key, label = "slots", "shmrunner remote, agents with --slots (2 x 1 slot)"
    agent = ["-m", "shmrunner.cli", "worker", "--slots"]
    joined = 2 * WORKERS  # each agent and its slot


class ShmLocal(_Executor):
    key, label = "sched", "Scheduler(local_workers=2)"

    def __init__(self) -> None:
        import shmrunner

        self.mod = shmrunner

    def start(self, timeout: float) -> Any:
        sched = self.mod.Scheduler(local_workers=WORKERS)
        try:
            sched.submit(_tasks.inc, 0).result(timeout)
        except BaseException:
            self.stop(sched, kill=True)
            raise
        return sched

    def stop(self, h: Any, kill: bool = False) -> None:
        if kill:
            h.shutdown(wait=False, cancel_futures=True)
        else:
            h.shutdown(wait=True)


class ShmPool(System):
    """shmrunner.Pool(2) through apply_async: the same single-task shape as submit."""

    key, label = "pool", "shmrunner.Pool(2)"

    def __init__(self) -> None:
        import shmrunner

        self.mod = shmrunner

    def start(self, timeout: float) -> Any:
        pool = self.mod.Pool(WORKERS)
        try:
            pool.apply_async(_tasks.inc, (0,)).get(timeout)
        except BaseException:
            self.stop(pool, kill=True)
            raise
        return pool

    def stop(self, h: Any, kill: bool = False) -> None:
        h.terminate() if kill else h.close()
        h.join()

    def w1b(self, h: Any, n: int, timeout: float) -> list[Any]:
        pending = [h.apply_async(_tasks.inc, (i,)) for i in range(n)]
        deadline = time.monotonic() + timeout
        return [r.get(max(0.0, deadline - time.monotonic())) for r in pending]

    def w2(self, h: Any, arrays: Sequence[np.ndarray], timeout: float) -> list[Any]:
        pending = [h.apply_async(_tasks.array_sum, (a,)) for a in arrays]
        deadline = time.monotonic() + timeout
        return [r.get(max(0.0, deadline - time.monotonic())) for r in pending]

    def call(self, h: Any, timeout: float) -> Any:
        return h.apply_async(_tasks.inc, (1,)).get(timeout)


# --- peers -----------------------------------------------------------------------------


class Dask(System):
    key, label = "dask", "Dask distributed"

    def __init__(self) -> None:
        import distributed  # noqa: F401  (fail here, as "skipped", if absent)

    def start(self, timeout: float) -> Any:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            host=LOOPBACK,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = None
        try:
            client = Client(cluster, timeout=timeout)
            client.wait_for_workers(WORKERS, timeout=timeout)
            client.submit(_tasks.inc, 0, pure=False).result(timeout)
        except BaseException:
            self.stop((cluster, client), kill=True)
            raise
        return cluster, client

    def stop(self, h: Any, kill: bool = False) -> None:
        cluster, client = h
        try:
            if client is not None:
                client.close(timeout=30)
        finally:
            cluster.close(timeout=30)

    def _gather(self, client: Any, futures: list[Any], timeout: float) -> list[Any]:
        from distributed import wait

        done = wait(futures, timeout=timeout)  # Client.gather itself has no timeout
        if done.not_done:
            raise TimeoutError(f"{len(done.not_done)} tasks not done after {timeout} s")
        return list(client.gather(futures))

    def w1b(self, h: Any, n: int, timeout: float) -> list[Any]:
        client = h[1]
        return self._gather(
            client, [client.submit(_tasks.inc, i, pure=False) for i in range(n)], timeout
        )

    def w2(self, h: Any, arrays: Sequence[np.ndarray], timeout: float) -> list[Any]:
        client = h[1]
        with warnings.catch_warnings():  # "Sending large graph of size 64 MiB": that's W2
            warnings.filterwarnings("ignore", message="Sending large graph")
            futures = [client.submit(_tasks.array_sum, a, pure=False) for a in arrays]
        return self._gather(client, futures, timeout)

    def call(self, h: Any, timeout: float) -> Any:
        return h[1].submit(_tasks.inc, 1, pure=False).result(timeout)


class Ray(System):
    key, label = "ray", "Ray"

    def __init__(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        self.ray = ray
        self.inc = ray.remote(_tasks.inc)
        self.array_sum = ray.remote(_tasks.array_sum)

    def start(self, timeout: float) -> Any:
        ray = self.ray
        ray.init(
            num_cpus=WORKERS,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        try:
            # Both worker processes up and importing _tasks before anything is timed.
            ray.get([self.inc.remote(i) for i in range(WORKERS)], timeout=timeout)
        except BaseException:
            self.stop(None, kill=True)
            raise
        return ray

    def stop(self, h: Any, kill: bool = False) -> None:
        self.ray.shutdown()

    def w1b(self, h: Any, n: int, timeout: float) -> list[Any]:
        return list(self.ray.get([self.inc.remote(i) for i in range(n)], timeout=timeout))

    def w2(self, h: Any, arrays: Sequence[np.ndarray], timeout: float) -> list[Any]:
        # Each .remote(a) puts a into the node's shared-memory object store (one
        # copy); workers read it there without another copy. No network here.
        refs = [self.array_sum.remote(a) for a in arrays]
        return list(self.ray.get(refs, timeout=timeout))

    def call(self, h: Any, timeout: float) -> Any:
        return self.ray.get(self.inc.remote(1), timeout=timeout)


class RawZmq(System):
    """The loopback limit: this process and one peer process (bench/_zmq_peer.py),
    a DEALER pair over tcp://127.0.0.1; no framing, no scheduling, no compute.

    W5: one tiny message echoed, one at a time (the round trip).
    W2: the 16 arrays sent as 64 MiB frames with copy=False, the peer receives
        them with copy=False and acks each with 8 bytes (no copy into Python, no sum).
    W1b: 5,000 tiny messages echoed with up to 256 in flight (pipelined).
    """

    key, label = "zmq", "raw pyzmq (DEALER pair)"
    sums = False
    WINDOW = 256

    def __init__(self) -> None:
        import zmq

        self.zmq = zmq

    def start(self, timeout: float) -> Any:
        zmq = self.zmq
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        proc = None
        try:
            sock.bind(f"tcp://{LOOPBACK}:*")
            addr = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            proc = subprocess.Popen(
                child_argv([sys.executable, str(HERE / "_zmq_peer.py"), addr]),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
            h = (ctx, sock, proc)
            self._send(sock, b"hi", timeout)
            if self._recv(sock, timeout, proc) != b"hi":
                raise RuntimeError("peer did not echo")
        except BaseException:
            self.stop((ctx, sock, proc), kill=True)
            raise
        return h

    def stop(self, h: Any, kill: bool = False) -> None:
        ctx, sock, proc = h
        try:
            if proc is not None and not kill and proc.poll() is None:
                try:
                    sock.send(b"", self.zmq.NOBLOCK)  # empty frame: the peer exits
                    proc.wait(5)
                except Exception:
                    pass
        finally:
            if proc is not None:
                stop_process(proc, grace=2.0)
            sock.close(linger=0)
            ctx.term()

    def _send(self, sock: Any, data: Any, timeout: float) -> None:
        if not sock.poll(int(timeout * 1000), self.zmq.POLLOUT):
            raise TimeoutError(f"send blocked for {timeout} s")
        sock.send(data, copy=False)

    def _recv(self, sock: Any, timeout: float, proc: Any = None) -> bytes:
        if not sock.poll(int(timeout * 1000), self.zmq.POLLIN):
            raise TimeoutError(
                f"no reply within {timeout:.1f} s"
                + (f" (peer exit code {proc.poll()})" if proc else "")
            )
        return bytes(sock.recv(copy=False).buffer)

    def call(self, h: Any, timeout: float) -> Any:
        sock = h[1]
        self._send(sock, b"1", timeout)
        reply = self._recv(sock, timeout)
        return int(reply) + 1

    def w1b(self, h: Any, n: int, timeout: float) -> list[Any]:
        zmq = self.zmq
        sock = h[1]
        deadline = time.monotonic() + timeout
        out: list[int] = []
        sent = 0
        while len(out) < n:
            while sent < n and sent - len(out) < self.WINDOW:
                sock.send(b"%d" % sent, copy=True)
                sent += 1
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000), zmq.POLLIN):
                raise TimeoutError(f"{n - len(out)} echoes missing after {timeout} s")
            while len(out) < n:
                try:
                    out.append(int(sock.recv(zmq.NOBLOCK)) + 1)
                except zmq.Again:
                    break
        return out

    def w2(self, h: Any, arrays: Sequence[np.ndarray], timeout: float) -> list[Any]:
        sock = h[1]
        deadline = time.monotonic() + timeout
        for a in arrays:
            self._send(sock, a.data, max(0.001, deadline - time.monotonic()))
        acks = [
            int.from_bytes(self._recv(sock, max(0.001, deadline - time.monotonic())), "little")
            for _ in arrays
        ]
        if acks != [a.nbytes for a in arrays]:
            raise RuntimeError(f"peer acked {acks[:3]}..., expected {arrays[0].nbytes} each")
        return acks


def load(keys: Sequence[str]) -> tuple[list[System], dict[str, str]]:
    """Build the requested adapters; one that cannot be imported is skipped with a note."""
    makers: dict[str, Any] = {
        "remote": ShmRemote,
        "inline": ShmInline,
        "slots": ShmSlots,
        "dask": Dask,
        "ray": Ray,
        "zmq": RawZmq,
        "sched": ShmLocal,
        "pool": ShmPool,
    }
    systems: list[System] = []
    skipped: dict[str, str] = {}
    for k in keys:
        if k not in makers:
            raise SystemExit(f"unknown system {k!r}; choose from {', '.join(makers)}")
        try:
            systems.append(makers[k]())
        except Exception as e:  # an absent or broken library must not stop the others
            skipped[k] = f"{type(e).__name__}: {e}"
    return systems, skipped
