"""Sorted Arrow tables cut into groups of equal keys: shared by the reference matcher (which pairs
fragments within LSH buckets) and the pipeline executors (which cut work at group boundaries)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def sort_rows(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys])


def group_starts(t: pa.Table, keys: list[str]) -> np.ndarray:
    """Row indices where a group starts in `t` (sorted by `keys`), then `len(t)`."""
    n = t.num_rows
    change = np.zeros(max(n - 1, 0), dtype=bool)
    for k in keys:
        col = t[k].combine_chunks()
        change |= pc.not_equal(col.slice(1), col.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(change) + 1, [n]]).astype(np.int64)


def rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal neighbouring `keys` (0, 1, ... per run):
    with keys sorted, the first `r` of each group are those with rank < r."""
    block = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.arange(len(keys)) - np.repeat(block, np.diff(np.r_[block, len(keys)]))
