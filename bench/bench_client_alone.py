"""The daemon client alone: does its own thread bound the jobs/s?

A stub daemon (a ROUTER on 127.0.0.1, a thread of this process) answers every
message of submits at once with one batched ``accepted`` and one ``results``
(saying ``submits: true``, as the daemon does); a ``Client`` submits --jobs
tiny jobs, then collects them. Prints jobs/s and CPU per job of the caller's
thread, the client thread and the stub thread (``/proc`` thread times). The
stub shares this process's interpreter lock: the figures are a floor for
the client's own rate, not the daemon's.

python bench/bench_client_alone.py [--jobs 20000] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

import zmq

from shmrunner import connect
from shmrunner.transport.protocol import Message, decode, encode

_LIMIT = 1 << 30


def _answers(sock: zmq.Socket[Any], stop: threading.Event) -> None:
    while not stop.is_set():
        if not sock.poll(100):
            continue
        while True:
            try:
                peer, *frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = decode(frames, max_bytes=_LIMIT, allow_pickle=False)
            if msg.type == "submits":
                subs = [decode([b], max_bytes=_LIMIT, allow_pickle=False)
                        for b in msg.body["submits"]]
            elif msg.type == "submit":
                subs = [msg]
            else:
                continue
            ids = [s.body["job_id"] for s in subs]
            res = [{"job_id": s.body["job_id"], "ok": True, "value": s.body["args"][0] + 1}
                   for s in subs]
            for i in range(0, len(ids), 1024):
                sock.send_multipart([peer, *encode(Message(
                    "accepted", {"job_ids": ids[i:i + 1024], "submits": True}))])
                sock.send_multipart([peer, *encode(Message(
                    "results", {"results": res[i:i + 1024]}))])


def _thread_cpu() -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    stub = threading.Thread(target=_answers, args=(sock, stop), daemon=True)
    stub.start()
    client = connect(f"tcp://127.0.0.1:{port}")
    client_thread = next(t for t in threading.enumerate() if t.name == "shmrunner-client")
    try:
        [f.result(30) for f in [client.submit("x:inc", i) for i in range(1000)]]  # warm-up
        for _ in range(args.reps):
            before = _thread_cpu()
            t0 = time.perf_counter()
            futures = [client.submit("x:inc", i) for i in range(args.jobs)]
            assert [f.result(60) for f in futures][-1] == args.jobs
            seconds = time.perf_counter() - t0
            after = _thread_cpu()

            cpu = {name: (after.get(t.native_id or 0, 0.0) - before.get(t.native_id or 0, 0.0))
                   / args.jobs * 1e6 for name, t in (("caller", threading.main_thread()),
                                                      ("client", client_thread),
                                                      ("stub", stub))}
            print(f"{args.jobs / seconds:8,.0f} jobs/s; CPU per job: caller "
                  f"{cpu['caller']:.1f} µs, client thread {cpu['client']:.1f} µs, stub "
                  f"{cpu['stub']:.1f} µs; load {os.getloadavg()[0]:.1f}")
    finally:
        stop.set()
        client.shutdown(wait=False)
        stub.join()
        sock.close()
        ctx.term()


if __name__ == "__main__":
    main()
