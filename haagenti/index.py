"""The library's global indexes as tables: LSH band rows and fragment ids, stored so that a
lookup reads only the files and row groups that can hold its keys.

Both tables are keyed by an int64 and every data file is sorted by it:
  bands: (bucket, fragment_id, bits, n_elements), one row per band of each plain exact float
         fragment; key `bucket` = band << rows | the band's bits: bands are key ranges.
  ids:   (id_key, fragment_id, dtype), one row per stored fragment; key `id_key` (the id's first
         8 bytes), the known-id check.
A lookup takes the Delta log's per-file min/max of the key (no listing, no file opened), then
each candidate file's row-group min/max from its footer, and reads only the row groups whose
range holds a wanted key (docs/decisions.md: why sorted row groups rather than Delta
partitions or bloom filters). Each commit of fragments appends one sorted file per index table
with their rows; `compact()` z-orders each table (one key column: a sort) into files with
disjoint key ranges.

Why not datasketch here: its MinHashLSH keeps every band bucket in one process's dicts (or in
Redis/Cassandra), which is what this module exists to avoid. Its `_optimal_param` does not
choose bands x rows either (docs/decisions.md): the library's bands x rows is an invariant of
its signatures (SignatureConfig). The reference rule over the rows read is haagenti.matching's.
"""
from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import WriterProperties
from deltalake.transaction import AddAction

from haagenti.signature import SignatureConfig
from haagenti.store import SCHEMAS, LibraryStore


@dataclass(frozen=True)
class KeyedTable:
    name: str
    key: str
    group_rows: int  # rows per row group: the unit a lookup reads (docs/decisions.md)


BANDS = KeyedTable("bands", "bucket", 256)
IDS = KeyedTable("ids", "id_key", 256)


@dataclass
class ReadCounts:
    """What lookups read: data files opened, row groups and their bytes (compressed)."""

    files: int = 0
    row_groups: int = 0
    bytes: int = 0


# ---- keys ------------------------------------------------------------------------------
def id_keys(ids: Iterable[str]) -> np.ndarray:
    """The first 8 bytes of each hex id as a signed big-endian int64 (sorts like the ids)."""
    raw = bytes.fromhex("".join(i[:16] for i in ids))
    return np.frombuffer(raw, ">u8").astype(np.uint64).view(np.int64) ^ np.int64(-(2**63))


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


def band_hashes(bits: list[bytes] | np.ndarray, config: SignatureConfig) -> np.ndarray:
    """(fragments, bands) int64 band values: a band's `rows` bits are its own hash (rows <= 63).
    `bits`: signatures as bytes, or as an (n, bits / 8) uint8 array."""
    if config.rows > 63:
        raise ValueError("band keys need rows <= 63")
    if not len(bits):
        return np.zeros((0, config.bands), np.int64)
    packed = bits if isinstance(bits, np.ndarray) else np.frombuffer(b"".join(bits), np.uint8).reshape(len(bits), -1)
    if config.rows % 8 == 0:  # whole bytes: fold them big-endian, no bit unpacking
        per = packed.reshape(len(packed), config.bands, config.rows // 8)
        out = np.zeros((len(packed), config.bands), np.int64)
        for j in range(config.rows // 8):
            out = (out << 8) | per[:, :, j]
        return out
    arr = np.unpackbits(packed, axis=1)
    weights = np.int64(1) << np.arange(config.rows, dtype=np.int64)[::-1]
    return (arr.reshape(len(bits), config.bands, config.rows).astype(np.int64) * weights).sum(axis=2)


def buckets(hashes: np.ndarray, config: SignatureConfig) -> np.ndarray:
    """Bucket keys of (n, bands) band values: band << rows | value, one int64 per (band, value)."""
    if config.rows + max(config.bands - 1, 1).bit_length() > 63:
        raise ValueError("bucket keys need rows + log2(bands) < 64")
    return (np.arange(config.bands, dtype=np.int64) << config.rows) | hashes


def band_table(ids: list[str], bits: list[bytes], n_elements: list[int], config: SignatureConfig) -> pa.Table:
    """Rows of the bands table for these signatures (fragment ids stored as their 32 raw bytes)."""
    keys = buckets(band_hashes(bits, config), config)
    pick = pa.array(np.repeat(np.arange(len(ids)), config.bands))
    return pa.table(
        {
            "bucket": pa.array(keys.reshape(-1)),
            "fragment_id": pa.array([bytes.fromhex(i) for i in ids], pa.binary()).take(pick),
            "bits": pa.array(bits, pa.binary()).take(pick),
            "n_elements": pa.array(n_elements, pa.int64()).take(pick),
        },
        schema=SCHEMAS["bands"],
    )


def id_table(ids: list[str], dtypes: list[str]) -> pa.Table:
    return pa.table({"id_key": pa.array(id_keys(ids)), "fragment_id": pa.array(ids, pa.string()), "dtype": pa.array(dtypes, pa.string())}, schema=SCHEMAS["ids"])


# ---- writes ----------------------------------------------------------------------------
def append_keyed(store: LibraryStore, spec: KeyedTable, rows: pa.Table, note: str = "") -> None:
    """Append rows in one commit: one file sorted by the key, row groups of `group_rows`,
    statistics on the key only (small footers), nothing compressed (ids and signature bits are
    random bytes), the key's range in the add action."""
    if rows.num_rows == 0:
        return
    from deltalake import CommitProperties

    schema = SCHEMAS[spec.name]
    rows = rows.cast(schema).sort_by(spec.key)
    fname = f"part-00000-{uuid.uuid4()}-c000.parquet"
    path = posixpath.join(store.root, spec.name, fname)
    ints = [f.name for f in schema if pa.types.is_integer(f.type)]
    with store.fs.open(path, "wb") as f:
        pq.write_table(rows, f, row_group_size=spec.group_rows, compression="none", use_dictionary=ints, write_statistics=[spec.key])
    key = rows[spec.key]
    stats = {"numRecords": rows.num_rows, "minValues": {spec.key: key[0].as_py()}, "maxValues": {spec.key: key[-1].as_py()}, "nullCount": {spec.key: 0}}
    action = AddAction(fname, store.fs.size(path), {}, int(time.time() * 1000), True, json.dumps(stats))
    with store._lock:
        store.table(spec.name).create_write_transaction(
            [action], mode="append", schema=schema, commit_properties=CommitProperties(custom_metadata={"haagenti": note}) if note else None,
        )


def append_index(store: LibraryStore, fragments: pa.Table, signatures: pa.Table, config: SignatureConfig, note: str = "") -> None:
    """Index rows for newly committed fragments: every id, and band rows of the plain exact
    ones that have a signature (the only fragments a delta may reference). Written after the
    fragments and signatures they index, before the manifests and models that publish them."""
    if fragments.num_rows == 0:
        return
    append_keyed(store, IDS, id_table(fragments["fragment_id"].to_pylist(), fragments["dtype"].to_pylist()), note)
    plain = fragments.filter(pc.and_(pc.equal(fragments["encoding"], "plain"), pc.equal(fragments["quality"], "exact")))
    sigs = signatures.filter(pc.is_in(signatures["fragment_id"], plain["fragment_id"]))
    if sigs.num_rows:
        append_keyed(store, BANDS, band_table(sigs["fragment_id"].to_pylist(), sigs["bits"].to_pylist(), sigs["n_elements"].to_pylist(), config), note)


# ---- reads -----------------------------------------------------------------------------
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
        paths, actions = self.store._snapshot(self.spec.name, None)
        return list(zip(paths, actions[f"min.{self.spec.key}"], actions[f"max.{self.spec.key}"])) if paths else []

    def read(self, keys: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows whose key is in `keys` (sorted, unique), with `columns`."""
        schema = SCHEMAS[self.spec.name]
        need = columns if self.spec.key in columns else columns + [self.spec.key]
        out = []
        for path, lo, hi in self.files():
            sel = keys[(keys >= lo) & (keys <= hi)] if lo is not None else keys
            if len(sel):
                t = self._read_file(path, sel, need, schema)
                if t is not None and t.num_rows:
                    out.append(t.select(columns))
        return pa.concat_tables(out) if out else pa.schema([schema.field(c) for c in columns]).empty_table()

    def _read_file(self, path: str, keys: np.ndarray, columns: list[str], schema: pa.Schema) -> pa.Table | None:
        with self.store.files.open(path) as src:
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
            self.counts.row_groups += len(groups)
            self.counts.bytes += sum(pf.metadata.row_group(g).total_byte_size for g in groups)
            t = pf.read_row_groups(groups, columns=columns, use_threads=False)
        t = t.cast(pa.schema([schema.field(c) for c in columns]))
        return t.filter(pc.is_in(t[self.spec.key], value_set=pa.array(keys)))

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


class KnownIds:
    """Which of some fragment ids the library holds (id -> dtype), reading only the ids table's
    row groups their keys fall in; never the whole id set."""

    def __init__(self, store: LibraryStore):
        self.reader = KeyedReader(store, IDS)

    def lookup(self, ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(ids))
        if not ids:
            return {}
        keys = np.unique(id_keys(ids))
        t = self.reader.read(keys, ["fragment_id", "dtype"])
        t = t.filter(pc.is_in(t["fragment_id"], value_set=pa.array(ids, pa.string())))
        return dict(zip(t["fragment_id"].to_pylist(), t["dtype"].to_pylist()))


class BandIndex:
    """The library's band rows in given buckets: fragments that share an LSH band with new
    ones, with what ranking them needs (haagenti.matching applies the reference rule)."""

    def __init__(self, store: LibraryStore, config: SignatureConfig, keep_footers: bool = True):
        self.config = config
        self.reader = KeyedReader(store, BANDS, keep_footers)

    def rows(self, wanted: pa.Table) -> pa.Table:
        """Rows (band, band_hash, fragment_id as hex, bits, n_elements) of the library in the
        (band, band_hash) buckets given."""
        rows = self.config.rows
        keys = np.unique((wanted["band"].to_numpy().astype(np.int64) << rows) | wanted["band_hash"].to_numpy().astype(np.int64))
        t = self.reader.read(keys, ["bucket", "fragment_id", "bits", "n_elements"])
        key = t["bucket"].to_numpy()
        return pa.table({
            "band": pa.array((key >> rows).astype(np.int16)), "band_hash": pa.array(key & ((1 << rows) - 1)),
            "fragment_id": hex_ids(t["fragment_id"]), "bits": t["bits"].combine_chunks(), "n_elements": t["n_elements"],
        })


def compact(store: LibraryStore, target_bytes: int = 256 * 1024 * 1024) -> int:
    """Rewrite each index table sorted by its key (z-order on one column) into files of about
    `target_bytes` with disjoint key ranges and row groups of `group_rows`: a lookup then opens
    one file per key range. Deletes nothing (gc's vacuum does). Returns data files replaced."""
    removed = 0
    for spec in (BANDS, IDS):
        props = WriterProperties(max_row_group_size=spec.group_rows, compression="UNCOMPRESSED")
        with store._lock:
            m = store.table(spec.name).optimize.z_order([spec.key], target_size=target_bytes, writer_properties=props)
        removed += int(m.get("numFilesRemoved", 0))
    return removed
