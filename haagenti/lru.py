"""A least-recently-used cache bounded by the total size of what it holds."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class SizedLru(Generic[V]):
    """Values by key; the least recently used are dropped once their sizes (by `size`, `len`
    unless told) exceed `max_bytes`. A value larger than the whole cache is not kept."""

    def __init__(self, max_bytes: int, size: Callable[[V], int] = len):  # type: ignore[assignment]
        self.max_bytes = max_bytes
        self.size = 0
        self._size_of = size
        self._d: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()  # ingest and restore threads share a cache

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._d.get(key)
            if value is not None:
                self._d.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        n = self._size_of(value)
        with self._lock:
            if key in self._d or n > self.max_bytes:
                return
            self._d[key] = value
            self.size += n
            while self.size > self.max_bytes:
                _, old = self._d.popitem(last=False)
                self.size -= self._size_of(old)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d
