"""The library's global indexes as tables: LSH band rows and fragment ids, stored so that a
lookup reads only the files and row groups that can hold its keys.

Both tables are keyed by an int64 and every data file is sorted by it:
  bands: (bucket, fragment_id, bits, n_elements, depth), one row per band of each exact float
         fragment that may serve as a reference (chain depth below MAX_CHAIN_DEPTH); key
         `bucket` = band << rows | the band's bits: bands are key ranges.
  ids:   (id_key, fragment_id, dtype, data_file), one row per stored fragment; key `id_key` (the
         id's first 8 bytes): the known-id check, and where read_fragments finds a fragment.
The reading by key is haagenti.store.keyed's: a lookup takes the Delta log's per-file min/max of the key (no listing, no file opened), then
each candidate file's row-group min/max from its footer, and reads only the row groups whose
range holds a wanted key (docs/decisions/0013-index-as-tables.md: why sorted row groups rather than Delta
partitions or bloom filters). Each commit of fragments appends one sorted file per index table
with their rows; `compact()` z-orders each table (one key column: a sort) into files with
disjoint key ranges.

Why not datasketch here: its MinHashLSH keeps every band bucket in one process's dicts (or in
Redis/Cassandra), which is what this module exists to avoid. Its `_optimal_param` does not
choose bands x rows either (docs/decisions/0011-datasketch-banding.md): the library's bands x rows is an invariant of
its signatures (SignatureConfig). The reference rule over the rows read is haagenti.matching's.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import WriterProperties

from haagenti.config import MAX_CHAIN_DEPTH
from haagenti.signature import SignatureConfig
from haagenti.store import SCHEMAS, LibraryStore
from haagenti.store.keyed import IDS, KeyedReader, KeyedTable, ReadCounts, append_keyed, id_keys, id_rows

__all__ = ["BANDS", "IDS", "BandIndex", "KeyedReader", "KnownIds", "ReadCounts", "append_index", "append_keyed", "band_table", "compact", "id_keys", "id_table"]


BANDS = KeyedTable("bands", "bucket", 256)
# Bytes a band row takes on disk (bands files of the bench family: id 36, bits 36, bucket ~5,
# length and depth ~1). A fragment's band rows cost `bands` times this.
BAND_ROW_BYTES = 80


# ---- keys ------------------------------------------------------------------------------
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


def band_table(ids: list[str], bits: list[bytes], n_elements: list[int], depths: list[int], config: SignatureConfig) -> pa.Table:
    """Rows of the bands table for these signatures and chain depths (fragment ids stored as their
    32 raw bytes)."""
    keys = buckets(band_hashes(bits, config), config)
    pick = pa.array(np.repeat(np.arange(len(ids)), config.bands))
    return pa.table(
        {
            "bucket": pa.array(keys.reshape(-1)),
            "fragment_id": pa.array([bytes.fromhex(i) for i in ids], pa.binary()).take(pick),
            "bits": pa.array(bits, pa.binary()).take(pick),
            "n_elements": pa.array(n_elements, pa.int64()).take(pick),
            "depth": pa.array(depths, pa.int64()).take(pick),
        },
        schema=SCHEMAS["bands"],
    )


def id_table(ids: list[str], dtypes: list[str], data_file: str | None = None) -> pa.Table:
    """Rows of the ids table; `data_file`: the uuid of the fragments data file they were
    appended in (LibraryStore.append returns it), where read_fragments looks first."""
    return pa.table({
        "id_key": pa.array(id_keys(ids)), "fragment_id": pa.array(ids, pa.string()), "dtype": pa.array(dtypes, pa.string()),
        "data_file": pa.array([data_file] * len(ids), pa.string()),
    }, schema=SCHEMAS["ids"])


# ---- writes ----------------------------------------------------------------------------
def append_index(store: LibraryStore, fragments: pa.Table, signatures: pa.Table, config: SignatureConfig, note: str = "",
                 data_file: str | None = None) -> None:
    """Index rows for newly committed fragments (appended in the fragments data file whose uuid
    is `data_file`): every id, and band rows of the references later ingests may use: exact
    fragments with a signature and a chain depth below MAX_CHAIN_DEPTH, plain ones and the deltas
    that start a lineage in their dtype. A delta of a same-dtype reference (a fine-tune of it)
    is left out: its relatives are nearer their common ancestor, which is indexed; so is a delta
    that stored fewer bytes than its band rows would take (a near-copy, a cast re-export: its
    reference serves as well, within what the delta stored). Docs/decisions/0101-reference-chains.md
    has the figures. Written after the fragments and signatures they index, before the
    manifests and models that publish them."""
    if fragments.num_rows == 0:
        return
    append_keyed(store, IDS, id_table(fragments["fragment_id"].to_pylist(), fragments["dtype"].to_pylist(), data_file), note)
    plain = pc.equal(fragments["encoding"], "plain")
    lineage = pc.and_(pc.not_equal(fragments["ref_dtype"], fragments["dtype"]), pc.greater(fragments["stored_size"], BAND_ROW_BYTES * config.bands))
    usable = fragments.filter(pc.and_(pc.and_(pc.equal(fragments["quality"], "exact"), pc.less(fragments["depth"], MAX_CHAIN_DEPTH)),
                                      pc.or_(plain, pc.fill_null(lineage, False))))
    sigs = signatures.select(["fragment_id", "bits", "n_elements"]).join(usable.select(["fragment_id", "depth"]), "fragment_id", join_type="inner").sort_by("fragment_id")
    if sigs.num_rows:
        append_keyed(store, BANDS, band_table(sigs["fragment_id"].to_pylist(), sigs["bits"].to_pylist(), sigs["n_elements"].to_pylist(),
                                              sigs["depth"].to_pylist(), config), note)


# ---- reads -----------------------------------------------------------------------------
class KnownIds:
    """Which of some fragment ids the library holds (id -> dtype), reading only the ids table's
    row groups their keys fall in; never the whole id set. An id row is confirmed by its
    fragment's row (the id column of the data file it names, cached per file): an index row
    whose fragment is gone must cost a copy, never a published model that cannot be restored."""

    def __init__(self, store: LibraryStore):
        self.store = store
        self.reader = store.ids  # shared with read_fragments: one set of cached footers per library

    def lookup(self, ids: Iterable[str]) -> dict[str, str]:
        t = id_rows(self.reader, ids, ["fragment_id", "dtype"])
        found = dict(zip(t["fragment_id"].to_pylist(), t["dtype"].to_pylist()))
        stored = set(self.store.read_fragments(found, columns=["fragment_id"])["fragment_id"].to_pylist()) if found else set()
        return {i: d for i, d in found.items() if i in stored}


class BandIndex:
    """The library's band rows in given buckets: fragments that share an LSH band with new
    ones, with what ranking them needs (haagenti.matching applies the reference rule)."""

    def __init__(self, store: LibraryStore, config: SignatureConfig, keep_footers: bool = True):
        self.config = config
        self.reader = KeyedReader(store, BANDS, keep_footers)

    def rows(self, wanted: pa.Table) -> pa.Table:
        """Rows (band, band_hash, fragment_id as hex, bits, n_elements, depth) of the library in
        the (band, band_hash) buckets given."""
        rows = self.config.rows
        keys = np.unique((wanted["band"].to_numpy().astype(np.int64) << rows) | wanted["band_hash"].to_numpy().astype(np.int64))
        t = self.reader.read(keys, ["bucket", "fragment_id", "bits", "n_elements", "depth"])
        key = t["bucket"].to_numpy()
        return pa.table({
            "band": pa.array((key >> rows).astype(np.int16)), "band_hash": pa.array(key & ((1 << rows) - 1)),
            "fragment_id": hex_ids(t["fragment_id"]), "bits": t["bits"].combine_chunks(), "n_elements": t["n_elements"],
            "depth": t["depth"],
        })


def compact(store: LibraryStore, target_bytes: int = 256 * 1024 * 1024) -> int:
    """Rewrite each index table sorted by its key (z-order on one column) into files of about
    `target_bytes` with disjoint key ranges and row groups of `group_rows`: a lookup then opens
    one file per key range. Deletes nothing (gc's vacuum does). Returns data files replaced (0:
nothing changed since the last compact)."""
    removed = 0
    for spec in (BANDS, IDS):
        props = WriterProperties(max_row_group_size=spec.group_rows, compression="UNCOMPRESSED")
        with store._lock:
            table = store.table(spec.name)
            last = next((h.get("operation") for h in table.history(16) if not str(h.get("operation")).startswith("VACUUM")), None)
            if last == "OPTIMIZE":
                continue  # nothing appended or deleted since it was last sorted: a rewrite would change nothing
            m = table.optimize.z_order([spec.key], target_size=target_bytes, writer_properties=props)
        removed += int(m.get("numFilesRemoved", 0))
    return removed
