"""The ingest's sign, match and encode steps over Arrow batches, for any executor
(haagenti.executors): a step knows nothing of how it is scheduled. A fragment's bytes ride in
the batch's `data` column where the executor shares the driver's memory; where it is null
(another process) they are read by byte range where they are needed, so model bytes never
travel between processes. `ingest_batches` drives them over a run's occurrences, batch after
batch: new -> sign -> match -> encode -> commit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.checkpoints import reached
from haagenti.config import LibraryConfig
from haagenti.core import LibraryCore
from haagenti.encode import PendingFragment, encode_fragment, rows_table, signature_row
from haagenti.executors import Executor
from haagenti.formats.dtypes import can_dequantize, signable
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.source import RangeReader
from haagenti.fragment import FragmentType
from haagenti.index import IndexLayout, open_index
from haagenti.matching import BUCKET, Pairing, RunMatcher, hamming_limit, partner_pairs
from haagenti.parallel import Workers
from haagenti.signature import SignatureConfig, compute_signatures
from haagenti.store import SCHEMAS, LibraryStore
from haagenti.writer import Committer

# Fragments per sign and encode call: measured on 2 CPUs, 32 per encode call spent ~4 s of a
# 7-model run in per-call overhead, 128 per call 0.4 s; 64 keeps an output batch (~10 MB) well
# inside a small object store with a few calls in flight.
STEP_BATCH = 64
MATCH_PART_ROWS = 4096  # band rows per match task: 256 fragments x 16 bands, an ingest batch's lookup

# One row per fragment occurrence of the run's models, in model order. `data`: the bytes, or
# null where they are read from `url` at `byte_offset`.
OCCURRENCE_SCHEMA = pa.schema(
    [
        ("rank", pa.int64()),
        ("fragment_id", pa.string()),
        ("dtype", pa.string()),
        ("fragment_type", pa.string()),
        ("signs", pa.bool_()),
        ("url", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_len", pa.int64()),
        ("data", pa.binary()),
    ]
)

# One row per new fragment: where its bytes are and its candidate references, each an in-run
# fragment (a byte range) or a library one (url null, read from the library).
ASSIGNMENT_SCHEMA = pa.schema(
    [
        ("fragment_id", pa.string()),
        ("dtype", pa.string()),
        ("fragment_type", pa.string()),
        ("url", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_len", pa.int64()),
        ("data", pa.binary()),
        ("ref_ids", pa.list_(pa.string())),
        ("ref_urls", pa.list_(pa.string())),  # null entry: the reference is in the library
        ("ref_offsets", pa.list_(pa.int64())),
        ("ref_lens", pa.list_(pa.int64())),
        ("ref_dtypes", pa.list_(pa.string())),
        ("ref_depths", pa.list_(pa.int64())),
    ]
)


def signs(p: PendingFragment) -> bool:
    """Whether a new fragment gets a signature (and so takes part in reference choice): floats,
    and quantized blocks gguf can dequantize."""
    d = lookup_dtype(p.dtype)
    return bool(p.data) and (d.is_float or (d.block > 1 and can_dequantize(d)))


def signature_table(pieces: list[PendingFragment], config: SignatureConfig, device: str = "cpu", workers: Workers | None = None) -> pa.Table:
    """Signatures-table rows of fragments (bit-identical on any device), signed over `workers`;
    quantized blocks are signed on their dequantized values."""
    sign = lambda part: compute_signatures([signable(p.data, lookup_dtype(p.dtype)) for p in part], config, device)  # noqa: E731
    sigs = (workers.map(sign, pieces) if workers is not None else sign(pieces)) if pieces else []
    return rows_table([signature_row(p, s) for p, s in zip(pieces, sigs)], SCHEMAS["signatures"])


def fragment_table(rows: list[dict]) -> pa.Table:
    return rows_table(rows, SCHEMAS["fragments"])


def _pieces(rows: list[dict], reader: RangeReader) -> list[PendingFragment]:
    """The rows' fragments, their bytes carried in `data` or read by range."""
    return [PendingFragment(r["fragment_id"], r["dtype"], r["data"] if r["data"] is not None else reader.read(r["url"], r["byte_offset"], r["byte_len"]),
                            FragmentType(r["fragment_type"]), 0) for r in rows]


class SignFragments:
    """Signatures of fragments, on the GPU when this worker has one. The same class runs on
    CPU workers; the signatures are bit-identical either way (haagenti.signature)."""

    def __init__(self, config: SignatureConfig):
        import torch  # here, not at the top: the other steps run without it

        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reader = RangeReader()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return signature_table(_pieces(batch.to_pylist(), self.reader), self.config, self.device)


class MatchBands:
    """Reference pairs of this run's band rows of some whole buckets (one task of the match
    stage's join; rows not `is_new` are the run's earlier ones): the library's rows of those
    buckets are read here, from storage (only the index files and row groups that hold them),
    never sent from the driver."""

    def __init__(self, library_url: str, config: LibraryConfig, max_hamming: int):
        self.library_url, self.config, self.max_hamming = library_url, config, max_hamming

    def __call__(self, part: pa.Table) -> pa.Table:
        index = _INDEXES.get(self.library_url)
        if index is None:  # one per worker process, row-group ranges cached; footers are not kept:
            # a task reads few files, and kept footers grow with the library
            index = _INDEXES[self.library_url] = open_index(LibraryStore(self.library_url), self.config, keep_footers=False)
        new = part["is_new"]
        return partner_pairs(part.filter(new), index.propose, part.filter(pc.invert(new)), self.max_hamming)


_INDEXES: dict[str, IndexLayout] = {}


class EncodeFragments:
    """Encode new fragments (plain, or a delta against the best of their references) into
    fragments-table rows, in run order."""

    def __init__(self, library_url: str, config: LibraryConfig):
        self.library = LibraryCore.open(library_url, config, create=False)
        self.level = config.zstd_level
        self.reader = RangeReader()

    def __call__(self, batch: pa.Table) -> pa.Table:
        reached("encode")
        rows = batch.to_pylist()
        from_library = {i for r in rows for i, u in zip(r["ref_ids"], r["ref_urls"]) if u is None}
        library_raw = self.library.fetch_raw(from_library) if from_library else {}
        out = []
        for r, p in zip(rows, _pieces(rows, self.reader)):
            refs = []
            for rid, url, off, ln, rdt, depth in zip(r["ref_ids"], r["ref_urls"], r["ref_offsets"], r["ref_lens"], r["ref_dtypes"], r["ref_depths"]):
                refs.append((rid, library_raw[rid] if url is None else self.reader.read(url, off, ln), rdt, depth))
            out.append(encode_fragment(p, refs, self.level))
        return fragment_table(out)


@dataclass
class StoredTotals:
    """What a run stored: its new fragments, how many as deltas, and their bytes."""

    new_fragments: int = 0
    delta_fragments: int = 0
    stored_bytes: int = 0


def occurrence_batches(tables: Iterable[pa.Table], batch_bytes: int | None) -> Iterator[pa.Table]:
    """The occurrences of `tables` (OCCURRENCE_SCHEMA, in run order) in batches of about
    `batch_bytes` of fragment bytes (None: one batch)."""
    held: list[pa.Table] = []
    size = 0
    for t in tables:
        held.append(t)
        size += int(pc.sum(t["byte_len"]).as_py() or 0)
        while batch_bytes is not None and size >= batch_bytes:
            rows = pa.concat_tables(held)
            cut = int(np.searchsorted(np.cumsum(rows["byte_len"].to_numpy()), batch_bytes)) + 1
            yield rows.slice(0, cut)
            held = [rows.slice(cut)]
            size = int(pc.sum(held[0]["byte_len"]).as_py() or 0)
    if held and sum(t.num_rows for t in held):
        yield pa.concat_tables(held)


def ingest_batches(core: LibraryCore, index: IndexLayout, occurrences: Iterable[pa.Table], executor: Executor, committer: Committer,
                   seconds: dict[str, float], batch_bytes: int | None) -> StoredTotals:
    """Store the new fragments of a run's occurrences (OCCURRENCE_SCHEMA, in run order, `rank`
    the model each belongs to) batch after batch, each stage's steps run by `executor`: which
    are new (the library's `known` per batch), their signatures, their references
    (haagenti.matching's rule, paired by `grouped_pairs`),
    their rows, committed by `committer` as they come. Adds each stage's time to `seconds`
    ("sign", "match", "encode+write"). Batches of `batch_bytes` of fragment bytes bound what the
    driver holds; None makes the run one batch, each stage's calls streaming over the whole run
    (no pool drains between batches: what a cluster wants, decisions/0242)."""
    config = core.config
    matcher = RunMatcher(config, None, scope=index.scoper(), pairs=grouped_pairs(executor, core.store.url, config)) if config.similarity else None
    known: dict[str, str] = {}  # id -> dtype of the library's fragments met and the run's new ones
    located: dict[str, tuple[str, int, int]] = {}  # (url, offset, length) of the run's new fragments
    totals = StoredTotals()
    clock = _Clock(seconds)
    for batch in occurrence_batches(occurrences, batch_bytes):
        ids = batch["fragment_id"].to_pylist()
        known.update(index.known(list(set(ids) - known.keys())))
        first: dict[str, int] = {}
        for i, fid in enumerate(ids):
            if fid not in known and fid not in first:
                first[fid] = i
        new = batch.take(pa.array(list(first.values()), pa.int64()))
        for fid, dtype, url, offset, length in zip(*(new[c].to_pylist() for c in ("fragment_id", "dtype", "url", "byte_offset", "byte_len"))):
            known[fid] = dtype
            located[fid] = (url, offset, length)
        floats = new.filter(new["signs"])
        parts = list(executor.map_batches(SignFragments, (config.signature,), floats, STEP_BATCH, actors=True)) if matcher and floats.num_rows else []
        sigs = pa.concat_tables(parts) if parts else signature_table([], config.signature)
        clock("sign")
        refs, depths = matcher.match(sigs) if matcher is not None else ({}, {})
        known.update(index.known(list({c for cs in refs.values() for c in cs} - known.keys())))  # the library references' dtypes
        clock("match")
        assignments = _assignments(new, refs, depths, located, known)
        for tb in executor.map_batches(EncodeFragments, (core.store.url, config), assignments, STEP_BATCH):
            totals.new_fragments += tb.num_rows
            totals.delta_fragments += int(pc.sum(pc.not_equal(tb["encoding"], "plain")).as_py() or 0)
            totals.stored_bytes += int(pc.sum(tb["stored_size"]).as_py() or 0)
            at = pc.index_in(tb["fragment_id"], value_set=new["fragment_id"])
            committer.add(tb, sigs.filter(pc.is_in(sigs["fragment_id"], value_set=tb["fragment_id"])), new["rank"].take(at).to_numpy())
        clock("encode+write")
    committer.flush()
    clock("encode+write")
    return totals


def grouped_pairs(executor: Executor, library_url: str, config: LibraryConfig) -> Pairing:
    """RunMatcher's pairing in whole bucket groups of at most MATCH_PART_ROWS rows on
    `executor`, each group's library rows read where it runs (MatchBands): the driver holds
    the run's band rows only."""
    limit = hamming_limit(config.signature, config.thresholds.similar_cosine)

    def pairs(new: pa.Table, earlier: pa.Table) -> pa.Table:
        rows = pa.concat_tables([new, earlier.join(new.select(BUCKET).group_by(BUCKET).aggregate([]), BUCKET, join_type="left semi")])
        return executor.group_by(rows, BUCKET, MatchBands(library_url, config, limit), MATCH_PART_ROWS)

    return pairs


class _Clock:
    """Adds the time since its last call to the stage named."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.last = seconds, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now


def _assignments(new: pa.Table, refs: dict[str, list[str]], depths: dict[str, int], located: dict[str, tuple[str, int, int]],
                 known: dict[str, str]) -> pa.Table:
    """One row per new fragment with its candidate references: a byte range of this run's
    files, or a library fragment (url null), each with its dtype and chain depth."""
    rows = []
    for r in new.select(["fragment_id", "dtype", "fragment_type", "url", "byte_offset", "byte_len", "data"]).to_pylist():
        ids = refs.get(r["fragment_id"], [])
        run = [located.get(i) for i in ids]
        rows.append(dict(
            r, ref_ids=ids, ref_urls=[x[0] if x else None for x in run], ref_offsets=[x[1] if x else 0 for x in run],
            ref_lens=[x[2] if x else 0 for x in run], ref_dtypes=[known[i] for i in ids], ref_depths=[depths[i] for i in ids],
        ))
    return pa.Table.from_pylist(rows, schema=ASSIGNMENT_SCHEMA)
