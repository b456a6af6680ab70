"""Tables keyed by an int64, read by key: every data file is sorted by its key and carries the
key's min/max in its Delta add action and in its row groups' statistics, so a lookup opens only
the files whose range holds a wanted key and reads only those row groups (docs/decisions/0045-located-by-id.md:
why sorted row groups rather than Delta partitions or bloom filters). Generic: an index layout
(haagenti.index) declares its tables as KeyedTables and appends, reads and sorts them here; the
store's own primitives (`snapshot`, `commit_add`, `sort_by_key`) do the Delta work."""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake.transaction import AddAction

from haagenti.store.damage import damaged
from haagenti.store.files import new_data_file
from haagenti.store.schema import SCHEMAS, conform, empty, project

if TYPE_CHECKING:
    from haagenti.store.delta import LibraryStore


@dataclass(frozen=True)
class KeyedTable:
    name: str
    key: str
    group_rows: int  # rows per row group: the unit a lookup reads (docs/decisions/0045-located-by-id.md)
    dictionary: tuple[str, ...] = ()  # string columns of few values a commit (dtype, data file) stored as a dictionary
    # (column, Parquet encoding) written without a dictionary: DELTA_BINARY_PACKED for a sorted
    # key (the gaps, not the values), PLAIN for random bytes a per-group dictionary only repeats.
    # Readers decode any encoding: changing one changes bytes on disk, never rows.
    encodings: tuple[tuple[str, str], ...] = ()
    # Lookups mostly miss (the ids of a new model): read the key column of the row groups a
    # key's range falls in first, and the other columns only of those that hold one.
    keys_first: bool = False


# A file of fewer rows is appended without the spec's encodings: its sorted keys' gaps span most
# of the key range and DELTA_BINARY_PACKED pads 32-value miniblocks (76 random keys: 13.8 B a key
# against 10.1 as a dictionary; 256: 7.7 against 9.4). docs/decisions/0276-index-encodings.md
ENCODED_ROWS = 256


def dictionary_columns(spec: KeyedTable, schema: pa.Schema, encodings: dict[str, str]) -> list[str]:
    """The columns stored as a dictionary: integers (few values a commit: shards, sizes, depths)
    and the spec's strings, less those written in `encodings`."""
    return [c for c in [f.name for f in schema if pa.types.is_integer(f.type)] + list(spec.dictionary) if c not in encodings]


@dataclass
class ReadCounts:
    """What lookups read: data files opened, row groups and their bytes (compressed)."""

    files: int = 0
    row_groups: int = 0
    bytes: int = 0


def append_keyed(store: LibraryStore, spec: KeyedTable, rows: pa.Table, note: str = "") -> None:
    """Append rows in one commit: one file sorted by the key, row groups of `group_rows`,
    statistics on the key only (small footers), nothing compressed (ids and signature bits are
    random bytes), the spec's encodings from ENCODED_ROWS rows, the key's range in the add
    action."""
    if rows.num_rows == 0:
        return
    schema = SCHEMAS[spec.name]
    rows = conform(rows, schema).sort_by(spec.key)
    fname = new_data_file()
    path = posixpath.join(store.root, spec.name, fname)
    encodings = dict(spec.encodings) if rows.num_rows >= ENCODED_ROWS else {}
    with store.fs.open(path, "wb") as f:
        pq.write_table(rows, f, row_group_size=spec.group_rows, compression="none", use_dictionary=dictionary_columns(spec, schema, encodings),
                       column_encoding=encodings or None, write_statistics=[spec.key])
        size = f.tell()  # what was written, without a HEAD request
    key = rows[spec.key]
    stats = {"numRecords": rows.num_rows, "minValues": {spec.key: key[0].as_py()}, "maxValues": {spec.key: key[-1].as_py()}, "nullCount": {spec.key: 0}}
    action = AddAction(fname, size, {}, int(time.time() * 1000), True, json.dumps(stats))
    store.commit_add(spec.name, [action], note)


def sort_keyed(store: LibraryStore, spec: KeyedTable, target_bytes: int) -> int:
    """Rewrite the table sorted by its key into files of about `target_bytes` with disjoint key
    ranges (LibraryStore.sort_by_key): a lookup then opens one file per key range. Returns data
    files replaced (0: nothing changed since the last sort)."""
    return store.sort_by_key(spec.name, spec.key, spec.group_rows, target_bytes, dict(spec.encodings))


class KeyedReader:
    """Reads rows of a keyed table by key, touching only files and row groups whose key range
    holds a wanted key. Row-group ranges are cached per data file (files never change); footers
    too with `keep_footers`, for a reader that comes back to the same files (an ingest, batch
    after batch). A footer costs ~3.5 KB of memory per row group (27 MB per 2M band rows)."""

    def __init__(self, store: LibraryStore, spec: KeyedTable, keep_footers: bool = True):
        self.store, self.spec, self.keep_footers = store, spec, keep_footers
        self.ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.footers: dict[str, pq.FileMetaData] = {}  # of the files this reader opened (one ingest's)
        self.counts = ReadCounts()

    def files(self) -> list[tuple[str, int, int]]:
        """(path, min key, max key) of the latest snapshot's data files."""
        return [f[:3] for f in self._files()]

    def _files(self) -> list[tuple[str, int, int, int | None]]:
        """(path, min key, max key, rows) of the latest snapshot's data files."""
        paths, actions = self.store.snapshot(self.spec.name)
        return list(zip(paths, actions[f"min.{self.spec.key}"], actions[f"max.{self.spec.key}"], actions.get("num_records", [None] * len(paths))))

    def read(self, keys: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows whose key is in `keys` (sorted, unique), with `columns`. A file of one row group
        (one commit's rows, before compaction merges them) is read whole into the store's column
        cache: every file of an uncompacted table holds a key of most lookups, and reopening them
        all on each one cost a request per file on S3 (docs/decisions/0045-located-by-id.md)."""
        schema = SCHEMAS[self.spec.name]
        need = columns if self.spec.key in columns else columns + [self.spec.key]
        out = []
        for path, lo, hi, rows in self._files():
            sel = keys[(keys >= lo) & (keys <= hi)] if lo is not None else keys
            if len(sel):
                if rows is not None and rows <= self.spec.group_rows:
                    t = self.store.files.columns(path, schema.names, schema)  # every column: one cache entry serves every lookup
                    t = t.filter(pc.is_in(t[self.spec.key], value_set=_int64s(sel)))
                else:
                    t = self._read_file(path, sel, need, schema)
                if t is not None and t.num_rows:
                    out.append(t.select(columns))
        return pa.concat_tables(out) if out else empty(project(schema, columns))

    def _read_file(self, path: str, keys: np.ndarray, columns: list[str], schema: pa.Schema) -> pa.Table | None:
        with damaged(f"data file {path}"), self.store.files.open(path) as src:
            pf = pq.ParquetFile(src, metadata=self.footers.get(path))
            if self.keep_footers:
                self.footers[path] = pf.metadata
            lows, highs = self._ranges(path, pf.metadata)
            first = np.searchsorted(keys, lows, side="left")
            hit = first < len(keys)
            hit[hit] = keys[first[hit]] <= highs[hit]
            groups = np.flatnonzero(hit).tolist()
            self.counts.files += 1
            if not groups:
                return None
            wanted = _int64s(keys)
            if self.spec.keys_first and columns != [self.spec.key]:
                groups = self._holding(pf, groups, wanted)
                if not groups:
                    return None
            self.counts.row_groups += len(groups)
            self.counts.bytes += column_bytes(pf.metadata, groups, columns)
            t = pf.read_row_groups(groups, columns=columns, use_threads=False)
        t = conform(t, project(schema, columns))
        return t.filter(pc.is_in(t[self.spec.key], value_set=wanted))

    def _holding(self, pf: pq.ParquetFile, groups: list[int], wanted: pa.Array) -> list[int]:
        """Those of `groups` that hold a wanted key, from their key column alone: a probe of
        keys mostly absent (a new model's ids) reads 8 B a row instead of whole rows."""
        self.counts.bytes += column_bytes(pf.metadata, groups, [self.spec.key])
        found = pc.is_in(pf.read_row_groups(groups, columns=[self.spec.key], use_threads=False)[self.spec.key], value_set=wanted)
        ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in groups])
        hits = np.add.reduceat(found.to_numpy(zero_copy_only=False), np.concatenate([[0], ends[:-1]]))
        return [g for g, h in zip(groups, hits) if h]

    def _ranges(self, path: str, md: pq.FileMetaData) -> tuple[np.ndarray, np.ndarray]:
        got = self.ranges.get(path)
        if got is None:
            col = md.schema.names.index(self.spec.key)
            lows, highs = [], []
            for g in range(md.num_row_groups):
                s = md.row_group(g).column(col).statistics
                ok = s is not None and s.has_min_max
                lows.append(s.min if ok else -(2**63))
                highs.append(s.max if ok else 2**63 - 1)
            got = self.ranges[path] = (np.array(lows, np.int64), np.array(highs, np.int64))
        return got


def column_bytes(md: pq.FileMetaData, groups: list[int], columns: list[str]) -> int:
    """Bytes on disk of these columns' chunks in these row groups: what reading them reads."""
    at = [md.schema.names.index(c) for c in columns]
    return sum(md.row_group(g).column(c).total_compressed_size for g in groups for c in at)


def _int64s(values: np.ndarray) -> pa.Array:
    """An int64 array from its buffer: pa.array() on a numpy array imports pandas (0.5 s of a
    cold process's first lookup)."""
    values = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])
