"""The library's tables as Delta Lake tables.

Why Delta (docs/decisions/0001-delta-lake-tables.md has the measurements): each append is one atomic commit, a
reader sees a whole table version or the previous one, two writers race on the same log
entry and the loser gets an error instead of overwriting, and the tables stay plain
Parquet that pyarrow, DuckDB, polars and Ray Data read without haagenti.

Tables: fragments, signatures, manifests, models, and the index layout's (haagenti.index). The
order an ingest commits them in is the committer's (haagenti/writer.py, docs/format.md): a model
is visible only once everything it references is committed. The store knows what a table is,
not what it means: keyed tables (sorted by an int64 key, read by key range) are
haagenti.store.keyed's, on the primitives here (`snapshot`, `commit_add`, `sort_by_key`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import ColumnProperties, CommitProperties, DeltaTable, Field, WriterProperties
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from haagenti.checkpoints import reached
from haagenti.errors import DamagedError, LibraryError
from haagenti.fsio import filesystem_for, s3_endpoint
from haagenti.store.damage import damaged, log_problems
from haagenti.store.files import DataFiles, data_file_uuid, new_data_file, strings
from haagenti.store.schema import LIBRARY_FORMAT_VERSION, SCHEMAS, UPGRADABLE_FROM, empty, project
from haagenti.store.leases import HeldLease, Leases, writing
from haagenti.store.sql import owned_by, quote

# Small row groups on the fragments table let a restore read only the fragments it needs.
# Rows stay in the order they were ingested (a model's tensors in file order), so a restore,
# which walks a model in that order, reads a run of neighbouring row groups per batch, and its
# delta references (a base model, stored in the same tensor order) likewise. Appends also start
# a new row group where the writer says a run ends (one model's new fragments): a row group
# straddling two models made each restore read its neighbour's rows too (on the example
# family, 50 MB read to restore 29 MB of stored fragments).
_FRAGMENT_ROW_GROUP_BYTES = 2 * 1024 * 1024
_DELTA_TYPES = {pa.string(): "string", pa.int64(): "long"}
# Where fragments were appended, as an index layout knows it: fragment id -> the uuid of its
# fragments data file, for the ids it holds (read_fragments' hints).
Locate = Callable[[set[str]], dict[str, str]]


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
        self.files = DataFiles(self.fs, self._local)
        # Each table's latest snapshot: (version, data file paths, add actions as columns).
        # Listing a snapshot's files and their statistics cost ~2 ms per read, more than an
        # incremental log update; a version never changes, so they are computed once per version.
        self._snapshots: dict[str, tuple[int, list[str], dict]] = {}
        # The fragments data files of one version by the uuid their names start with.
        self._by_uuid: tuple[int, dict[str, list[str]]] | None = None
        # Concurrent writers (docs/format.md): every writer holds a lease while it writes, and
        # each commit first checks that the lease is still alive.
        self.leases = Leases(self.fs, self.root, self._local)
        self.lease: HeldLease | None = None

    # ---- layout -----------------------------------------------------------------------
    def table_uri(self, table: str) -> str:
        return f"{self.url}/{table}"

    def exists(self) -> bool:
        return self.fs.exists(posixpath.join(self.root, "haagenti.json"))

    def create(self, invariants: dict, tables: tuple[str, ...]) -> None:
        """Create the empty `tables` (the library's and its index layout's) and the marker file,
        which records the library's invariants (haagenti.config). Safe against a concurrent
        creator: the first marker written wins and is never rewritten (the loser then reads the
        winner's invariants, which its own config must agree with), and a table another writer
        created meanwhile is kept."""
        for name in tables:
            schema = SCHEMAS[name]
            if self._is_table(name):
                continue
            try:
                created = DeltaTable.create(self.table_uri(name), schema, mode="ignore", storage_options=self.options,
                                            description=f"haagenti {name} (format {LIBRARY_FORMAT_VERSION})")
            except Exception:  # version 0 committed by a concurrent creator between the check and ours
                if not self._is_table(name):
                    raise
                continue
            with self._lock:  # open already: reading its log again cost a listing and two reads per entry
                self._tables.setdefault(name, created)
        reached("create-marker")
        body = json.dumps({"format": "haagenti", "format_version": LIBRARY_FORMAT_VERSION, **invariants}).encode()
        marker = posixpath.join(self.root, "haagenti.json")
        try:
            if self._local:  # written whole, then linked: link(2) never replaces, and no reader sees half a marker
                tmp = f"{marker}.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(body)
                try:
                    os.link(tmp, marker)
                finally:
                    os.unlink(tmp)
            else:  # S3's If-None-Match: * (one PUT, atomic)
                with self.fs.open(marker, "xb") as f:
                    f.write(body)
        except FileExistsError:
            pass

    def marker(self) -> dict:
        """haagenti.json, checked to be this format's."""
        doc = self.marker_doc()
        found = doc.get("format_version")
        if found in UPGRADABLE_FROM:
            raise LibraryError(f"{self.url}: library format {found}, this haagenti reads format {LIBRARY_FORMAT_VERSION}: run `haagenti upgrade {self.url}` first")
        if found != LIBRARY_FORMAT_VERSION:
            raise LibraryError(f"{self.url}: library format {found}, this haagenti reads format {LIBRARY_FORMAT_VERSION} (docs/format.md says how to move a library)")
        return doc

    def marker_version(self) -> object:
        """haagenti.json's format_version, whatever it is (what an upgrade starts from)."""
        return self.marker_doc().get("format_version")

    def marker_doc(self) -> dict:
        """haagenti.json, of whatever format (an upgrade reads the invariants of an older one).
        Read in one request: opening it as a file first asked for its size."""
        path = posixpath.join(self.root, "haagenti.json")
        try:
            doc = json.loads(self.fs.cat_file(path))
            if not isinstance(doc, dict):
                raise ValueError(doc)
            return doc
        except FileNotFoundError:
            raise LibraryError(f"{self.url}: not a haagenti library (no haagenti.json)") from None
        except (ValueError, AttributeError):
            raise DamagedError(f"{self.url}: haagenti.json is damaged (not the JSON object haagenti writes)") from None

    def rewrite_marker(self, version: int) -> None:
        """haagenti.json with another format version, written whole (locally a finished
        temporary file renamed over it; on an object store one PUT): the last step of an upgrade."""
        path = posixpath.join(self.root, "haagenti.json")
        with self.fs.open(path, "r") as f:
            doc = json.load(f)
        body = json.dumps({**doc, "format_version": version}).encode()
        if self._local:
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, body)

    def replace_models(self, rows: pa.Table, note: str) -> None:
        """Every models row rewritten in one commit (an upgrade's): the table's data files
        removed and one file of `rows` added, its schema learning the columns it lacks."""
        schema = SCHEMAS["models"]
        rows = rows.cast(schema)
        version, _, actions = self._versioned_snapshot("models", None)
        now = int(time.time() * 1000)
        removes = [RemoveAction(rel, True, now, size) for rel, size in zip(actions["path"], actions["size_bytes"])]
        add = self._write_file("models", [rows] if rows.num_rows else [], {"compression": "snappy"})
        try:
            self._check_lease()
            with self._lock:
                table = self.table("models", version=version)
                learn_columns(table, schema)
                table.create_write_transaction([*removes, add], mode="append", schema=schema,
                                               commit_properties=CommitProperties(custom_metadata={"haagenti": note}))
        except BaseException:
            self._remove_quietly(posixpath.join(self.root, "models", add.path))
            raise

    def links(self) -> list[str]:
        """Symbolic links inside a local library (never followed): what gc and compaction refuse
        to delete through. An object store has none."""
        if not self._local:
            return []
        out = []
        for top, dirs, files in os.walk(self.root):  # followlinks=False: a linked folder is listed, not entered
            out += [os.path.join(top, n) for n in dirs + files if os.path.islink(os.path.join(top, n))]
        return sorted(out)

    def _is_table(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.options)

    def present(self) -> list[str]:
        """The tables of the format this library has: the library's own and its index layout's
        (haagenti.core.LIBRARY_TABLES and the layout's `tables`)."""
        return [name for name in SCHEMAS if name in self._tables or self._is_table(name)]

    # ---- reads --------------------------------------------------------------------------
    def table(self, name: str, version: int | None = None) -> DeltaTable:
        """The table at `version`, or its latest version (an open table, updated). The open table
        serves a `version` it is at: a pinned read or commit follows a look at the latest version
        (publish, delete_where), and opening that version afresh replayed the whole log (on an
        object store a listing and two reads per log entry). A table object holds the version it
        reports: a commit through it either leaves it there (`create_write_transaction`) or
        moves it to the version committed (delete, update, optimize, alter)."""
        with self._lock, damaged(f"{self.url}: table {name!r}"):
            try:
                dt = self._tables.get(name)
                if version is not None:
                    if dt is not None and dt.version() == version:
                        return dt
                    return DeltaTable(self.table_uri(name), version=version, storage_options=self.options)
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

    def log_problems(self) -> list[str]:
        """Damaged Delta log entries of every table (what `verify` reports beyond the rows)."""
        return [p for name in SCHEMAS for p in log_problems(self.fs, posixpath.join(self.root, name), f"{self.url}: table {name!r}")]

    def versions(self) -> dict[str, int]:
        return {name: self.table(name).version() for name in self.present()}

    def _paths(self, name: str, version: int | None, equals: tuple[str, str] | None = None) -> list[str]:
        """Data files of a table version; with `equals` (column, value), only the files whose
        min/max statistics in the Delta log can hold that value."""
        paths, actions = self.snapshot(name, version)
        if equals is None:
            return paths
        col, value = equals
        lows, highs = actions.get(f"min.{col}"), actions.get(f"max.{col}")
        if lows is None or highs is None:
            return paths
        return [p for p, lo, hi in zip(paths, lows, highs) if lo is None or hi is None or lo <= value <= hi]

    def snapshot(self, name: str, version: int | None = None) -> tuple[list[str], dict]:
        """(data file paths, add actions as columns) of a table version (the latest by default),
        in the same order; computed once per version."""
        return self._versioned_snapshot(name, version)[1:]

    def _versioned_snapshot(self, name: str, version: int | None) -> tuple[int, list[str], dict]:
        """The version read, its data file paths and its add actions as columns."""
        with self._lock, damaged(f"{self.url}: table {name!r} (its Delta log)"):
            dt = self.table(name, version)
            at = dt.version()
            cached = self._snapshots.get(name)
            if cached is not None and cached[0] == at:
                return cached
            actions = pa.RecordBatchReader.from_stream(dt.get_add_actions(flatten=True)).read_all().to_pydict()  # not pa.table(): see strings()
            paths = [self.fs._strip_protocol(f"{self.table_uri(name)}/{p}") for p in actions["path"]]
            self.files.learn_sizes(paths, actions["size_bytes"])
            if version is None:
                self._snapshots[name] = (at, paths, actions)
            return at, paths, actions

    def read(self, name: str, columns: list[str] | None = None, equals: tuple[str, str] | None = None, version: int | None = None) -> pa.Table:
        """A table at one version, projected and optionally filtered on column == value, read as
        Parquet through fsspec. Files rewritten by delta-rs hold string_view columns, so each
        file is cast to the declared schema before filtering."""
        schema = SCHEMAS[name]
        target = project(schema, columns or schema.names)
        needed = list(target.names) + ([equals[0]] if equals and equals[0] not in target.names else [])
        parts = []
        for path in self._paths(name, version, equals):
            t = self.files.columns(path, needed, schema)
            if equals:
                t = t.filter(pc.equal(t[equals[0]], strings([equals[1]])[0]))
            parts.append(t.select(target.names))
        return pa.concat_tables(parts) if parts else empty(target)

    def scan(self, name: str, columns: list[str] | None = None, batch_rows: int = 65536, version: int | None = None) -> Iterator[pa.Table]:
        """A table at one version in batches of at most `batch_rows` rows (projected, cast to
        the declared schema), one row group at a time and nothing cached: what maintenance
        streams over, so that its memory does not grow with the table."""
        for path in self._paths(name, version):
            for t in self.files.row_groups(path, columns or SCHEMAS[name].names, SCHEMAS[name]):
                for start in range(0, t.num_rows, batch_rows):
                    yield t.slice(start, batch_rows)

    def read_fragments(self, ids: Iterable[str], columns: list[str] | None = None, version: int | None = None,
                       locate: Locate | None = None) -> pa.Table:
        """Rows of the given fragment ids, reading only the row groups that hold them. With
        `locate` (the index layout's: id -> the uuid of the data file it was appended in, for the
        ids it knows), each id is looked for first in the data file it names (a cost in what is
        asked, not in the library), then, if not found there, in every data file: a hint is never
        trusted for an answer (docs/format.md, "The index tables")."""
        wanted = set(ids)
        at, paths, _ = self._versioned_snapshot("fragments", version)
        if self._by_uuid is None or self._by_uuid[0] != at:
            by_uuid: dict[str, list[str]] = {}
            for p in paths:
                by_uuid.setdefault(data_file_uuid(p), []).append(p)
            self._by_uuid = (at, by_uuid)
        files = self._by_uuid[1]
        hints: dict[str, set[str]] = {}
        if wanted and locate is not None:
            try:
                found = locate(wanted)
            except DamagedError:  # an unreadable index file costs the hints, not the fragments: the scan finds them
                found = {}
            for fid, u in found.items():
                for p in files.get(u, ()):
                    hints.setdefault(p, set()).add(fid)
        return self.files.fragments(paths, wanted, columns or SCHEMAS["fragments"].names, hints)

    # ---- writes -------------------------------------------------------------------------
    def append(self, name: str, rows: pa.Table, note: str = "", runs: list[int] | None = None, on_version: int | None = None) -> str | None:
        """Append rows in one atomic commit: one new Parquet file, then one Delta log entry that
        adds it. A failed append removes its file; a killed one leaves an unreferenced file (gc
        removes it), never a half-visible append. `runs` (row counts summing to the rows) are
        consecutive runs that never share a row group, so a reader of one run reads no rows of
        its neighbours. With `on_version`, the commit is made on top of that version or not at
        all (CommitFailedError when another writer committed first).

        The file is written by pyarrow and committed with delta-rs' `create_write_transaction`
        rather than `write_deltalake`: on the example family's 24 MB of fragment blobs
        `write_deltalake` ran at 390-560 MB/s and pyarrow's writer at 700-1480 MB/s, which made
        the commit a quarter of an exact ingest (docs/decisions/0007-parquet-and-commits.md). Returns the uuid of the
        data file committed (what the `ids` table's `data_file` records), None for no rows."""
        if rows.num_rows == 0:
            return None
        schema = SCHEMAS[name]
        rows = rows.cast(schema)
        blobs = name == "fragments"
        scalar = _scalar_columns(schema)
        runs = runs or [rows.num_rows]
        if sum(runs) != rows.num_rows:
            raise ValueError(f"runs cover {sum(runs)} rows, the append has {rows.num_rows}")
        # Fragments: blobs are zstd already, so no page compression; no statistics or
        # dictionary on blobs; row groups of ~2 MiB so a restore reads little beyond its rows,
        # each column chunk one page: with 1 MiB pages (the default) the writer cut a page
        # about every six blobs (each blob its own Arrow chunk), which made writing a batch 1.4x
        # slower than one page per row group (docs/decisions/0007-parquet-and-commits.md).
        group_rows = max(1, _FRAGMENT_ROW_GROUP_BYTES * rows.num_rows // max(1, rows["blob"].nbytes)) if blobs else None
        starts = [sum(runs[:i]) for i in range(len(runs))]
        parts = (rows.slice(start, n) for start, n in zip(starts, runs) if n)
        options = {"compression": "none" if blobs else "snappy", "use_dictionary": scalar, "write_statistics": scalar}
        if blobs:
            options["data_page_size"] = 4 * _FRAGMENT_ROW_GROUP_BYTES
        action = self._write_file(name, parts, options, group_rows)
        path = posixpath.join(self.root, name, action.path)
        try:
            reached(f"commit-{name}")
            self._check_lease()
        except BaseException:
            self._remove_quietly(path)
            raise
        props = CommitProperties(custom_metadata={"haagenti": note} if note else None, max_commit_retries=0 if on_version is not None else None)
        with self._lock:
            table = self.table(name) if on_version is None else self.table(name, version=on_version)
            try:
                table.create_write_transaction([action], mode="append", schema=schema, commit_properties=props)
            except CommitFailedError:
                self._remove_quietly(path)  # not committed, for sure
                raise
        reached(f"committed-{name}")
        return data_file_uuid(action.path)

    def _write_file(self, name: str, parts: Iterable[pa.Table], options: dict, group_rows: int | None = None,
                    replaces: str | None = None) -> AddAction:
        """One new data file of table `name` holding `parts` in order (each part starts a row
        group; `group_rows` rows at most per group), written by pyarrow with writer `options`, and
        its add action (statistics on the scalar columns). A file that `replaces` another keeps
        its uuid (new_data_file). A failed write removes the file."""
        schema = SCHEMAS[name]
        fname = new_data_file(replaces)
        path = posixpath.join(self.root, name, fname)
        stats = _FileStats(_scalar_columns(schema))
        try:
            with self.fs.open(path, "wb") as f:
                with pq.ParquetWriter(f, schema, **options) as w:
                    for t in parts:
                        w.write_table(t, row_group_size=group_rows)
                        stats.add(t)
                        reached(f"write-{name}")
                size = f.tell()  # what was written: asking the store for it cost a HEAD request
            return AddAction(fname, size, {}, int(time.time() * 1000), True, json.dumps(stats.json()))
        except BaseException:
            self._remove_quietly(path)  # a full disk must not stay full of a file nobody will commit
            raise

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def _remove_quietly(self, path: str) -> None:
        with contextlib.suppress(OSError):
            self.fs.rm_file(path)

    def commit_add(self, name: str, actions: list[AddAction], note: str = "") -> None:
        """Commit data files already written under table `name` (a keyed table's append:
        haagenti.store.keyed), the table's schema first learning the columns it lacks."""
        schema = SCHEMAS[name]
        with self._lock:
            table = self.table(name)
            learn_columns(table, schema)
            table.create_write_transaction(
                actions, mode="append", schema=schema, commit_properties=CommitProperties(custom_metadata={"haagenti": note}) if note else None,
            )

    def sort_by_key(self, name: str, key: str, group_rows: int, target_bytes: int, encodings: dict[str, str] | None = None) -> int:
        """Rewrite table `name` sorted by its one `key` column (a z-order on one column) into
        files of about `target_bytes` with disjoint key ranges and row groups of `group_rows`,
        nothing compressed, the columns in `encodings` in theirs without a dictionary, statistics
        on the key only, per row group (as appended: delta-rs's default, page statistics and
        indexes of every column, made the two-level index's files 12% larger). Skipped when the
        last commit (vacuums aside) was such a rewrite: nothing appended or deleted since, so it
        would change nothing. Deletes nothing (vacuum does). Returns data files replaced."""
        encodings = encodings or {}
        columns = {c: ColumnProperties(dictionary_enabled=False, encoding=e, statistics_enabled="CHUNK" if c == key else "NONE") for c, e in encodings.items()}
        columns.setdefault(key, ColumnProperties(statistics_enabled="CHUNK"))
        props = WriterProperties(max_row_group_size=group_rows, compression="UNCOMPRESSED", default_column_properties=ColumnProperties(statistics_enabled="NONE"),
                                 column_properties=columns)
        with self._lock:
            table = self.table(name)
            last = next((h.get("operation") for h in table.history(16) if not str(h.get("operation")).startswith("VACUUM")), None)
            if last == "OPTIMIZE":
                return 0
            metrics = table.optimize.z_order([key], target_size=target_bytes, writer_properties=props)
        return int(metrics.get("numFilesRemoved", 0))

    def delete(self, name: str, predicate: str) -> int:
        """Delete rows matching a SQL predicate in one commit; returns rows deleted."""
        self._check_lease()
        with self._lock:
            metrics = self.table(name).delete(predicate)
        return int(metrics.get("num_deleted_rows", 0))

    def delete_owned(self, name: str, keys: list[tuple[str, str]]) -> int:
        """Delete the models or manifests rows of the given (model_id, ingest_id) pairs."""
        return sum(self.delete(name, p) for p in owned_by(sorted(keys)))

    def delete_where(self, name: str, column: str, values: pa.Array, note: str = "") -> int:
        """Delete the rows whose `column` is in `values`, in one commit, one data file at a
        time: a file holding none is left alone, a file holding nothing else is removed, and any
        other is rewritten without them, row group by row group (its row groups less the deleted
        rows, its compression, dictionaries and statistics), the replacement committed with the
        removal. Memory is a row group, not a file or the table; rows appended meanwhile are not
        touched (only files read are removed). Returns rows deleted."""
        if not len(values):
            return 0
        schema = SCHEMAS[name]
        version, paths, actions = self._versioned_snapshot(name, None)
        now = int(time.time() * 1000)
        removes: list[RemoveAction] = []
        adds: list[AddAction] = []
        deleted = 0
        try:
            for path, rel, size in zip(paths, actions["path"], actions["size_bytes"]):
                hits = sum(pc.sum(pc.is_in(t[column], value_set=values)).as_py() or 0 for t in self.files.row_groups(path, [column], schema))
                if not hits:
                    continue
                deleted += hits
                removes.append(RemoveAction(rel, True, now, size))
                md = self.files.footer(path)
                if hits < md.num_rows:
                    rest = (t.filter(pc.invert(pc.is_in(t[column], value_set=values))) for t in self.files.row_groups(path, schema.names, schema))
                    adds.append(self._write_file(name, (t for t in rest if t.num_rows), _writer_options(md), replaces=rel))
            if not removes:
                return 0
            self._check_lease()
            props = CommitProperties(custom_metadata={"haagenti": note} if note else None)
            with self._lock:
                self.table(name, version=version).create_write_transaction([*removes, *adds], mode="append", schema=schema, commit_properties=props)
        except BaseException:
            for a in adds:  # not committed: nobody references them
                self._remove_quietly(posixpath.join(self.root, name, a.path))
            raise
        reached(f"deleted-{name}")
        return deleted

    def delete_fragments(self, fragment_ids: pa.Array) -> int:
        return self.delete_where("fragments", "fragment_id", fragment_ids, "gc")

    def delete_signatures(self, fragment_ids: pa.Array) -> int:
        return self.delete_where("signatures", "fragment_id", fragment_ids, "gc")

    def set_family(self, model_id: str, family: str) -> int:
        """Record another family for a published model, in one commit of the models table."""
        self._check_lease()
        with self._lock:
            metrics = self.table("models").update(updates={"family": quote(family)}, predicate=f"model_id = {quote(model_id)}")
        return int(metrics.get("num_updated_rows", 0))

    def compact(self, wait: float = 0.0) -> int:
        """Merge small files of the metadata tables (fragments keep their small row groups)."""
        n = 0
        with writing(self, "gc", wait=wait):
            for name in ("signatures", "manifests", "models"):
                self._check_lease()
                with self._lock:
                    n += int(self.table(name).optimize.compact().get("numFilesRemoved", 0))
            self.vacuum()
        return n

    def disk_bytes(self) -> dict[str, int]:
        """Bytes of every file of the library (what `du -b` counts, less the folders' own
        entries), by part: each table's data files under its name, every table's Delta log
        under "logs", the rest (marker, leases, publication record, reports) under "other".
        One listing; on an object store, the objects' sizes."""
        out = dict.fromkeys([*SCHEMAS, "logs", "other"], 0)
        root = self.root.rstrip("/") + "/"
        for path, info in self.listing(self.root).items():
            if info.get("type") != "file" or not path.startswith(root):
                continue
            top, _, rest = path[len(root):].partition("/")
            part = "logs" if top in SCHEMAS and rest.startswith("_delta_log/") else top if top in SCHEMAS else "other"
            out[part] += int(info["size"])
        return out

    def learn_columns(self, name: str) -> None:
        """Add to table `name`'s Delta schema the columns of this format it lacks (an upgraded
        library: format 5's fragments.depth), so readers and rewriters keep them."""
        with self._lock:
            learn_columns(self.table(name), SCHEMAS[name])

    def listing(self, path: str) -> dict[str, dict]:
        """Every entry under `path` with its info, listed afresh. s3fs keeps the listings it made
        for the life of the process and answers a later open from them: a file committed after
        the listing then reads as missing (a gc loop took a just-published models file for
        damage). The whole cache is dropped before and after: dropping `path` keeps the
        listings of the folders under it."""
        self.fs.invalidate_cache()
        try:
            return self.fs.find(path, detail=True)
        finally:
            self.fs.invalidate_cache()

    def vacuum(self, wait: float = 0.0) -> int:
        """Physically remove every data file the latest version of a table does not reference:
        files of older versions (after gc) and files no commit ever referenced (an append killed
        between its file and its commit). Under a gc lease no other writer is running, so none
        of them can belong to an append still in flight, however young."""
        n = 0
        with writing(self, "gc", wait=wait):
            links = self.links()
            if links:  # delta-rs' full vacuum deletes whatever it lists, through links too
                raise LibraryError(f"{links[0]} is a symbolic link; vacuum never follows links out of the library (nothing was vacuumed)")
            for name in self.present():
                self._check_lease()
                present = {posixpath.relpath(p, posixpath.join(self.root, name)) for p in self.listing(posixpath.join(self.root, name))}
                with self._lock:
                    gone = self.table(name).vacuum(retention_hours=0, full=True, enforce_retention_duration=False, dry_run=False)
                # delta-rs also lists files of old versions that an earlier vacuum deleted: counted
                # were the same every run. Only what was there counts (`gc` says when it did nothing).
                n += len(set(gone) & present)
        return n


def learn_columns(table: DeltaTable, schema: pa.Schema) -> None:
    """Add to the Delta table's schema the columns of `schema` it lacks (a column added to
    format 4 later: ids.data_file; format 5's models.record_digest), before a file holding them is committed: Delta readers and
    rewriters (compaction's z-order) drop the columns a table's schema does not name."""
    def missing() -> list[pa.Field]:
        return [f for f in schema if f.name not in table.schema().to_arrow().names]

    if missing():
        try:
            table.alter.add_columns([Field(f.name, _DELTA_TYPES[f.type], nullable=True) for f in missing()])
        except CommitFailedError:  # another writer changed the table first, perhaps adding them
            table.update_incremental()
            if missing():
                raise


def _scalar_columns(schema: pa.Schema) -> list[str]:
    """Columns that get dictionaries and statistics: not nested, not blobs."""
    return [f.name for f in schema if not pa.types.is_nested(f.type) and not pa.types.is_large_binary(f.type)]


class _FileStats:
    """Delta add-action statistics of a data file written in parts (numRecords, per-column min,
    max and null count) for the scalar columns: readers such as ours, DuckDB or Spark skip
    files with them."""

    def __init__(self, columns: list[str]):
        self.columns, self.rows = columns, 0
        self.mins: dict = {}
        self.maxs: dict = {}
        self.nulls = dict.fromkeys(columns, 0)

    def add(self, t: pa.Table) -> None:
        self.rows += t.num_rows
        for c in self.columns:
            col = t[c]
            self.nulls[c] += col.null_count
            if pa.types.is_string(col.type) or pa.types.is_integer(col.type):
                mm = pc.min_max(col)
                if mm["min"].is_valid:
                    lo, hi = mm["min"].as_py(), mm["max"].as_py()
                    self.mins[c] = min(lo, self.mins.get(c, lo))
                    self.maxs[c] = max(hi, self.maxs.get(c, hi))

    def json(self) -> dict:
        return {"numRecords": self.rows, "minValues": self.mins, "maxValues": self.maxs, "nullCount": self.nulls}


def _writer_options(md: pq.FileMetaData) -> dict:
    """pyarrow writer options that reproduce a data file's column chunks: their compression,
    dictionaries, encodings other than PLAIN and statistics (a fragments file keeps blobs
    uncompressed and without statistics, an index file statistics on its key only and its
    keyed table's encodings)."""
    rg = md.row_group(0)
    chunks = [rg.column(i) for i in range(rg.num_columns)]
    encodings = {c.path_in_schema: e for c in chunks if not c.has_dictionary_page for e in c.encodings if e not in ("PLAIN", "RLE")}
    return {
        "compression": {c.path_in_schema: "none" if c.compression == "UNCOMPRESSED" else c.compression.lower() for c in chunks},
        "use_dictionary": [c.path_in_schema for c in chunks if c.has_dictionary_page],
        "column_encoding": encodings or None,
        "write_statistics": [c.path_in_schema for c in chunks if c.is_stats_set],
    }
