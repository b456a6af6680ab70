"""The interface every container format implements, and the one walk of a stored file's layout.

A container format reads a model file into tensors and verbatim gaps, and knows how its record
(files.header) keeps those gaps. Its name is what files.format stores: names never change,
they are in users' libraries. haagenti.formats.registry lists the formats; everything else asks
the registry by that name and knows nothing of any one format.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from haagenti.errors import DamagedError, FormatError
from haagenti.formats.dtypes import DType
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.splice import Splice, TensorSpan, Turn, transpose
from haagenti.fsio import filesystem_for
from haagenti.hashing import content_hash, file_tree, hasher


@dataclass
class SourceTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    file_index: int
    nbytes: int
    data_begin: int = 0  # absolute offset in its file
    payload: bytes | None = None  # checkpoint tensors are held in memory
    transposed: bool = False  # the file holds this tensor's transpose (haagenti.formats.splice)

    def turn(self) -> Turn | None:
        """Where the file holds this tensor transposed; None if it holds it as it is."""
        return (self.data_begin, self.shape[1], self.shape[0], self.dtype.itemsize) if self.transposed else None


@dataclass
class SourceFile:
    name: str  # basename as restored
    url: str
    format: str  # a ContainerFormat's name (haagenti.formats.registry)
    size: int
    header: bytes = b""  # safetensors header JSON verbatim, a spliced file's packed gaps, or a whole side file
    blake3: str = ""  # the whole file's BLAKE3, known up front for checkpoints (read whole); others hash as they stream, if asked


class StoredFile(Protocol):
    """What a format reads of a stored file's record (haagenti.manifest.FileRecord)."""

    name: str
    size: int
    header: bytes


class StoredTensor(Protocol):
    """What a format reads of a stored tensor's record (haagenti.manifest.TensorRef)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FileEntry:
    """One file of a model being opened: where it is, its name in the model, its size."""

    index: int
    url: str
    name: str
    in_folder: bool  # found under a folder the user named (a side file there is kept verbatim)
    size: int

    def open(self):
        fs, path = filesystem_for(self.url)
        return fs.open(path, "rb")

    def read_all(self) -> bytes:
        with self.open() as fh:
            return fh.read()


@dataclass
class ModelFiles:
    """Every file of a model being opened, and what each format's `scan` found in them (a
    format whose files refer to others, as ONNX to its external data, scans first)."""

    entries: list[FileEntry]
    scans: dict[str, object] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


@dataclass(slots=True)  # not frozen: a frozen one took 1.4 us to make, this 0.4 (a 10 GB model has 40,000)
class Segment:
    """One slice of a stored file at its offset in the original: verbatim bytes, or fragments
    of the file's `tensor`-th tensor (in file order)."""

    offset: int
    size: int
    gap: bytes | None = None
    tensor: int = -1
    fragments: range = range(0)  # which of its fragments: one, or every one of a transposed tensor
    turn: tuple[int, int, int] | None = None  # (rows, cols, itemsize) of the file's matrix: stored transposed


def layout_segments(splice: Splice, tensors: Sequence[Sequence[int]]) -> list[Segment]:
    """A file as gap 0, tensor 0, gap 1, ..., the gaps after the last tensor; `tensors` holds
    each tensor's fragment sizes in bytes, in file order. A transposed tensor is one segment
    (it is turned back whole); any other, one segment per fragment."""
    out: list[Segment] = []
    pos = 0
    gaps, turned = splice.gaps, splice.transposed
    for k, sizes in enumerate(tensors):
        if k < len(gaps):
            out.append(Segment(pos, len(gaps[k]), gap=gaps[k]))
            pos += len(gaps[k])
        turn = turned.get(k)
        if turn is not None:
            out.append(Segment(pos, sum(sizes), tensor=k, fragments=range(len(sizes)), turn=turn))
            pos += out[-1].size
            continue
        for j, n in enumerate(sizes):
            out.append(Segment(pos, n, None, k, range(j, j + 1)))
            pos += n
    for gap in gaps[len(tensors) :]:
        out.append(Segment(pos, len(gap), gap=gap))
        pos += len(gap)
    return out


def file_end(segments: list[Segment]) -> int:
    return segments[-1].offset + segments[-1].size if segments else 0


class LayoutWriter:
    """Writes a file in order from its fragments' stored bytes, fed one fragment at a time in
    file order: the gaps between them, and each transposed tensor turned back into the file's
    orientation. Restore streams files with it; ingest hashes them with it (write = hasher.update)."""

    def __init__(self, segments: list[Segment], put: Callable[[bytes], object]):
        self.segments, self.put = segments, put
        self.next = 0
        self.held: list[bytes] = []

    def _ready(self) -> Segment | None:
        """The segment the next fragment goes to, once every gap before it is written."""
        while self.next < len(self.segments):
            s = self.segments[self.next]
            if s.gap is not None:
                self.put(s.gap)
            elif len(s.fragments) > len(self.held):
                return s
            else:  # a transposed tensor, whole
                rows, cols, itemsize = s.turn  # type: ignore[misc]
                self.put(transpose(b"".join(self.held), cols, rows, itemsize))
                self.held = []
            self.next += 1
        return None

    def write(self, data: bytes | memoryview) -> None:
        s = self._ready()
        if s is None:
            raise FormatError("more fragments than the file's layout holds")
        if s.turn is None:
            self.put(data)
            self.next += 1
        else:
            self.held.append(data)

    def finish(self) -> None:
        if self._ready() is not None:
            raise FormatError("fewer fragments than the file's layout holds")


class FileHasher(LayoutWriter):
    """The plain BLAKE3 of a whole file rebuilt from its gaps and its fragments' stored bytes,
    fed as they are cut (ingest computes it this way when asked to, in the pass that cuts)."""

    def __init__(self, segments: list[Segment]):
        self.hasher = hasher()
        super().__init__(segments, self.hasher.update)

    def hexdigest(self) -> str:
        self.finish()
        return self.hasher.hexdigest()


def splice_tree(splice: Splice, counts: Sequence[int], fragment_ids: Sequence[str], gaps_digest: bytes | None = None) -> str:
    """The tree hash (hashing.file_tree) of a file laid out as `splice` with `counts[k]`
    fragments in its k-th tensor; `gaps_digest`: the BLAKE3 of its gap bytes as found in a
    restored file (default: of the recorded gaps)."""
    if gaps_digest is None:
        h = hasher()
        for g in splice.gaps:
            h.update(g)
        gaps_digest = h.digest()
    tensors = [(n, *splice.transposed.get(k, (0, 0, 0))) for k, n in enumerate(counts)]
    return file_tree([len(g) for g in splice.gaps], gaps_digest, tensors, fragment_ids)


class TreeHasher:
    """A file's tree hash recomputed from its bytes, fed in file order in pieces of any size:
    the bytes are cut where the stored layout puts each gap and fragment (a transposed tensor
    turned back first) and each piece hashed as ingest hashed it. With `whole`, the plain
    BLAKE3 of the bytes too (files.blake3, where a user asked for it)."""

    def __init__(self, splice: Splice, sizes: Sequence[Sequence[int]], whole: bool = False):
        self.splice, self.counts = splice, [len(s) for s in sizes]
        self.pieces = [(s.size, s.gap is not None, s.turn, sizes[s.tensor][s.fragments.start:s.fragments.stop] if s.turn else ())
                       for s in layout_segments(splice, sizes)]
        self.gaps, self.whole = hasher(), hasher() if whole else None
        self.ids: list[str] = []
        self.next, self.held, self.over = 0, bytearray(), False

    def update(self, data: bytes | memoryview) -> None:
        if self.whole is not None:
            self.whole.update(data)
        view = memoryview(data).cast("B")
        while view:
            self._skip_empty()
            if self.next >= len(self.pieces):
                self.over = True  # more bytes than the layout holds
                return
            need = self.pieces[self.next][0] - len(self.held)
            if not self.held and len(view) >= need:
                self._take(view[:need])
            else:
                self.held += view[:need]
                if len(self.held) == self.pieces[self.next][0]:
                    self._take(memoryview(self.held))
                    self.held = bytearray()
            view = view[need:]

    def _skip_empty(self) -> None:
        while self.next < len(self.pieces) and self.pieces[self.next][0] == 0:
            self._take(memoryview(b""))

    def _take(self, data: memoryview) -> None:
        size, gap, turn, frag_sizes = self.pieces[self.next]
        self.next += 1
        if gap:
            self.gaps.update(data)
            return
        if turn is None:
            self.ids.append(content_hash(data))
            return
        rows, cols, itemsize = turn
        stored = transpose(bytes(data), rows, cols, itemsize)  # the fragments' orientation
        pos = 0
        for n in frag_sizes:
            self.ids.append(content_hash(stored[pos:pos + n]))
            pos += n

    def hexdigest(self) -> str:
        """The tree of the bytes fed ("" when they are more or fewer than the layout holds)."""
        self._skip_empty()
        if self.over or self.held or self.next != len(self.pieces):
            return ""
        return splice_tree(self.splice, self.counts, self.ids, self.gaps.digest())

    def whole_hexdigest(self) -> str | None:
        return self.whole.hexdigest() if self.whole is not None else None


class ContainerFormat(ABC):
    """A kind of model file. `name` is stored in files.format and never changes."""

    name: str
    description: str  # in messages: "a GGUF file"
    extensions: tuple[str, ...] = ()  # the file names it reads, by ending (lower case)
    holds_tensors = True  # False: a side file, kept verbatim
    byte_exact = True  # False: restored from its tensors as an equal state dict, not byte for byte

    # ---- reading a model file ------------------------------------------------------------
    def scan(self, model: ModelFiles) -> object:
        """What this format needs to know of the model's other files before any is read (None:
        nothing); kept in model.scans[self.name]."""
        return None

    exclusive = False  # a file whose name has one of `extensions` is of this format and no other

    def named(self, name: str) -> bool | None:
        """Whether a file of this name is of this format: True (always, and of no other), None
        (it may be, as the model's other files decide), False (never). Restore checks a record's
        format against the name with it."""
        if not name.lower().endswith(self.extensions):
            return False
        return True if self.exclusive else None

    def claims(self, entry: FileEntry, model: ModelFiles) -> bool:
        """Whether this format reads `entry` (asked in the registry's order; the first wins)."""
        return entry.name.lower().endswith(self.extensions)

    @abstractmethod
    def read(self, entry: FileEntry, model: ModelFiles) -> tuple[SourceFile, list[SourceTensor]]:
        """The file's record and its tensors (in file order), checked: a malformed or lying file
        raises FormatError (or UnsafeFileError) with one line naming what is wrong."""

    # ---- a stored file -------------------------------------------------------------------
    @abstractmethod
    def splice(self, header: bytes, where: str) -> Splice:
        """The verbatim gaps around the tensors, from the record's header."""

    def segments(self, header: bytes, where: str, sizes: Sequence[Sequence[int]]) -> list[Segment]:
        """The file as ordered slices, gaps and fragments, each at its offset in the original;
        `sizes` holds each tensor's fragment sizes in bytes, in file order."""
        return layout_segments(self.splice(header, where), sizes)

    def tree(self, header: bytes, where: str, counts: Sequence[int], fragment_ids: Sequence[str]) -> str:
        """The file's tree hash (splice_tree) from its record: the file's identity, files.layout."""
        return splice_tree(self.splice(header, where), counts, fragment_ids)

    def check_file(self, record: StoredFile, where: str) -> None:
        """Raise DamagedError if the record alone cannot be what this format made of a file."""

    def check_record(self, record: StoredFile, tensors: Sequence[StoredTensor], where: str) -> None:
        """Raise DamagedError if the record, with the file's tensor records (in file order,
        each checked already), cannot be what this format made of a file."""


class SplicedFormat(ContainerFormat):
    """A format whose record keeps its gaps packed (Splice.pack): GGUF, ONNX and the like."""

    def splice(self, header: bytes, where: str) -> Splice:
        return Splice.unpack(header, where)

    def record(self, entry: FileEntry, spans: list[TensorSpan], splice: Splice) -> tuple[SourceFile, list[SourceTensor]]:
        """The file's record and tensors, as read at `spans` with `splice` between them."""
        tensors = [SourceTensor(s.name, s.dtype, s.shape, entry.index, s.nbytes, data_begin=s.begin, transposed=s.transposed) for s in spans]
        return SourceFile(entry.name, entry.url, self.name, entry.size, splice.pack()), tensors

    def check_record(self, record: StoredFile, tensors: Sequence[StoredTensor], where: str) -> None:
        """The gaps and the tensors add up to the file's size, and each transposed tensor is
        the matrix its record says (the gaps decide where each tensor's bytes go)."""
        fw = f"{where}, file {record.name!r}"
        try:
            splice = Splice.unpack(record.header, fw)
        except FormatError as e:
            raise DamagedError(str(e)) from None
        sizes = [math.prod(t.shape) // lookup_dtype(t.dtype).block * lookup_dtype(t.dtype).itemsize for t in tensors]
        if len(splice.gaps) > len(tensors) + 1 or sum(map(len, splice.gaps)) + sum(sizes) != record.size:
            raise DamagedError(f"{fw}: its recorded gaps and tensors do not add up to its {record.size} bytes")
        for k, (rows, cols, itemsize) in splice.transposed.items():
            t = tensors[k] if 0 <= k < len(tensors) else None
            if t is None or len(t.shape) != 2 or (cols, rows) != tuple(t.shape) or itemsize != lookup_dtype(t.dtype).itemsize:
                raise DamagedError(f"{fw}: a recorded transposed tensor does not match its tensor record")
