"""The ingest's sign, match and encode steps over Arrow batches, for any executor
(haagenti.executors): a step knows nothing of how it is scheduled. A fragment's bytes ride in
the batch's `data` column where the executor shares the driver's memory; where it is null
(another process) they are read by byte range where they are needed, so model bytes never
travel between processes. `ingest_batches` drives them over a run's occurrences, batch after
batch: new -> sign -> match -> encode -> commit.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from itertools import chain
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.checkpoints import reached
from haagenti.config import MAX_CHAIN_DEPTH, LibraryConfig
from haagenti.core import LibraryCore
from haagenti.encode import PendingFragment, RawCache, encode_fragment, rows_table, signature_row
from haagenti.executors import Executor
from haagenti.formats.dtypes import can_dequantize, signable
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.source import RangeReader
from haagenti.fragment import FragmentType
from haagenti.index import IndexLayout, open_index
from haagenti.matching import BUCKET, Pairing, RunMatcher, hamming_limit, partner_pairs
from haagenti.parallel import Workers
from haagenti.signature import SignatureConfig, compute_signatures
from haagenti.similarity import measure
from haagenti.store import SCHEMAS, LibraryStore
from haagenti.writer import Committer

# Fragments per sign and encode call: measured on 2 CPUs, 32 per encode call spent ~4 s of a
# 7-model run in per-call overhead, 128 per call 0.4 s; 64 keeps an output batch (~10 MB) well
# inside a small object store with a few calls in flight.
STEP_BATCH = 64
MATCH_PART_ROWS = 4096  # band rows per match task: 256 fragments x 16 bands, an ingest batch's lookup
# Raw bytes of occurrences per encode batch, at most: apart from the commit size
# (LibraryConfig.batch_bytes, also the two-level layout's shard), which stays what the index
# names. The driver holds a batch being encoded, one cut ahead and their references: with
# 64 MiB batches that was ~500 MiB of a 1.6 GB driver (docs/decisions/0274-driver-peak-bounded.md).
ENCODE_BATCH_BYTES = 16 * 1024 * 1024
# The run's reference cache (RunBytes): committed new fragments and fetched library references.
# It serves a batch's references (at most `candidates` per fragment: 32 MiB of a 16 MiB batch)
# and a model's references to one earlier in the run that fits it; a larger one is read back
# from the library, as a separate ingest reads it (0274).
REF_CACHE_BYTES = 64 * 1024 * 1024

# Where a file holds a tensor transposed (haagenti.formats.splice.Turn), null where it does not.
TURN = pa.list_(pa.int64(), 4)

# One row per fragment occurrence of the run's models, in model order. `data`: the bytes, or
# null where they are read from `url` at `byte_offset` (with `turn`: of the tensor turned back).
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
        ("turn", TURN),
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
        ("turn", TURN),
        ("data", pa.binary()),
        ("ref_ids", pa.list_(pa.string())),
        ("ref_urls", pa.list_(pa.string())),  # null entry: the reference is in the library (read by EncodeFragments unless RunBytes holds it)
        ("ref_offsets", pa.list_(pa.int64())),
        ("ref_lens", pa.list_(pa.int64())),
        ("ref_turns", pa.list_(TURN)),
        ("ref_dtypes", pa.list_(pa.string())),
        ("ref_depths", pa.list_(pa.int64())),
    ]
)

# EncodeFragments' output: fragments rows, and for a fragment shared lossily (the library's
# `lossy_threshold`) a row naming the fragment that stands in for it, with the errors measured;
# the driver commits the first and records the second in the model's manifest.
ENCODED_SCHEMA = pa.schema(list(SCHEMAS["fragments"]) + [("shared_id", pa.string()), ("max_abs_error", pa.float64()), ("rel_l2_error", pa.float64())])


def signs(p: PendingFragment) -> bool:
    """Whether a new fragment gets a signature (and so takes part in reference choice): floats,
    quantized blocks gguf can dequantize, and int8/uint8 codes (ONNX linear quantization)."""
    d = lookup_dtype(p.dtype)
    return bool(p.data) and (d.is_float or d.name in ("I8", "U8") or (d.block > 1 and can_dequantize(d)))


def signature_table(pieces: list[PendingFragment], config: SignatureConfig, device: str = "cpu", workers: Workers | None = None) -> pa.Table:
    """Signatures-table rows of fragments (bit-identical on any device), signed over `workers`;
    quantized blocks are signed on their dequantized values."""
    sample = config.sample if str(device) == "cpu" else None  # the CPU kernel takes legacy blocks' samples alone
    sign = lambda part: compute_signatures([signable(p.data, lookup_dtype(p.dtype), sample) for p in part], config, device)  # noqa: E731
    sigs = (workers.map(sign, pieces) if workers is not None else sign(pieces)) if pieces else []
    return rows_table([signature_row(p, s) for p, s in zip(pieces, sigs)], SCHEMAS["signatures"])


def fragment_table(rows: list[dict]) -> pa.Table:
    return rows_table(rows, SCHEMAS["fragments"])


def binary_column(items: list[bytes]) -> pa.ChunkedArray:
    """`items` as a binary column, their bytes copied once into one buffer per chunk of less
    than 2 GiB (pa.array grew its buffer item by item: 0.2-0.4 s for a 44 MB batch against 0.03 s)."""
    ends = np.cumsum([len(b) for b in items], dtype=np.int64)
    chunks, start = [], 0
    while start < len(items) or not chunks:
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + 2**31 - 1, side="right"))) if start < len(items) else start
        offsets = np.r_[0, ends[start:stop] - base].astype(np.int32)
        chunks.append(pa.BinaryArray.from_buffers(pa.binary(), stop - start, [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items[start:stop]))]))
        start = stop
    return pa.chunked_array(chunks, pa.binary())


def binary_views(column: pa.ChunkedArray) -> list[memoryview | None]:
    """Each value of a binary column as a view into Arrow's buffer (None where null): to_pylist
    copied every carried byte once more in each step."""
    out: list[memoryview | None] = []
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1].tolist()
        data = memoryview(chunk.buffers()[2] or b"")
        valid = chunk.is_valid().to_pylist() if chunk.null_count else [True] * len(chunk)
        out.extend(data[a:b] if v else None for a, b, v in zip(offsets, offsets[1:], valid))
    return out


def _pieces(batch: pa.Table, rows: list[dict], reader: RangeReader) -> list[PendingFragment]:
    """The fragments of `batch` (its `rows` without `data`), their bytes carried in `data` or
    read by range."""
    return [PendingFragment(r["fragment_id"], r["dtype"], data if data is not None else reader.read(r["url"], r["byte_offset"], r["byte_len"], r["turn"]),
                            FragmentType(r["fragment_type"]), 0) for r, data in zip(rows, binary_views(batch["data"]))]


class SignFragments:
    """Signatures of fragments, on the GPU when this worker has one. The same class runs on
    CPU workers; the signatures are bit-identical either way (haagenti.signature)."""

    def __init__(self, config: SignatureConfig, device: str | None = None):
        import torch  # here, not at the top: the other steps run without it

        self.config = config
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.reader = RangeReader()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return signature_table(_pieces(batch, batch.drop_columns(["data"]).to_pylist(), self.reader), self.config, self.device)


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


class RunBytes:
    """The bytes of a run's references, in the driver's memory, for a run whose occurrences
    carry their bytes (the library path reads each byte once): the run's new fragments that
    may serve as references, held until their commit (the store cannot serve them before) and
    then kept in a bounded cache, and the library's references, fetched once and cached."""

    def __init__(self, fetch_raw: Callable[[set[str]], dict[str, bytes]]):
        self.fetch_raw = fetch_raw
        self.cache = RawCache(REF_CACHE_BYTES)
        self.uncommitted: dict[str, bytes] = {}
        self.lock = threading.Lock()  # held by the driver, the encode threads and the commit lane

    def hold(self, pieces: dict[str, bytes]) -> None:
        with self.lock:
            self.uncommitted.update(pieces)

    def committed(self, ids: Iterable[str]) -> None:
        """`ids` are in the store now: their bytes move to the bounded cache."""
        with self.lock:
            for fid in ids:
                raw = self.uncommitted.pop(fid, None)
                if raw is not None:
                    self.cache.put(fid, raw)

    def get(self, ids: Iterable[str]) -> dict[str, bytes]:
        """The bytes of `ids`: held, cached, or else fetched from the library (and cached)."""
        out: dict[str, bytes] = {}
        with self.lock:
            for fid in set(ids):
                raw = self.uncommitted.get(fid)
                if raw is None:
                    raw = self.cache.get(fid)
                if raw is not None:
                    out[fid] = raw
        missing = set(ids) - out.keys()
        if missing:
            for fid, raw in self.fetch_raw(missing).items():
                self.cache.put(fid, raw)
                out[fid] = raw
        return out


class EncodeFragments:
    """Encode new fragments (plain, or a delta against the best of their references) into
    fragments-table rows, in run order (ENCODED_SCHEMA). References come from `run_bytes` when
    given (this process), else in-run ones by byte range and the library's from storage. With
    the library's `lossy_threshold`, a candidate whose measured relative L2 error is within it
    stands in for the fragment, which is then not stored. `quality` labels the rows."""

    def __init__(self, library_url: str, config: LibraryConfig, quality: str = "exact", run_bytes: RunBytes | None = None):
        self.library_url, self.config, self.quality, self.run_bytes = library_url, config, quality, run_bytes
        self.library: LibraryCore | None = None
        self.reader = RangeReader()

    def __call__(self, batch: pa.Table) -> pa.Table:
        reached("encode")
        rows = batch.drop_columns(["data"]).to_pylist()
        raw = self.run_bytes.get({i for r in rows for i in r["ref_ids"]}) if self.run_bytes is not None else self._from_library(rows)
        out = []
        for r, p in zip(rows, _pieces(batch, rows, self.reader)):
            refs = []
            shared = None
            for rid, url, off, ln, turn, rdt, depth in zip(r["ref_ids"], r["ref_urls"], r["ref_offsets"], r["ref_lens"], r["ref_turns"], r["ref_dtypes"], r["ref_depths"]):
                ref_raw = raw[rid] if rid in raw else self.reader.read(url, off, ln, turn)
                if self.config.lossy_threshold is not None and rdt == p.dtype and lookup_dtype(p.dtype).torch_name:
                    shared = _shared(p, rid, ref_raw, self.config.lossy_threshold)
                    if shared is not None:
                        break
                refs.append((rid, ref_raw, rdt, depth))
            out.append(_blob_in_arrow(encode_fragment(p, refs, self.config.zstd_level, self.quality)) if shared is None else shared)
        return rows_table(out, ENCODED_SCHEMA)

    def _from_library(self, rows: list[dict]) -> dict[str, bytes]:
        """The library references of `rows` (url null), read from storage."""
        wanted = {i for r in rows for i, u in zip(r["ref_ids"], r["ref_urls"]) if u is None}
        if not wanted:
            return {}
        if self.library is None:
            self.library = LibraryCore.open(self.library_url, self.config, create=False)
        return self.library.fetch_raw(wanted)


def _shared(p: PendingFragment, cand: str, ref: bytes, threshold: float) -> dict | None:
    """The row sharing `cand` in place of `p` when their relative L2 error is within `threshold`."""
    import torch

    t = lookup_dtype(p.dtype).torch_dtype
    a = torch.frombuffer(bytearray(p.data), dtype=t).to(torch.float64).numpy()
    b = torch.frombuffer(bytearray(ref), dtype=t).to(torch.float64).numpy()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    _, rel, mx = measure(a, b)
    if rel > threshold:
        return None
    return {f.name: None for f in SCHEMAS["fragments"]} | {"fragment_id": p.fragment_id, "blob": b"", "shared_id": cand, "max_abs_error": mx, "rel_l2_error": rel}


def _blob_in_arrow(row: dict) -> dict:
    """The row with its blob copied into Arrow's memory, the encoder's bytes freed at once.
    A batch's blobs (40 MB of 64) are held until its commit: held in malloc's memory, they went
    back to the kernel when freed and came back as fresh pages for the next batch (8.7k page
    faults per batch, half the encode rate on a 2-core machine; Arrow's allocator keeps its
    pages), see docs/decisions/0037-every-core.md."""
    if row["blob"]:
        buf = pa.allocate_buffer(len(row["blob"]))
        np.frombuffer(buf, np.uint8)[:] = np.frombuffer(row["blob"], np.uint8)
        row["blob"] = buf
    return row | {"shared_id": None, "max_abs_error": None, "rel_l2_error": None}


@dataclass
class BatchResult:
    """What the driver made of one batch: its occurrences (OCCURRENCE_SCHEMA, in run order),
    the rows it stored for their new fragments (`fragment_id`, `encoding`, `stored_size`, in
    the order of their first occurrence) and the fragments it shared lossily (`fragment_id`,
    `shared_id`, `max_abs_error`, `rel_l2_error`)."""

    occurrences: pa.Table
    stored: pa.Table
    shared: pa.Table

    def shared_refs(self) -> dict[str, tuple[str, float, float]]:
        """fragment id -> (the id standing in for it, max abs error, relative L2 error)."""
        cols = (self.shared[c].to_pylist() for c in ("fragment_id", "shared_id", "max_abs_error", "rel_l2_error"))
        return {f: (s, mx, rel) for f, s, mx, rel in zip(*cols)}


def encode_batch_bytes(config: LibraryConfig) -> int:
    """Raw bytes per encode batch of an ingest in one process (both drivers alike: a batch's
    commits decide what the next batch's scope may read)."""
    return min(config.batch_bytes, ENCODE_BATCH_BYTES)


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


def ingest_batches(core: LibraryCore, index: IndexLayout, batches: Iterable[pa.Table], executor: Executor, committer: Committer,
                   seconds: dict[str, float], quality: str = "exact", device: str | None = None,
                   run_bytes: RunBytes | None = None) -> Iterator[BatchResult]:
    """Store the new fragments of a run's occurrence `batches` (OCCURRENCE_SCHEMA, in run
    order, `rank` the model each belongs to; occurrence_batches), each stage's steps run by
    `executor`, and yield what each batch became: which are new (the library's `known` per
    batch), their signatures (on `device`; None: a GPU where the step runs has one), their
    references (haagenti.matching's rule; an executor in another process pairs them in bucket
    groups, `grouped_pairs`), their rows, committed by `committer` as they come. Adds each
    stage's time to `seconds` ("sign", "match", "encode+write").
    `quality` other than "exact" (a precision tier) labels the rows and takes no reference
    from the library. `run_bytes`: where references are read when the occurrences carry their
    bytes (the library's ingest; the committer's `on_commit` must be its `committed`).
    While the index's scoper needs a run's next fragments to scope its first ones, their
    batches wait, signed, and are matched and yielded as one with the batch that settles it."""
    config = core.config
    lookup = index.propose if quality == "exact" else None  # a tier references only itself
    pairs = grouped_pairs(executor, core.store.url, config) if lookup is not None and not executor.shares_memory else None
    matcher = RunMatcher(config, lookup, config.lossy_threshold is None, index.scoper() if lookup else None, pairs) if config.similarity else None
    known: dict[str, str] = {}  # id -> dtype of the library's fragments met and the run's new ones
    located: dict[str, tuple[str, int, int, list[int] | None]] = {}  # (url, offset, length, turn) of the run's new fragments
    clock = _Clock(seconds)
    commits: list[Future] = []  # the previous batch's, on the executor's commit lane
    held: list[tuple[pa.Table, pa.Table, pa.Table, pa.Table]] = []  # (batch, new, floats, sigs) signed, whose scope waits on the next
    for batch in chain(batches, [None]):  # None: the run's end
        more = batch is not None
        if more:
            ids = batch["fragment_id"].to_pylist()
            known.update(index.known(list(set(ids) - known.keys())))
            first: dict[str, int] = {}
            for i, fid in enumerate(ids):
                if fid not in known and fid not in first:
                    first[fid] = i
            new = take_rows(batch, np.fromiter(first.values(), np.int64, len(first)))
            for fid, dtype, url, offset, length, turn in zip(*(new[c].to_pylist() for c in ("fragment_id", "dtype", "url", "byte_offset", "byte_len", "turn"))):
                known[fid] = dtype
                located[fid] = (url, offset, length, turn)
            floats = take_rows(new, np.flatnonzero(new["signs"].to_numpy(zero_copy_only=False)))
            parts = list(executor.map_batches(SignFragments, (config.signature, device), floats, STEP_BATCH, actors=True)) if matcher and floats.num_rows else []
            held.append((batch, new, floats, pa.concat_tables(parts) if parts else signature_table([], config.signature)))
            clock("sign")
        if not held:
            continue
        batch, new, floats, sigs = held[0] if len(held) == 1 else tuple(pa.concat_tables(t) for t in zip(*held))
        for c in commits:  # references are chosen from the same rows whatever the timing
            c.result()
        commits = []
        matched = matcher.match(sigs, more) if matcher is not None else ({}, {})
        if matched is None:  # the run's leading fragments wait for the scope of a later one (IndexLayout.scoper)
            continue
        held = []
        refs, depths = matched
        known.update(index.known(list({c for cs in refs.values() for c in cs} - known.keys())))  # the library references' dtypes
        if run_bytes is not None:
            _hold_references(run_bytes, floats, refs, depths, matcher)
        clock("match")
        assignments = _assignments(new, refs, depths, located, known)
        stored, shared = [], []
        for tb in executor.map_batches(EncodeFragments, (core.store.url, config, quality, run_bytes), assignments, STEP_BATCH):
            lossy = pc.is_valid(tb["shared_id"])
            if pc.any(lossy).as_py():  # filtering copies the blobs: only when there is something to take out
                shared.append(copied(tb.filter(lossy).select(["fragment_id", "shared_id", "max_abs_error", "rel_l2_error"])))
                tb = tb.filter(pc.invert(lossy))
            tb = tb.select(SCHEMAS["fragments"].names)
            stored.append(copied(tb.select(["fragment_id", "encoding", "stored_size"])))
            at = pc.index_in(tb["fragment_id"], value_set=new["fragment_id"])
            commits.append(executor.in_order(committer.add, tb, sigs.filter(pc.is_in(sigs["fragment_id"], value_set=tb["fragment_id"])), new["rank"].take(at).to_numpy()))
        result = BatchResult(batch, _concat(stored, ["fragment_id", "encoding", "stored_size"]), _concat(shared, ["fragment_id", "shared_id", "max_abs_error", "rel_l2_error"]))
        for fid in result.shared["fragment_id"].to_pylist():  # nothing stored: a later occurrence is new again
            del known[fid]
        clock("encode+write")
        yield result
    for c in commits:
        c.result()
    committer.flush()
    clock("encode+write")


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """The rows of `table` at `rows` (ascending), as slices of it: take and filter copied the
    carried bytes (0.07 s of a 44 MB batch)."""
    if len(rows) == 0:
        return table.slice(0, 0)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, ends = rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return pa.concat_tables([table.slice(a, b - a) for a, b in zip(starts.tolist(), ends.tolist())])


def _hold_references(run_bytes: RunBytes, floats: pa.Table, refs: dict[str, list[str]], depths: dict[str, int], matcher: RunMatcher | None) -> None:
    """Hold the bytes of the batch's new fragments that later ones may reference (anchors, and
    with new deltas any not too deep), and fetch the library references the batch chose."""
    if matcher is None:
        return
    run_bytes.hold({fid: bytes(data) for fid, data in zip(floats["fragment_id"].to_pylist(), binary_views(floats["data"]))
                    if (fid not in refs or matcher.new_deltas) and depths[fid] < MAX_CHAIN_DEPTH})
    run_bytes.get({c for cs in refs.values() for c in cs})


def copied(table: pa.Table) -> pa.Table:
    """A copy of a few columns of a step's result, kept for the batch's result: on Ray the
    result is a view into one object of the object store, and a column of it pins the whole
    object, blobs included (the driver held every encoded byte of a run: 1 GB for a 1 GB
    model, docs/decisions/0274-driver-peak-bounded.md)."""
    return table.take(np.arange(table.num_rows))


def _concat(tables: list[pa.Table], columns: list[str]) -> pa.Table:
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], ENCODED_SCHEMA.field(c).type) for c in columns})


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


def _assignments(new: pa.Table, refs: dict[str, list[str]], depths: dict[str, int], located: dict[str, tuple[str, int, int, list[int] | None]],
                 known: dict[str, str]) -> pa.Table:
    """One row per new fragment with its candidate references: a byte range of this run's
    files, or a library fragment (url null), each with its dtype and chain depth. The
    fragments' own columns (their bytes too) are taken as they are."""
    lists = {c: [] for c in ASSIGNMENT_SCHEMA.names if c.startswith("ref_")}
    for fid in new["fragment_id"].to_pylist():
        ids = refs.get(fid, [])
        run = [located.get(i) for i in ids]
        lists["ref_ids"].append(ids)
        lists["ref_urls"].append([x[0] if x else None for x in run])
        lists["ref_offsets"].append([x[1] if x else 0 for x in run])
        lists["ref_lens"].append([x[2] if x else 0 for x in run])
        lists["ref_turns"].append([x[3] if x else None for x in run])
        lists["ref_dtypes"].append([known[i] for i in ids])
        lists["ref_depths"].append([depths[i] for i in ids])
    return pa.table({f.name: new[f.name] if f.name in new.column_names else pa.array(lists[f.name], f.type) for f in ASSIGNMENT_SCHEMA}, schema=ASSIGNMENT_SCHEMA)
