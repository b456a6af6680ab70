"""Reading the tables' data files: Parquet through pyarrow, memory-mapped when local. Data files
of a Delta table are never rewritten in place (a path names one immutable file), so their
footers, row-group boundaries and small metadata columns are cached by path."""
from __future__ import annotations

import posixpath
import re
import uuid
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from haagenti.lru import SizedLru
from haagenti.store.damage import damaged
from haagenti.store.schema import SCHEMAS, conform, empty, project

# Parquet reads decode on the calling thread: Arrow's pool hands each column of a ~2 MiB row
# group to another thread, and the hand-offs cost more than they save. Restores of the example
# family, paired in one process, 16 rounds each: 1.04x (exact) and 1.03x (with similarity)
# faster on one thread, 1.14x while the disk was busy writing back. Parallelism comes from
# running more workers (the Ray pipeline), one core each, and the bench figures are per core.
ARROW_THREADS = False
# Parsed footers kept, by their serialized bytes: a parsed footer takes several times its
# serialized size (docs/decisions/0045-located-by-id.md), and a process that reads
# fragments from many files over its life (a loader, a long restore) must not keep them all.
FOOTER_CACHE_BYTES = 16 * 1024 * 1024


_FILE_UUID = re.compile(r"part-\d+-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def new_data_file(replaces: str | None = None) -> str:
    """The name of a new data file. A file written to replace another (gc's rewrite without
    deleted rows) keeps that file's uuid first in its name, so an `ids` row naming the uuid of
    the file its fragment was appended in still finds it after any number of rewrites."""
    kept = data_file_uuid(replaces) if replaces else None
    return f"part-00000-{kept + '-' if kept else ''}{uuid.uuid4()}-c000.parquet"


def data_file_uuid(path: str) -> str | None:
    """The uuid a data file's name starts with (new_data_file); None for a name not of that form."""
    m = _FILE_UUID.match(posixpath.basename(path))
    return m.group(1) if m else None


def strings(values: Iterable[str | None]) -> pa.StringArray:
    """A string array (None: null) built from its buffers: pa.array() on Python objects imports
    pandas to ask whether they are a DataFrame (0.15-0.4 s of a cold process's first read,
    which needs no pandas: the read path builds no Arrow data from Python objects)."""
    values = list(values)
    data = [v.encode() if v is not None else b"" for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("strings: over 2 GiB of text")
    valid = np.array([v is not None for v in values], bool)
    mask = pa.py_buffer(np.packbits(valid, bitorder="little")) if not valid.all() else None
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data)), mask)


def positions(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Indices where a boolean mask holds, read from the result's buffer (to_numpy() and
    np.asarray import pandas too)."""
    idx = pc.indices_nonzero(mask)
    if not len(idx):
        return np.empty(0, np.uint64)
    return np.frombuffer(idx.buffers()[1], np.uint64, count=len(idx), offset=idx.offset * 8)


class DataFiles:
    """Data files of one library, with their caches."""

    def __init__(self, fs, local: bool):
        self.fs, self.local = fs, local
        self._footers: SizedLru[pq.FileMetaData] = SizedLru(FOOTER_CACHE_BYTES, size=lambda md: md.serialized_size)
        self._row_group_ends: dict[str, np.ndarray] = {}
        self._columns: SizedLru[pa.Table] = SizedLru(256 * 1024 * 1024, size=lambda t: t.nbytes)
        # Sizes of data files as their Delta add actions record them. A data file is never
        # rewritten in place, so a file opened with its size and details needs no HEAD request
        # (s3fs makes one per open otherwise, for the size and an ETag to compare each read with).
        self._sizes: dict[str, int] = {}

    def learn_sizes(self, paths: list[str], sizes: list[int]) -> None:
        if "s3" in self.fs.protocol:  # s3fs's files take them; other stores' files open as before
            self._sizes.update(zip(paths, sizes))

    def open(self, path: str):
        """A data file: memory-mapped through pyarrow when local (no Python-level reads),
        through fsspec otherwise."""
        if self.local:
            return pa.memory_map(path, "r")
        return self._remote(path)

    def _remote(self, path: str):
        size = self._sizes.get(path)
        if size is None:
            return self.fs.open(path, "rb")
        f = self.fs.open(path, "rb", size=size)
        f.details = {"name": path, "size": size, "type": "file"}
        return f

    def footer(self, path: str) -> pq.FileMetaData:
        md = self._footers.get(path)
        if md is None:
            with damaged(f"data file {path}"), self.open(path) as src:
                md = pq.ParquetFile(src).metadata
            self._footers.put(path, md)
        return md

    def columns(self, path: str, columns: list[str], schema: pa.Schema) -> pa.Table:
        """Columns of one data file, cast to the declared schema (files rewritten by delta-rs
        hold string_view columns); cached unless they hold blobs."""
        key = (path, tuple(columns))
        t = self._columns.get(key)
        if t is None:
            with damaged(f"data file {path}"), self.open(path) as src:
                t = pq.ParquetFile(src, metadata=self.footer(path)).read(columns=columns, use_threads=ARROW_THREADS)
                t = conform(t, project(schema, columns))
            if "blob" not in columns:
                self._columns.put(key, t)
        return t

    def row_groups(self, path: str, columns: list[str], schema: pa.Schema) -> Iterator[pa.Table]:
        """Columns of one data file, a row group at a time, cast to the declared schema and not
        cached. Plain reads, not the memory map: a mapped file's pages count in the process's
        RSS until it is closed, and `iter_batches` held a whole ~64 MiB fragments file."""
        with damaged(f"data file {path}"), pa.OSFile(path) if self.local else self._remote(path) as src:
            pf = pq.ParquetFile(src, metadata=self.footer(path))
            for g in range(pf.num_row_groups):
                yield conform(pf.read_row_group(g, columns=columns, use_threads=ARROW_THREADS), project(schema, columns))

    def fragments(self, paths: list[str], ids: Iterable[str], columns: list[str], hints: dict[str, set[str]] | None = None) -> pa.Table:
        """Rows of the given fragment ids from fragments data files, reading only the row
        groups that hold them. `hints` (data file -> ids said to be in it, each file one of
        `paths`) are looked in first; any id not found where a hint says, or without a hint,
        is looked for in every file (exact, but O(files))."""
        wanted = set(ids)
        parts = [self._rows(path, strings(there & wanted), columns) for path, there in (hints or {}).items() if there & wanted]
        rest = wanted - {i for t in parts for i in t["fragment_id"].to_pylist()}
        if rest:
            values = strings(rest)
            parts += [self._rows(path, values, columns) for path in paths]
        parts = [t for t in parts if t.num_rows]
        if not parts:
            return empty(project(SCHEMAS["fragments"], columns))
        # A fragment written twice by racing ingests is the same bytes: keep one row.
        return _first_per_id(pa.concat_tables(parts))

    def _rows(self, path: str, wanted: pa.Array, columns: list[str]) -> pa.Table:
        """Rows of one fragments data file whose id is in `wanted` (`columns` hold the id)."""
        groups = self._groups_holding(path, wanted)
        if not groups:
            return empty(project(SCHEMAS["fragments"], columns))
        with damaged(f"data file {path}"), self.open(path) as src:
            pf = pq.ParquetFile(src, metadata=self.footer(path))
            t = conform(pf.read_row_groups(groups, columns=columns, use_threads=ARROW_THREADS), project(SCHEMAS["fragments"], columns))
        return _rows_where(t, pc.is_in(t["fragment_id"], wanted))

    def _groups_holding(self, path: str, wanted: pa.Array) -> list[int]:
        """Row groups of one fragments data file that hold any of `wanted`, found exactly on the
        file's id column (cached) rather than on min/max statistics: ids are hashes, so every
        row group's id range spans most of the id space and statistics would select them all."""
        ids = self.columns(path, ["fragment_id"], SCHEMAS["fragments"])["fragment_id"]
        rows = positions(pc.is_in(ids, value_set=wanted))
        if not len(rows):
            return []
        ends = self._row_group_ends.get(path)
        if ends is None:
            md = self.footer(path)
            ends = self._row_group_ends[path] = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])
        return np.unique(np.searchsorted(ends, rows, side="right")).tolist()


def _rows_where(t: pa.Table, mask: pa.ChunkedArray) -> pa.Table:
    """Rows of `t` where `mask` holds, as zero-copy slices of their contiguous runs: a filter
    would copy every selected blob, and a model's fragments lie in runs (ingest order)."""
    idx = positions(mask)
    if len(idx) == t.num_rows:
        return t
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(idx)]])
    return pa.concat_tables([t.slice(int(idx[a]), int(b - a)) for a, b in zip(starts, ends)] or [t.slice(0, 0)])


def _first_per_id(t: pa.Table) -> pa.Table:
    if t.num_rows == len(pc.unique(t["fragment_id"])):
        return t
    seen: set[str] = set()
    keep = []
    for i, fid in enumerate(t["fragment_id"].to_pylist()):
        if fid not in seen:
            seen.add(fid)
            keep.append(i)
    return t.take(keep)
