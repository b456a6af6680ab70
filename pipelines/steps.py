"""Pipeline steps: the ingest core's stages (haagenti.ingest, haagenti.matching) wrapped so an
executor can run them anywhere, knowing nothing of how they are scheduled. Model bytes never
travel between steps, only file URLs and byte ranges, read where they are needed."""
from __future__ import annotations

import pyarrow as pa

from haagenti.checkpoints import reached
from haagenti.config import LibraryConfig
from haagenti.core import LibraryCore
from haagenti.encode import PendingFragment, encode_fragment
from haagenti.errors import FormatError
from haagenti.formats import container, open_model
from haagenti.formats.source import RangeReader
from haagenti.fragment import FragmentType
from haagenti.hashing import model_hash
from haagenti.index import IndexLayout, open_index
from haagenti.ingest import ModelCut, ModelInput, fragment_table, signature_table, signs
from haagenti.manifest import ModelManifest
from haagenti.matching import partner_pairs
from haagenti.signature import SignatureConfig
from haagenti.store import LibraryStore

# One row per fragment occurrence of the run's models, in model order.
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
    ]
)


def scan_model(row: dict) -> dict:
    """Content hash and file records of one catalog entry (reads its files once, streaming)."""
    src = open_model(list(row["files"]))
    records = [{"name": f.name, "format": f.format, "size": f.size, "blake3": digest, "header": f.header, "url": f.url}
               for f, digest in zip(src.files, src.file_digests())]
    whole = next((r for r in records if not container(r["format"]).byte_exact), None)
    if whole is not None:  # its tensors are read whole, not as byte ranges of the file
        raise FormatError(f"model {row['model_id']!r}: the pipeline reads model files by byte range and {whole['name']} is {container(whole['format']).description}; ingest it with `haagenti ingest`")
    content_hash = model_hash([r["blake3"] for r in records])
    return dict(row, content_hash=content_hash, raw_bytes=src.raw_bytes, file_records=records)


class FragmentModel:
    """One scanned model cut (haagenti.ingest.ModelCut): its manifest and one row per fragment
    occurrence (id, byte range). The bytes cut must be those the scan hashed."""

    def __init__(self, config: LibraryConfig):
        self.config = config

    def __call__(self, row: dict) -> tuple[ModelManifest, pa.Table]:
        with open_model(list(row["files"])) as src:  # as scanned: a folder's files keep their relative names
            turned = next((t for t in src.tensors if t.transposed), None)
            if turned is not None:  # later steps read fragments as byte ranges of files; a transposed tensor is none
                raise FormatError(f"{src.files[turned.file_index].url}: tensor {turned.name!r} is stored transposed (an ONNX MatMul weight), which the pipeline cannot read by byte range; ingest this model with `haagenti ingest`")
            cut = ModelCut(ModelInput(list(row["files"]), row["model_id"], row["family"]), src, self.config.fragment_elements)
            occ = [(o.piece.fragment_id, o.piece.dtype, o.piece.fragment_type.value, signs(o.piece), o.url, o.byte_offset, len(o.piece.data)) for o in cut]
            manifest = cut.manifest([r["blake3"] for r in row["file_records"]])
        cols = list(zip(*occ)) if occ else [[]] * 7
        names = OCCURRENCE_SCHEMA.names[1:]
        table = pa.table({"rank": [row["rank"]] * len(occ), **dict(zip(names, cols))}, schema=OCCURRENCE_SCHEMA)
        return manifest, table


def _pieces(rows: list[dict], data: list[bytes]) -> list[PendingFragment]:
    return [PendingFragment(r["fragment_id"], r["dtype"], d, FragmentType(r["fragment_type"]), 0) for r, d in zip(rows, data)]


class SignFragments:
    """Signatures of fragments, on the GPU when this worker has one. The same class runs on
    CPU actors; the signatures are bit-identical either way (haagenti.signature)."""

    def __init__(self, config: SignatureConfig):
        import torch  # here, not at the top: the other steps run without it

        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reader = RangeReader()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        data = [self.reader.read(r["url"], r["byte_offset"], r["byte_len"]) for r in rows]
        return signature_table(_pieces(rows, data), self.config, self.device)


class MatchBands:
    """Reference pairs of this run's band rows of some whole buckets (one task of the match
    stage's join): the library's rows of those buckets are read here, from storage (only the
    index files and row groups that hold them), never sent from the driver."""

    def __init__(self, library_url: str, config: LibraryConfig, max_hamming: int):
        self.library_url, self.config, self.max_hamming = library_url, config, max_hamming

    def __call__(self, part: pa.Table) -> pa.Table:
        index = _INDEXES.get(self.library_url)
        if index is None:  # one per worker process, row-group ranges cached; footers are not kept:
            # a task reads few files, and kept footers grow with the library
            index = _INDEXES[self.library_url] = open_index(LibraryStore(self.library_url), self.config, keep_footers=False)
        return partner_pairs(part, index.propose, None, self.max_hamming)


_INDEXES: dict[str, IndexLayout] = {}


ASSIGNMENT_SCHEMA = pa.schema(
    [
        ("fragment_id", pa.string()),
        ("dtype", pa.string()),
        ("fragment_type", pa.string()),
        ("url", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_len", pa.int64()),
        ("ref_ids", pa.list_(pa.string())),
        ("ref_urls", pa.list_(pa.string())),  # null entry: the reference is in the library
        ("ref_offsets", pa.list_(pa.int64())),
        ("ref_lens", pa.list_(pa.int64())),
        ("ref_dtypes", pa.list_(pa.string())),
        ("ref_depths", pa.list_(pa.int64())),
    ]
)


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
        data = [self.reader.read(r["url"], r["byte_offset"], r["byte_len"]) for r in rows]
        out = []
        for r, p in zip(rows, _pieces(rows, data)):
            refs = []
            for rid, url, off, ln, rdt, depth in zip(r["ref_ids"], r["ref_urls"], r["ref_offsets"], r["ref_lens"], r["ref_dtypes"], r["ref_depths"]):
                refs.append((rid, library_raw[rid] if url is None else self.reader.read(url, off, ln), rdt, depth))
            out.append(encode_fragment(p, refs, self.level))
        return fragment_table(out)
