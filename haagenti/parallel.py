"""Threads for the data path. zstd, BLAKE3 and numpy release the GIL, so fragment work (hash,
sign, encode, decode) spreads over cores inside one process without copying a byte; the Ray
pipeline spreads the same functions over processes instead."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def thread_count(threads: int | None) -> int:
    """`threads` as given, or every core for 0 / None."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)):
        raise ValueError(f"threads must be a whole number, not {threads!r}")
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be 0 (all cores) or more, not {threads}")
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def inline(fn: Callable[..., R], *args) -> "Future[R]":
    """fn run now, in the caller, as a finished Future."""
    f: Future[R] = Future()
    try:
        f.set_result(fn(*args))
    except BaseException as e:  # re-raised by result(), as a pool's future would
        f.set_exception(e)
    return f


class Workers:
    """`threads` workers. `map` keeps order and runs in the calling thread too, so a stage
    submitted in the background still fans out over every worker; with one thread everything
    runs inline, in the caller, as before."""

    SLICES_PER_THREAD = 4  # a thread slowed by other work (a read, a commit, another process) takes fewer

    def __init__(self, threads: int | None = 0):
        self.threads = thread_count(threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="haagenti") if self.threads > 1 else None
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="haagenti-lane") if self.threads > 1 else None

    def map(self, fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
        """fn over contiguous slices of `items`, results concatenated in order. The caller and
        up to `threads` - 1 pool workers each take the next slice until none is left: with one
        fixed slice per thread, the thread that shared its core finished last and the others
        waited (docs/decisions/0037-every-core.md)."""
        if self._pool is None or len(items) < 2:
            return fn(items)
        size = -(-len(items) // (self.threads * self.SLICES_PER_THREAD))
        starts = range(0, len(items), size)
        results: list[list[R] | None] = [None] * len(starts)
        taken = iter(range(len(starts)))
        lock = threading.Lock()

        def run() -> None:
            while True:
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                results[i] = fn(items[starts[i] : starts[i] + size])

        helpers = [self._pool.submit(run) for _ in range(min(self.threads, len(starts)) - 1)]
        try:
            run()  # the caller works too, so it never waits for a helper still queued behind other work
        finally:  # every slice is taken: cancel the helpers not started, wait for the running ones
            errors = [None if f.cancel() else f.exception() for f in helpers]
        if (error := next((e for e in errors if e is not None), None)) is not None:
            raise error
        return [r for part in results for r in part]  # type: ignore[union-attr]

    def each(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """fn on every item, in order."""
        return self.map(lambda part: [fn(x) for x in part], list(items))

    def submit(self, fn: Callable[..., R], *args) -> "Future[R]":
        """Run fn in the background (inline with one thread): overlap a stage with the next."""
        return self._run(self._pool, fn, *args)

    def ahead(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, the next one made in the background (inline with one thread) while the caller
        works on this one: a producer (the cut) overlaps its consumer."""
        it = iter(items)
        end = object()
        coming = self.submit(next, it, end)
        while True:
            item = coming.result()
            if item is end:
                return
            coming = self.submit(next, it, end)
            yield item  # type: ignore[misc]

    @staticmethod
    def _run(pool: ThreadPoolExecutor | None, fn: Callable[..., R], *args) -> "Future[R]":
        return pool.submit(fn, *args) if pool is not None else inline(fn, *args)

    def in_order(self, fn: Callable[..., R], *args) -> "Future[R]":
        """Run fn in the background after everything given to `in_order` before it (inline with
        one thread), on a thread of its own: a stage whose effects must land in order (commits)
        overlaps the next batch's work without holding one of the `threads`."""
        return self._run(self._lane, fn, *args)

    def close(self) -> None:
        for pool in (self._pool, self._lane):
            if pool is not None:
                pool.shutdown(wait=True)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
