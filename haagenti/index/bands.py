"""The "bands" index layout: LSH band rows and fragment ids as two keyed tables, stored so that a
lookup reads only the files and row groups that can hold its keys.

Both tables are keyed by an int64 and every data file is sorted by it:
  bands: (bucket, fragment_id, bits, n_elements, depth), one row per band of each exact float
         fragment that may serve as a reference (chain depth below MAX_CHAIN_DEPTH); key
         `bucket` = band << rows | the band's bits: bands are key ranges.
  ids:   (id_key, fragment_id, dtype, data_file), one row per stored fragment; key `id_key` (the
         id's first 8 bytes): the known-id check, and where read_fragments finds a fragment.
The reading by key is haagenti.store.keyed's: a lookup takes the Delta log's per-file min/max
of the key (no listing, no file opened), then each candidate file's row-group min/max from its
footer, and reads only the row groups whose range holds a wanted key
(docs/decisions/0013-index-as-tables.md: why sorted row groups rather than Delta partitions or bloom filters). Each commit of fragments
appends one sorted file per table with their rows; `compact()` sorts each table into files with
disjoint key ranges.

Why not datasketch here: its MinHashLSH keeps every band bucket in one process's dicts (or in
Redis/Cassandra), which is what this layout exists to avoid. Its `_optimal_param` does not
choose bands x rows either (docs/decisions/0011-datasketch-banding.md): the library's bands x rows is an invariant of
its signatures (SignatureConfig). The reference rule over the rows read is haagenti.matching's.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.binary import hex_ids, raw_ids
from haagenti.config import MAX_CHAIN_DEPTH
from haagenti.index.layout import IndexLayout, register_layout
from haagenti.signature import SignatureConfig, band_hashes
from haagenti.store import SCHEMAS, LibraryStore
from haagenti.store.files import strings
from haagenti.store.keyed import KeyedReader, KeyedTable, append_keyed, sort_keyed
from haagenti.store.schema import empty, project

BANDS = KeyedTable("bands", "bucket", 256)
IDS = KeyedTable("ids", "id_key", 256, keys_first=True)
# Bytes a band row takes on disk (bands files of the bench family: id 36, bits 36, bucket ~5,
# length and depth ~1). A fragment's band rows cost `bands` times this.
BAND_ROW_BYTES = 80
_HEX_ID = re.compile(r"[0-9a-f]{64}")


# ---- keys and rows ---------------------------------------------------------------------
def id_keys(ids: Iterable[str]) -> np.ndarray:
    """The first 8 bytes of each hex id as a signed big-endian int64 (sorts like the ids)."""
    raw = bytes.fromhex("".join(i[:16] for i in ids))
    return np.frombuffer(raw, ">u8").astype(np.uint64).view(np.int64) ^ np.int64(-(2**63))


def buckets(hashes: np.ndarray, config: SignatureConfig) -> np.ndarray:
    """Bucket keys of (n, bands) band values: band << rows | value, one int64 per (band, value)."""
    if config.rows + max(config.bands - 1, 1).bit_length() > 63:
        raise ValueError("bucket keys need rows + log2(bands) < 64")
    return (np.arange(config.bands, dtype=np.int64) << config.rows) | hashes


def bands_rows(ids: list[str], bits: list[bytes], n_elements: list[int], depths: list[int], config: SignatureConfig) -> pa.Table:
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


def ids_rows(ids: list[str], dtypes: list[str], data_file: str | None = None) -> pa.Table:
    """Rows of the ids table; `data_file`: the uuid of the fragments data file they were
    appended in (LibraryStore.append returns it), where read_fragments looks first."""
    return pa.table({
        "id_key": pa.array(id_keys(ids)), "fragment_id": pa.array(ids, pa.string()), "dtype": pa.array(dtypes, pa.string()),
        "data_file": pa.array([data_file] * len(ids), pa.string()),
    }, schema=SCHEMAS["ids"])


def read_ids(reader: KeyedReader, ids: Iterable[str], columns: list[str]) -> pa.Table:
    """The rows of an id table keyed by `id_key` (with `columns`, which hold `fragment_id`, hex
    or raw as the table stores it) of those of `ids` the library holds: only the row groups
    their keys fall in are read. Ids that are not 64 hex digits (a damaged record naming one)
    have no row."""
    ids = sorted({i for i in ids if isinstance(i, str) and _HEX_ID.fullmatch(i)})
    if not ids:
        return empty(project(SCHEMAS[reader.spec.name], columns))
    t = reader.read(np.unique(id_keys(ids)), columns)
    wanted, kind = strings(ids), t.schema.field("fragment_id").type
    return t.filter(pc.is_in(t["fragment_id"], value_set=wanted if pa.types.is_string(kind) else raw_ids(wanted).cast(kind)))


def reference_signatures(fragments: pa.Table, signatures: pa.Table, config: SignatureConfig) -> pa.Table:
    """(fragment_id, bits, n_elements, depth) of the committed fragments later ingests may use as
    references (BandsLayout.append says which), sorted by id."""
    plain = pc.equal(fragments["encoding"], "plain")
    lineage = pc.and_(pc.not_equal(fragments["ref_dtype"], fragments["dtype"]), pc.greater(fragments["stored_size"], BAND_ROW_BYTES * config.bands))
    usable = fragments.filter(pc.and_(pc.and_(pc.equal(fragments["quality"], "exact"), pc.less(fragments["depth"], MAX_CHAIN_DEPTH)),
                                      pc.or_(plain, pc.fill_null(lineage, False))))
    return signatures.select(["fragment_id", "bits", "n_elements"]).join(usable.select(["fragment_id", "depth"]), "fragment_id", join_type="inner").sort_by("fragment_id")


# ---- the layout --------------------------------------------------------------------------
@register_layout
class BandsLayout(IndexLayout):
    """Band rows proposed by bucket, ids found by key. Readers cache row-group ranges per data
    file, and footers too with `keep_footers` (an ingest, batch after batch); the ids reader
    serves both `known` and `locate`: one set of cached footers per layout object."""

    name = "bands"
    tables = ("bands", "ids")

    def __init__(self, store: LibraryStore, signature: SignatureConfig, keep_footers: bool = True):
        self.store, self.config = store, signature
        self.bands = KeyedReader(store, BANDS, keep_footers)
        self.ids = KeyedReader(store, IDS)

    def append(self, fragments: pa.Table, signatures: pa.Table, data_file: str | None, note: str = "") -> None:
        """Index rows for newly committed fragments (appended in the fragments data file whose
        uuid is `data_file`): every id, and band rows of the references later ingests may use:
        exact fragments with a signature and a chain depth below MAX_CHAIN_DEPTH, plain ones and
        the deltas that start a lineage in their dtype. A delta of a same-dtype reference (a
        fine-tune of it) is left out: its relatives are nearer their common ancestor, which is
        indexed; so is a delta that stored fewer bytes than its band rows would take (a
        near-copy, a cast re-export: its reference serves as well, within what the delta
        stored). Docs/decisions/0101-reference-chains.md has the figures."""
        if fragments.num_rows == 0:
            return
        append_keyed(self.store, IDS, ids_rows(fragments["fragment_id"].to_pylist(), fragments["dtype"].to_pylist(), data_file), note)
        sigs = reference_signatures(fragments, signatures, self.config)
        if sigs.num_rows:
            append_keyed(self.store, BANDS, bands_rows(sigs["fragment_id"].to_pylist(), sigs["bits"].to_pylist(), sigs["n_elements"].to_pylist(),
                                                       sigs["depth"].to_pylist(), self.config), note)

    def propose(self, wanted: pa.Table) -> pa.Table:
        """Rows (band, band_hash, fragment_id as hex, bits, n_elements, depth) of the library in
        the (band, band_hash) buckets given."""
        rows = self.config.rows
        keys = np.unique((wanted["band"].to_numpy().astype(np.int64) << rows) | wanted["band_hash"].to_numpy().astype(np.int64))
        t = self.bands.read(keys, ["bucket", "fragment_id", "bits", "n_elements", "depth"])
        key = t["bucket"].to_numpy()
        return pa.table({
            "band": pa.array((key >> rows).astype(np.int16)), "band_hash": pa.array(key & ((1 << rows) - 1)),
            "fragment_id": hex_ids(t["fragment_id"]), "bits": t["bits"].combine_chunks(), "n_elements": t["n_elements"],
            "depth": t["depth"],
        })

    def known(self, ids: Iterable[str]) -> dict[str, str]:
        """An id row is confirmed by its fragment's row (read where the id row says it was
        appended): an index row whose fragment is gone must cost a copy, never a published
        model that cannot be restored."""
        t = read_ids(self.ids, ids, ["fragment_id", "dtype"])
        found = dict(zip(t["fragment_id"].to_pylist(), t["dtype"].to_pylist()))
        stored = set(self.store.read_fragments(found, columns=["fragment_id"], locate=self.locate)["fragment_id"].to_pylist()) if found else set()
        return {i: d for i, d in found.items() if i in stored}

    def locate(self, ids: set[str]) -> dict[str, str]:
        t = read_ids(self.ids, ids, ["fragment_id", "data_file"])
        return {f: u for f, u in zip(t["fragment_id"].to_pylist(), t["data_file"].to_pylist()) if u}

    def delete_except(self, present: pa.Array) -> int:
        """Bands first: a gc stopped in between leaves ids rows without band rows (an exact
        match still found, a reference not proposed), never a band row whose fragment the ids
        table no longer knows (proposed as a reference, or as its own, to the next ingest)."""
        stale: list[pa.Array] = []
        for t in self.store.scan("ids", ["fragment_id"]):
            stale.append(t["fragment_id"].filter(pc.invert(pc.is_in(t["fragment_id"], value_set=present))).combine_chunks())
        for t in self.store.scan("bands", ["fragment_id"]):
            ids = hex_ids(t["fragment_id"])
            stale.append(ids.filter(pc.invert(pc.is_in(ids, value_set=present))))
        gone = pc.unique(pa.chunked_array(stale, pa.string()))
        return self.store.delete_where("bands", "fragment_id", raw_ids(gone), "gc") + self.store.delete_where("ids", "fragment_id", gone, "gc")

    def compact(self, target_bytes: int = 256 * 1024 * 1024) -> int:
        """Each table sorted by its key (LibraryStore.sort_by_key), bands first."""
        return sum(sort_keyed(self.store, spec, target_bytes) for spec in (BANDS, IDS))
