"""Threads for the data path. zstd, BLAKE3 and numpy release the GIL, so fragment work (hash,
sign, encode, decode) spreads over cores inside one process without copying a byte; the Ray
pipeline spreads the same functions over processes instead."""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def thread_count(threads: int | None) -> int:
    """`threads` as given, or every core for 0 / None."""
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be 0 (all cores) or more, not {threads}")
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """`threads` workers. `map` keeps order, hands each worker a contiguous slice (per-thread
    buffers stay warm) and runs the first slice in the calling thread, so a stage submitted in
    the background still fans out over every worker; with one thread everything runs inline,
    in the caller, as before."""

    def __init__(self, threads: int | None = 0):
        self.threads = thread_count(threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="haagenti") if self.threads > 1 else None

    def map(self, fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
        """fn over contiguous slices of `items`, results concatenated in order."""
        if self._pool is None or len(items) < 2:
            return fn(items)
        k = min(self.threads, len(items))
        cuts = [len(items) * i // k for i in range(k + 1)]
        futures = [self._pool.submit(fn, items[a:b]) for a, b in zip(cuts[1:], cuts[2:])]
        first = fn(items[: cuts[1]])
        return first + [r for f in futures for r in f.result()]

    def each(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """fn on every item, in order."""
        return self.map(lambda part: [fn(x) for x in part], list(items))

    def submit(self, fn: Callable[..., R], *args) -> "Future[R]":
        """Run fn in the background (inline with one thread): overlap a stage with the next."""
        if self._pool is None:
            f: Future[R] = Future()
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # re-raised by result(), as a pool's future would
                f.set_exception(e)
            return f
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
