"""Restore: a model's fragments fetched in bounded batches, verified, and written into its
files (byte-identical, checkpoints as equal state dicts), as the tree they were ingested from."""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import uuid
import warnings
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator

from haagenti.checkpoints import reached
from haagenti.core import LibraryCore
from haagenti.encode import RawCache
from haagenti.errors import FragmentError, LibraryError
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.container import LayoutWriter, TreeHasher, file_end
from haagenti.formats.registry import container
from haagenti.formats.source import RESTORE_JOURNAL, RESTORE_STAGING
from haagenti.formats.splice import transpose
from haagenti.manifest import FileRecord, ModelManifest, TensorRef
from haagenti.parallel import Workers
from haagenti.records import LossyRestoreWarning, lossy_summary
from haagenti.tensors import checkpoint_bytes, tensor_of

if TYPE_CHECKING:
    import torch


def _groups(lib: LibraryCore, manifest: ModelManifest) -> list[list[TensorRef]]:
    """The model's tensors in groups of about `batch_bytes`: what one read fetches."""
    groups: list[list[TensorRef]] = [[]]
    size = 0
    for t in manifest.tensors:
        if size >= lib.config.batch_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += sum(r.elem_count for r in t.fragments) * lookup_dtype(t.dtype).itemsize
    return groups


@contextlib.contextmanager
def _naming(manifest: ModelManifest, group: list[TensorRef]) -> Iterator[None]:
    """A missing or damaged fragment named with its model and tensor."""
    try:
        yield
    except FragmentError as e:
        names = [g.name for g in group if any(r.fragment_id in str(e) for r in g.fragments)] or [g.name for g in group]
        raise FragmentError(f"model {manifest.model_id!r}, tensor {names[0]!r}: {e}") from None


def iter_parts(lib: LibraryCore, manifest: ModelManifest, cache: RawCache | None = None,
               workers: Workers | None = None, tally: list[int] | None = None) -> Iterable[tuple[TensorRef, list[bytes]]]:
    """(tensor, its fragments' verified bytes in order): what a stream or a loader takes, uncopied.
    With `workers` a group is decoded over them while the one before it is taken (two groups
    in memory at most). `tally` gets the stored size of every fragment row read from storage."""
    groups = _groups(lib, manifest)

    def fetch(group: list[TensorRef]) -> dict[str, bytes]:
        with _naming(manifest, group):
            return lib.fetch_raw({r.fragment_id for g in group for r in g.fragments}, cache, workers, tally)

    pool = workers or Workers(1)
    ahead = pool.submit(fetch, groups[0])
    for k, group in enumerate(groups):
        raw = ahead.result()
        if k + 1 < len(groups):
            ahead = pool.submit(fetch, groups[k + 1])
        for g in group:
            parts = [raw[r.fragment_id] for r in g.fragments]
            itemsize = lookup_dtype(g.dtype).itemsize
            for r, part in zip(g.fragments, parts):  # verified bytes, but the record decides how many it places
                if len(part) != r.elem_count * itemsize:
                    raise FragmentError(f"model {manifest.model_id!r}, tensor {g.name!r}: fragment {r.fragment_id}: {len(part)} bytes where the manifest places {r.elem_count * itemsize}")
            yield g, parts


def restore_model(lib: LibraryCore, model_id: str, out_dir: str, rehash: bool = False, force: bool = False,
                  threads: int = 0) -> list[str]:
    """Write the model's files into `out_dir` (a folder's as its tree); files come back byte-identical
    (every fragment checked against its id, each file against its recorded layout, and with
    `rehash` each file's tree recomputed from its bytes too), checkpoints as equal state
    dicts. Existing files are refused unless `force`; all files are written aside and moved
    in only once every one is complete. A model stored lossy warns (LossyRestoreWarning) on
    every restore, and with `rehash` fails naming the first file that differs."""
    manifest = lib.manifest(model_id)  # checked whole: no recorded name leaves out_dir (records.py)
    paths = [os.path.join(out_dir, *f.name.split("/")) for f in manifest.files]  # a folder's files keep their tree
    journal = os.path.join(out_dir, RESTORE_JOURNAL)
    if os.path.lexists(journal) and not force:
        raise LibraryError(f"{out_dir}: {_interrupted(journal)}; rerun with --force to restore it whole")
    present = [os.path.relpath(p, out_dir) for p in paths if os.path.lexists(p)]
    if present and not force:
        raise LibraryError(f"{out_dir}: {', '.join(present[:3])} already exist(s); refusing to overwrite without --force")
    _open_file_room(manifest)
    if os.path.lexists(journal):  # --force over an interrupted restore: its staged files go first
        _remove_leftovers(journal, out_dir)
    if manifest.lossy:
        warnings.warn(LossyRestoreWarning(lossy_summary(manifest)), stacklevel=3)
    made = _absent_folders(paths)
    for d in sorted({os.path.dirname(p) for p in paths}):
        os.makedirs(d, exist_ok=True)
    tmp: list[str] = []
    try:
        with contextlib.ExitStack() as files:
            fds = []
            for p in paths:  # staged under names of our own, made exclusively: never a file or link already there
                tmp.append(os.path.join(os.path.dirname(p), f".{uuid.uuid4().hex}{RESTORE_STAGING}"))
                fds.append(os.open(tmp[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644))
                files.callback(os.close, fds[-1])
            for f, fd in zip(manifest.files, fds):
                _preallocate(fd, f)
            with Workers(threads) as workers:  # 0: every core
                place_model(lib, manifest, fds, workers)
        if rehash:
            _check_files(manifest, None, [_rehash_file(p, f, tensors) if container(f.format).byte_exact else None
                                          for p, f, tensors in zip(tmp, manifest.files, manifest.file_tensors())])
    except BaseException:
        for p in tmp:  # a failed restore leaves nothing half-written behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        for d in reversed(made):  # nor the folders it made (rmdir: only while empty)
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    # The moves are not one step: a journal says, until the last is made, that the folder mixes
    # files of before and after (a restore killed here is refused until rerun with --force).
    doc = {"model": model_id, "files": [f.name for f in manifest.files], "staged": [os.path.relpath(t, out_dir) for t in tmp]}
    with open(os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as j:
        json.dump(doc, j)
    for t, p in zip(tmp, paths):
        os.replace(t, p)
        reached("restore-moved")
    _remove_leftovers(journal, out_dir)
    return paths


def _absent_folders(paths: list[str]) -> list[str]:
    """The folders a restore of `paths` makes (the output folder and the model's subfolders not
    there yet), parents first."""
    absent = set()
    for p in paths:
        d = os.path.dirname(p)
        while d and not os.path.isdir(d) and d not in absent:
            absent.add(d)
            d = os.path.dirname(d)
    return sorted(absent, key=len)


def _interrupted(journal: str) -> str:
    """What a leftover journal says, in words."""
    try:
        with open(journal) as f:
            model = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        model = None
    return f"an earlier restore{f' of {model!r}' if isinstance(model, str) else ''} was interrupted while moving its files in (some may be old, some new)"


def _remove_leftovers(journal: str, out_dir: str) -> None:
    """The journal of the restore just finished, and the staged files it names that an earlier,
    interrupted restore left (their moves never happened)."""
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        with open(os.open(journal, os.O_RDONLY | os.O_NOFOLLOW)) as f:
            staged = json.load(f).get("staged", [])
        for rel in staged:
            p = os.path.join(out_dir, rel)
            if os.path.basename(p).endswith(RESTORE_STAGING) and os.path.commonpath([os.path.abspath(out_dir), os.path.abspath(p)]) == os.path.abspath(out_dir):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
    os.remove(journal)


def _open_file_room(manifest: ModelManifest) -> None:
    """A restore holds every file of the model open at once: raise the soft limit on open files
    to what that needs (at most the hard limit), or refuse in one line before writing anything."""
    try:
        import resource
    except ImportError:  # no rlimits to adjust (Windows)
        return
    held = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0  # open already (cached table files, sockets)
    need = held + len(manifest.files) + 64  # and room for the reads a restore makes meanwhile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        room = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (room, hard))
            soft = room
        if soft < need:
            raise LibraryError(f"model {manifest.model_id!r} has {len(manifest.files)} files; a restore holds them all open and this process may open {soft} (ulimit -n)")


def place_model(lib: LibraryCore, manifest: ModelManifest, fds: list[int], workers: Workers) -> None:
    """Write the model into one file per record (open for writing): every fragment at its
    offset (os.pwrite), by the worker that decoded and verified it, the moment it is decoded;
    then check each file's layout. The rows of the next group are read meanwhile. One writer
    thread after the decoders was serial work, and the decoded group it held was 64 MB of
    fresh pages per group in the workers' malloc arenas (docs/decisions/0037-every-core.md)."""
    plan = _Placement(manifest, fds)
    for fd, offset, gap in plan.gaps:
        _pwrite(fd, gap, offset)
    states: dict[int, dict[str, torch.Tensor]] = {i: {} for i, f in enumerate(manifest.files) if not container(f.format).byte_exact}
    groups = _groups(lib, manifest)
    ids = [{r.fragment_id for g in group for r in g.fragments} for group in groups]
    ahead = workers.submit(lib.read_rows, ids[0])
    for k, group in enumerate(groups):
        with _naming(manifest, group):
            rows = ahead.result()
            if k + 1 < len(groups):
                ahead = workers.submit(lib.read_rows, ids[k + 1])
            raw = lib.fetch_raw(ids[k], None, workers, place=plan.put, rows=rows)
        for t in group:  # what could not be placed as it came: checkpoint tensors, transposed ones
            if t.file_index in states:
                states[t.file_index][t.name] = tensor_of(t, [raw[r.fragment_id] for r in t.fragments])
            elif id(t) in plan.whole:
                fd, offset, (rows_, cols, itemsize) = plan.whole[id(t)]
                _pwrite(fd, transpose(b"".join(raw[r.fragment_id] for r in t.fragments), cols, rows_, itemsize), offset)
    for i, state in states.items():
        data = checkpoint_bytes(state)
        _pwrite(fds[i], data, 0)
        plan.ends[i] = len(data)
    for fd, end in zip(fds, plan.ends):
        os.ftruncate(fd, end)  # a re-saved checkpoint may be shorter than its original
    _check_files(manifest, plan.layouts, None)


class _Placement:
    """Where a model's bytes lie in its restored files (each file's layout segments):
    `at` each fragment's (fd, offset, length) for every place it fills, `gaps` the verbatim
    bytes, `whole` the transposed tensors (written whole, turned back), `kept` the ids a caller
    assembles (those and checkpoint tensors)."""

    def __init__(self, manifest: ModelManifest, fds: list[int]):
        self.at: dict[str, list[tuple[int, int, int]]] = {}
        self.gaps: list[tuple[int, int, bytes]] = []
        self.whole: dict[int, tuple[int, int, tuple[int, int, int]]] = {}
        self.kept: set[str] = set()
        self.ends = [0] * len(fds)
        self.layouts: list[list[str]] = [[] for _ in fds]  # each file's fragment ids in file order (of the original)
        for i, (f, fd, tensors) in enumerate(zip(manifest.files, fds, manifest.file_tensors())):
            fmt = container(f.format)
            if not fmt.byte_exact:
                self.kept.update(r.fragment_id for t in tensors for r in t.fragments)
                continue
            segments = f.segments(tensors)
            for s in segments:
                if s.gap is not None:
                    self.gaps.append((fd, s.offset, s.gap))
                elif s.turn is not None:
                    t = tensors[s.tensor]
                    self.whole[id(t)] = (fd, s.offset, s.turn)
                    self.kept.update(r.fragment_id for r in t.fragments)
                else:
                    self.at.setdefault(tensors[s.tensor].fragments[s.fragments.start].fragment_id, []).append((fd, s.offset, s.size))
            self.layouts[i] = [r.source_fragment_id for t in tensors for r in t.fragments]  # of the original's fragments (lossy refs too)
            self.ends[i] = file_end(segments)

    def put(self, fragment_id: str, raw: bytes) -> bool:
        """Write a decoded fragment wherever it goes (any thread); False when a caller still needs it."""
        for fd, offset, length in self.at.get(fragment_id, ()):
            if len(raw) != length:
                raise FragmentError(f"fragment {fragment_id}: {len(raw)} bytes where the manifest places {length}")
            _pwrite(fd, raw, offset)
        return fragment_id in self.at and fragment_id not in self.kept


def write_model(lib: LibraryCore, manifest: ModelManifest, sinks: list[BinaryIO], rehash: bool, workers: Workers | None = None) -> None:
    """Stream the model into one sink per file, in order, then check each file's layout: the
    ids of the fragments written, each verified against its bytes on read, in the order
    written. With `rehash` each file's tree is also recomputed from the bytes written (and its
    BLAKE3, where recorded): a second BLAKE3 pass over every byte, ~10% of a restore
    (docs/decisions/0005-file-layout-digest.md)."""
    file_tensors = manifest.file_tensors()
    hashers = [f.tree_hasher(tensors) if rehash and container(f.format).byte_exact else None for f, tensors in zip(manifest.files, file_tensors)]
    written: list[list[str]] = [[] for _ in manifest.files]
    writers = [  # each file's verbatim gaps around its tensors; None: a checkpoint, restored from its tensors
        LayoutWriter(f.segments(tensors), lambda data, sink=sink, h=h: _put(sink, h, data)) if container(f.format).byte_exact else None
        for f, sink, h, tensors in zip(manifest.files, sinks, hashers, file_tensors)
    ]
    states: dict[int, dict[str, torch.Tensor]] = {i: {} for i, w in enumerate(writers) if w is None}
    for t, parts in iter_parts(lib, manifest, None, workers):
        i = t.file_index
        writer = writers[i]
        if writer is None:
            states[i][t.name] = tensor_of(t, parts)
            continue
        for ref, part in zip(t.fragments, parts):
            writer.write(part)
            written[i].append(ref.source_fragment_id)  # the layout is of the original's fragments (lossy refs too)
    for w in writers:
        if w is not None:
            w.finish()
    for i, state in states.items():
        _put(sinks[i], None, checkpoint_bytes(state))
    _check_files(manifest, written, hashers)


def _check_files(manifest: ModelManifest, layouts: list[list[str]] | None, rehashed: list[TreeHasher | None] | None) -> None:
    """Each restored file's fragment ids (in file order) against its recorded layout, and where
    `rehashed`, the tree (and BLAKE3, where recorded) recomputed from its bytes against the
    recorded ones; checkpoints restore as state dicts, unchecked."""
    for i, (f, tensors) in enumerate(zip(manifest.files, manifest.file_tensors())):
        if not container(f.format).byte_exact:
            continue
        if layouts is not None and f.tree([len(t.fragments) for t in tensors], layouts[i]) != f.layout:
            raise FragmentError(f"model {manifest.model_id!r}: restored {f.name} does not match its recorded layout (fragments missing or out of order)")
        h = rehashed[i] if rehashed is not None else None
        if h is None:
            continue
        tree, whole = h.hexdigest(), h.whole_hexdigest()
        if tree != f.layout or whole != (f.blake3 or None):
            if manifest.lossy:
                raise FragmentError(f"model {manifest.model_id!r}: restored {f.name} differs from the original, as the model is stored lossy ({lossy_summary(manifest)})")
            what = f"tree {tree or '(bytes do not fit its layout)'}, expected {f.layout}" if tree != f.layout else f"blake3 {whole}, expected {f.blake3}"
            raise FragmentError(f"model {manifest.model_id!r}: restored {f.name} has {what}")


def _rehash_file(path: str, f: FileRecord, tensors: list[TensorRef]) -> TreeHasher:
    """A restored file's tree (and BLAKE3, where recorded) recomputed from its bytes as they are
    on disk (the bytes a rehash vouches for), cut by its recorded layout."""
    h = f.tree_hasher(tensors)
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                with memoryview(mm) as view:
                    h.update(view)
    return h


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _preallocate(fd: int, f: FileRecord) -> None:
    """Reserve a restored file's blocks up front where its size is known. Measured here (ext4):
    once ~100 MB of a restore are dirty, writes into a growing file fall from ~4 GB/s to
    ~0.7 GB/s (delayed block allocation racing writeback); into reserved blocks they stay fast."""
    if container(f.format).byte_exact and f.size > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, f.size)
        except OSError:
            pass  # a filesystem without fallocate: the writes still work, just slower


def _put(sink: BinaryIO, hasher: TreeHasher | None, data: bytes) -> None:
    sink.write(data)
    if hasher is not None:
        hasher.update(data)
