"""Seeded randomized concurrency stress of shmrunner's Pool and Scheduler.

    PYTHONPATH=. python tests/stress_harness.py pool SEED [--ops N] [--threads T] [--no-kill]
        [--kill-every S] [--end close|abrupt] [--mtpc N] [--ctx fork|spawn|forkserver]
    PYTHONPATH=. python tests/stress_harness.py sched SEED ...

(PYTHONPATH: the venv's editable install points at another checkout.)

Exit 0: every operation ended in time with an acceptable outcome and nothing
leaked. Exit 1: a wrong outcome or a leak (printed). Exit 2: a hang (stacks
dumped). Not a pytest module (its name does not start with test_).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import faulthandler
import gc
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _stress_tasks as T  # noqa: E402

import shmrunner  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assert shmrunner.__file__.startswith(HERE), f"run with PYTHONPATH={HERE}"

OP_DEADLINE = 40.0
GET = 30.0
problems: list[str] = []
# What an operation may raise once the pool/scheduler is being terminated/shut down.
ENDING = (shmrunner.TaskCancelledError, cf.CancelledError, ValueError, RuntimeError,
          shmrunner.WorkerLostError, shmrunner.DependencyError)
plock = threading.Lock()


def problem(msg: str) -> None:
    with plock:
        problems.append(msg)
    print("PROBLEM:", msg, flush=True)


# --- process-level observations ------------------------------------------------------


def children() -> set[int]:
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def memfds() -> int:
    return sum(1 for t in fds().values() if t.startswith("/memfd:"))


# --- acceptance helpers --------------------------------------------------------------


class Checker:
    def __init__(self, kills: bool) -> None:
        self.kills = kills
        self.ending = False  # terminate()/shutdown() while ops run: they may fail so
        self.counts = {"ok": 0, "exc": 0}
        self.lost: dict[int, list] = {}

    def note_lost(self, what: str, e: BaseException) -> None:
        """A SIGKILLed worker fails exactly one task (README): the same pid
        reported by two different exceptions is a task failed for nothing."""
        with plock:
            # ids and text only: a kept exception would pin its frames
            seen = self.lost.setdefault(e.pid, [])
            if not any(x == id(e) for _, x, _ in seen):
                seen.append((what, id(e), str(e)))
                if len(seen) > 1:
                    problem(f"worker {e.pid} failed {len(seen)} tasks: {seen}")

    def lost_ok(self) -> tuple[type[BaseException], ...]:
        return (shmrunner.WorkerLostError,) if self.kills else ()

    def expect(self, what: str, fn, value=None, exc=(), lost=True, eq=None):
        """Run fn(); its result must equal value (or eq(result) be True), or it
        must raise one of exc (or WorkerLostError when kills are on and lost)."""
        allowed = tuple(exc) + (self.lost_ok() if lost else ())
        try:
            got = fn()
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, allowed + (ENDING if self.ending else ())):
                self.counts["exc"] += 1
                if isinstance(e, shmrunner.WorkerLostError) and e.exitcode == -9:
                    self.note_lost(what, e)
                return None
            problem(f"{what}: unexpected {type(e).__name__}: {e!r}\n"
                    + "".join(traceback.format_exception(e))[-1500:])
            return None
        self.counts["ok"] += 1
        ok = eq(got) if eq is not None else _equal(got, value)
        if not ok:
            problem(f"{what}: wrong result {got!r:.200} (expected {value!r:.200} "
                    f"or one of {[c.__name__ for c in allowed]})")
        return got


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --- Pool operations -----------------------------------------------------------------


def _expect_squares(ck: Checker, name: str, it, n: int, stop: int | None,
                    unordered: bool) -> None:
    """Read the stream ``it`` of the squares of range(n), leaving it after
    ``stop`` items when given, and check what came."""
    def consume():
        got = []
        for k, v in enumerate(it):
            if stop is not None and k >= stop:
                break
            got.append(v)
        return got
    exp = [i * i for i in range(n)]
    if stop is not None:
        ck.expect(f"{name} abandoned", consume, eq=lambda g: (
            len(g) == min(stop, n) and (set(g) <= set(exp) if unordered else g == exp[:stop])))
    else:
        ck.expect(name, consume, eq=lambda g: (sorted(g) == exp if unordered else g == exp))


def pool_ops(pool, ck: Checker):
    def apply_ok(r):
        x = r.randrange(100)
        ck.expect("apply sq", lambda: pool.apply(T.sq, (x,)), x * x)

    def apply_raise(r):
        ck.expect("apply boom", lambda: pool.apply(T.boom, (1,)), exc=(ValueError,))

    def apply_die(r):
        ck.expect("apply die", lambda: pool.apply(T.die, (1,)), exc=(shmrunner.WorkerLostError,))

    def apply_async(r):
        x = r.randrange(100)
        kind = r.choice(["ok", "boom", "die", "nap"])
        if kind == "ok":
            res = pool.apply_async(T.sq, (x,))
            ck.expect("apply_async sq", lambda: res.get(GET), x * x)
        elif kind == "boom":
            res = pool.apply_async(T.boom, (x,))
            ck.expect("apply_async boom", lambda: res.get(GET), exc=(ValueError,))
        elif kind == "die":
            res = pool.apply_async(T.die, (x,))
            ck.expect("apply_async die", lambda: res.get(GET),
                      exc=(shmrunner.WorkerLostError,))
        else:
            res = pool.apply_async(T.nap, (r.random() * 0.05, x))
            ck.expect("apply_async nap", lambda: res.get(GET), x)

    def apply_callbacks(r):
        x = r.randrange(100)
        got: list = []
        done = threading.Event()

        def cb(v):
            got.append(("ok", v))
            done.set()

        def ecb(e):
            got.append(("err", e))
            done.set()
        fn = r.choice([T.sq, T.boom])
        res = pool.apply_async(fn, (x,), callback=cb, error_callback=ecb)
        res.wait(GET)
        if not res.ready():
            problem("apply_async callbacks: not ready in time")
            return
        if not done.wait(5):
            problem("apply_async: ready but no callback ran")
        elif len(got) != 1:
            problem(f"apply_async: callbacks ran {len(got)} times")

    def map_(r):
        n = r.randrange(0, 40)
        items = [r.randrange(10) for _ in range(n)]
        specials = r.random() < 0.3
        if specials and n:
            items[r.randrange(n)] = r.choice([-1, -2, -3])
        cs = r.choice([None, 1, 3])
        exc: tuple = ()
        if -1 in items:
            exc += (ValueError,)
        if -2 in items:
            exc += (shmrunner.WorkerLostError,)
        expected = [9 if i == -3 else i * i for i in items]
        if r.random() < 0.5:
            ck.expect("map", lambda: pool.map(T.sq_or, items, cs), expected, exc=exc)
        else:
            res = pool.map_async(T.sq_or, items, cs)
            ck.expect("map_async", lambda: res.get(GET), expected, exc=exc)

    def map_out(r):
        n = r.randrange(1, 30)
        out = shmrunner.empty((n, 8))
        exp = np.repeat(np.arange(n, dtype=float)[:, None], 8, axis=1)
        if r.random() < 0.5:
            ck.expect("map out=", lambda: pool.map(T.arow, range(n), r.choice([None, 2]), out=out),
                      eq=lambda got: got is out and np.array_equal(out, exp))
        else:
            ck.expect("starmap out=", lambda: pool.starmap(T.arow, [(i,) for i in range(n)],
                                                          out=out),
                      eq=lambda got: got is out and np.array_equal(out, exp))

    def imap_(r):
        n = r.randrange(0, 50)
        unordered = r.random() < 0.5
        bs = r.choice([None, 1, 2, 5])
        cs = r.choice([1, 1, 3])
        stop = r.randrange(n + 1) if r.random() < 0.4 else None
        meth = pool.imap_unordered if unordered else pool.imap
        _expect_squares(ck, meth.__name__, meth(T.sq, range(n), cs, bs), n, stop, unordered)

    def imap_next_timeout(r):
        it = pool.imap(T.nap, [], 1)  # empty
        ck.expect("imap empty", lambda: list(it), [])
        it = pool.imap(T.sq, range(3))
        ck.expect("imap next(timeout)", lambda: [it.next(GET) for _ in range(3)], [0, 1, 4])

    def shared_arg(r):
        a = shmrunner.zeros(16)
        i = r.randrange(16)
        ck.expect("shared arg", lambda: pool.apply(T.afill, (a, i)), i,
                  eq=lambda g: g == i and a[i] == i)

    def big_plain_arg(r):
        a = np.arange(20000, dtype=float)  # 160 KB: shared by copy
        ck.expect("big plain arg", lambda: pool.apply_async(T.asum, (a,)).get(GET),
                  float(a.sum()))

    def array_result(r):
        v = r.randrange(100)
        n = r.choice([10, 50000])
        ck.expect("array result", lambda: pool.apply(T.amake, (n, v)),
                  np.full(n, float(v)))

    def array_roundtrip(r):
        a = np.ones(30000)
        ck.expect("array round trip", lambda: pool.apply_async(T.aplus, (a, 2)).get(GET),
                  np.full(30000, 3.0))

    def reentrant_callback(r):
        """A callback that submits to the pool again (from the result thread)."""
        inner: list = []
        done = threading.Event()

        def cb(v):
            try:
                inner.append(pool.apply_async(T.sq, (v,), callback=lambda _: done.set(),
                                              error_callback=lambda _: done.set()))
            except ValueError:  # the pool ended meanwhile
                done.set()

        res = pool.apply_async(T.ident, (3,), callback=cb, error_callback=lambda _: done.set())
        ck.expect("reentrant outer", lambda: res.get(GET), 3)
        if not done.wait(GET):
            problem("reentrant callback: inner task never settled")
        elif inner:
            ck.expect("reentrant inner", lambda: inner[0].get(GET), 9)

    def imap_bad_input(r):
        def gen():
            yield 1
            yield 2
            raise KeyError("input")
        it = pool.imap(T.sq, gen(), 1, r.choice([None, 1]))
        got = []

        def consume():
            for v in it:
                got.append(v)
        ck.expect("imap bad input", consume, exc=(KeyError,))
        if got and got != [1, 4][:len(got)]:
            problem(f"imap bad input: {got}")

    return [apply_ok, apply_raise, apply_die, apply_async, apply_callbacks, map_, map_out,
            imap_, imap_next_timeout, shared_arg, big_plain_arg, array_result, array_roundtrip,
            reentrant_callback, imap_bad_input]


# --- Scheduler operations ------------------------------------------------------------


def sched_ops(sched, ck: Checker):
    CancelErr = (cf.CancelledError, shmrunner.TaskCancelledError)

    def submit_ok(r):
        x = r.randrange(100)
        f = sched.submit(T.sq, x)
        ck.expect("submit sq", lambda: f.result(GET), x * x)

    def submit_raise(r):
        f = sched.submit(T.boom, 1)
        ck.expect("submit boom", lambda: f.result(GET), exc=(ValueError,))

    def submit_die(r):
        f = sched.submit(T.die, 1, retries=r.choice([0, 1]))
        ck.expect("submit die", lambda: f.result(GET), exc=(shmrunner.WorkerLostError,))

    def submit_retry(r):
        x = r.randrange(100)
        f = sched.submit(T.nap, r.random() * 0.05, x, retries=3)
        ck.expect("submit retries=3", lambda: f.result(GET), x)

    def chain(r):
        v = r.randrange(100)
        n = r.choice([10, 40000])
        f1 = sched.submit(T.amake, n, v)
        bad = r.random() < 0.3
        f1b = sched.submit(T.boom, 1) if bad else f1
        f2 = sched.submit(T.aplus, f1b, 1)
        f3 = sched.submit(T.asum, f2)
        if bad:
            ck.expect("chain bad", lambda: f3.result(GET), exc=(shmrunner.DependencyError,))
        else:
            ck.expect("chain", lambda: f3.result(GET), float(n * (v + 1)),
                      exc=(shmrunner.DependencyError,) if ck.kills else ())
        ck.expect("chain f1", lambda: f1.result(GET), np.full(n, float(v)))

    def chain_list(r):
        fs = [sched.submit(T.sq, i) for i in range(r.randrange(1, 6))]
        f = sched.submit(T.ident, fs)
        ck.expect("chain list", lambda: f.result(GET), [i * i for i in range(len(fs))],
                  exc=(shmrunner.DependencyError,) if ck.kills else ())

    def cancel(r):
        x = r.randrange(100)
        f = sched.submit(T.nap, r.random() * 0.2, x)
        if r.random() < 0.5:
            time.sleep(r.random() * 0.05)
        hard = r.random() < 0.5
        ok = sched.cancel(f) if hard else f.cancel()
        if ok:
            ck.expect(f"cancel({'sched' if hard else 'future'})=True", lambda: f.result(GET),
                      exc=CancelErr, lost=False)
        else:
            ck.expect(f"cancel({'sched' if hard else 'future'})=False", lambda: f.result(GET), x)

    def cancel_chain(r):
        f1 = sched.submit(T.nap, 0.1, 1)
        f2 = sched.submit(T.add, f1, 1)
        ok = f1.cancel() if r.random() < 0.5 else sched.cancel(f1)
        if ok:
            ck.expect("cancel dep: dependent", lambda: f2.result(GET),
                      exc=CancelErr + (shmrunner.DependencyError,), lost=False)
        else:
            ck.expect("cancel dep (not cancelled): dependent", lambda: f2.result(GET), 2,
                      exc=(shmrunner.DependencyError,) if ck.kills else ())

    def smap(r):
        n = r.randrange(0, 40)
        cs = r.choice([1, 1, 4])
        bs = r.choice([None, 1, 3])
        kind = r.choice(["map", "imap", "imap_unordered"])
        stop = r.randrange(n + 1) if r.random() < 0.4 else None
        it = getattr(sched, kind)(T.sq, range(n), chunksize=cs, buffersize=bs)
        _expect_squares(ck, kind, it, n, stop, kind == "imap_unordered")
        if stop is not None and r.random() < 0.5:
            del it  # drop: cancels the rest

    def smap_specials(r):
        items = [r.randrange(10) for _ in range(r.randrange(1, 10))]
        items[r.randrange(len(items))] = r.choice([-1, -2, -3])
        exc: tuple = ()
        if -1 in items:
            exc += (ValueError,)
        if -2 in items:
            exc += (shmrunner.WorkerLostError,)
        exp = [9 if i == -3 else i * i for i in items]
        ck.expect("sched map specials", lambda: list(sched.map(T.sq_or, items)), exp, exc=exc)

    def shared_arg(r):
        a = shmrunner.zeros(16)
        i = r.randrange(16)
        f = sched.submit(T.afill, a, i)
        ck.expect("sched shared arg", lambda: f.result(GET), i,
                  eq=lambda g: g == i and a[i] == i)

    def big_arg(r):
        a = np.ones(30000)
        f = sched.submit(T.aplus, a, 2)
        ck.expect("sched array round trip", lambda: f.result(GET), np.full(30000, 3.0))

    def as_completed(r):
        fs = [sched.submit(T.nap, r.random() * 0.02, i) for i in range(r.randrange(1, 8))]
        got = sorted(f.result() for f in cf.as_completed(fs, timeout=GET)
                     if not f.cancelled() and not f.exception())
        if not ck.kills and got != list(range(len(fs))):
            problem(f"as_completed: {got}")

    def task_timeout(r):
        f = sched.submit(T.nap, 5.0, 1, timeout=r.choice([0.05, 0.2]))
        ck.expect("task timeout", lambda: f.result(GET), exc=(shmrunner.TaskTimeoutError,))

    def submit_from_callback(r):
        inner: list = []
        done = threading.Event()

        def cb(f):
            try:
                g = sched.submit(T.sq, 4)
                inner.append(g)
                g.add_done_callback(lambda _: done.set())
            except RuntimeError:  # shut down meanwhile
                done.set()
        f = sched.submit(T.ident, 1)
        f.add_done_callback(cb)
        ck.expect("callback outer", lambda: f.result(GET), 1)
        if not done.wait(GET):
            problem("submit from done-callback: inner never settled")
        elif inner:
            ck.expect("callback inner", lambda: inner[0].result(GET), 16)

    def describe(r):
        f = sched.submit(T.nap, 0.01, 5)
        d = sched.describe(f)
        if d is not None and d["state"] not in ("queued", "running", "done", "failed",
                                                 "cancelled"):
            problem(f"describe: {d}")
        ok = ck.expect("describe task", lambda: f.result(GET), 5) == 5
        d = sched.describe(f)
        if d is not None and d["state"] != ("done" if ok else "failed"):
            problem(f"describe after result: {d}")

    def smap_timeout(r):
        it = sched.map(T.nap, [0.5] * 4, range(4), timeout=0.05)
        ck.expect("map timeout", lambda: list(it), exc=(TimeoutError, cf.TimeoutError))

    return [submit_ok, submit_raise, submit_die, submit_retry, chain, chain_list, cancel,
            cancel_chain, smap, smap_specials, shared_arg, big_arg, as_completed,
            task_timeout, submit_from_callback, describe, smap_timeout]


# --- the run -------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pool", "sched"])
    ap.add_argument("seed", type=int)
    ap.add_argument("--ops", type=int, default=40)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--kill-every", type=float, default=0.05)
    ap.add_argument("--only", default=None, help="comma-separated op names")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--end", choices=["close", "abrupt"], default="close",
                    help="abrupt: terminate()/shutdown(cancel_futures=True) while ops run")
    ap.add_argument("--ctx", default="fork", choices=["fork", "spawn", "forkserver"])
    ap.add_argument("--mtpc", type=int, default=None, help="Pool maxtasksperchild")
    a = ap.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    kills = not a.no_kill

    helpers: set[int] = set()
    if a.ctx == "forkserver":  # the forkserver is a child too, and a session helper
        warm = multiprocessing.get_context("forkserver").Process(target=int)
        warm.start()
        warm.join()
        helpers = children()
    # warm-up state shmrunner keeps per process (rlimit raise, cache) before the baseline
    shmrunner.set_shm_cache(0)
    threads0 = {t.ident for t in threading.enumerate()}
    fds0 = fds()
    ck = Checker(kills)

    if a.mode == "pool":
        runner = shmrunner.Pool(2, maxtasksperchild=a.mtpc,
                                context=multiprocessing.get_context(a.ctx))
        ops = pool_ops(runner, ck)

        def worker_pids():
            return [p.pid for p in runner._pool if p.pid is not None]
    else:
        runner = shmrunner.Scheduler(local_workers=2)
        ops = sched_ops(runner, ck)

        def worker_pids():
            return sorted(children())
    if a.only:
        ops = [o for o in ops if o.__name__ in a.only.split(",")]

    current: dict[int, tuple[str, float]] = {}
    stop_kill = threading.Event()
    killed = [0]

    def killer():
        r = random.Random(a.seed * 7919 + 1)
        while not stop_kill.wait(r.uniform(0.2, 1.0) * a.kill_every):
            pids = worker_pids()
            if pids:
                pid = r.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed[0] += 1
                except ProcessLookupError:
                    pass

    def runner_thread(k: int):
        r = random.Random(a.seed * 1000 + k)
        me = threading.get_ident()
        for _ in range(a.ops):
            op = r.choice(ops)
            current[me] = (op.__name__, time.monotonic())
            if a.verbose:
                print(f"t{k} {op.__name__}", flush=True)
            try:
                op(r)
            except BaseException as e:  # noqa: BLE001
                if not (ck.ending and isinstance(e, (ValueError, RuntimeError))):
                    # (else: submitting to a pool/scheduler that ended)
                    problem(f"op {op.__name__} crashed the harness: {e!r}\n"
                            + "".join(traceback.format_exception(e))[-2000:])
            current.pop(me, None)

    ths = [threading.Thread(target=runner_thread, args=(k,), name=f"stress-{k}", daemon=True)
           for k in range(a.threads)]
    kt = threading.Thread(target=killer, name="killer", daemon=True)
    for t in ths:
        t.start()
    if kills:
        kt.start()

    def hang(what: str) -> int:
        print(f"HANG: {what}", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        for pid in children():
            os.kill(pid, signal.SIGKILL)
        os._exit(2)

    abrupt_at = time.monotonic() + random.Random(a.seed).uniform(0.1, 1.5)
    ended = False
    while any(t.is_alive() for t in ths):
        time.sleep(0.05)
        if a.end == "abrupt" and not ended and time.monotonic() > abrupt_at:
            ended = True
            ck.ending = True
            t_end = time.monotonic()
            if a.mode == "pool":
                runner.terminate()
            else:
                runner.shutdown(wait=True, cancel_futures=True)
            if time.monotonic() - t_end > 20:
                problem(f"abrupt end took {time.monotonic() - t_end:.0f}s")
        now = time.monotonic()
        for name, t0 in list(current.values()):
            if now - t0 > OP_DEADLINE:
                hang(f"op {name} running for {now - t0:.0f}s")
    stop_kill.set()

    # close + join / shutdown must return
    done = threading.Event()

    def finish():
        if a.mode == "pool":
            if not ended:
                runner.close()
            runner.join()
        else:
            runner.shutdown()
        done.set()
    threading.Thread(target=finish, daemon=True).start()
    if not done.wait(60):
        hang("close()+join() / shutdown()")
    runner = ops = None  # noqa: F841 (dropped before the leak checks)
    # leak checks, polled briefly
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        # multiprocessing's own session helpers (spawn's resource tracker) are not leaks
        kids = {k for k in children() - helpers if b"resource_tracker" not in _cmdline(k)}
        mf = memfds()
        extra_threads = [t for t in threading.enumerate()
                         if t.ident not in threads0 and t is not kt and t not in ths
                         and t.is_alive()]
        nfd = len(fds())
        if (not kids and not mf and not extra_threads and nfd <= len(fds0) + 2) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if kids:
        def cmd(pid: int) -> str:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    return f.read().replace(b"\0", b" ").decode()[:200]
            except OSError:
                return "?"
        problem(f"leaked child processes {[(k, cmd(k)) for k in kids]}")
    if mf:
        problem(f"leaked {mf} memfds: {sorted(t for t in fds().values() if 'memfd' in t)[:5]}")
    if extra_threads:
        problem(f"leaked threads {[t.name for t in extra_threads]}")
    if nfd > len(fds0) + 2:
        new = {fd: t for fd, t in fds().items() if fd not in fds0}
        problem(f"fd count {len(fds0)} -> {nfd}: {list(new.items())[:10]}")
    print(f"seed {a.seed} {a.mode}: kills={killed[0]} {ck.counts} problems={len(problems)}",
          flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    multiprocessing.set_start_method("fork", force=True)
    code = main()
    sys.stdout.flush()
    os._exit(code)
