"""The library's tables as Delta Lake tables.

Why Delta (docs/decisions.md has the measurements): each append is one atomic commit, a
reader sees a whole table version or the previous one, two writers race on the same log
entry and the loser gets an error instead of overwriting, and the tables stay plain
Parquet that pyarrow, DuckDB, polars and Ray Data read without haagenti.

Tables: fragments, signatures, manifests, models. The order an ingest commits them in is the
committer's (haagenti/writer.py, docs/format.md): a model is visible only once everything it
references is committed.
"""
from __future__ import annotations

import atexit
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction

from haagenti.errors import FragmentError, LibraryError
from haagenti.fsio import filesystem_for, s3_endpoint
from haagenti.lru import SizedLru

LIBRARY_FORMAT_VERSION = 4  # 2: BLAKE3 ids and file hashes; 3: file layout digests; 4: invariants in haagenti.json

SCHEMAS: dict[str, pa.Schema] = {
    "fragments": pa.schema(
        [
            ("fragment_id", pa.string()),
            ("dtype", pa.string()),
            ("n_elements", pa.int64()),
            ("raw_size", pa.int64()),
            ("stored_size", pa.int64()),
            ("encoding", pa.string()),
            ("codec", pa.string()),
            ("ref_id", pa.string()),
            ("ref_dtype", pa.string()),
            ("fragment_type", pa.string()),
            ("quality", pa.string()),
            ("blob", pa.large_binary()),
        ]
    ),
    "signatures": pa.schema(
        [
            ("fragment_id", pa.string()),
            ("dtype", pa.string()),
            ("n_elements", pa.int64()),
            ("bits", pa.binary()),
            ("scale", pa.float64()),
            ("mean", pa.float64()),
            ("std", pa.float64()),
            ("min", pa.float64()),
            ("max", pa.float64()),
            ("nonfinite", pa.int64()),
            ("histogram", pa.list_(pa.int64())),
        ]
    ),
    "manifests": pa.schema(
        [
            ("model_id", pa.string()),
            ("file_index", pa.int32()),
            ("tensor_index", pa.int32()),
            ("tensor_name", pa.string()),
            ("dtype", pa.string()),
            ("shape", pa.list_(pa.int64())),
            ("fragment_seq", pa.int32()),
            ("fragment_id", pa.string()),
            ("elem_offset", pa.int64()),
            ("elem_count", pa.int64()),
            ("fragment_type", pa.string()),
            ("source_fragment_id", pa.string()),  # differs from fragment_id only for lossy sharing
            ("max_abs_error", pa.float64()),
            ("rel_l2_error", pa.float64()),
        ]
    ),
    "models": pa.schema(
        [
            ("model_id", pa.string()),
            ("family", pa.string()),
            ("content_hash", pa.string()),
            ("raw_bytes", pa.int64()),
            ("n_tensors", pa.int64()),
            ("lossy", pa.bool_()),
            (
                "files",
                pa.list_(
                    pa.struct(
                        [
                            ("name", pa.string()),
                            ("format", pa.string()),
                            ("size", pa.int64()),
                            ("blake3", pa.string()),
                            ("header", pa.large_binary()),
                            ("layout", pa.string()),
                        ]
                    )
                ),
            ),
            ("source_uris", pa.list_(pa.string())),
            ("ingest_seq", pa.int64()),
            ("format_version", pa.int32()),
        ]
    ),
}

# Small row groups on the fragments table let a restore read only the fragments it needs.
# Rows stay in the order they were ingested (a model's tensors in file order), so a restore,
# which walks a model in that order, reads a run of neighbouring row groups per batch, and its
# delta references (a base model, stored in the same tensor order) likewise. Appends also start
# a new row group where the writer says a run ends (one model's new fragments): a row group
# straddling two models made each restore read its neighbour's rows too (on the example
# family, 50 MB read to restore 29 MB of stored fragments).
_FRAGMENT_ROW_GROUP_BYTES = 2 * 1024 * 1024
# Parquet reads decode on the calling thread: Arrow's pool hands each column of a ~2 MiB row
# group to another thread, and the hand-offs cost more than they save. Restores of the example
# family, paired in one process, 16 rounds each: 1.04x (exact) and 1.03x (with similarity)
# faster on one thread, 1.14x while the disk was busy writing back. Parallelism comes from
# running more workers (the Ray pipeline), one core each, and the bench figures are per core.
_ARROW_THREADS = False
ORPHAN_HOURS = 1


def storage_options_for(url: str) -> dict[str, str]:
    """Delta (object_store) options from the standard AWS_* environment, so the same env that
    configures s3fs/boto configures the tables. S3 commits use conditional put (If-None-Match),
    which keeps concurrent writers from overwriting each other without a lock service."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    opts = {"conditional_put": "etag", "AWS_REGION": os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))}
    endpoint = s3_endpoint()
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    return opts


_MEMORY_LIBRARIES: dict[str, str] = {}


def _memory_library(url: str) -> str:
    """memory://NAME: a library private to this process that vanishes when it exits, as fsspec's
    memory filesystem does. It lives in a temporary folder: Delta commits run in delta-rs, which
    cannot see fsspec's in-process files, and delta-rs' own memory store is invisible to fsspec."""
    name = url.rstrip("/")
    path = _MEMORY_LIBRARIES.get(name)
    if path is None:
        path = _MEMORY_LIBRARIES[name] = tempfile.mkdtemp(prefix="haagenti-memory-")
        atexit.register(shutil.rmtree, path, True)
    return path


class LibraryStore:
    """Tables of one library at `url`; reads a consistent version of each table."""

    def __init__(self, url: str):
        self.url = _memory_library(url) if url.startswith("memory://") else url.rstrip("/")
        self.fs, self.root = filesystem_for(self.url)
        self.options = storage_options_for(self.url)
        self._local = "file" in self.fs.protocol
        # Open tables, brought up to date on each use: replaying a Delta log from scratch costs
        # milliseconds per table, an incremental update a fraction of one. One lock because a
        # DeltaTable must not be used from two threads at once.
        self._lock = threading.RLock()
        self._tables: dict[str, DeltaTable] = {}
        # Data files of a Delta table are never rewritten in place (a path names one immutable
        # file), so their footers and small metadata columns can be cached by path.
        self._footers: dict[str, pq.FileMetaData] = {}
        self._row_group_ends: dict[str, np.ndarray] = {}
        self._columns: SizedLru[pa.Table] = SizedLru(256 * 1024 * 1024, size=lambda t: t.nbytes)
        # Each table's latest snapshot: (version, data file paths, add actions as columns).
        # Listing a snapshot's files and their statistics cost ~2 ms per read, more than an
        # incremental log update; a version never changes, so they are computed once per version.
        self._snapshots: dict[str, tuple[int, list[str], dict]] = {}

    # ---- layout -----------------------------------------------------------------------
    def table_uri(self, table: str) -> str:
        return f"{self.url}/{table}"

    def exists(self) -> bool:
        return self.fs.exists(posixpath.join(self.root, "haagenti.json"))

    def create(self, invariants: dict) -> None:
        """Create the marker file, which records the library's invariants (haagenti.config),
        and the empty tables; idempotent (a marker already written is kept)."""
        for name, schema in SCHEMAS.items():
            if not self._is_table(name):
                DeltaTable.create(self.table_uri(name), schema, mode="ignore", storage_options=self.options,
                                  description=f"haagenti {name} (format {LIBRARY_FORMAT_VERSION})")
        marker = posixpath.join(self.root, "haagenti.json")
        if not self.fs.exists(marker):
            with self.fs.open(marker, "w") as f:
                json.dump({"format": "haagenti", "format_version": LIBRARY_FORMAT_VERSION, **invariants}, f)

    def marker(self) -> dict:
        """haagenti.json, checked to be this format's."""
        path = posixpath.join(self.root, "haagenti.json")
        if not self.fs.exists(path):
            raise LibraryError(f"{self.url}: not a haagenti library (no haagenti.json)")
        with self.fs.open(path, "r") as f:
            doc = json.load(f)
        found = doc.get("format_version")
        if found != LIBRARY_FORMAT_VERSION:
            raise LibraryError(f"{self.url}: library format {found}, this haagenti reads format {LIBRARY_FORMAT_VERSION} (docs/format.md says how to move a library)")
        return doc

    def _is_table(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.options)

    # ---- reads --------------------------------------------------------------------------
    def table(self, name: str, version: int | None = None) -> DeltaTable:
        """The table at `version`, or its latest version (an open table, updated)."""
        with self._lock:
            try:
                if version is not None:
                    return DeltaTable(self.table_uri(name), version=version, storage_options=self.options)
                dt = self._tables.get(name)
                if dt is None:
                    dt = self._tables[name] = DeltaTable(self.table_uri(name), storage_options=self.options)
                elif not self._local or self._newer_commit(name, dt.version()):
                    dt.update_incremental()
                return dt
            except TableNotFoundError:
                raise LibraryError(f"{self.url}: table {name!r} is missing; is this a haagenti library?") from None

    def _newer_commit(self, name: str, version: int) -> bool:
        """Whether a commit after `version` exists (Delta versions are consecutive, so the next
        log entry tells). One stat, against ~0.4 ms for delta-rs' update_incremental, which
        lists the log: that was a third of the fixed cost of restoring a model locally. Remote
        stores keep delta-rs' check: either way it is one request."""
        return os.path.exists(os.path.join(self.root, name, "_delta_log", f"{version + 1:020d}.json"))

    def versions(self) -> dict[str, int]:
        return {name: self.table(name).version() for name in SCHEMAS}

    def _paths(self, name: str, version: int | None, equals: tuple[str, str] | None = None) -> list[str]:
        """Data files of a table version; with `equals` (column, value), only the files whose
        min/max statistics in the Delta log can hold that value."""
        paths, actions = self._snapshot(name, version)
        if equals is None:
            return paths
        col, value = equals
        lows, highs = actions.get(f"min.{col}"), actions.get(f"max.{col}")
        if lows is None or highs is None:
            return paths
        return [p for p, lo, hi in zip(paths, lows, highs) if lo is None or hi is None or lo <= value <= hi]

    def _snapshot(self, name: str, version: int | None) -> tuple[list[str], dict]:
        """(data file paths, add actions as columns) of a table version, in the same order."""
        with self._lock:
            dt = self.table(name, version)
            at = dt.version()
            cached = self._snapshots.get(name)
            if cached is not None and cached[0] == at:
                return cached[1], cached[2]
            actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
            paths = [self.fs._strip_protocol(f"{self.table_uri(name)}/{p}") for p in actions["path"]]
            if version is None:
                self._snapshots[name] = (at, paths, actions)
            return paths, actions

    def read(self, name: str, columns: list[str] | None = None, equals: tuple[str, str] | None = None, version: int | None = None) -> pa.Table:
        """A table at one version, projected and optionally filtered on column == value, read as
        Parquet through fsspec. Files rewritten by delta-rs hold string_view columns, so each
        file is cast to the declared schema before filtering."""
        schema = SCHEMAS[name]
        target = _project(schema, columns or schema.names)
        needed = list(target.names) + ([equals[0]] if equals and equals[0] not in target.names else [])
        parts = []
        for path in self._paths(name, version, equals):
            t = self._read_columns(path, needed, schema)
            if equals:
                t = t.filter(pc.equal(t[equals[0]], equals[1]))
            parts.append(t.select(target.names))
        return pa.concat_tables(parts) if parts else target.empty_table()

    def read_fragments(self, ids: Iterable[str], columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """Rows of the given fragment ids, reading only the row groups that hold them."""
        wanted = pa.array(list(set(ids)), pa.string())
        cols = columns or SCHEMAS["fragments"].names
        parts = []
        if len(wanted):
            for path in self._paths("fragments", version):
                groups = self._groups_holding(path, wanted)
                if groups:
                    with self._open(path) as src:
                        pf = pq.ParquetFile(src, metadata=self._footer(path))
                        # Files rewritten by delta-rs (delete) store strings as string_view: normalise.
                        t = pf.read_row_groups(groups, columns=cols, use_threads=_ARROW_THREADS).cast(_project(SCHEMAS["fragments"], cols))
                    parts.append(_rows_where(t, pc.is_in(t["fragment_id"], wanted)))
        if not parts:
            return SCHEMAS["fragments"].empty_table().select(cols)
        found = pa.concat_tables(parts)
        # A fragment written twice by racing ingests is the same bytes: keep one row.
        return _first_per_id(found)

    def _groups_holding(self, path: str, wanted: pa.Array) -> list[int]:
        """Row groups of one fragments data file that hold any of `wanted`, found exactly on the
        file's id column (cached) rather than on min/max statistics: ids are hashes, so every
        row group's id range spans most of the id space and statistics would select them all."""
        ids = self._read_columns(path, ["fragment_id"], SCHEMAS["fragments"])["fragment_id"]
        rows = pc.indices_nonzero(pc.is_in(ids, value_set=wanted)).to_numpy()
        if not len(rows):
            return []
        ends = self._row_group_ends.get(path)
        if ends is None:
            md = self._footer(path)
            ends = self._row_group_ends[path] = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])
        return np.unique(np.searchsorted(ends, rows, side="right")).tolist()

    def _open(self, path: str):
        """A data file: memory-mapped through pyarrow when local (no Python-level reads),
        through fsspec otherwise."""
        if self._local:
            return pa.memory_map(path, "r")
        return self.fs.open(path, "rb")

    def _footer(self, path: str) -> pq.FileMetaData:
        md = self._footers.get(path)
        if md is None:
            with self._open(path) as src:
                md = self._footers[path] = pq.ParquetFile(src).metadata
        return md

    def _read_columns(self, path: str, columns: list[str], schema: pa.Schema) -> pa.Table:
        """Columns of one data file, cast to the declared schema; cached unless they hold blobs."""
        key = (path, tuple(columns))
        t = self._columns.get(key)
        if t is None:
            with self._open(path) as src:
                t = pq.ParquetFile(src, metadata=self._footer(path)).read(columns=columns, use_threads=_ARROW_THREADS).cast(_project(schema, columns))
            if "blob" not in columns:
                self._columns.put(key, t)
        return t

    # ---- writes -------------------------------------------------------------------------
    def append(self, name: str, rows: pa.Table, note: str = "", runs: list[int] | None = None) -> None:
        """Append rows in one atomic commit: one new Parquet file, then one Delta log entry that
        adds it. A crash before the commit leaves an unreferenced file (vacuum removes it), never
        a half-visible append. `runs` (row counts summing to the rows) are consecutive runs that
        never share a row group, so a reader of one run reads no rows of its neighbours.

        The file is written by pyarrow and committed with delta-rs' `create_write_transaction`
        rather than `write_deltalake`: on the example family's 24 MB of fragment blobs
        `write_deltalake` ran at 390-560 MB/s and pyarrow's writer at 700-1480 MB/s, which made
        the commit a quarter of an exact ingest (docs/decisions.md)."""
        if rows.num_rows == 0:
            return
        schema = SCHEMAS[name]
        rows = rows.cast(schema)
        blobs = name == "fragments"
        scalar = [f.name for f in schema if not pa.types.is_nested(f.type) and not pa.types.is_large_binary(f.type)]
        fname = f"part-00000-{uuid.uuid4()}-c000.{'uncompressed' if blobs else 'snappy'}.parquet"
        path = posixpath.join(self.root, name, fname)
        runs = runs or [rows.num_rows]
        if sum(runs) != rows.num_rows:
            raise ValueError(f"runs cover {sum(runs)} rows, the append has {rows.num_rows}")
        # Fragments: blobs are zstd already, so no page compression; no statistics or
        # dictionary on blobs; row groups of ~2 MiB so a restore reads little beyond its rows.
        group_rows = max(1, _FRAGMENT_ROW_GROUP_BYTES * rows.num_rows // max(1, rows["blob"].nbytes)) if blobs else None
        with self.fs.open(path, "wb") as f, pq.ParquetWriter(
            f, schema, compression="none" if blobs else "snappy", use_dictionary=scalar, write_statistics=scalar
        ) as w:
            start = 0
            for n in runs:
                if n:
                    w.write_table(rows.slice(start, n), row_group_size=group_rows)
                start += n
        action = AddAction(fname, self.fs.size(path), {}, int(time.time() * 1000), True, json.dumps(_file_stats(rows, scalar)))
        with self._lock:
            self.table(name).create_write_transaction(
                [action], mode="append", schema=schema,
                commit_properties=CommitProperties(custom_metadata={"haagenti": note}) if note else None,
            )

    def delete(self, name: str, predicate: str) -> int:
        """Delete rows matching a SQL predicate in one commit; returns rows deleted."""
        with self._lock:
            metrics = self.table(name).delete(predicate)
        return int(metrics.get("num_deleted_rows", 0))

    def compact(self) -> int:
        """Merge small files of the metadata tables (fragments keep their small row groups)."""
        n = 0
        for name in ("signatures", "manifests", "models"):
            with self._lock:
                n += int(self.table(name).optimize.compact().get("numFilesRemoved", 0))
        self.vacuum()
        return n

    def vacuum(self) -> int:
        """Physically remove data files no longer in any retained version (after gc), and data
        files no commit ever referenced (an append killed between its file and its commit) once
        they are ORPHAN_HOURS old: a younger one may belong to an append still running."""
        n = 0
        for name in SCHEMAS:
            with self._lock:
                t = self.table(name)
                n += len(t.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False))
                n += len(t.vacuum(retention_hours=ORPHAN_HOURS, full=True, enforce_retention_duration=False, dry_run=False))
        return n


def _file_stats(rows: pa.Table, columns: list[str]) -> dict:
    """Delta add-action statistics (numRecords, per-column min, max and null count) for the
    scalar columns: readers such as ours, DuckDB or Spark skip files with them."""
    mins, maxs, nulls = {}, {}, {}
    for c in columns:
        col = rows[c]
        nulls[c] = col.null_count
        if pa.types.is_string(col.type) or pa.types.is_integer(col.type):
            mm = pc.min_max(col)
            if mm["min"].is_valid:
                mins[c], maxs[c] = mm["min"].as_py(), mm["max"].as_py()
    return {"numRecords": rows.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}


def _project(schema: pa.Schema, cols: list[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in cols])


def _rows_where(t: pa.Table, mask: pa.ChunkedArray) -> pa.Table:
    """Rows of `t` where `mask` holds, as zero-copy slices of their contiguous runs: a filter
    would copy every selected blob, and a model's fragments lie in runs (ingest order)."""
    idx = pc.indices_nonzero(mask).to_numpy()
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


def quote(value: str) -> str:
    """A SQL string literal for Delta predicates (ids are validated, this is belt and braces)."""
    if "'" in value:
        raise FragmentError(f"refusing quote character in {value!r}")
    return f"'{value}'"
