"""The ingest core, shared by `FragmentLibrary.ingest_many` and the Ray pipeline.

    cut (ModelCut) -> sign (signature_table) -> match (haagenti.matching) -> encode
    (encode_fragment) -> commit (haagenti.writer.Committer)

The library runs these stages in one process, batch after batch (`ingest_models`); the
pipeline (`pipelines/`) runs them as the steps of haagenti.ingest_steps, which its executors
distribute, with model bytes read by byte range where they are needed. Both build the same tables from the same
catalog (tests/test_agreement.py).
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from haagenti import maintenance
from haagenti.config import MAX_CHAIN_DEPTH, LibraryConfig
from haagenti.core import LibraryCore
from haagenti.encode import PendingFragment, RawCache, encode_fragment
from haagenti.errors import FormatError, LibraryError
from haagenti.formats import open_model
from haagenti.formats.container import FileHasher
from haagenti.formats.dtypes import has_nonfinite
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.registry import container
from haagenti.formats.source import ModelSource
from haagenti.fragment import Encoding, FragmentId, FragmentType
from haagenti.hashing import model_hash
from haagenti.index import open_index
from haagenti.ingest_steps import fragment_table, signature_table, signs
from haagenti.manifest import FileRecord, FragmentRef, ModelManifest, TensorRef, validate_model_id
from haagenti.matching import RunMatcher
from haagenti.parallel import Workers
from haagenti.similarity import measure
from haagenti.store.leases import writing
from haagenti.writer import Committer


IngestProgress = Callable[[int], None]  # called with the raw bytes each commit took in


@dataclass
class ModelInput:
    """One model to ingest: its files (any fsspec URLs), id and optional family."""

    urls: list[str]
    model_id: str
    family: str | None = None


@dataclass
class IngestReport:
    model_id: str
    raw_bytes: int
    fragments: int = 0
    exact: int = 0  # references to fragments already stored (or repeated within the model)
    plain: int = 0
    delta: int = 0
    lossy: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0
    unchanged: bool = False
    nonfinite_tensors: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        return 1 - self.stored_bytes / self.raw_bytes if self.raw_bytes else 0.0


# ---- cut: occurrences ---------------------------------------------------------------------
@dataclass
class Occurrence:
    """One fragment position of a model: the cut bytes, the tensor they belong to (whose
    `fragments[index]` is their reference), and where they lie ("" for checkpoint tensors)."""

    piece: PendingFragment
    tensor: TensorRef
    index: int
    url: str
    byte_offset: int


class ModelCut:
    """One model cut into fragments of `fragment_elements` elements (the same elements in any
    dtype), each id the BLAKE3 of its bytes. Iterating yields the occurrences in model order
    and re-hashes each safetensors file as it is cut: a file's layout (its fragment ids) stands
    in for its bytes on restore, so they must be the bytes whose BLAKE3 is recorded.
    `manifest()` then holds the files (with layouts) and tensors (with exact references)."""

    def __init__(self, model: ModelInput, source: ModelSource, fragment_elements: int):
        self.model, self.source, self.step = model, source, fragment_elements
        self.hashers = {i: self._hasher(i) for i, f in enumerate(source.files) if not f.blake3}  # the others' are known from their reading
        self.layouts: list[list[str]] = [[] for _ in source.files]  # each file's fragment ids in order
        self.tensors: list[TensorRef] = []

    def _hasher(self, i: int) -> FileHasher:
        """The hasher of file `i`, fed each fragment as it is cut (the gaps come from its record)."""
        f = self.source.files[i]
        sizes = []
        for t in self.source.tensors:
            if t.file_index == i:
                chunk_bytes = t.dtype.fragment_items(self.step) * t.dtype.itemsize
                sizes.append([min(chunk_bytes, t.nbytes - b) for b in range(0, t.nbytes, chunk_bytes)])
        return FileHasher(container(f.format).segments(f.header, f.name, sizes))

    def __iter__(self) -> Iterator[Occurrence]:
        for t in self.source.tensors:
            ref = TensorRef(t.name, t.dtype.name, t.shape, t.file_index, FragmentType.infer(t.name))
            self.tensors.append(ref)
            # "" where the bytes are no range of a file: checkpoint tensors, transposed ONNX weights
            url = self.source.files[t.file_index].url if t.payload is None and not t.transposed else ""
            step = t.dtype.fragment_items(self.step)  # quantized tensors: whole blocks
            chunk_bytes = step * t.dtype.itemsize
            fh = self.hashers.get(t.file_index)
            for seq, chunk in enumerate(self.source.iter_chunks(t, chunk_bytes)):
                fid = FragmentId.of(chunk)
                if fh:
                    fh.write(chunk)
                self.layouts[t.file_index].append(fid)
                n = len(chunk) // t.dtype.itemsize
                ref.fragments.append(FragmentRef(fid, seq * step, n, fid))
                piece = PendingFragment(fid, t.dtype.name, chunk, ref.fragment_type, seq * step)
                yield Occurrence(piece, ref, seq, url, t.data_begin + seq * chunk_bytes)

    def manifest(self, expected_blake3: list[str] | None = None) -> ModelManifest:
        """The model's manifest once every occurrence was taken. `expected_blake3`: the files'
        hashes from an earlier scan, which the bytes cut must match."""
        files = []
        for i, f in enumerate(self.source.files):
            digest = self.hashers[i].hexdigest() if i in self.hashers else f.blake3
            if expected_blake3 is not None and digest != expected_blake3[i]:
                raise FormatError(f"{f.url}: changed between the scan and fragmenting (its BLAKE3 differs); run again")
            files.append(FileRecord.with_layout(f.name, f.format, f.size, digest, f.header, self.layouts[i]))
        m = self.model
        return ModelManifest(m.model_id, m.family, files, self.tensors, model_hash([f.blake3 for f in files]), self.source.raw_bytes, list(m.urls))


# ---- sign and encode (the steps: haagenti.ingest_steps) ---------------------------------
class FragmentEncoder:
    """The library's stages after the cut, batch by batch: which occurrences are new, their
    signatures, their references (one RunMatcher for the whole ingest), and their rows."""

    def __init__(self, config: LibraryConfig, stored: Callable[[list[str]], dict[str, str]], matcher: RunMatcher | None,
                 fetch_raw: Callable[[set[str]], dict[str, bytes]], device: str = "cpu", quality: str = "exact",
                 workers: Workers | None = None):
        self.config, self.stored, self.matcher, self.fetch_raw = config, stored, matcher, fetch_raw
        # id -> dtype of the fragments this ingest met: its new ones, and the library's it
        # found among its ids (asked of `stored` batch by batch) or its candidates.
        self.known: dict[str, str] = {}
        self.depths: dict[str, int] = {}  # chain depth of this ingest's new fragments and candidates (haagenti.matching)
        self.device, self.quality = device, quality
        self.workers = workers or Workers(1)  # signs and encodes a batch's fragments
        self.refs = RawCache(512 * 1024 * 1024)
        # New fragments of this ingest not yet committed: later fragments may reference them
        # before the store can serve them. Moved to the bounded cache on commit.
        self.uncommitted: dict[str, bytes] = {}
        self.batch: list[tuple[Occurrence, IngestReport]] = []
        self.batch_bytes = 0

    def add(self, occ: Occurrence, report: IngestReport) -> bool:
        """Queue an occurrence; True when the batch is full (call `encode`)."""
        self.batch.append((occ, report))
        self.batch_bytes += len(occ.piece.data)
        return self.batch_bytes >= self.config.batch_bytes

    def committed(self) -> None:
        for fid, raw in self.uncommitted.items():
            self.refs.put(fid, raw)
        self.uncommitted.clear()

    def take(self) -> tuple[list[tuple[Occurrence, IngestReport]], int]:
        """The queued occurrences and their bytes, for `encode` (which may run in another thread
        while the next batch is cut)."""
        taken = self.batch, self.batch_bytes
        self.batch, self.batch_bytes = [], 0
        return taken

    def encode(self, taken: tuple[list[tuple[Occurrence, IngestReport]], int] | None = None,
               before_match: Callable[[], object] | None = None) -> tuple[pa.Table, pa.Table, int]:
        """(fragments rows, signatures rows, raw bytes consumed) of the queued (or `taken`)
        occurrences. `before_match` is called before the library's index is read for references
        (an ingest waits there for its previous batch's commit: references are chosen from the
        same rows whatever the timing)."""
        batch, consumed = taken if taken is not None else self.take()
        new: list[Occurrence] = []
        self.known.update(self.stored(list({o.piece.fragment_id for o, _ in batch} - self.known.keys())))
        for occ, _ in batch:
            fid = occ.piece.fragment_id
            if fid not in self.known:
                self.known[fid] = occ.piece.dtype
                new.append(occ)
        signed = [o.piece for o in new if signs(o.piece)] if self.matcher is not None else []
        sigs = signature_table(signed, self.config.signature, self.device, self.workers)
        if before_match is not None and self.matcher is not None:
            before_match()
        candidates, depths = self.matcher.match(sigs) if self.matcher is not None else ({}, {})
        self.depths.update(depths)
        self.known.update(self.stored(list({c for cs in candidates.values() for c in cs} - self.known.keys())))
        batch_ids = {o.piece.fragment_id for o in new}  # this batch's: referenced by their bytes as cut
        wanted = {c for cs in candidates.values() for c in cs if c not in self.refs and c not in self.uncommitted and c not in batch_ids}
        if wanted:
            for fid, raw in self.fetch_raw(wanted).items():
                self.refs.put(fid, raw)
        stored: list[dict] = []
        lossy: dict[str, FragmentRef] = {}
        for occ in new:  # registered first, so the batch encodes in any order
            p = occ.piece
            if self.matcher is not None and signs(p) and (p.fragment_id not in candidates or self.matcher.new_deltas) and self.depths[p.fragment_id] < MAX_CHAIN_DEPTH:
                self.uncommitted[p.fragment_id] = p.data  # later fragments may reference it
        encoded = self.workers.each(lambda o: _blob_in_arrow(*self._encode_one(o.piece, candidates.get(o.piece.fragment_id))), new)
        for occ, (row, ref) in zip(new, encoded):
            p = occ.piece
            if ref is not None:  # shared lossily: nothing stored, and the id stays unknown
                lossy[p.fragment_id] = ref
                del self.known[p.fragment_id]
                continue
            stored.append(row)
        by_id = {r["fragment_id"]: r for r in stored}
        for occ, report in batch:
            report.fragments += 1
            shared = lossy.get(occ.piece.fragment_id)
            if shared is not None:
                occ.tensor.fragments[occ.index] = FragmentRef(shared.fragment_id, occ.piece.elem_offset, occ.piece.n_elements,
                                                              shared.source_fragment_id, shared.max_abs_error, shared.rel_l2_error)
                report.lossy += 1
                continue
            row = by_id.pop(occ.piece.fragment_id, None)
            if row is None:
                report.exact += 1
            else:
                report.plain += row["encoding"] == Encoding.PLAIN.value
                report.delta += row["encoding"] != Encoding.PLAIN.value
                report.stored_bytes += row["stored_size"]
        if lossy and sigs.num_rows:
            sigs = sigs.filter(pa.array([f not in lossy for f in sigs["fragment_id"].to_pylist()], pa.bool_()))
        return fragment_table(stored), sigs, consumed

    def _encode_one(self, p: PendingFragment, candidates: list[str] | None) -> tuple[dict | None, FragmentRef | None]:
        """(row, None), or (None, a lossy reference) when a candidate may stand in for `p`."""
        refs = []
        for cand in candidates or []:
            ref_raw = self.uncommitted.get(cand) or self.refs.get(cand)
            if ref_raw is None:
                ref_raw = self.fetch_raw({cand})[cand]  # evicted from the cache since it was fetched
            if self.config.lossy_threshold is not None and self.known.get(cand) == p.dtype and lookup_dtype(p.dtype).torch_name:
                shared = self._lossy(p, cand, ref_raw)
                if shared is not None:
                    return None, shared
            refs.append((cand, ref_raw, self.known[cand], self.depths[cand]))
        return encode_fragment(p, refs, self.config.zstd_level, self.quality), None

    def _lossy(self, p: PendingFragment, cand: str, ref: bytes) -> FragmentRef | None:
        """Share `cand` in place of `p` when the measured relative L2 error is within the bound."""
        import torch

        t = lookup_dtype(p.dtype).torch_dtype
        a = torch.frombuffer(bytearray(p.data), dtype=t).to(torch.float64).numpy()
        b = torch.frombuffer(bytearray(ref), dtype=t).to(torch.float64).numpy()
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return None
        _, rel, mx = measure(a, b)
        if rel <= (self.config.lossy_threshold or 0.0):
            return FragmentRef(cand, p.elem_offset, p.n_elements, p.fragment_id, mx, rel)
        return None


def _blob_in_arrow(row: dict | None, ref: FragmentRef | None) -> tuple[dict | None, FragmentRef | None]:
    """The row with its blob copied into Arrow's memory, the encoder's bytes freed at once.
    A batch's blobs (40 MB of 64) are held until its commit: held in malloc's memory, they went
    back to the kernel when freed and came back as fresh pages for the next batch (8.7k page
    faults per batch, half the encode rate on a 2-core machine; Arrow's allocator keeps its pages), see
    docs/decisions/0037-every-core.md."""
    if row is not None and row["blob"]:
        buf = pa.allocate_buffer(len(row["blob"]))
        np.frombuffer(buf, np.uint8)[:] = np.frombuffer(row["blob"], np.uint8)
        row["blob"] = buf
    return row, ref


# ---- the library's ingest -----------------------------------------------------------------
def ingest_models(lib: LibraryCore, models: list[ModelInput], progress: IngestProgress | None = None,
                  device: str = "cpu", quality: str = "exact", threads: int = 0, wait: float = 60.0,
                  replace: bool = False) -> list[IngestReport]:
    """Add several models in one set of commits (haagenti.writer.Committer states the order);
    later models deduplicate against earlier ones. A Delta commit costs milliseconds whatever
    its size, so a family of small models ingests much faster this way than one by one.
    With `threads` > 1 (0: every core) a batch is signed, encoded and committed in the
    background, its fragments spread over the threads, while the next batch is read and hashed.
    A model already stored with the same file bytes is left as it is (`unchanged`, its family
    set when one is given), as the Ray job does; one stored with other bytes is refused unless
    `replace`, and then unpublished just before the new one is published.
    Holds an ingest lease on the ids throughout (waiting up to `wait` seconds for a gc)."""
    ids = [m.model_id for m in models]
    for mid in ids:
        validate_model_id(mid)
    if len(set(ids)) != len(ids):
        raise LibraryError(f"model ids repeat within one ingest: {sorted({i for i in ids if ids.count(i) > 1})}")
    with writing(lib.store, "ingest", ids, wait) as lease, Workers(threads) as workers:
        sources = [open_model(m.urls) for m in models]  # every file is checked before anything is written
        unchanged, replaced = _against_stored(lib, models, sources, replace)
        todo = [(m, s) for m, s in zip(models, sources) if m.model_id not in unchanged]
        done = _ingest_models(lib, todo, progress, device, quality, workers, lease.writer, replaced) if todo else []
    by_id = {r.model_id: r for r in done + list(unchanged.values())}
    return [by_id[m] for m in ids]


def _against_stored(lib: LibraryCore, models: list[ModelInput], sources: list[ModelSource],
                    replace: bool) -> tuple[dict[str, IngestReport], list[str]]:
    """(reports of the models stored already with the same bytes, ids of those to replace).
    Same bytes: the same files' BLAKE3 in order, and not stored lossy unless lossy sharing is
    on (a lossy model given again without it is stored exact)."""
    wanted = {m.model_id for m in models}
    stored = {r["model_id"]: r for r in lib.store.read("models", columns=["model_id", "family", "content_hash", "lossy"]).to_pylist()
              if r["model_id"] in wanted}
    unchanged: dict[str, IngestReport] = {}
    replaced: list[str] = []
    for m, source in zip(models, sources):
        old = stored.get(m.model_id)
        if old is None:
            continue
        same_bytes = old["content_hash"] == model_hash(source.file_digests())
        if same_bytes and (not old["lossy"] or lib.config.lossy_threshold is not None):
            if m.family and m.family != old["family"]:
                lib.store.set_family(m.model_id, m.family)
            unchanged[m.model_id] = IngestReport(m.model_id, source.raw_bytes, unchanged=True)
        elif replace:
            replaced.append(m.model_id)
        else:
            what = "stored lossy" if same_bytes else "in the library with other bytes"
            raise LibraryError(f"model {m.model_id!r} is {what}; replace it with --replace (replace=True)")
    return unchanged, replaced


def _ingest_models(lib: LibraryCore, todo: list[tuple[ModelInput, ModelSource]], progress: IngestProgress | None, device: str,
                   quality: str, workers: Workers, ingest_id: str, replaced: list[str]) -> list[IngestReport]:
    ids = [m.model_id for m, _ in todo]
    config = lib.config
    # Tier models (quality != exact) never reference exact data, only each other.
    # The library's index is read per batch, by key: the ids a batch could repeat and the buckets
    # its signatures fall in (haagenti.index), never the whole index.
    index = open_index(lib.store, config)
    lookup = index.propose if quality == "exact" else None
    matcher = RunMatcher(config, lookup, config.lossy_threshold is None, index.scoper() if lookup else None) if config.similarity else None
    encoder = FragmentEncoder(config, index.known, matcher, lib.fetch_raw, device, quality, workers)
    committer = Committer(lib.store, index, ingest_id, f"ingest {', '.join(ids)}"[:200], config.batch_bytes, encoder.committed)

    def commit(encoded: tuple[pa.Table, pa.Table, int], owner: int, before: Future | None) -> None:
        if before is not None:
            before.result()  # a failed commit fails every later one
        frags, sigs, consumed = encoded
        committer.add(frags, sigs, owner)
        if progress and consumed:
            progress(consumed)

    def encode(taken, owner: int, before: Future | None) -> Future:
        """A batch's NaN/Inf check and rows (over the threads: on the main thread, beside the
        read and the hashes, the check made the cut the slowest stage at two threads), then
        their commit queued behind the previous batch's (`before`)."""
        occurrences = [occ for occ, _ in taken[0]]
        flagged = workers.each(lambda occ: has_nonfinite(occ.piece.data, lookup_dtype(occ.piece.dtype)), occurrences)
        for (occ, report), bad in zip(taken[0], flagged):
            if bad and occ.tensor.name not in report.nonfinite_tensors:
                report.nonfinite_tensors.append(occ.tensor.name)
        encoded = encoder.encode(taken, before.result if before is not None else None)
        return workers.in_order(commit, encoded, owner, before)

    # One batch encodes in the background (its fragments spread over the threads) while the
    # main thread reads and hashes the next and the batch before it commits on a lane of its
    # own: commits in order, one encode at a time, three batches in memory at most.
    pending: Future | None = None  # the batch being encoded; its result: that batch's commit
    committed: Future | None = None  # the commit of the batch before it

    def encode_next(owner: int) -> None:
        nonlocal pending, committed
        taken = encoder.take()
        if pending is not None:
            if committed is not None:
                committed.result()
            committed = pending.result()
        pending = workers.submit(encode, taken, owner, committed)

    manifests, reports = [], []
    for owner, (m, source) in enumerate(todo):
        started = time.perf_counter()
        report = IngestReport(m.model_id, source.raw_bytes)
        cut = ModelCut(m, source, config.fragment_elements)
        with source:
            for occ in cut:
                if encoder.add(occ, report):
                    encode_next(owner)
            encode_next(owner)
            pending.result()  # this model's references are complete before its manifest is built
        manifests.append(cut.manifest())
        report.seconds = time.perf_counter() - started
        reports.append(report)
    if pending is not None:
        pending.result().result()  # every batch committed, in order
    committer.flush()
    for mid in replaced:  # unpublished just before the new one is published; gc frees what only it held
        maintenance.rm(lib, mid)
    committer.commit_manifests(manifests)
    committer.publish(manifests)
    return reports
