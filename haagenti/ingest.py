"""The cut, and the library's ingest around the one driver of the steps.

    cut (ModelCut) -> new -> sign -> match -> encode -> commit (haagenti.ingest_steps.ingest_batches)

`ingest_models` (`FragmentLibrary.ingest_many`, `haagenti ingest`, precision tiers) cuts the
models in this process with their bytes carried (`cut_models`) and runs the driver on a
`LocalExecutor`; the pipeline (`pipelines/`) cuts them on its executor as byte ranges and runs
the same driver there. Both build the same tables from the same catalog (tests/test_agreement.py).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from haagenti import maintenance
from haagenti.core import LibraryCore
from haagenti.encode import PendingFragment
from haagenti.errors import FormatError, LibraryError
from haagenti.executors import LocalExecutor
from haagenti.formats import open_model
from haagenti.formats.container import FileHasher, SourceTensor
from haagenti.formats.dtypes import has_nonfinite
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.registry import container
from haagenti.formats.source import ModelSource
from haagenti.formats.splice import Turn
from haagenti.fragment import Encoding, FragmentId, FragmentType
from haagenti.hashing import model_hash
from haagenti.index import open_index
from haagenti.ingest_steps import OCCURRENCE_SCHEMA, BatchResult, RunBytes, binary_column, binary_views, encode_batch_bytes, ingest_batches, occurrence_batches, signs
from haagenti.manifest import FileRecord, FragmentRef, ModelManifest, TensorRef, validate_model_id
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
    `fragments[index]` is their reference), and where they lie ("" for checkpoint tensors;
    with `turn`, at `byte_offset` of the tensor the file holds transposed there)."""

    piece: PendingFragment
    tensor: TensorRef
    index: int
    url: str
    byte_offset: int
    turn: Turn | None = None


class ModelCut:
    """One model cut into fragments of `fragment_elements` elements (the same elements in any
    dtype), each id the BLAKE3 of its bytes: the one hash of each byte. A file's identity is
    its tree over those ids and its gaps (hashing.file_tree), so nothing hashes the file again;
    with `whole_blake3` each byte-exact file's plain BLAKE3 is computed too, from the pieces as
    they are cut (files.blake3, for users who compare with published checksums).
    `manifest()` then holds the files (with their trees) and tensors (with exact references)."""

    def __init__(self, model: ModelInput, source: ModelSource, fragment_elements: int, whole_blake3: bool = False):
        self.model, self.source, self.step = model, source, fragment_elements
        self.hashers = {i: self._hasher(i) for i, f in enumerate(source.files) if whole_blake3 and container(f.format).byte_exact}
        self.layouts: list[list[str]] = [[] for _ in source.files]  # each file's fragment ids in order
        self.counts: list[list[int]] = [[] for _ in source.files]  # each file's fragments per tensor, in order
        self.tensors: list[TensorRef] = []

    def _chunk_bytes(self, t: SourceTensor) -> int:
        return t.dtype.fragment_items(self.step) * t.dtype.itemsize  # quantized tensors: whole blocks

    def _hasher(self, i: int) -> FileHasher:
        """The whole-file hasher of file `i`, fed each fragment as it is cut (the gaps come from its record)."""
        f = self.source.files[i]
        sizes = []
        for t in self.source.tensors:
            if t.file_index == i:
                chunk_bytes = self._chunk_bytes(t)
                sizes.append([min(chunk_bytes, t.nbytes - b) for b in range(0, t.nbytes, chunk_bytes)])
        return FileHasher(container(f.format).segments(f.header, f.name, sizes))

    def __iter__(self) -> Iterator[Occurrence]:
        for t in self.source.tensors:
            ref = TensorRef(t.name, t.dtype.name, t.shape, t.file_index, FragmentType.infer(t.name))
            self.tensors.append(ref)
            url = self.source.files[t.file_index].url if t.payload is None else ""  # "": checkpoint tensors, no range of a file
            turn = t.turn()
            begin = 0 if turn else t.data_begin  # a transposed tensor's fragments lie in it turned back
            step = t.dtype.fragment_items(self.step)
            chunk_bytes = self._chunk_bytes(t)
            fh = self.hashers.get(t.file_index)
            for seq, chunk in enumerate(self.source.iter_chunks(t, chunk_bytes)):
                fid = FragmentId.of(chunk)
                if fh:
                    fh.write(chunk)
                self.layouts[t.file_index].append(fid)
                n = len(chunk) // t.dtype.itemsize
                ref.fragments.append(FragmentRef(fid, seq * step, n, fid))
                piece = PendingFragment(fid, t.dtype.name, chunk, ref.fragment_type, seq * step)
                yield Occurrence(piece, ref, seq, url, begin + seq * chunk_bytes, turn)
            self.counts[t.file_index].append(len(ref.fragments))

    def manifest(self, expected: list[str] | None = None) -> ModelManifest:
        """The model's manifest once every occurrence was taken. `expected`: the files'
        identities (FileRecord.identity) from an earlier scan, which the bytes cut must match."""
        files = []
        for i, f in enumerate(self.source.files):
            digest = self.hashers[i].hexdigest() if i in self.hashers else f.blake3 or None
            files.append(FileRecord.with_layout(f.name, f.format, f.size, digest, f.header, self.counts[i], self.layouts[i]))
            if expected is not None and files[-1].identity != expected[i]:
                raise FormatError(f"{f.url}: changed between the scan and fragmenting (its hash differs); run again")
        m = self.model
        return ModelManifest(m.model_id, m.family, files, self.tensors, model_hash([f.identity for f in files]), self.source.raw_bytes, list(m.urls))


def file_hashes(source: ModelSource, fragment_elements: int) -> list[str]:
    """Each file's identity as an ingest would record it (its tree; a checkpoint's BLAKE3): the
    files cut and every fragment hashed, nothing kept. What an incremental ingest and the
    pipeline's scan compare with the library before storing anything; one pass over each byte."""
    cut = ModelCut(ModelInput([], ""), source, fragment_elements)
    for _ in cut:
        pass
    return [f.identity for f in cut.manifest().files]


def occurrence_table(rank: int, occurrences: Iterable[Occurrence], carry: bool) -> pa.Table:
    """The occurrences of model `rank` as rows of OCCURRENCE_SCHEMA, their bytes in `data` when
    `carry` (steps in this process read nothing again), else null (read by byte range; the
    bytes are let go as each occurrence is taken)."""
    cols: dict[str, list] = {name: [] for name in OCCURRENCE_SCHEMA.names}
    for o in occurrences:
        p = o.piece
        for name, value in (("fragment_id", p.fragment_id), ("dtype", p.dtype), ("fragment_type", p.fragment_type.value), ("signs", signs(p)),
                            ("url", o.url), ("byte_offset", o.byte_offset), ("byte_len", len(p.data)), ("turn", o.turn),
                            ("data", p.data if carry else None)):
            cols[name].append(value)
    cols["rank"] = [rank] * len(cols["fragment_id"])
    data = binary_column(cols["data"]) if carry else pa.nulls(len(cols["data"]), pa.binary())
    return pa.table({f.name: data if f.name == "data" else pa.array(cols[f.name], f.type) for f in OCCURRENCE_SCHEMA}, schema=OCCURRENCE_SCHEMA)


# ---- the library's ingest -----------------------------------------------------------------
def ingest_models(lib: LibraryCore, models: list[ModelInput], progress: IngestProgress | None = None,
                  device: str = "cpu", quality: str = "exact", threads: int = 0, wait: float = 60.0,
                  replace: bool = False) -> list[IngestReport]:
    """Add several models in one set of commits (haagenti.writer.Committer states the order);
    later models deduplicate against earlier ones. A Delta commit costs milliseconds whatever
    its size, so a family of small models ingests much faster this way than one by one.
    With `threads` > 1 (0: every core) the next batch is read and hashed in the background
    while this one is signed and encoded over the threads, and commits run on a lane of their own.
    A model already stored with the same file bytes is left as it is (`unchanged`, its family
    set when one is given), as the Ray job does; one stored with other bytes is refused unless
    `replace`, and then unpublished just before the new one is published.
    Holds an ingest lease on the ids throughout (waiting up to `wait` seconds for a gc)."""
    ids = [m.model_id for m in models]
    for mid in ids:
        validate_model_id(mid)
    if len(set(ids)) != len(ids):
        raise LibraryError(f"model ids repeat within one ingest: {sorted({i for i in ids if ids.count(i) > 1})}")
    with writing(lib.store, "ingest", ids, wait) as lease, LocalExecutor(threads) as executor:
        sources = [open_model(m.urls) for m in models]  # every file is checked before anything is written
        unchanged, replaced = _against_stored(lib, models, sources, replace)
        todo = [(m, s) for m, s in zip(models, sources) if m.model_id not in unchanged]
        done = _ingest_models(lib, todo, progress, device, quality, executor, lease.writer, replaced) if todo else []
    by_id = {r.model_id: r for r in done + list(unchanged.values())}
    return [by_id[m] for m in ids]


def _against_stored(lib: LibraryCore, models: list[ModelInput], sources: list[ModelSource],
                    replace: bool) -> tuple[dict[str, IngestReport], list[str]]:
    """(reports of the models stored already with the same bytes, ids of those to replace).
    Same bytes: the same files' hashes (trees) in order, and not stored lossy unless lossy sharing is
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
        same_bytes = old["content_hash"] == model_hash(file_hashes(source, lib.config.fragment_elements))
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
                   quality: str, executor: LocalExecutor, ingest_id: str, replaced: list[str]) -> list[IngestReport]:
    """The models cut here (`cut_models`) through the ingest's steps (ingest_steps.ingest_batches
    on `executor`), each byte read once; then their manifests, published."""
    config = lib.config
    # The library's index is read per batch, by key: the ids a batch could repeat and the buckets
    # its signatures fall in (haagenti.index), never the whole index.
    index = open_index(lib.store, config)
    run_bytes = RunBytes(lib.fetch_raw)
    committer = Committer(lib.store, index, ingest_id, f"ingest {', '.join(m.model_id for m, _ in todo)}"[:200], config.batch_bytes, run_bytes.committed)
    committer.add_verbatim([[f.header for f in s.files] for _, s in todo])
    cuts = [ModelCut(m, s, config.fragment_elements, config.file_blake3) for m, s in todo]
    tally = _Tally([IngestReport(m.model_id, s.raw_bytes) for m, s in todo], executor)
    # The next batch is cut while this one is signed, matched and encoded; commits run on a lane of their own.
    batches = executor.workers.ahead(occurrence_batches(cut_models(cuts, encode_batch_bytes(config), tally), encode_batch_bytes(config)))
    for done in ingest_batches(lib, index, batches, executor, committer, {}, quality, device, run_bytes):
        tally.add(done)
        if progress:
            progress(int(pc.sum(done.occurrences["byte_len"]).as_py() or 0))
    for mid in replaced:  # unpublished just before the new one is published; gc frees what only it held
        maintenance.rm(lib, mid)
    manifests = [c.manifest() for c in cuts]
    committer.commit_manifests(manifests)
    committer.publish(manifests)
    return tally.reports


def cut_models(cuts: list[ModelCut], batch_bytes: int, tally: "_Tally") -> Iterator[pa.Table]:
    """The cut step of an ingest in this process: each model's occurrences in order, in tables
    of about `batch_bytes` with their bytes (`data`): read once (checkpoint tensors have no
    byte range to read again). `tally` learns where each lies."""
    for rank, cut in enumerate(cuts):
        tally.started(rank)
        held: list[Occurrence] = []
        size = 0
        with cut.source:
            for occ in cut:
                held.append(occ)
                size += len(occ.piece.data)
                if size >= batch_bytes:
                    tally.cut(held)
                    yield occurrence_table(rank, held, carry=True)
                    held, size = [], 0
        tally.cut(held)
        yield occurrence_table(rank, held, carry=True)
        tally.finished(rank)


class _Tally:
    """Each model's IngestReport from the driver's results, occurrence by occurrence in run
    order: new fragments stored (plain or delta, their bytes), exact repeats, fragments shared
    lossily (their references in the manifest replaced), and tensors holding NaN or Inf."""

    def __init__(self, reports: list[IngestReport], executor: LocalExecutor):
        self.reports, self.executor = reports, executor
        self.places: deque[tuple[TensorRef, int]] = deque()  # (tensor, index) of each occurrence cut, not yet tallied
        self.begun: dict[int, float] = {}

    def started(self, rank: int) -> None:
        self.begun[rank] = time.perf_counter()

    def cut(self, occurrences: list[Occurrence]) -> None:
        self.places.extend((o.tensor, o.index) for o in occurrences)

    def finished(self, rank: int) -> None:
        """The model's cut is done: its time so far (its last batch may still be encoding)."""
        self.reports[rank].seconds = time.perf_counter() - self.begun[rank]

    def add(self, done: BatchResult) -> None:
        stored = {f: (e, n) for f, e, n in zip(*(done.stored[c].to_pylist() for c in ("fragment_id", "encoding", "stored_size")))}
        shared = done.shared_refs()
        occ = done.occurrences
        flagged = self.executor.map(_nonfinite, list(zip(binary_views(occ["data"]), occ["dtype"].to_pylist())))
        for rank, fid, bad in zip(occ["rank"].to_pylist(), occ["fragment_id"].to_pylist(), flagged):
            tensor, index = self.places.popleft()
            report = self.reports[rank]
            report.fragments += 1
            if bad and tensor.name not in report.nonfinite_tensors:
                report.nonfinite_tensors.append(tensor.name)
            if fid in shared:
                ref = tensor.fragments[index]
                by, mx, rel = shared[fid]
                tensor.fragments[index] = FragmentRef(by, ref.elem_offset, ref.elem_count, fid, mx, rel)
                report.lossy += 1
            elif fid in stored:
                encoding, size = stored.pop(fid)
                report.plain += encoding == Encoding.PLAIN.value
                report.delta += encoding != Encoding.PLAIN.value
                report.stored_bytes += size
            else:
                report.exact += 1
            report.seconds = max(report.seconds, time.perf_counter() - self.begun[rank])


def _nonfinite(item: tuple[bytes, str]) -> bool:
    return has_nonfinite(item[0], lookup_dtype(item[1]))
