"""Fixed-width binary Arrow columns (fragment ids as 32 raw bytes, signature bits) as numpy,
without a Python object per value."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_width(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, width) uint8 view of a binary column whose values all have one width (ids, signature
    bits): no Python object per value, no copy for a single chunk."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), np.uint8)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + n + 1]
    width = int(offsets[1] - offsets[0])
    if (np.diff(offsets) != width).any() or arr.null_count:
        raise ValueError("binary values of unequal widths")
    return np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(n, width)


_HEX = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), np.uint16)  # byte -> its 2 hex chars


def hex_ids(raw: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Raw 32-byte ids as their hex strings, the id form of every other table (vectorised)."""
    chars = _HEX[fixed_width(raw)]
    offsets = np.arange(len(chars) + 1, dtype=np.int32) * 64
    return pa.Array.from_buffers(pa.string(), len(chars), [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def raw_ids(ids: pa.Array) -> pa.Array:
    """Hex ids as their 32 raw bytes (binary values); only hex ids pass."""
    raw = bytes.fromhex("".join(ids.to_pylist()))
    return pa.Array.from_buffers(pa.binary(32), len(ids), [None, pa.py_buffer(raw)]).cast(pa.binary())
