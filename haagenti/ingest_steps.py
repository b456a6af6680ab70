"""The ingest's sign, match and encode steps over Arrow batches, for any executor
(haagenti.executors): a step knows nothing of how it is scheduled. A fragment's bytes ride in
the batch's `data` column where the executor shares the driver's memory; where it is null
(another process) they are read by byte range where they are needed, so model bytes never
travel between processes.
"""
from __future__ import annotations

import pyarrow as pa

from haagenti.checkpoints import reached
from haagenti.config import LibraryConfig
from haagenti.core import LibraryCore
from haagenti.encode import PendingFragment, encode_fragment, rows_table, signature_row
from haagenti.formats.dtypes import can_dequantize, signable
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.source import RangeReader
from haagenti.fragment import FragmentType
from haagenti.index import IndexLayout, open_index
from haagenti.matching import partner_pairs
from haagenti.parallel import Workers
from haagenti.signature import SignatureConfig, compute_signatures
from haagenti.store import SCHEMAS, LibraryStore

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
