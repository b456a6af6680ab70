"""The library's tables as Delta Lake tables.

Why Delta (docs/decisions.md has the measurements): each append is one atomic commit, a
reader sees a whole table version or the previous one, two writers race on the same log
entry and the loser gets an error instead of overwriting, and the tables stay plain
Parquet that pyarrow, DuckDB, polars and Ray Data read without haagenti.

Tables, written in this order by an ingest so that a model is visible only once
everything it references is committed:
  fragments  -> signatures -> manifests -> models (the models row publishes the model)
"""
from __future__ import annotations

import json
import os
import posixpath
import threading
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import ColumnProperties, CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError

from haagenti.errors import FragmentError, LibraryError
from haagenti.fsio import filesystem_for, s3_endpoint
from haagenti.lru import SizedLru

LIBRARY_FORMAT_VERSION = 1

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
                            ("sha256", pa.string()),
                            ("header", pa.large_binary()),
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
# delta references (a base model, stored in the same tensor order) likewise.
_FRAGMENT_ROW_GROUP_BYTES = 2 * 1024 * 1024


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


class LibraryStore:
    """Tables of one library at `url`; reads a consistent version of each table."""

    def __init__(self, url: str):
        if url.startswith("memory://"):
            raise LibraryError(
                "memory:// cannot hold a library: its Delta tables need a store shared between "
                "processes; use a temporary directory (model files can still be read from memory://)"
            )
        self.url = url.rstrip("/")
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

    # ---- layout -----------------------------------------------------------------------
    def table_uri(self, table: str) -> str:
        return f"{self.url}/{table}"

    def exists(self) -> bool:
        return self.fs.exists(posixpath.join(self.root, "haagenti.json"))

    def create(self) -> None:
        """Create the marker file and the empty tables; idempotent."""
        for name, schema in SCHEMAS.items():
            if not self._is_table(name):
                DeltaTable.create(self.table_uri(name), schema, mode="ignore", storage_options=self.options,
                                  description=f"haagenti {name} (format {LIBRARY_FORMAT_VERSION})")
        marker = posixpath.join(self.root, "haagenti.json")
        if not self.fs.exists(marker):
            with self.fs.open(marker, "w") as f:
                json.dump({"format": "haagenti", "format_version": LIBRARY_FORMAT_VERSION}, f)

    def check_version(self) -> None:
        marker = posixpath.join(self.root, "haagenti.json")
        if not self.fs.exists(marker):
            raise LibraryError(f"{self.url}: not a haagenti library (no haagenti.json)")
        with self.fs.open(marker, "r") as f:
            found = json.load(f).get("format_version")
        if found != LIBRARY_FORMAT_VERSION:
            raise LibraryError(f"{self.url}: library format {found}, this haagenti reads format {LIBRARY_FORMAT_VERSION}")

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
                else:
                    dt.update_incremental()
                return dt
            except TableNotFoundError:
                raise LibraryError(f"{self.url}: table {name!r} is missing; is this a haagenti library?") from None

    def versions(self) -> dict[str, int]:
        return {name: self.table(name).version() for name in SCHEMAS}

    def _paths(self, name: str, version: int | None, equals: tuple[str, str] | None = None) -> list[str]:
        """Data files of a table version; with `equals` (column, value), only the files whose
        min/max statistics in the Delta log can hold that value."""
        with self._lock:
            dt = self.table(name, version)
            if equals is None:
                return [self.fs._strip_protocol(u) for u in dt.file_uris()]
            actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
        col, value = equals
        lows, highs = actions.get(f"min.{col}"), actions.get(f"max.{col}")
        keep = []
        for i, path in enumerate(actions["path"]):
            if lows is None or lows[i] is None or highs[i] is None or lows[i] <= value <= highs[i]:
                keep.append(self.fs._strip_protocol(f"{self.table_uri(name)}/{path}"))
        return keep

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
                        t = pf.read_row_groups(groups, columns=cols).cast(_project(SCHEMAS["fragments"], cols))
                    parts.append(t.filter(pc.is_in(t["fragment_id"], wanted)))
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
                t = pq.ParquetFile(src, metadata=self._footer(path)).read(columns=columns).cast(_project(schema, columns))
            if "blob" not in columns:
                self._columns.put(key, t)
        return t

    # ---- writes -------------------------------------------------------------------------
    def append(self, name: str, rows: pa.Table, note: str = "") -> None:
        """Append rows in one atomic commit."""
        if rows.num_rows == 0:
            return
        rows = rows.cast(SCHEMAS[name])
        self.append_stream(name, [rows], note, avg_row_bytes=max(1, int(pc.sum(rows["stored_size"]).as_py() or 1) // rows.num_rows) if name == "fragments" else 0)

    def append_stream(self, name: str, tables: Iterable[pa.Table], note: str = "", avg_row_bytes: int = 0) -> int:
        """Append a stream of tables in one atomic commit (bounded memory); returns rows written."""
        schema = SCHEMAS[name]
        count = 0

        def batches():
            nonlocal count
            for t in tables:
                count += t.num_rows
                yield from t.cast(schema).to_batches()

        props = None
        if name == "fragments":
            props = WriterProperties(
                max_row_group_size=max(1, _FRAGMENT_ROW_GROUP_BYTES // max(avg_row_bytes, 1)),
                compression="UNCOMPRESSED",  # blobs are already zstd; statistics stay on ids only
                column_properties={"blob": ColumnProperties(statistics_enabled="NONE", dictionary_enabled=False)},
            )
        reader = pa.RecordBatchReader.from_batches(schema, batches())
        with self._lock:
            write_deltalake(
                self.table(name),
                reader,
                mode="append",
                writer_properties=props,
                commit_properties=CommitProperties(custom_metadata={"haagenti": note}) if note else None,
            )
        return count

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
        """Physically remove data files no longer in any retained version (after gc)."""
        n = 0
        for name in SCHEMAS:
            with self._lock:
                n += len(self.table(name).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False))
        return n


def _project(schema: pa.Schema, cols: list[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in cols])


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
