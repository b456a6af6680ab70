"""Reference choice: which stored or earlier fragments a new fragment may be encoded against.

One rule, used by `FragmentLibrary.ingest_many` (batch after batch, in one process) and by the
Ray pipeline (once over the whole run, its bucket groups spread over workers):

1. Candidates. Every new float fragment has a position in the run (catalog order: models in
   order, tensors in file order, fragments in tensor order). Its candidates are the fragments
   *before* it that share an LSH band with it and have its length: plain exact fragments of the
   library first (by id), then this run's new float fragments (by position). Per band bucket
   the first `MAX_SCAN` such fragments are looked at, those within
   `hamming_limit(similar_cosine)` bits of it are kept, and of those the `MAX_PARTNERS` nearest
   (by Hamming distance, then that order). Both caps keep a bucket of identical signatures
   linear; the nearest are kept, not the first, because a bucket fills with unrelated fragments
   as the library grows (N/65,536 rows per 16-bit bucket): with the first 32 by id, a
   near-duplicate in a 10M-fragment library was proposed 27% of the time (docs/decisions/0015-reference-rule.md).
2. Depth. Every fragment has a depth: 0 when stored plain, else 1 + its reference's depth. A
   candidate is usable when its depth is below `MAX_CHAIN_DEPTH`, delta or not: a fine-tune
   references its base even when the base is itself a delta of an export that came first
   (docs/decisions/0101-reference-chains.md). The library's fragments carry their stored depth
   (the bands index); this run's carry a bound, decided in run order: 0 without a usable
   candidate (an anchor, stored plain), else 1 + the deepest of its top k.
3. Top k. The usable candidates are ranked by (Hamming distance, id); the first `k` are tried
   as references and the smallest encoding wins (haagenti.encode); the fragment's stored depth
   is 0 if that is plain, else 1 + the chosen reference's depth (never above its bound).
4. Float sources. A fragment of quantized blocks that haagenti.codecs.predict can predict is
   also paired, by the same rule, with the float fragments of as many values (its own band
   rows, counted in values: a block type's band rows count blocks, so they never meet a float's
   otherwise); those candidates rank before its others (docs/decisions/0281-quantized-prediction.md).
   ONNX int8/uint8 codes need no such pass: they count values and are signed on their codes less
   their median, so rule 1 pairs them with their float source (docs/decisions/0290-onnx-int8-prediction.md).
   Other int8/uint8 exports of that source sign as it does (codes over a scale), so an int8/uint8
   fragment's candidates that are this run's int8/uint8 fragments rank after its others: the
   float source is tried whatever the ids of the run's other exports (docs/decisions/0282-onnx-per-channel.md).

Every step looks only at fragments before the one it decides, so computing the rule batch by
batch (the library, carrying the earlier batches' band rows) gives exactly what computing it
over the whole run at once gives (the pipeline): the two paths build the same library.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.codecs.predict import LINEAR, VALUES_PER_BLOCK
from haagenti.config import MAX_CHAIN_DEPTH, LibraryConfig
from haagenti.groups import group_starts, rank_in_runs, sort_rows
from haagenti.binary import fixed_width
from haagenti.signature import SignatureConfig, band_hashes

MAX_SCAN = 1024  # earlier fragments looked at per new fragment and band bucket
MAX_PARTNERS = 32  # of those, the nearest kept as candidates
PAIR_CHUNK = 1 << 20  # candidate pairs scored at once (~130 MB of temporaries with 256-bit signatures)
BUCKET = ["band", "band_hash"]
# One row per (fragment, band). `pos` orders fragments: -1 for the library's, then run order.
# `is_new`: decided in this call; `depth`: its chain depth (null while being decided).
BAND_SCHEMA = pa.schema(
    [
        ("band", pa.int16()),
        ("band_hash", pa.uint64()),
        ("fragment_id", pa.string()),
        ("bits", pa.binary()),
        ("n_elements", pa.int64()),
        ("pos", pa.int64()),
        ("is_new", pa.bool_()),
        ("depth", pa.int16()),
        ("scope", pa.string()),  # what the index layout is told with the row's bucket (IndexLayout.scoper); null: nothing
    ]
)
PAIR_SCHEMA = pa.schema([("fragment_id", pa.string()), ("candidate_id", pa.string()), ("hamming", pa.int32()), ("depth", pa.int16())])


def hamming_limit(config: SignatureConfig, cosine: float) -> int:
    """Hamming distance at which SimHash's expected collision rate matches `cosine`."""
    return int(config.bits * math.acos(max(min(cosine, 1.0), -1.0)) / math.pi)


def signature_bands(ids: list[str], bits: list[bytes], config: SignatureConfig) -> pa.Table:
    """Signatures exploded into one row per band (band, band_hash, fragment_id), keyed as the
    library's index keys them (haagenti.signature.band_hashes: a band's bits are its own hash)."""
    hashes = band_hashes(bits, config)
    return pa.table(
        {
            "band": pa.array(np.tile(np.arange(config.bands, dtype=np.int16), len(ids))),
            "band_hash": pa.array(hashes.reshape(-1).astype(np.uint64)),
            "fragment_id": pa.array(np.repeat(np.array(ids, dtype=object), config.bands), pa.string()),
        }
    )


def match_rows(sigs: pa.Table, config: SignatureConfig, pos: np.ndarray, depth: np.ndarray | None = None) -> pa.Table:
    """Band rows of signatures (`fragment_id`, `bits`, `n_elements`), carrying what pairing needs:
    new rows to decide (`depth` None), or decided rows of this run with their depths."""
    b = signature_bands(sigs["fragment_id"].to_pylist(), sigs["bits"].to_pylist(), config)
    reps = config.bands
    n = sigs.num_rows
    cols = {
        "band": b["band"], "band_hash": b["band_hash"], "fragment_id": b["fragment_id"],
        "bits": pc.take(sigs["bits"], pa.array(np.repeat(np.arange(n), reps))),
        "n_elements": pa.array(np.repeat(sigs["n_elements"].to_numpy(), reps), pa.int64()),
        "pos": pa.array(np.repeat(np.asarray(pos, np.int64), reps), pa.int64()),
        "is_new": pa.array(np.full(n * reps, depth is None)),
        "depth": pa.nulls(n * reps, pa.int16()) if depth is None else pa.array(np.repeat(np.asarray(depth, np.int16), reps)),
        "scope": pa.nulls(n * reps, pa.string()),
    }
    return pa.table(cols, schema=BAND_SCHEMA)


def shared_buckets(bands: pa.Table) -> pa.Table:
    """Band rows of the buckets that can yield a pair: two or more fragments, one of them new.
    Most buckets hold one fragment; dropping them in one Arrow aggregation keeps the pairing
    work proportional to the real matches."""
    agg = bands.group_by(BUCKET).aggregate([("fragment_id", "count"), ("is_new", "any")])
    keep = agg.filter(pc.and_(pc.greater(agg["fragment_id_count"], 1), agg["is_new_any"])).select(BUCKET)
    return bands.join(keep, BUCKET, join_type="inner")


def bucket_pairs(part: pa.Table, max_hamming: int, max_partners: int = MAX_PARTNERS, max_scan: int = MAX_SCAN) -> pa.Table:
    """(new fragment, candidate, Hamming distance, candidate depth) for the rows of whole
    buckets: each new fragment against the first `max_scan` fragments of its length before it
    in its bucket, kept when within `max_hamming`, the `max_partners` nearest of those (rule 1 of
    the module doc). Vectorised: rows sorted by (bucket, length, pos, id), the partners of a row
    are among the first min(its rank, max_scan) rows of its group."""
    if part.num_rows == 0:
        return PAIR_SCHEMA.empty_table()
    t = sort_rows(part, BUCKET + ["n_elements", "pos", "fragment_id"])
    starts = group_starts(t, BUCKET + ["n_elements"])
    sizes = np.diff(starts)
    row_start = np.repeat(starts[:-1], sizes)
    rank = np.arange(t.num_rows) - row_start
    is_new = t["is_new"].to_numpy(zero_copy_only=False)
    rows_i = np.flatnonzero(is_new & (rank > 0))
    reps = np.minimum(rank[rows_i], max_scan)
    words = fixed_width(t["bits"])
    if words.shape[1] % 8 == 0:  # XOR and popcount a word at a time
        words = words.view(np.uint64)
    # Scored a run of new rows at a time, at most PAIR_CHUNK pairs (and their signatures) held:
    # a bucket of many fragments of one length (20k one-element tensors) otherwise made
    # rows x max_scan pairs at once (23.7 GB). Each run keeps its rows' nearest, so the
    # result is the same as scoring every pair together.
    ends = np.cumsum(reps)
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    lo = 0
    while lo < len(rows_i):
        hi = max(lo + 1, int(np.searchsorted(ends, ends[lo] - reps[lo] + PAIR_CHUNK, side="right")))
        ri, rr = rows_i[lo:hi], reps[lo:hi]
        first = np.cumsum(rr) - rr
        i = np.repeat(ri, rr)
        j = np.repeat(row_start[ri], rr) + np.arange(int(rr.sum())) - np.repeat(first, rr)
        d = np.bitwise_count(words[i] ^ words[j]).sum(axis=1, dtype=np.int64)
        close = d <= max_hamming
        i, j, d = i[close], j[close], d[close]
        nearest = np.lexsort((j, d, i))  # per new row: by distance, then bucket order
        i, j, d = i[nearest], j[nearest], d[nearest]
        keep = rank_in_runs(i) < max_partners
        kept.append((i[keep], j[keep], d[keep]))
        lo = hi
    i, j, d = (np.concatenate(parts) for parts in zip(*kept)) if kept else (np.zeros(0, np.int64),) * 3
    ids = t["fragment_id"].combine_chunks()
    return pa.table(
        {
            "fragment_id": ids.take(pa.array(i)),
            "candidate_id": ids.take(pa.array(j)),
            "hamming": pa.array(d, pa.int32()),
            "depth": t["depth"].combine_chunks().take(pa.array(j)),
        },
        schema=PAIR_SCHEMA,
    )


def library_rows(rows: pa.Table) -> pa.Table:
    """Band rows read from the library's index (IndexLayout.propose, haagenti.index) as reference
    candidates: before every new fragment (pos -1), with their stored depths."""
    n = rows.num_rows
    return pa.table({
        "band": rows["band"], "band_hash": rows["band_hash"].cast(pa.uint64()), "fragment_id": rows["fragment_id"],
        "bits": rows["bits"], "n_elements": rows["n_elements"], "pos": pa.array(np.full(n, -1, np.int64)),
        "is_new": pa.array(np.zeros(n, bool)), "depth": rows["depth"].cast(pa.int16()).fill_null(0),  # null: a row written before depths (plain)
        "scope": pa.nulls(n, pa.string()),
    }, schema=BAND_SCHEMA)


Lookup = Callable[[pa.Table], pa.Table]  # (band, band_hash) buckets -> the library's band rows in them
# (a batch's new band rows, the run's earlier band rows) -> their pairs (partner_pairs)
Pairing = Callable[[pa.Table, pa.Table], pa.Table]


def partner_pairs(new: pa.Table, lookup: Lookup | None, earlier: pa.Table | None, max_hamming: int) -> pa.Table:
    """Pairs of `new` band rows with the fragments before them in their buckets: the library's,
    read by `lookup` for these buckets (and the rows' scope) only, and `earlier` rows of this
    run. Rows of different scopes are paired a scope at a time, each with the library rows of
    its own scope and every run row (of any scope) in its buckets: what a row is paired with
    depends on its scope, never on which other rows share the call."""
    scopes = pc.unique(new.filter(new["is_new"])["scope"])  # rows not new (earlier ones the caller added) are seen, not scoped
    if len(scopes) <= 1:
        return _scope_pairs(new, None, scopes[0] if len(scopes) else pa.scalar(None, pa.string()), lookup, earlier, max_hamming)
    parts = []
    for scope in scopes:
        same = pc.fill_null(pc.equal(new["scope"], scope), False) if scope.is_valid else pc.is_null(new["scope"])
        mine = pc.and_(same, new["is_new"])
        others = new.filter(pc.invert(mine))
        others = others.set_column(others.schema.get_field_index("is_new"), "is_new", pa.array(np.zeros(others.num_rows, bool)))
        parts.append(_scope_pairs(new.filter(mine), others, scope, lookup, earlier, max_hamming))
    return pa.concat_tables(parts)


def _scope_pairs(new: pa.Table, others: pa.Table | None, scope: pa.Scalar, lookup: Lookup | None, earlier: pa.Table | None,
                 max_hamming: int) -> pa.Table:
    """partner_pairs for rows of one scope; `others`: the call's new rows of other scopes, seen
    as run rows (their depths are decided with these)."""
    buckets = new.select(BUCKET).group_by(BUCKET).aggregate([])
    parts = [new]
    if lookup is not None:
        parts.append(library_rows(lookup(buckets.append_column("scope", pa.array([scope.as_py()] * buckets.num_rows, pa.string())))))
    for run in (others, earlier):
        if run is not None:
            parts.append(run.join(buckets, BUCKET, join_type="left semi"))
    return bucket_pairs(shared_buckets(pa.concat_tables(parts)), max_hamming)


def choose_references(pairs: pa.Table, new_ids: list[str], k: int, max_depth: int = MAX_CHAIN_DEPTH,
                      new_deltas: bool = True, first: pa.Table | None = None, last: pa.Table | None = None) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Rules 2 and 3 of the module doc over the pairs of fragments decided together (`new_ids`,
    in run order): ({fragment: its k nearest usable candidates} for every fragment that has
    one (the others are anchors), {id: depth} of every new fragment (its bound) and of every
    candidate chosen). A candidate decided in the same call has the depth decided for it here;
    an earlier one carries its own. The ranking runs on Arrow and numpy columns (a catalog has
    tens of pairs per new fragment); the depths are decided in run order, each fragment after
    the candidates before it, with at most a few usable candidates looked at per fragment.
    Without `new_deltas` only this call's anchors may serve (lossy sharing: a fragment shared
    lossily is never stored, so no fragment of its run may reference it). Pairs in `first`
    (rule 4's float sources) rank before every pair in `pairs` of their fragment, pairs in
    `last` (int8/uint8 codes paired with codes) after them."""
    depth = np.zeros(len(new_ids), np.int64)
    out: dict[str, list[str]] = {}
    tiers = [(t, i) for i, t in enumerate((first, pairs, last)) if t is not None and t.num_rows]
    tier = pa.array(np.concatenate([np.full(t.num_rows, i, np.int8) for t, i in tiers] or [np.zeros(0, np.int8)]))
    pairs = pa.concat_tables([t for t, _ in tiers]) if tiers else pairs
    if pairs.num_rows == 0:
        return out, dict(zip(new_ids, depth.tolist()))
    keys = pa.array(new_ids, pa.string())
    ranked = pa.table({
        "f": pc.index_in(pairs["fragment_id"], value_set=keys), "t": tier, "h": pairs["hamming"], "c": pairs["candidate_id"],
        "ci": pc.index_in(pairs["candidate_id"], value_set=keys).fill_null(-1), "cd": pairs["depth"].cast(pa.int64()).fill_null(-1),
    }).sort_by([("f", "ascending"), ("t", "ascending"), ("h", "ascending"), ("c", "ascending")])
    f = ranked["f"].to_numpy()
    c = ranked["c"].combine_chunks().dictionary_encode()
    cidx = c.indices.to_numpy()
    fresh = np.ones(len(f), bool)  # a pair found in several bands counts once
    fresh[1:] = (f[1:] != f[:-1]) | (cidx[1:] != cidx[:-1])
    f, cidx = f[fresh], cidx[fresh]
    ci, cd = ranked["ci"].to_numpy()[fresh], ranked["cd"].to_numpy()[fresh]
    cands = c.dictionary.to_pylist()
    chosen: dict[str, int] = {}
    starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]]).tolist() + [len(f)]
    for s, e in zip(starts, starts[1:]):
        taken: list[str] = []
        deepest = -1
        for j in range(s, e):
            d = int(depth[ci[j]]) if ci[j] >= 0 else int(cd[j])
            if d < max_depth and (new_deltas or ci[j] < 0 or d == 0) and cands[cidx[j]] not in taken:
                taken.append(cands[cidx[j]])
                chosen[taken[-1]] = d
                deepest = max(deepest, d)
                if len(taken) == k:
                    break
        if taken:
            out[new_ids[f[s]]] = taken
            depth[f[s]] = deepest + 1
    return out, chosen | dict(zip(new_ids, depth.tolist()))


class RunMatcher:
    """The rule applied batch by batch (the library's ingest): reads the library's band rows
    of each batch's buckets through `lookup` (None: no library references, as for precision
    tiers), each batch's rows scoped by `scope` (the index layout's scoper), and holds the
    band rows of this run's earlier new fragments, with their depths: memory grows with what
    is new, not with the library. Without `new_deltas` (lossy sharing) only the run's anchors
    serve as references among its fragments. `pairs` pairs the rows elsewhere (an executor's
    bucket groups, haagenti.ingest_steps.grouped_pairs); `lookup` is then unused."""

    def __init__(self, config: LibraryConfig, lookup: Lookup | None, new_deltas: bool = True, scope: Callable[[pa.Table, bool], pa.Table | None] | None = None,
                 pairs: Pairing | None = None):
        self.config, self.new_deltas = config, new_deltas
        self.limit = hamming_limit(config.signature, config.thresholds.similar_cosine)
        self.lookup, self.scope = lookup, scope
        self.pairs = pairs or (lambda new, earlier: partner_pairs(new, self.lookup, earlier, self.limit))
        self.earlier = BAND_SCHEMA.empty_table()
        self.codes: set[str] = set()  # the run's int8/uint8 fragments (rule 4)
        self.next_pos = 0

    def match(self, sigs: pa.Table, more: bool = False) -> tuple[dict[str, list[str]], dict[str, int]] | None:
        """Reference candidates of the next new fragments (`fragment_id`, `bits`, `n_elements`,
        in run order; `dtype`, where quantized blocks may be among them: rule 4), and the
        depths of them and their candidates (choose_references); fragments absent from the
        candidates are anchors. None when the scoper needs the run's next fragments (`more`
        follow) to scope these: nothing is decided, and the caller asks again with these and
        the next."""
        if sigs.num_rows == 0:
            return {}, {}
        pos = np.arange(self.next_pos, self.next_pos + sigs.num_rows)
        batch = match_rows(sigs, self.config.signature, pos)
        if self.scope is not None:
            batch = self.scope(batch, more)
            if batch is None:
                return None
        self.next_pos += sigs.num_rows
        pairs = self.pairs(batch, self.earlier)
        sources = self._source_pairs(sigs, batch)
        ids = sigs["fragment_id"].to_pylist()
        if "dtype" in sigs.column_names:
            self.codes.update(i for i, d in zip(ids, sigs["dtype"].to_pylist()) if d in LINEAR)
        last = None
        if self.codes:
            codes = pa.array(sorted(self.codes), pa.string())
            among = pc.and_(pc.is_in(pairs["fragment_id"], value_set=codes), pc.is_in(pairs["candidate_id"], value_set=codes))
            pairs, last = pairs.filter(pc.invert(among)), pairs.filter(among)
        refs, depths = choose_references(pairs, ids, self.config.candidates, new_deltas=self.new_deltas, first=sources, last=last)
        held = np.array([depths[i] if self.new_deltas or i not in refs else MAX_CHAIN_DEPTH for i in ids])
        self.earlier = pa.concat_tables([self.earlier, match_rows(sigs, self.config.signature, pos, held)])
        return refs, depths

    def _source_pairs(self, sigs: pa.Table, batch: pa.Table) -> pa.Table | None:
        """Rule 4: the pairs of the batch's predictable quantized fragments with the float
        fragments of as many values before them (the library's, the run's, the batch's), from
        their band rows (`batch`, scoped) counted in values. None without such fragments."""
        if "dtype" not in sigs.column_names:
            return None
        blocks = pa.array([VALUES_PER_BLOCK.get(d, 0) for d in sigs["dtype"].to_pylist()], pa.int64())
        if not pc.any(pc.greater(blocks, 0)).as_py():
            return None
        scale = pc.take(blocks, pc.index_in(batch["fragment_id"], value_set=sigs["fragment_id"]))
        quantized = pc.greater(scale, 0)
        rows = batch.filter(quantized)
        rows = rows.set_column(rows.schema.get_field_index("n_elements"), "n_elements", pc.multiply(rows["n_elements"], scale.filter(quantized)))
        floats = batch.filter(pc.invert(quantized))  # the batch's own floats, seen as candidates
        floats = floats.set_column(floats.schema.get_field_index("is_new"), "is_new", pa.array(np.zeros(floats.num_rows, bool)))
        pairs = self.pairs(pa.concat_tables([rows, floats]), self.earlier)
        return pairs.filter(pc.invert(pc.is_in(pairs["candidate_id"], value_set=rows["fragment_id"])))  # blocks are no float source
