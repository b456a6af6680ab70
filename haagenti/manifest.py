"""What a model is made of: files, tensors, and the ordered fragment references of each tensor."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import pyarrow as pa

from haagenti.errors import DamagedError, FragmentError, ModelIdError
from haagenti.formats.container import Segment, TreeHasher
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.registry import container
from haagenti.fragment import FragmentId, FragmentType, verbatim_pieces
from haagenti.store.schema import SCHEMAS

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_MODEL_ID = re.compile(rf"{_SEGMENT}(/{_SEGMENT})?")


def validate_model_id(model_id: str) -> str:
    """Model ids are `name` or `org/name` (HF style); segments start with a letter or digit,
    so '.', '..', absolute paths, backslashes and empty segments are all refused."""
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id) or ".." in model_id:
        raise ModelIdError(
            f"invalid model id {model_id!r}: use 'name' or 'org/name' with letters, digits, '.', '_', '-' (no '..')"
        )
    return model_id


@dataclass(frozen=True)
class FragmentRef:
    fragment_id: str
    elem_offset: int
    elem_count: int
    source_fragment_id: str  # the original content's id; differs only for lossy sharing
    max_abs_error: float = 0.0
    rel_l2_error: float = 0.0

    @property
    def lossy(self) -> bool:
        return self.fragment_id != self.source_fragment_id


@dataclass
class TensorRef:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file_index: int
    fragment_type: FragmentType
    fragments: list[FragmentRef] = field(default_factory=list)


PIECES_FROM = 8  # models rows of this format on hold `files.header` as a tag byte and its payload
INLINE, PIECES = 0, 1  # the tag: the verbatim bytes themselves, or their pieces' ids
INLINE_MAX = 16 * 1024  # verbatim bytes up to this size stay in the models row (docs/decisions/0292)
ID_BYTES = 32


def stored_pieces(header: bytes) -> list[bytes]:
    """The pieces (fragments) a file's verbatim bytes are stored as: none when they stay in the
    models row. A piece costs a fragments row, an index row and compression on its own; small
    headers compress better together in the models table than apart."""
    return verbatim_pieces(header) if len(header) > INLINE_MAX else []


def header_field(header: bytes) -> bytes:
    """What `files.header` holds from PIECES_FROM: INLINE then the bytes, or PIECES then the
    pieces' ids, 32 raw bytes each, in order."""
    pieces = stored_pieces(header)
    return bytes([PIECES]) + b"".join(bytes.fromhex(FragmentId.of(p)) for p in pieces) if pieces else bytes([INLINE]) + header


def read_header_field(field: bytes, where: str) -> tuple[bytes, list[str]]:
    """(the bytes held inline, the pieces' ids) of a `files.header` from PIECES_FROM (header_field);
    anything else is damage."""
    if not isinstance(field, bytes) or not field or field[0] not in (INLINE, PIECES):
        raise DamagedError(f"{where}: its recorded verbatim bytes are neither inline nor pieces")
    if field[0] == INLINE:
        return field[1:], []
    if len(field) == 1 or (len(field) - 1) % ID_BYTES:
        raise DamagedError(f"{where}: its recorded verbatim pieces are not whole ids ({len(field) - 1} bytes)")
    return b"", [field[k : k + ID_BYTES].hex() for k in range(1, len(field), ID_BYTES)]


@dataclass(frozen=True)
class FileRecord:
    name: str
    format: str  # a ContainerFormat's name (haagenti.formats.registry)
    size: int
    blake3: str | None  # the whole file's plain BLAKE3: a checkpoint's identity; of other files only where ingest was asked for it
    header: bytes  # safetensors header JSON verbatim, a spliced file's packed gaps, or a side file's bytes
    layout: str = ""  # the file's tree hash (hashing.file_tree), its identity ("" for checkpoints)

    @classmethod
    def with_layout(cls, name: str, format: str, size: int, blake3: str | None, header: bytes,
                    counts: list[int], fragment_ids: list[str]) -> "FileRecord":
        """The record of a file cut into `fragment_ids` (in file order), `counts[k]` of them in
        its k-th tensor. Checkpoints restore as equal state dicts, not bytes, so they have no tree."""
        rec = cls(name, format, size, blake3, header)
        return replace(rec, layout=rec.tree(counts, fragment_ids)) if container(format).byte_exact else rec

    @property
    def identity(self) -> str:
        """What a model's content hash is made of: the tree of a byte-exact file, a checkpoint's BLAKE3."""
        return self.layout if container(self.format).byte_exact else str(self.blake3)

    def tree(self, counts: list[int], fragment_ids: list[str]) -> str:
        """The tree hash of this record's gaps with these fragment ids, `counts[k]` in its k-th tensor."""
        return container(self.format).tree(self.header, self.name, counts, fragment_ids)

    def fragment_sizes(self, tensors: list[TensorRef]) -> list[list[int]]:
        """Each of `tensors`' (the file's, in file order) fragment sizes in bytes."""
        return [[r.elem_count * lookup_dtype(t.dtype).itemsize for r in t.fragments] for t in tensors]

    def segments(self, tensors: list[TensorRef]) -> list[Segment]:
        """The file as its format lays it out (haagenti.formats.container): gap and fragment
        slices at their offsets; `tensors` are the file's, in file order."""
        return container(self.format).segments(self.header, self.name, self.fragment_sizes(tensors))

    def tree_hasher(self, tensors: list[TensorRef]) -> TreeHasher:
        """A hasher that recomputes this file's tree (and its BLAKE3, where recorded) from its bytes."""
        return TreeHasher(container(self.format).splice(self.header, self.name), self.fragment_sizes(tensors), whole=bool(self.blake3))

    def row(self) -> dict:
        """Its `files` entry in a models row (from PIECES_FROM: `header` as header_field)."""
        return {"name": self.name, "format": self.format, "size": self.size, "blake3": self.blake3,
                "header": header_field(self.header), "layout": self.layout}


@dataclass
class ModelManifest:
    model_id: str
    family: str | None
    files: list[FileRecord]
    tensors: list[TensorRef]
    content_hash: str = ""
    raw_bytes: int = 0
    source_uris: list[str] = field(default_factory=list)

    @property
    def fragment_ids(self) -> set[str]:
        return {r.fragment_id for t in self.tensors for r in t.fragments}

    def tensors_by_name(self) -> dict[str, "TensorRef"]:
        return {t.name: t for t in self.tensors}

    def file_tensors(self) -> list[list[TensorRef]]:
        """Each file's tensors, in file order (the order of a file's layout)."""
        out: list[list[TensorRef]] = [[] for _ in self.files]
        for t in self.tensors:
            out[t.file_index].append(t)
        return out

    @property
    def lossy(self) -> bool:
        return any(r.lossy for t in self.tensors for r in t.fragments)

    def lossy_tensors(self) -> dict[str, dict[str, float]]:
        """Tensor name -> its lossy fragments' count and largest errors (lossy tensors only)."""
        out = {}
        for t in self.tensors:
            lossy = [r for r in t.fragments if r.lossy]
            if lossy:
                out[t.name] = {
                    "fragments": len(lossy),
                    "max_abs_error": max(r.max_abs_error for r in lossy),
                    "rel_l2_error": max(r.rel_l2_error for r in lossy),
                }
        return out

    def manifest_rows(self, ingest_id: str) -> pa.Table:
        """The model's manifests-table rows, owned by the ingest `ingest_id` that publishes them."""
        cols: dict[str, list] = {k: [] for k in (
            "model_id", "file_index", "tensor_index", "tensor_name", "dtype", "shape", "fragment_seq", "fragment_id",
            "elem_offset", "elem_count", "fragment_type", "source_fragment_id", "max_abs_error", "rel_l2_error")}
        for ti, t in enumerate(self.tensors):
            # An empty tensor has no fragment; one row with a null fragment keeps it in the manifest.
            for seq, r in enumerate(t.fragments or [None]):  # type: ignore[list-item]
                r = r or FragmentRef(None, 0, 0, None)  # type: ignore[arg-type]
                seq = seq if t.fragments else -1
                for k, v in (
                    ("model_id", self.model_id), ("file_index", t.file_index), ("tensor_index", ti), ("tensor_name", t.name),
                    ("dtype", t.dtype), ("shape", list(t.shape)), ("fragment_seq", seq), ("fragment_id", r.fragment_id),
                    ("elem_offset", r.elem_offset), ("elem_count", r.elem_count), ("fragment_type", t.fragment_type.value),
                    ("source_fragment_id", r.source_fragment_id), ("max_abs_error", r.max_abs_error), ("rel_l2_error", r.rel_l2_error),
                ):
                    cols[k].append(v)
        cols["ingest_id"] = [ingest_id] * len(cols["model_id"])
        return pa.table(cols, schema=SCHEMAS["manifests"])  # typed even with no rows (a model with no tensors)

    @classmethod
    def from_rows(cls, model: dict, rows: pa.Table) -> "ModelManifest":
        rows = rows.sort_by([("tensor_index", "ascending"), ("fragment_seq", "ascending")])
        c = rows.to_pydict()  # column lists, zipped: row dicts cost more than the rest of this
        tensors: list[TensorRef] = []
        for ti, name, dt, shape, fi, ft, fid, off, n, src, mx, rel in zip(*(c[k] for k in (
            "tensor_index", "tensor_name", "dtype", "shape", "file_index", "fragment_type",
            "fragment_id", "elem_offset", "elem_count", "source_fragment_id", "max_abs_error", "rel_l2_error",
        ))):
            if not tensors or len(tensors) - 1 != ti:
                if ti != len(tensors):  # tensor indices are 0, 1, 2, ... in the rows a writer writes
                    raise ValueError(f"tensor index {ti} where {len(tensors)} comes next")
                tensors.append(TensorRef(name, dt, tuple(shape), fi, FragmentType(ft)))
            if fid is not None:
                tensors[-1].fragments.append(FragmentRef(fid, off, n, src, mx, rel))
        files = [FileRecord(f["name"], f["format"], f["size"], f["blake3"], f["header"], f["layout"]) for f in model["files"]]
        m = cls(model["model_id"], model["family"], files, tensors, model["content_hash"], model["raw_bytes"], model["source_uris"])
        if m.lossy != model["lossy"]:  # a restore checks exact models only: a damaged ref must not turn that off
            raise FragmentError(f"model {m.model_id!r}: its manifest's references {'are' if m.lossy else 'are not'} lossy, its model record says otherwise")
        return m
