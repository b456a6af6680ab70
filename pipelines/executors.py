"""Executors run steps; steps do not know which one runs them (as in datatrove).

LocalExecutor: in this process, in order (tests, debugging, the baseline the Ray run is
measured against). RayExecutor: Ray Data tasks for CPU steps, an actor pool for signatures
(one GPU per actor when the cluster has GPUs), and a distributed group-by for LSH buckets.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterator, Protocol

import pyarrow as pa


FORWARDED_ENV = ("AWS_", "HAAGENTI_", "GOOGLE_", "AZURE_")


class Executor(Protocol):
    def map(self, fn: Callable[[dict], dict], rows: list[dict]) -> list[dict]: ...

    def flat_map(self, fn: Callable[[dict], list[dict]], rows: list[dict], schema: pa.Schema) -> pa.Table: ...

    def map_batches(self, cls: type, args: tuple, table: pa.Table, batch_size: int, actors: bool = False) -> Iterator[pa.Table]: ...

    def group_by(self, table: pa.Table, keys: list[str], fn: Callable[[pa.Table], pa.Table]) -> pa.Table: ...


class LocalExecutor:
    def map(self, fn, rows):
        return [fn(r) for r in rows]

    def flat_map(self, fn, rows, schema):
        out = [x for r in rows for x in fn(r)]
        return pa.Table.from_pylist(out, schema=schema)

    def map_batches(self, cls, args, table, batch_size, actors=False):
        step = cls(*args)
        for start in range(0, table.num_rows, batch_size):
            yield step(table.slice(start, batch_size))

    def group_by(self, table, keys, fn):
        if table.num_rows == 0:
            return fn(table.slice(0, 0))
        t = table.sort_by([(k, "ascending") for k in keys])
        key_cols = [t[k].to_pylist() for k in keys]
        parts, start = [], 0
        for i in range(1, t.num_rows + 1):
            if i == t.num_rows or any(c[i] != c[start] for c in key_cols):
                parts.append(fn(t.slice(start, i - start)))
                start = i
        return pa.concat_tables(parts)


class RayExecutor:
    """Runs steps on a Ray cluster (started locally unless `address` / RAY_ADDRESS names one).
    Ray retries tasks whose worker died (3 times by default) and restarts pool actors, and the
    driver commits only the final outputs, so a lost worker costs time, never rows.
    Pools are sized to leave CPUs for Ray Data's read and write tasks: an actor pool that takes
    every CPU deadlocks silently on a small machine (shared/ray-on-small-machines.md)."""

    def __init__(self, address: str | None = None, workers: int | None = None):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 1))
        self.gpus = int(resources.get("GPU", 0))
        self.workers = workers or max(1, self.gpus or self.cpus - 1)
        # Workers may have started before the driver's environment was set (e.g. S3 endpoint and
        # credentials): forward the variables the steps read.
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        self.runtime_env = {"env_vars": env} if env else None
        # On a 1-2 CPU cluster a whole-CPU task could never run beside a pool actor: use halves.
        self.task_cpus = 1.0 if self.cpus >= 4 else 0.5

    def map(self, fn, rows):
        import ray.data

        if not rows:
            return []
        return ray.data.from_items(rows).map(fn, num_cpus=self.task_cpus, runtime_env=self.runtime_env).take_all()

    def flat_map(self, fn, rows, schema):
        import ray
        import ray.data

        if not rows:
            return schema.empty_table()
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).flat_map(fn, num_cpus=self.task_cpus, runtime_env=self.runtime_env)
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()

    def map_batches(self, cls, args, table, batch_size, actors=False):
        import ray.data

        if table.num_rows == 0:
            return iter(())
        # Blocks made here, not by repartition(): that all-to-all step asks a whole CPU per task
        # and never runs beside a pool actor on a 1-CPU cluster.
        ds = ray.data.from_arrow([table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)])
        if actors:
            size = max(1, min(self.workers, self.gpus or max(self.cpus - 1, 1)))
            resources = {"num_gpus": 1} if self.gpus else {"num_cpus": 0.5}
            ds = ds.map_batches(cls, fn_constructor_args=args, batch_size=batch_size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=size), runtime_env=self.runtime_env, max_restarts=3, max_task_retries=3, **resources)
        else:
            ds = ds.map_batches(functools.partial(_call, cls, args), batch_size=batch_size, batch_format="pyarrow", num_cpus=self.task_cpus, runtime_env=self.runtime_env)
        return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)

    def group_by(self, table, keys, fn):
        import ray
        import ray.data

        if table.num_rows == 0:
            return fn(table.slice(0, 0))
        ds = ray.data.from_arrow(table).groupby(keys).map_groups(fn, batch_format="pyarrow", num_cpus=self.task_cpus)
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        return pa.concat_tables(tables) if tables else fn(table.slice(0, 0))


_STEPS: dict = {}


def _call(cls, args, batch: pa.Table) -> pa.Table:
    """Build a task step once per worker process and reuse it (opening a library is not free)."""
    key = (cls, args)
    if key not in _STEPS:
        _STEPS[key] = cls(*args)
    return _STEPS[key](batch)


def make_executor(kind: str, address: str | None = None, workers: int | None = None) -> Executor:
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address, workers)
    raise ValueError(f"unknown executor {kind!r} (local or ray)")


def sort_rows(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])
