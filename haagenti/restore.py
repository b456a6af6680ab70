"""Restore: a model's fragments fetched in bounded batches, verified, and written into its
files (byte-identical, checkpoints as equal state dicts), as the tree they were ingested from."""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, BinaryIO, Iterable

from haagenti.encode import RawCache
from haagenti.errors import FragmentError, LibraryError
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.splice import SpliceWriter
from haagenti.hashing import file_layout, hasher
from haagenti.manifest import FileRecord, ModelManifest, TensorRef
from haagenti.parallel import Workers
from haagenti.records import LossyRestoreWarning, lossy_summary
from haagenti.tensors import checkpoint_bytes, tensor_of

if TYPE_CHECKING:
    import torch

    from haagenti.library import FragmentLibrary


def iter_parts(lib: "FragmentLibrary", manifest: ModelManifest, cache: RawCache | None = None,
               workers: Workers | None = None, tally: list[int] | None = None) -> Iterable[tuple[TensorRef, list[bytes]]]:
    """(tensor, its fragments' verified bytes in order): what a restore writes, uncopied.
    Fragments come in groups of about `batch_bytes`; with `workers` a group is decoded over
    them while the one before it is written (two groups in memory at most). `tally` gets the
    stored size of every fragment row read from storage."""
    groups: list[list[TensorRef]] = [[]]
    size = 0
    for t in manifest.tensors:
        if size >= lib.config.batch_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += sum(r.elem_count for r in t.fragments) * lookup_dtype(t.dtype).itemsize

    def fetch(group: list[TensorRef]) -> dict[str, bytes]:
        ids = {r.fragment_id for g in group for r in g.fragments}
        try:
            return lib.fetch_raw(ids, cache, workers, tally)
        except FragmentError as e:
            names = [g.name for g in group if any(r.fragment_id in str(e) for r in g.fragments)] or [g.name for g in group]
            raise FragmentError(f"model {manifest.model_id!r}, tensor {names[0]!r}: {e}") from None

    pool = workers or Workers(1)
    ahead = pool.submit(fetch, groups[0])
    for k, group in enumerate(groups):
        raw = ahead.result()
        if k + 1 < len(groups):
            ahead = pool.submit(fetch, groups[k + 1])
        for g in group:
            yield g, [raw[r.fragment_id] for r in g.fragments]


def restore_model(lib: "FragmentLibrary", model_id: str, out_dir: str, rehash: bool = False, force: bool = False,
                  threads: int = 0) -> list[str]:
    """Write the model's files into `out_dir` (a folder's as its tree); files come back byte-identical
    (every fragment checked against its id, each file against its recorded layout, and with
    `rehash` each file's bytes against its recorded BLAKE3 too), checkpoints as equal state
    dicts. Existing files are refused unless `force`; all files are written aside and moved
    in only once every one is complete. A model stored lossy warns (LossyRestoreWarning) on
    every restore, and with `rehash` fails naming the first file that differs."""
    manifest = lib.manifest(model_id)  # checked whole: no recorded name leaves out_dir (records.py)
    paths = [os.path.join(out_dir, *f.name.split("/")) for f in manifest.files]  # a folder's files keep their tree
    present = [os.path.relpath(p, out_dir) for p in paths if os.path.lexists(p)]
    if present and not force:
        raise LibraryError(f"{out_dir}: {', '.join(present[:3])} already exist(s); refusing to overwrite without --force")
    if manifest.lossy:
        warnings.warn(LossyRestoreWarning(lossy_summary(manifest)), stacklevel=3)
    for d in sorted({os.path.dirname(p) for p in paths}):
        os.makedirs(d, exist_ok=True)
    tmp = [p + ".partial" for p in paths]
    try:
        with contextlib.ExitStack() as files:
            sinks = [files.enter_context(open(p, "wb")) for p in tmp]
            for f, sink in zip(manifest.files, sinks):
                _preallocate(sink, f)
            with Workers(threads) as workers:  # 0: every core; the next batch decodes while one is written
                write_model(lib, manifest, sinks, rehash, workers)
            for sink in sinks:
                sink.truncate()  # a re-saved checkpoint may be shorter than its original
    except BaseException:
        for p in tmp:  # a failed restore leaves nothing half-written behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        raise
    for t, p in zip(tmp, paths):
        os.replace(t, p)
    return paths

def write_model(lib: "FragmentLibrary", manifest: ModelManifest, sinks: list[BinaryIO], rehash: bool, workers: Workers | None = None) -> None:
    """Stream the model into one sink per file, then check each file's layout: the ids of
    the fragments written, each verified against its bytes on read, in the order written.
    A second BLAKE3 pass over every byte (`rehash`) was ~10% of a restore (docs/decisions.md)."""
    hashers = [hasher() if rehash else None for _ in manifest.files]
    written: list[list[str]] = [[] for _ in manifest.files]
    states: dict[int, dict[str, torch.Tensor]] = {i: {} for i, f in enumerate(manifest.files) if f.format == "torch"}
    splicers = [  # each file's verbatim gaps around its tensors (haagenti.formats.splice)
        SpliceWriter(f.splice, lambda data, sink=sink, h=h: _put(sink, h, data)) for f, sink, h in zip(manifest.files, sinks, hashers)
    ]
    for t, parts in iter_parts(lib, manifest, None, workers):
        i = t.file_index
        if i in states:
            states[i][t.name] = tensor_of(t, parts)
            continue
        splicers[i].begin_tensor()
        for ref, part in zip(t.fragments, parts):
            splicers[i].write(part)
            written[i].append(ref.source_fragment_id)  # the layout is of the original's fragments (lossy refs too)
        splicers[i].end_tensor()
    for s in splicers:
        s.finish()
    for i, state in states.items():
        _put(sinks[i], hashers[i], checkpoint_bytes(state))
    for f, ids, h in zip(manifest.files, written, hashers):
        if f.format == "torch":
            continue
        if file_layout(f.inline, ids) != f.layout:
            raise FragmentError(f"model {manifest.model_id!r}: restored {f.name} does not match its recorded layout (fragments missing or out of order)")
        if h is not None and h.hexdigest() != f.blake3:
            if manifest.lossy:
                raise FragmentError(f"model {manifest.model_id!r}: restored {f.name} differs from the original, as the model is stored lossy ({lossy_summary(manifest)})")
            raise FragmentError(f"model {manifest.model_id!r}: restored {f.name} has blake3 {h.hexdigest()}, expected {f.blake3}")


def _preallocate(sink: BinaryIO, f: FileRecord) -> None:
    """Reserve a restored file's blocks up front where its size is known. Measured here (ext4):
    once ~100 MB of a restore are dirty, writes into a growing file fall from ~4 GB/s to
    ~0.7 GB/s (delayed block allocation racing writeback); into reserved blocks they stay fast."""
    if f.format != "torch" and f.size > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(sink.fileno(), 0, f.size)
        except OSError:
            pass  # a filesystem without fallocate: the writes still work, just slower


def _put(sink: BinaryIO, hasher, data: bytes) -> None:
    sink.write(data)
    if hasher is not None:
        hasher.update(data)
