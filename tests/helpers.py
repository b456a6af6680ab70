"""Small helpers shared by tests."""
from __future__ import annotations

import hashlib

import pyarrow.parquet as pq


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def table_versions(lib) -> dict[str, int]:
    return lib.store.versions()



def restore_counting_reads(lib, model_id: str, out: str, monkeypatch) -> tuple[set[str], int]:
    """Restore a model; returns the fragment ids it fetched and the Parquet rows it read."""
    seen: set[str] = set()
    rows_read = [0]
    real = lib.store.read_fragments

    def spy(ids, columns=None, version=None):
        t = real(ids, columns, version)
        seen.update(t["fragment_id"].to_pylist())
        return t

    def count_rows(self, *a, **k):
        t = real_groups(self, *a, **k)
        rows_read[0] += t.num_rows
        return t

    real_groups = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(lib.store, "read_fragments", spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", count_rows)
    lib.restore(model_id, out)
    monkeypatch.undo()
    return seen, rows_read[0]
