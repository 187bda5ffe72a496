"""One adapter per peer: the same few operations over each library's own API, 2 workers each."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

import _tasks

WORKERS = 2


class System:
    key = ""
    label = ""
    make_fn: Callable[[int], Any] = staticmethod(
        _tasks.make_array
    )  # W3 task: what this library returns

    def start(self, timeout: float) -> Any:
        """Create the pool and run one tiny task, so worker start-up is never timed by W1-W5."""
        raise NotImplementedError

    def stop(self, h: Any, kill: bool = False) -> None:
        raise NotImplementedError

    def map(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        raise NotImplementedError

    def submit_all(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        raise NotImplementedError

    def call(self, h: Any, fn: Callable[[Any], Any], arg: Any, timeout: float) -> Any:
        raise NotImplementedError

    def wrap(self, arrays: Sequence[np.ndarray]) -> list[Any]:
        return list(arrays)

    def share(self, arrays: Sequence[np.ndarray]) -> list[Any] | None:
        """Inputs already in shared memory, or None if the library has no shared arrays."""
        return None


class MpLike(System):
    """Anything with the multiprocessing.Pool API."""

    def __init__(self, key: str, label: str, factory: Callable[[int], Any]) -> None:
        self.key, self.label, self.factory = key, label, factory

    def start(self, timeout: float) -> Any:
        pool = self.factory(WORKERS)
        try:
            pool.apply_async(_tasks.inc, (0,)).get(timeout)
        except BaseException:
            self.stop(pool, kill=True)
            raise
        return pool

    def stop(self, h: Any, kill: bool = False) -> None:
        h.terminate() if kill else h.close()
        h.join()

    def map(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        return list(h.map_async(fn, items).get(timeout))

    def submit_all(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        pending = [h.apply_async(fn, (x,)) for x in items]
        return [r.get(timeout) for r in pending]

    def call(self, h: Any, fn: Callable[[Any], Any], arg: Any, timeout: float) -> Any:
        # W5 is apply(), as its label says (multiprocessing's and torch's apply
        # is apply_async().get(); shmrunner's reads its own reply). apply() has
        # no timeout: a hung pool hangs the run, as it would the user's call.
        return h.apply(fn, (arg,))


class Torch(MpLike):
    make_fn = staticmethod(_tasks.make_tensor)

    def __init__(self) -> None:
        import torch.multiprocessing as tmp

        super().__init__(
            "torch", "torch.mp.Pool", lambda n: tmp.Pool(n, initializer=_tasks.torch_single_thread)
        )

    def wrap(self, arrays: Sequence[np.ndarray]) -> list[Any]:
        import torch

        # Fresh tensors each time: pickling moves a tensor's storage into shared
        # memory for good, so reused tensors would silently become the W2s case.
        return [torch.from_numpy(a) for a in arrays]

    def share(self, arrays: Sequence[np.ndarray]) -> list[Any] | None:
        return [t.share_memory_() for t in self.wrap(arrays)]


class Shmrunner(MpLike):
    def __init__(self) -> None:
        import shmrunner

        self.mod = shmrunner
        super().__init__("shmrunner", "shmrunner.Pool", shmrunner.Pool)

    def share(self, arrays: Sequence[np.ndarray]) -> list[Any] | None:
        return [self.mod.share(a) for a in arrays]


class Executor(System):
    key, label = "ppe", "ProcessPoolExecutor"

    def start(self, timeout: float) -> Any:
        ex = cf.ProcessPoolExecutor(WORKERS)
        try:
            ex.submit(_tasks.inc, 0).result(timeout)
        except BaseException:
            self.stop(ex, kill=True)
            raise
        return ex

    def stop(self, h: Any, kill: bool = False) -> None:
        if kill:
            # No public way to kill stuck workers before Python 3.14.
            for p in list(getattr(h, "_processes", {}).values()):
                p.kill()
        h.shutdown(wait=True, cancel_futures=kill)

    def map(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        return list(h.map(fn, items, timeout=timeout))

    def submit_all(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        futures = [h.submit(fn, x) for x in items]
        return [f.result(timeout) for f in futures]

    def call(self, h: Any, fn: Callable[[Any], Any], arg: Any, timeout: float) -> Any:
        return h.submit(fn, arg).result(timeout)


class Joblib(System):
    key, label = "joblib", "joblib/loky"

    def start(self, timeout: float) -> Any:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=WORKERS, backend="loky", timeout=timeout)
        par(delayed(_tasks.inc)(i) for i in range(WORKERS))
        return par

    def stop(self, h: Any, kill: bool = False) -> None:
        # loky keeps one process-wide reusable executor alive after Parallel
        # returns; shutting it down is the only way to stop joblib's workers.
        from joblib.externals.loky import reusable_executor

        ex = getattr(reusable_executor, "_executor", None)
        if ex is not None:
            ex.terminate(kill_workers=kill) if hasattr(ex, "terminate") else ex.shutdown(wait=True)

    def map(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        from joblib import delayed

        return list(h(delayed(fn)(x) for x in items))

    # joblib has no single-task submit: this batches (batch_size="auto"): W1b is not like for like.
    submit_all = map

    def call(self, h: Any, fn: Callable[[Any], Any], arg: Any, timeout: float) -> Any:
        from joblib import delayed

        return h([delayed(fn)(arg)])[0]


class Ray(System):
    """Ray on this host: ``f.remote(a)`` puts each array in the node's
    shared-memory object store (Ray copies large objects with several threads);
    workers read it there without another copy, read-only."""

    key, label = "ray", "Ray (f.remote)"

    def __init__(self) -> None:
        import os

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Read when ray is imported: without it, Ray on Linux swaps the
        # _node_ip_address 127.0.0.1 given to ray.init for the host's outward
        # address and its servers listen there (and on every interface).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        self.ray = ray
        self.remotes: dict[Callable[[Any], Any], Any] = {}

    def _remote(self, fn: Callable[[Any], Any]) -> Any:
        if fn not in self.remotes:
            self.remotes[fn] = self.ray.remote(fn)
        return self.remotes[fn]

    def start(self, timeout: float) -> Any:
        import logging

        self.ray.init(num_cpus=WORKERS, include_dashboard=False, _node_ip_address="127.0.0.1",
                      logging_level=logging.WARNING)
        try:
            inc = self._remote(_tasks.inc)
            self.ray.get([inc.remote(i) for i in range(WORKERS)], timeout=timeout)
        except BaseException:
            self.stop(None, kill=True)
            raise
        return self.ray

    def stop(self, h: Any, kill: bool = False) -> None:
        self.ray.shutdown()
        self.remotes.clear()  # remote functions belong to the session that made them

    def map(
        self, h: Any, fn: Callable[[Any], Any], items: Iterable[Any], timeout: float
    ) -> list[Any]:
        remote = self._remote(fn)
        return list(self.ray.get([remote.remote(x) for x in items], timeout=timeout))

    submit_all = map

    def call(self, h: Any, fn: Callable[[Any], Any], arg: Any, timeout: float) -> Any:
        return self.ray.get(self._remote(fn).remote(arg), timeout=timeout)

    def share(self, arrays: Sequence[np.ndarray]) -> list[Any] | None:
        # Already in the object store: the task gets a reference (Ray's W2s).
        return [self.ray.put(a) for a in arrays]


def load(keys: Sequence[str]) -> tuple[list[System], dict[str, str]]:
    """Build the requested adapters; a library that cannot be imported is skipped with a note."""
    makers: dict[str, Callable[[], System]] = {
        "mp": lambda: MpLike("mp", "multiprocessing.Pool", multiprocessing.Pool),
        "ppe": Executor,
        "torch": Torch,
        "joblib": Joblib,
        "shmrunner": Shmrunner,
        "ray": Ray,
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
