"""Wire micro-benchmark: encode and decode of the remote tier's hot messages, in µs.

python bench/bench_wire.py [--trees /path/a,/path/b] [--rounds 7] [--n 3000]

Per message type (task, result, submit, a submits-batch item, accepted, results
batch, heartbeat) it times ``encode`` and ``decode`` of the shmrunner wire, and
plain ``msgpack.packb``/``unpackb`` of the same header as the floor (the cost
with no limits, no schema, no ext hooks), all in the same process. With
``--trees`` each round runs one child per tree, alternating the order, so a
before/after comparison shares the machine's noise; the figures are medians
over the rounds of each child's best-of-3 per-call time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

SESSION = "5f0c2a9e7b1d4c3a"
JOB = "0191d2c3a4b5" + "c0ffee00d15ea5e00001"


def _messages() -> dict[str, tuple[str, dict[str, Any]]]:
    result = {"session": SESSION, "task_id": 4711, "ok": True, "value": 42}
    submit = {"job_id": JOB, "fn": "_tasks:inc", "args": (5,), "kwargs": {},
              "batch_accepted": True, "batch_results": True}
    return {
        "task": ("task", {"task_id": 4711, "fn": "_tasks:inc", "args": (5,), "kwargs": {}}),
        "result": ("result", result),
        "submit": ("submit", submit),
        "accepted": ("accepted", {"job_ids": [JOB[:-2] + f"{i:02d}" for i in range(16)],
                                  "submits": True}),
        "results16": ("results", {"results": [dict(result, task_id=4711 + i)
                                              for i in range(16)]}),
        "job_result": ("result", {"job_id": JOB, "ok": True, "value": 42}),
        "heartbeat": ("heartbeat", {}),
    }


def _per_call(fn: Any, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def _child(n: int) -> dict[str, float]:
    import msgpack

    import shmrunner
    from shmrunner.transport.protocol import Message, decode, encode

    out: dict[str, float] = {"_tree": 0.0}
    print(shmrunner.__file__, file=sys.stderr)
    for name, (type_, body) in _messages().items():
        msg = Message(type_, body)  # type: ignore[arg-type]
        frames = encode(msg)
        assert len(frames) == 1
        header = bytes(frames[0])
        assert decode([header], max_bytes=1 << 30, allow_pickle=False) == \
            decode(frames, max_bytes=1 << 30, allow_pickle=False)
        plain = [2, type_, body]
        out[f"{name}.encode"] = _per_call(lambda m=msg: encode(m), n)
        out[f"{name}.decode"] = _per_call(
            lambda h=header: decode([h], max_bytes=1 << 30, allow_pickle=False), n)
        out[f"{name}.packb"] = _per_call(lambda p=plain: msgpack.packb(p), n)
        out[f"{name}.unpackb"] = _per_call(lambda h=header: msgpack.unpackb(h), n)
        out[f"{name}.bytes"] = float(len(header))
    # A submits batch item: the daemon decodes each item of a "submits" on its own.
    items = [bytes(encode(Message("submit", dict(_messages()["submit"][1],
                                                   job_id=JOB[:-2] + f"{i:02d}")))[0])
             for i in range(64)]
    out["submits64.decode_items"] = _per_call(
        lambda: [decode([b], max_bytes=1 << 30, allow_pickle=False) for b in items], n // 64) / 64
    out["submits64.unpackb_items"] = _per_call(
        lambda: [msgpack.unpackb(b) for b in items], n // 64) / 64
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="", help="comma-separated source trees to compare")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=3000, help="calls per timing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.n)))
        return
    trees = [t for t in args.trees.split(",") if t] or [os.environ.get("PYTHONPATH", "")]
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    for r in range(args.rounds + 1):  # round 0: warm-up, not counted
        order = trees if r % 2 else trees[::-1]
        for tree in order:
            env = dict(os.environ, PYTHONPATH=tree)
            proc = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n)],
                                  env=env, capture_output=True, text=True, check=True)
            if r:
                runs[tree].append(json.loads(proc.stdout))
    keys = [k for k in runs[trees[0]][0] if not k.startswith("_")]
    med = {t: {k: statistics.median(run[k] for run in runs[t]) for k in keys} for t in trees}
    head = "| µs per call | " + " | ".join(os.path.basename(t.rstrip("/")) for t in trees)
    print(head + (" | ratio |" if len(trees) == 2 else " |"))
    print("|---" * (len(trees) + 1 + (len(trees) == 2)) + "|")
    for k in keys:
        vals = [med[t][k] for t in trees]
        cells = " | ".join(f"{v:.0f}" if k.endswith("bytes") else f"{v:.2f}" for v in vals)
        ratio = f" | {vals[0] / vals[1]:.2f}x" if len(trees) == 2 and vals[1] else \
            (" | " if len(trees) == 2 else "")
        print(f"| {k} | {cells}{ratio} |")


if __name__ == "__main__":
    main()
