"""The "two-level" index layout: a small global table that names the shards a run's fragments
resemble, and the full signatures of those shards, read on demand.

Xet's dedup queries its global index with a sample of chunks and fetches, for a hit, the whole
chunk list of the shard it names. Here a shard is one fragments commit (about
LibraryConfig.batch_bytes of fragments of consecutive models) and the tables are:
  shard_keys:       (pair_key, shard), level 1: for each reference fragment's band-pair keys
                    (`pair_keys`) that fall in the sampled 1/8 of key space (`sampled`), the
                    shard holding it.
  shard_signatures: (shard, fragment_id, bits, n_elements, depth), level 2: one row per
                    reference (the fragments BandsLayout would band), its signature whole; the
                    band keys are computed from it where it is read.
  fragment_keys:    (id_key, fragment_id, dtype, data_file), every stored id (the bands
                    layout's ids table; ids and data-file uuids as raw bytes).
A run's scoper (`ShardScope`) reads level 1 for the sampled keys of its fragments and gives
each fragment, in run order, the top SHARDS shards by hits among the last WINDOW fragments (its
own included) and the shard committed after each (a model's corresponding tensors continue
there); the run's fragments before its first hit, up to LEAD of them, take that hit's scope.
`propose` reads those shards' signatures (cached) and returns their band rows in the buckets
asked. The scope of a fragment depends on the fragments before it, and for a leading one on
those up to the first hit, so a run scopes every fragment alike however it is cut into batches,
in one process or on an executor.
Exact ids are found by key in `fragment_keys` (the bands layout's probe).
docs/decisions/0270-two-level-index.md has the figures.
"""
from __future__ import annotations

import hashlib
import heapq
import uuid
from collections import Counter, OrderedDict, deque
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.binary import hex_ids, raw_ids
from haagenti.index.bands import buckets, id_keys, read_ids, reference_signatures
from haagenti.index.layout import IndexLayout, Scoper, register_layout
from haagenti.signature import SignatureConfig, band_hashes
from haagenti.store import SCHEMAS, LibraryStore
from haagenti.store.keyed import KeyedReader, KeyedTable, append_keyed, sort_keyed

# Encodings (docs/decisions/0276-index-encodings.md): sorted keys as their gaps; level 1's shards
# too (a writer's shards are consecutive keys: a library of few writers stores ~2 B a shard, of
# many as plain); signature bits without a length each; ids sorted by their leading bytes as the
# suffix after the prefix shared with the row before, other ids plain (a dictionary repeats each).
SHARD_KEYS = KeyedTable("shard_keys", "pair_key", 1024, encodings=(("pair_key", "DELTA_BINARY_PACKED"), ("shard", "DELTA_BINARY_PACKED")), keys_first=True)
SHARD_SIGNATURES = KeyedTable("shard_signatures", "shard", 1024, encodings=(("fragment_id", "DELTA_BYTE_ARRAY"), ("bits", "DELTA_LENGTH_BYTE_ARRAY")))
FRAGMENT_KEYS = KeyedTable("fragment_keys", "id_key", 256, ("dtype", "data_file"), (("id_key", "DELTA_BINARY_PACKED"), ("fragment_id", "DELTA_BYTE_ARRAY"), ("data_file", "DELTA_BYTE_ARRAY")), keys_first=True)
SAMPLE_BITS = 3  # level 1 keeps the pair keys whose mixed value has its top 3 bits clear: 1 in 8
SHARDS = 8  # shards a fragment's scope names by hits (each with its successor)
WINDOW = 1024  # fragments of the run whose hits choose the scope (about 256 MiB of bf16)
# A run's leading fragments, before its first hit, take that hit's scope when it comes within
# this many: the cold start of 0270 and 0272 (a fine-tune's first fragments were stored plain).
# The driver holds them, bytes and all, until then: 64 fragments of 256 KiB bf16 are one encode
# batch (docs/decisions/0275-cold-start.md).
LEAD = 64
CACHED_SHARDS = 64  # shards whose band rows a layout object keeps
_MIX = np.uint64(0x9E3779B97F4A7C15)
ID = pa.binary(32)  # how the layout's tables store fragment ids


def pair_keys(bits: list[bytes], config: SignatureConfig) -> np.ndarray:
    """(fragments, bands // 2) int64 keys of band pairs: pair << 2 rows | band 2j << rows | band
    2j + 1. Two bands make a key space wide enough that unrelated fragments rarely share one
    (2^32 values for 16-row bands, against 2^16 for a band: a 16-bit bucket holds ~150
    unrelated fragments of a 10M-fragment library), while near-duplicates still share some."""
    pairs = config.bands // 2
    if 2 * config.rows + max(pairs - 1, 1).bit_length() > 63:
        raise ValueError("pair keys need 2 * rows + log2(bands / 2) < 64")
    h = band_hashes(bits, config)[:, : 2 * pairs]
    return (np.arange(pairs, dtype=np.int64) << (2 * config.rows)) | (h[:, 0::2] << config.rows) | h[:, 1::2]


def sampled(keys: np.ndarray) -> np.ndarray:
    """Which pair keys level 1 keeps: a fixed 1/8 of key space (Fibonacci hashing of the key:
    band values themselves are not uniform). The sample is of keys, not fragments: a
    near-duplicate shares its reference's keys, so it samples the same ones."""
    return ((keys.astype(np.uint64) * _MIX) >> np.uint64(64 - SAMPLE_BITS)) == 0


def shard_prefix(data_file: str) -> int:
    """The high 47 bits of a writer's shard keys, from the name of its first data file; the low
    16 count its commits, so the shard after `s` is `s + 1`."""
    return int.from_bytes(hashlib.blake2b(data_file.encode(), digest_size=8).digest(), "big") >> 17


def band_rows(shards: pa.Table, config: SignatureConfig) -> pa.Table:
    """(bucket, fragment_id as hex, bits, n_elements, depth): level-2 rows exploded into one row
    per band, as the bands layout stores them."""
    n = shards.num_rows
    keys = buckets(band_hashes(shards["bits"].to_pylist(), config), config).reshape(-1)
    pick = pa.array(np.repeat(np.arange(n), config.bands))
    return pa.table({
        "bucket": pa.array(keys, pa.int64()), "fragment_id": hex_ids(shards["fragment_id"].cast(pa.binary())).take(pick),
        "bits": shards["bits"].combine_chunks().take(pick), "n_elements": shards["n_elements"].combine_chunks().take(pick),
        "depth": shards["depth"].combine_chunks().take(pick),
    })


class ShardScope:
    """A run's scoper (IndexLayout.scoper): each new fragment's scope is the shards its last
    WINDOW fragments hit in level 1, carried from call to call in run order; the run's leading
    fragments without a hit take the scope of its first hit within LEAD fragments."""

    def __init__(self, layout: TwoLevelLayout):
        self.layout = layout
        self.window: deque[tuple[int, list[int]]] = deque()  # (rank, shards hit) of the last WINDOW fragments with hits
        self.counts: Counter[int] = Counter()
        self.seen = 0  # fragments scoped so far
        self.leading = True  # no hit yet, and fewer than LEAD fragments scoped

    def __call__(self, rows: pa.Table, more: bool = False) -> pa.Table | None:
        if rows.num_rows == 0:
            return rows
        first = rows.filter(pc.equal(rows["band"], 0))  # one row per fragment
        pos = first["pos"].to_numpy()
        keys = pair_keys(first["bits"].to_pylist(), self.layout.config)
        at = np.repeat(pos, keys.shape[1])
        keys = keys.reshape(-1)
        keep = sampled(keys)
        hits: dict[int, list[int]] = {}
        if keep.any():
            level1 = self.layout.keys.read(np.unique(keys[keep]), ["pair_key", "shard"])
            if level1.num_rows:
                asked = pa.table({"pair_key": pa.array(keys[keep]), "pos": pa.array(at[keep])})
                joined = asked.join(level1, "pair_key", join_type="inner")
                for p, s in zip(joined["pos"].to_numpy(), joined["shard"].to_numpy()):
                    hits.setdefault(int(p), []).append(int(s))
        order = np.unique(pos)  # the call's fragments in run order
        if self.leading and more and len(order) < LEAD and not hits:
            return None  # the lead's scope is not known yet: nothing is counted
        scope_of: dict[int, str] = {}
        scope = self._scope()
        lead: list[int] = []  # the run's leading fragments, waiting for its first hit
        for p in order.tolist():
            rank = self.seen
            self.seen += 1
            changed = False
            while self.window and self.window[0][0] <= rank - WINDOW:
                self.counts.subtract(self.window.popleft()[1])
                changed = True
            got = hits.get(p)
            if got:
                self.window.append((rank, got))
                self.counts.update(got)
                changed = True
            if changed:
                scope = self._scope()
            if self.leading:
                lead.append(p)
                if not got and rank + 1 < LEAD:
                    continue
                self.leading = False
                scope_of.update(dict.fromkeys(lead, scope))  # the first hit's scope, or none within LEAD
            scope_of[p] = scope
        if self.leading:  # the run ended within its lead, without a hit
            scope_of.update(dict.fromkeys(lead, scope))
        scopes = pa.array([scope_of[p] for p in rows["pos"].to_pylist()], pa.string())
        return rows.set_column(rows.schema.get_field_index("scope"), "scope", scopes)

    def _scope(self) -> str:
        """The top SHARDS shards by hits (ties by key) and the shard after each, as text."""
        top = heapq.nsmallest(SHARDS, (s for s, c in self.counts.items() if c > 0), key=lambda s: (-self.counts[s], s))
        return ",".join(str(s) for s in sorted({s + d for s in top for d in (0, 1)}))


@register_layout
class TwoLevelLayout(IndexLayout):
    """Level 1 names shards, level 2 holds their signatures; ids found by key. Each layout
    object is one writer: its commits are consecutive shards (`shard_prefix`)."""

    name = "two-level"
    tables = ("shard_keys", "shard_signatures", "fragment_keys")

    def __init__(self, store: LibraryStore, signature: SignatureConfig, keep_footers: bool = True):
        self.store, self.config = store, signature
        self.keys = KeyedReader(store, SHARD_KEYS, keep_footers)
        self.signatures = KeyedReader(store, SHARD_SIGNATURES, keep_footers)
        self.ids = KeyedReader(store, FRAGMENT_KEYS)
        self.shards: OrderedDict[int, pa.Table] = OrderedDict()  # shard -> its band rows (band_rows), least recently used first
        self.prefix: int | None = None
        self.commits = 0

    def append(self, fragments: pa.Table, signatures: pa.Table, data_file: str | None, note: str = "") -> None:
        """Every id into fragment_keys; the references (BandsLayout.append's rule) into level 2
        under this commit's shard, and their sampled pair keys into level 1."""
        if fragments.num_rows == 0:
            return
        ids = fragments["fragment_id"].to_pylist()
        append_keyed(self.store, FRAGMENT_KEYS, pa.table({
            "id_key": pa.array(id_keys(ids)), "fragment_id": raw_ids(pa.array(ids, pa.string())), "dtype": fragments["dtype"],
            "data_file": pa.array([uuid.UUID(data_file).bytes if data_file else None] * len(ids), pa.binary(16)),
        }), note)
        sigs = reference_signatures(fragments, signatures, self.config)
        if sigs.num_rows == 0:
            return
        if self.prefix is None or self.commits == 1 << 16:
            self.prefix, self.commits = shard_prefix(data_file or ids[0]), 0
        shard = (self.prefix << 16) | self.commits
        self.commits += 1
        rows = pa.table({"shard": pa.array(np.full(sigs.num_rows, shard, np.int64)), "fragment_id": raw_ids(sigs["fragment_id"]),
                         "bits": sigs["bits"], "n_elements": sigs["n_elements"], "depth": sigs["depth"]})
        append_keyed(self.store, SHARD_SIGNATURES, rows, note)
        keys = pair_keys(sigs["bits"].to_pylist(), self.config).reshape(-1)
        keys = np.unique(keys[sampled(keys)])
        append_keyed(self.store, SHARD_KEYS, pa.table({"pair_key": pa.array(keys), "shard": pa.array(np.full(len(keys), shard, np.int64))}), note)

    def scoper(self) -> Scoper:
        return ShardScope(self)

    def propose(self, wanted: pa.Table) -> pa.Table:
        """Band rows of the shards `wanted`'s scope names, in its buckets."""
        rows = self.config.rows
        scope = wanted["scope"][0].as_py() if wanted.num_rows else None
        shards = [int(s) for s in scope.split(",")] if scope else []
        keys = np.unique((wanted["band"].to_numpy().astype(np.int64) << rows) | wanted["band_hash"].to_numpy().astype(np.int64))
        held = self._shard_rows(shards)
        t = held.filter(pc.is_in(held["bucket"], value_set=pa.array(keys, pa.int64()))) if held.num_rows else held
        key = t["bucket"].to_numpy()
        return pa.table({
            "band": pa.array((key >> rows).astype(np.int16)), "band_hash": pa.array(key & ((1 << rows) - 1)),
            "fragment_id": t["fragment_id"], "bits": t["bits"], "n_elements": t["n_elements"], "depth": t["depth"],
        })

    def _shard_rows(self, shards: list[int]) -> pa.Table:
        """The band rows of these shards, read from level 2 for those not cached."""
        missing = sorted(s for s in shards if s not in self.shards)
        if missing:
            t = self.signatures.read(np.array(missing, np.int64), ["shard", "fragment_id", "bits", "n_elements", "depth"])
            shard = t["shard"].to_numpy()
            for s in missing:
                self.shards[s] = band_rows(t.filter(pa.array(shard == s)), self.config)
        for s in shards:
            self.shards.move_to_end(s)
        parts = [self.shards[s] for s in shards]
        while len(self.shards) > max(CACHED_SHARDS, len(shards)):
            self.shards.popitem(last=False)
        return pa.concat_tables(parts) if parts else band_rows(SCHEMAS["shard_signatures"].empty_table(), self.config)

    def known(self, ids: Iterable[str]) -> dict[str, str]:
        """As BandsLayout.known: an id row is confirmed by its fragment's row."""
        found = self._ids(ids, ["fragment_id", "dtype"])
        stored = set(self.store.read_fragments(found, columns=["fragment_id"], locate=self.locate)["fragment_id"].to_pylist()) if found else set()
        return {i: d for i, d in found.items() if i in stored}

    def locate(self, ids: set[str]) -> dict[str, str]:
        return {f: str(uuid.UUID(bytes=u)) for f, u in self._ids(ids, ["fragment_id", "data_file"]).items() if u}

    def _ids(self, ids: Iterable[str], columns: list[str]) -> dict[str, str]:
        """{hex id: the other column} of the fragment_keys rows of those of `ids` stored."""
        t = read_ids(self.ids, ids, columns)
        return dict(zip(hex_ids(t["fragment_id"].cast(pa.binary())).to_pylist(), t[columns[1]].to_pylist()))

    def delete_except(self, present: pa.Array) -> int:
        """Level 2 first, then the level-1 rows of shards left with no reference, then ids: a gc
        stopped in between leaves ids without signatures (found, not proposed) or level-1 rows
        naming an empty shard (a read that finds nothing), never a proposed reference the ids
        table no longer knows."""
        raw = raw_ids(present).cast(ID)
        gone = [t["fragment_id"].filter(pc.invert(pc.is_in(t["fragment_id"], value_set=raw))).combine_chunks()
                for t in self.store.scan("shard_signatures", ["fragment_id"])]
        deleted = self.store.delete_where("shard_signatures", "fragment_id", pc.unique(pa.chunked_array(gone, ID)), "gc")
        kept = pc.unique(pa.chunked_array([t["shard"] for t in self.store.scan("shard_signatures", ["shard"])], pa.int64()))
        empty = pc.unique(pa.chunked_array([t["shard"].filter(pc.invert(pc.is_in(t["shard"], value_set=kept)))
                                            for t in self.store.scan("shard_keys", ["shard"])], pa.int64()))
        deleted += self.store.delete_where("shard_keys", "shard", empty, "gc")
        stale = [t["fragment_id"].filter(pc.invert(pc.is_in(t["fragment_id"], value_set=raw))).combine_chunks()
                 for t in self.store.scan("fragment_keys", ["fragment_id"])]
        self.shards.clear()
        return deleted + self.store.delete_where("fragment_keys", "fragment_id", pc.unique(pa.chunked_array(stale, ID)), "gc")

    def compact(self, target_bytes: int = 256 * 1024 * 1024) -> int:
        """Each table sorted by its key, level 2 first."""
        return sum(sort_keyed(self.store, spec, target_bytes) for spec in (SHARD_SIGNATURES, SHARD_KEYS, FRAGMENT_KEYS))
