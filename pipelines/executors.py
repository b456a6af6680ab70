"""The Ray executor: a pool of warm step actors for CPU steps and LSH bucket groups, and one
GPU actor per GPU for signatures when the cluster has GPUs. The `Executor` protocol and the
in-process `LocalExecutor` are haagenti.executors'; `make_executor` picks one by name.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from haagenti.executors import Executor, LocalExecutor, cut_at_groups
from haagenti.groups import sort_rows
from haagenti.parallel import inline


FORWARDED_ENV = ("AWS_", "HAAGENTI_", "GOOGLE_", "AZURE_")


class RayExecutor:
    """Runs steps on a Ray cluster (started locally unless `address` / RAY_ADDRESS names one)
    on a pool of long-lived step actors, plus a GPU pool for signatures when the cluster has GPUs.

    Why actors and not Ray Data or plain tasks: measured on a 2-CPU machine (docs/decisions/0012-ray-step-actors.md), every Ray Data
    execution paid seconds of planning and operator start-up (35-55 s per dedup run for
    6-90 MB catalogs, the LSH group-by alone ~13 s) and stalled on a 1-CPU cluster; plain
    tasks with fractional CPUs made Ray start and kill worker processes between stages, each
    start re-importing torch (seconds each). Step actors import once and stay warm for the
    executor's life. Faults: a call whose actor died (its process killed, its node lost) runs
    again on a live actor, and the driver commits only final outputs, so a lost worker or node
    costs time, never rows. At most two calls per actor are in flight and results come back in order,
    so memory is bounded by batches, not by the catalog."""

    shares_memory = False

    def __init__(self, address: str | None = None, workers: int | None = None):
        import ray

        if not ray.is_initialized():
            if address is None:
                init_local_ray(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 1))
        self.gpus = int(resources.get("GPU", 0))
        self.workers = max(1, min(workers or self.cpus, self.cpus))
        self.held_bytes = int(resources.get("object_store_memory", 0)) // 8 or None
        # Workers may have started before the driver's environment was set (e.g. S3 endpoint and
        # credentials): forward the variables the steps read.
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        # No restarts by Ray: an actor restarted in place waits for a CPU that a lost node took
        # with it, forever; `_run` re-runs the call on a live actor instead.
        self.options: dict = {"max_restarts": 0, "max_task_retries": 0}
        if env:
            self.options["runtime_env"] = {"env_vars": env}
        self.pool = [self._actor(gpu=False) for _ in range(self.workers)]
        self.gpu_pool = [self._actor(gpu=True) for _ in range(self.gpus)]

    def _actor(self, gpu: bool):
        """A step actor: one CPU each; GPU actors ask no CPU, so they fit beside a full CPU pool."""
        resources = {"num_cpus": 0, "num_gpus": 1} if gpu else {"num_cpus": 1}
        return _remote(_StepActor).options(**resources, **self.options).remote()

    def _run(self, calls: Iterable[tuple], gpu: bool = False) -> Iterator:
        """Results of (function, *args) calls spread over a pool, in order, two per actor in
        flight. A call whose actor died runs again on a live one (`_replace`)."""
        import ray
        from ray.exceptions import RayActorError

        pool = self.gpu_pool if gpu and self.gpu_pool else self.pool
        pending: deque = deque()

        def result():
            ref, actor, call = pending.popleft()
            while True:
                try:
                    return ray.get(ref)
                except RayActorError:
                    self._replace(pool, actor, gpu)
                    actor = pool[len(pending) % len(pool)]
                    ref = actor.run.remote(*call)

        for i, call in enumerate(calls):
            actor = pool[i % len(pool)]
            pending.append((actor.run.remote(*call), actor, call))
            if len(pending) >= 2 * len(pool):
                yield result()
        while pending:
            yield result()

    def _replace(self, pool: list, dead, gpu: bool) -> None:
        """Drop a dead actor from its pool; start another where the cluster has room for it (a
        killed process frees its CPU, a lost node does not), or when none is left (it starts
        once a node joins)."""
        import ray

        if dead in pool:
            pool.remove(dead)
            if not pool or ray.available_resources().get("GPU" if gpu else "CPU", 0) >= 1:
                pool.append(self._actor(gpu))

    def map(self, fn, rows):
        return list(self._run((_apply, fn, r) for r in rows))

    def map_batches(self, cls, args, table, batch_size, actors=False):
        slices = (table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size))
        return self._run(((_call, cls, args, b) for b in slices), gpu=actors)

    def in_order(self, fn, *args):
        """Now: the driver commits results as they come, holding at most `held_bytes` of them."""
        return inline(fn, *args)

    def group_by(self, table, keys, fn, max_rows=None):
        """Sort by key on the driver (Arrow, C++), cut at group boundaries into about two parts
        per worker slot (more when `max_rows` asks), and run `fn` on each part on the pool."""
        if table.num_rows == 0:
            return fn(table)
        t = sort_rows(table, keys)
        n = max(1, min(2 * len(self.pool), t.num_rows // 2000 + 1), -(-t.num_rows // max_rows) if max_rows else 1)
        parts = cut_at_groups(t, keys, n)
        tables = [_owned(x) for x in self._run((_apply, fn, p) for p in parts) if x.num_rows]
        return pa.concat_tables(tables) if tables else fn(table.slice(0, 0))


def _owned(t: pa.Table) -> pa.Table:
    """A copy of a step result in the driver's own memory. A table from `ray.get` is a view
    that pins its object in the object store for as long as anyone holds it: gathered whole
    (group_by), results held through later stages filled the store and sent every
    later result to Ray's fallback allocation on disk (1.4 GB catalog, 1 worker: the encode
    stage took 85 s instead of 7.5 s with the match stage's pairs pinning ~70 MB of 75 MiB).
    Streamed results (map_batches) stay views; the driver bounds them with `held_bytes`."""
    return t.take(pa.array(np.arange(t.num_rows)))


def _apply(fn, row):
    return fn(row)


class _StepActor:
    """A warm worker process that runs any step function it is handed."""

    def run(self, fn, *args):
        return fn(*args)


def init_local_ray(**options) -> None:
    """`ray.init` of a local cluster (`options` are ray.init's) that writes no ~/.ray/auth_token
    (`_private_token`): what the pipeline and the test suite start."""
    import ray

    _private_token()
    # address="local": a cluster of its own. A bare ray.init() joins whatever head this machine
    # already runs (another `ray start`, a test's multi-node cluster), with its CPUs and options.
    ray.init(address="local", ignore_reinit_error=True, **options)


def _private_token() -> None:
    """A local cluster started here keeps Ray's token auth, with a token of its own held in the
    environment (its processes inherit it): left to itself, `ray.init` writes ~/.ray/auth_token,
    which turns token auth on for every later `ray start` on the machine, and a plain
    `ray job submit` then fails with "Missing authentication token". A mode or token the user
    set, or a token file already there, is left alone; a second call finds its own token set.
    Ray's warning that it turned token auth on by default is silenced then: it is our choice,
    said here, and it was the one line a user saw on every `make demo`."""
    import secrets

    if any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    if os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def _remote(obj):
    """The Ray remote version of a module-level function or class, made once per process."""
    import ray

    return ray.remote(obj)


_STEPS: dict = {}


def _call(cls, args, batch: pa.Table) -> pa.Table:
    """Build a task step once per worker process and reuse it (opening a library is not free)."""
    key = (cls, args)
    if key not in _STEPS:
        _STEPS[key] = cls(*args)
    return _STEPS[key](batch)


def make_executor(kind: str, address: str | None = None, workers: int | None = None) -> Executor:
    if kind == "local":
        return LocalExecutor(threads=workers or 1)
    if kind == "ray":
        return RayExecutor(address, workers)
    raise ValueError(f"unknown executor {kind!r} (local or ray)")
