"""Executors run steps; steps do not know which one runs them (as in datatrove).

`Executor` is what a driver of ingest steps needs; `LocalExecutor` runs them in this process,
over `haagenti.parallel.Workers` threads (zstd, BLAKE3 and numpy release the GIL). The Ray
executor (`pipelines.executors.RayExecutor`) runs the same steps on a cluster.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Protocol

import pyarrow as pa

from haagenti.groups import group_starts, sort_rows
from haagenti.parallel import Workers


class Executor(Protocol):
    # Bytes of step results the driver may hold before it must commit them (None: no limit
    # beyond the library's batch_bytes). On Ray a result is a view into the object store and
    # pins it: a driver holding 64 MiB of a 75 MiB store made the encoders wait (3.5 s against
    # 1.2-1.9 s for 28 models).
    held_bytes: int | None
    # Whether steps run in the driver's process: they may then be handed objects of its memory
    # (haagenti.ingest_steps.RunBytes) and read the library through the driver's index.
    shares_memory: bool

    def map(self, fn: Callable[[dict], Any], rows: list[dict]) -> list[Any]: ...

    def map_batches(self, cls: type, args: tuple, table: pa.Table, batch_size: int, actors: bool = False) -> Iterator[pa.Table]:
        """`cls(*args)` over slices of `batch_size` rows of `table`, results in order, one step
        object per worker (a step may hold readers that are not shared across threads)."""
        ...

    def group_by(self, table: pa.Table, keys: list[str], fn: Callable[[pa.Table], pa.Table], max_rows: int | None = None) -> pa.Table:
        """`fn` over parts of `table` sorted by `keys`, each holding whole groups (one part or
        many) and, with `max_rows`, about that many rows at most (a group is never split)."""
        ...

    def in_order(self, fn: Callable[..., Any], *args) -> Future:
        """`fn(*args)` in the driver after every call given before it: a lane of its own where
        that overlaps the next work (the commits), else now."""
        ...


class LocalExecutor:
    """Steps in this process over `threads` worker threads (1: in order, in the caller).
    `map` and `map_batches` spread their calls over the threads and keep the results in order;
    `group_by` runs its parts in order in the caller, since its function (the match step) holds
    one index reader. `map_batches` computes at most two slices per thread ahead of the
    consumer, so results stream as they do on Ray."""

    held_bytes = None
    shares_memory = True

    def __init__(self, threads: int = 1):
        self.workers = Workers(threads)

    def map(self, fn, rows):
        return self.workers.each(fn, rows)

    def map_batches(self, cls, args, table, batch_size, actors=False):
        steps = threading.local()

        def run(batch: pa.Table) -> pa.Table:
            if not hasattr(steps, "step"):
                steps.step = cls(*args)
            return steps.step(batch)

        window = 2 * self.workers.threads if self.workers.threads > 1 else 1
        slices = [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)]
        for start in range(0, len(slices), window):
            yield from self.workers.each(run, slices[start : start + window])

    def in_order(self, fn, *args):
        return self.workers.in_order(fn, *args)

    def group_by(self, table, keys, fn, max_rows=None):
        t = sort_rows(table, keys)
        parts = cut_at_groups(t, keys, -(-t.num_rows // max_rows)) if max_rows and t.num_rows else [t]
        return pa.concat_tables([fn(p) for p in parts])

    def close(self) -> None:
        self.workers.close()

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cut_at_groups(t: pa.Table, keys: list[str], n: int) -> list[pa.Table]:
    """`t` (sorted by `keys`) in about `n` contiguous parts, never splitting a group."""
    starts = group_starts(t, keys)
    step = max(1, t.num_rows // n)
    cuts = [0]
    for s in starts[1:].tolist():
        if s - cuts[-1] >= step or s == t.num_rows:
            cuts.append(s)
    return [t.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
