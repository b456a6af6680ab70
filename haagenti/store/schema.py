"""The library's on-disk format: its version and the schemas of its tables
(docs/format.md describes every column)."""
from __future__ import annotations

import pyarrow as pa

LIBRARY_FORMAT_VERSION = 10  # 2: BLAKE3 ids and file hashes; 3: file layout digests; 4: invariants in haagenti.json, ingest ids; 5: record digests; 6: predicted quantized fragments; 7: file hashes are trees over fragment ids (files.layout), files.blake3 optional; 8: verbatim bytes over 16 KiB as pieces (fragments) named by files.header; 9: range-coded quantized fragments (codec rans); 10: table-driven rANS (codec rans2)
UPGRADABLE_FROM = (4, 5, 6, 7, 8, 9)  # `haagenti upgrade` moves a library of these formats to this one (haagenti.maintenance.upgrade)

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
            ("depth", pa.int64()),  # 0 plain, else 1 + its reference's; null in format-4 rows (plain 0, delta 1)
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
            ("ingest_id", pa.string()),  # the writer that wrote the row; owned by the models row with the same id
        ]
    ),
    # The "bands" index layout's tables (haagenti.index.bands): keyed tables (haagenti.store.keyed),
    # sorted by their int64 key, read by key range.
    "bands": pa.schema(
        [
            ("bucket", pa.int64()),  # band << rows | the band's bits (haagenti.index.bands.buckets)
            ("fragment_id", pa.binary()),  # the id's 32 raw bytes (hex in every other table)
            ("bits", pa.binary()),
            ("n_elements", pa.int64()),
            ("depth", pa.int64()),  # the fragment's chain depth (0: plain); null in rows written before chains: 0
        ]
    ),
    "ids": pa.schema(
        [
            ("id_key", pa.int64()),
            ("fragment_id", pa.string()),
            ("dtype", pa.string()),
            ("data_file", pa.string()),  # where its fragments row was appended: a hint (docs/format.md); null in older rows
        ]
    ),
    # The "two-level" index layout's tables (haagenti.index.two_level), keyed tables too.
    "shard_keys": pa.schema(  # level 1: the sampled band-pair keys of each shard's references
        [
            ("pair_key", pa.int64()),  # two bands' values (haagenti.index.two_level.pair_keys), one key in 8
            ("shard", pa.int64()),  # the shard (one fragments commit) holding a reference with the key
        ]
    ),
    "shard_signatures": pa.schema(  # level 2: every reference's signature, by shard
        [
            ("shard", pa.int64()),
            ("fragment_id", pa.binary(32)),  # the id's 32 raw bytes
            ("bits", pa.binary()),
            ("n_elements", pa.int64()),
            ("depth", pa.int64()),  # the fragment's chain depth (0: plain)
        ]
    ),
    "fragment_keys": pa.schema(  # every stored fragment's id, as the bands layout's ids table
        [
            ("id_key", pa.int64()),
            ("fragment_id", pa.binary(32)),  # the id's 32 raw bytes
            ("dtype", pa.string()),
            ("data_file", pa.binary(16)),  # the uuid (16 raw bytes) of the fragments data file its row was appended in: a hint
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
                            ("header", pa.large_binary()),  # format 8 on: a tag, then the verbatim bytes or their pieces' ids (haagenti.manifest.header_field)
                            ("layout", pa.string()),
                        ]
                    )
                ),
            ),
            ("source_uris", pa.list_(pa.string())),
            ("ingest_seq", pa.int64()),
            ("format_version", pa.int32()),
            ("ingest_id", pa.string()),  # the writer that published it (its manifest rows carry the same)
            ("record_digest", pa.string()),  # haagenti.records.record_digest of this row and its manifest rows
        ]
    ),
}


def project(schema: pa.Schema, cols: list[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in cols])


def empty(schema: pa.Schema) -> pa.Table:
    """A table of no rows: Schema.empty_table() imports pandas (0.2-0.5 s of a cold read)."""
    return pa.Table.from_batches([], schema=schema)


def conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """`t` as `schema`: its columns cast to the declared types (files rewritten by delta-rs hold
    string_view columns), and a column its data file lacks as nulls (a column added to format 4
    after the file was written: `ids.data_file`)."""
    for f in schema:
        if f.name not in t.column_names:
            t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
    return t.select(schema.names).cast(schema)
