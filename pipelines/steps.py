"""Pipeline steps: each a small function or class with one job, knowing nothing of how it is
scheduled. Rows are plain dicts or Arrow tables; model bytes never travel between steps, only
file URLs and byte ranges, read where they are needed."""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.config import LibraryConfig
from haagenti.encode import PendingFragment, encode_fragment, signature_row
from haagenti.errors import FormatError
from haagenti.formats import open_model
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import FragmentId, FragmentType
from haagenti.fsio import filesystem_for
from haagenti.hashing import hasher, model_hash
from haagenti.library import FragmentLibrary, safetensors_hasher
from haagenti.signature import SignatureConfig, compute_signatures
from haagenti.store import SCHEMAS
from pipelines.groups import group_starts, rank_in_runs, sort_rows

OCCURRENCE_SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("rank", pa.int64()),
        ("file_index", pa.int32()),
        ("tensor_index", pa.int32()),
        ("tensor_name", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("fragment_type", pa.string()),
        ("fragment_seq", pa.int32()),
        ("fragment_id", pa.string()),
        ("elem_offset", pa.int64()),
        ("elem_count", pa.int64()),
        ("url", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_len", pa.int64()),
    ]
)


class ByteRanges:
    """Reads byte ranges of model files, keeping a few handles open (cheap on object stores)."""

    def __init__(self, max_open: int = 8):
        self.handles: OrderedDict[str, object] = OrderedDict()
        self.max_open = max_open

    def read(self, url: str, offset: int, length: int) -> bytes:
        fh = self.handles.get(url)
        if fh is None:
            fs, path = filesystem_for(url)
            fh = self.handles[url] = fs.open(path, "rb")
            if len(self.handles) > self.max_open:
                self.handles.popitem(last=False)[1].close()  # type: ignore[attr-defined]
        self.handles.move_to_end(url)
        fh.seek(offset)  # type: ignore[attr-defined]
        data = fh.read(length)  # type: ignore[attr-defined]
        if len(data) != length:
            raise FormatError(f"{url}: short read at {offset} (file changed during the run?)")
        return data


def scan_model(row: dict) -> dict:
    """Content hash and file records of one catalog entry (reads its files once, streaming)."""
    src = open_model(list(row["files"]))
    records = []
    for f in src.files:
        digest = f.blake3
        if not digest:
            h = hasher()
            fs, path = filesystem_for(f.url)
            with fs.open(path, "rb", block_size=8 << 20) as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
            digest = h.hexdigest()
        records.append({"name": f.name, "format": f.format, "size": f.size, "blake3": digest, "header": f.header, "url": f.url})
    if any(r["format"] == "torch" for r in records):
        raise FormatError(f"model {row['model_id']!r}: the pipeline reads safetensors by byte range; ingest .pt checkpoints with `haagenti ingest`")
    content_hash = model_hash([r["blake3"] for r in records])
    return dict(row, content_hash=content_hash, raw_bytes=src.raw_bytes, file_records=records)


class FragmentModel:
    """One scanned model -> one row per fragment occurrence (id, position, byte range)."""

    def __init__(self, config: LibraryConfig):
        self.config = config

    def __call__(self, row: dict) -> list[dict]:
        with open_model([r["url"] for r in row["file_records"]]) as src:
            return self._occurrences(row, src)

    def _occurrences(self, row: dict, src) -> list[dict]:
        """Also re-hashes each file as cut: a file's layout (its fragment ids) stands in for its
        bytes on restore, so they must be the bytes whose BLAKE3 the scan recorded."""
        files = {i: safetensors_hasher(f.header) for i, f in enumerate(src.files) if f.format == "safetensors"}
        out = []
        for ti, t in enumerate(src.tensors):
            base = {
                "model_id": row["model_id"], "rank": row["rank"], "file_index": t.file_index, "tensor_index": ti,
                "tensor_name": t.name, "dtype": t.dtype.name, "shape": list(t.shape),
                "fragment_type": FragmentType.infer(t.name).value, "url": src.files[t.file_index].url,
            }
            step = self.config.fragment_elements
            if t.nbytes == 0:
                out.append(dict(base, fragment_seq=-1, fragment_id=None, elem_offset=0, elem_count=0, byte_offset=t.data_begin, byte_len=0))
                continue
            for seq, chunk in enumerate(src.iter_chunks(t, step * t.dtype.itemsize)):
                if t.file_index in files:
                    files[t.file_index].update(chunk)
                out.append(dict(
                    base, fragment_seq=seq, fragment_id=FragmentId.of(chunk), elem_offset=seq * step,
                    elem_count=len(chunk) // t.dtype.itemsize, byte_offset=t.data_begin + seq * step * t.dtype.itemsize, byte_len=len(chunk),
                ))
        for i, h in files.items():
            rec = row["file_records"][i]
            if h.hexdigest() != rec["blake3"]:
                raise FormatError(f"{rec['url']}: changed between the scan and fragmenting (its BLAKE3 differs); run again")
        return out


class SignFragments:
    """Signatures of fragments, on the GPU when this worker has one. The same class runs on
    CPU actors; the signatures are bit-identical either way (haagenti.signature)."""

    def __init__(self, config: SignatureConfig):
        import torch  # here, not at the top: the other steps run without it

        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reader = ByteRanges()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        data = [self.reader.read(r["url"], r["byte_offset"], r["byte_len"]) for r in rows]
        sigs = compute_signatures([(d, r["dtype"]) for d, r in zip(data, rows)], self.config, self.device)
        out = [signature_row(PendingFragment(r["fragment_id"], r["dtype"], d, FragmentType(r["fragment_type"]), 0), s) for r, d, s in zip(rows, data, sigs)]
        return pa.Table.from_pylist(out, schema=SCHEMAS["signatures"])


def shared_buckets(bands: pa.Table, keys: list[str]) -> pa.Table:
    """Band rows of the buckets that can yield a pair: two or more fragments, one of them new.
    Most buckets hold one fragment; dropping them in one Arrow aggregation keeps the pairing
    work proportional to the real matches."""
    agg = bands.group_by(keys).aggregate([("fragment_id", "count"), ("is_new", "any")])
    keep = agg.filter(pc.and_(pc.greater(agg["fragment_id_count"], 1), agg["is_new_any"])).select(keys)
    return bands.join(keep, keys, join_type="inner")


PAIR_SCHEMA = pa.schema([("fragment_id", pa.string()), ("candidate_id", pa.string()), ("hamming", pa.int32())])
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int32)
_VECTOR_BUCKET = 64  # buckets up to this size are paired in one vectorised pass; larger ones row by row


def band_pairs(part: pa.Table, max_hamming: int, max_partners: int = 32) -> pa.Table:
    """All (new fragment, candidate) pairs inside the LSH buckets of `part` (whole buckets, any
    number), with their Hamming distance. Within a bucket each new fragment is paired with the
    first `max_partners` other fragments of its length in id order, so a bucket of identical
    signatures (e.g. all-zero fragments) stays linear; the answer is deterministic. Pairs of all
    small buckets are built and measured at once in numpy (one Python call per bucket cost more
    than the pairing itself)."""
    keys = ["band", "band_hash"]
    t = sort_rows(part, keys + ["fragment_id"])
    if t.num_rows == 0:
        return PAIR_SCHEMA.empty_table()
    ids = t["fragment_id"].combine_chunks()
    n = t["n_elements"].to_numpy()
    is_new = t["is_new"].to_numpy(zero_copy_only=False)
    packed = np.frombuffer(b"".join(t["bits"].to_pylist()), np.uint8).reshape(t.num_rows, -1)
    starts = group_starts(t, keys)
    sizes = np.diff(starts)
    row_start = np.repeat(starts[:-1], sizes)
    row_size = np.repeat(sizes, sizes)

    # Small buckets: every (i, j) of a bucket, i new, then filtered and capped per i.
    rows_i = np.flatnonzero(is_new & (row_size > 1) & (row_size <= _VECTOR_BUCKET))
    reps = row_size[rows_i]
    first = np.cumsum(reps) - reps
    i = np.repeat(rows_i, reps)
    j = np.repeat(row_start[rows_i], reps) + np.arange(int(reps.sum())) - np.repeat(first, reps)
    keep = (i != j) & (n[i] == n[j])
    i, j = i[keep], j[keep]
    rank = rank_in_runs(i)
    i, j = i[rank < max_partners], j[rank < max_partners]

    # Large buckets: partners of each new row directly (at most max_partners each).
    big_i, big_j = [], []
    for r in np.flatnonzero(is_new & (row_size > _VECTOR_BUCKET)).tolist():
        span = np.arange(row_start[r], row_start[r] + row_size[r])
        partners = span[(n[span] == n[r]) & (span != r)][:max_partners]
        big_i.append(np.full(len(partners), r))
        big_j.append(partners)
    i = np.concatenate([i, *big_i]).astype(np.int64)
    j = np.concatenate([j, *big_j]).astype(np.int64)

    d = _POPCOUNT[packed[i] ^ packed[j]].sum(axis=1)
    close = d <= max_hamming
    return pa.table(
        {"fragment_id": ids.take(pa.array(i[close])), "candidate_id": ids.take(pa.array(j[close])), "hamming": pa.array(d[close], pa.int32())},
        schema=PAIR_SCHEMA,
    )


def choose_references(pairs: pa.Table, order: dict[str, int], k: int) -> dict[str, list[str]]:
    """Delta reference candidates per new fragment, keeping chains one hop deep in parallel:
    a new fragment is an *anchor* (stored plain, usable as a reference) when none of its
    candidates is in the library or earlier in catalog order; others may reference library
    fragments and anchors only, the `k` nearest (Hamming distance, then id). `order` maps each
    new fragment to its first position. Runs on Arrow and numpy columns: a catalog has tens of
    pairs per new fragment, and a Python tuple per pair was most of the driver's memory."""
    if pairs.num_rows == 0:
        return {}
    keys = pa.array(list(order), pa.string())
    pos = np.fromiter(order.values(), np.int64, len(order))
    fi = pc.index_in(pairs["fragment_id"], value_set=keys).to_numpy(zero_copy_only=False).astype(np.int64)
    ci = pc.index_in(pairs["candidate_id"], value_set=keys).fill_null(-1).to_numpy().astype(np.int64)
    cpos = np.where(ci >= 0, pos[np.maximum(ci, 0)], -1)  # library fragments come before all
    has_earlier = np.zeros(len(pos), bool)
    has_earlier[fi[cpos < pos[fi]]] = True
    usable = (ci < 0) | ~has_earlier[np.maximum(ci, 0)]
    ranked = pa.table({"f": fi, "d": pairs["hamming"], "c": pairs["candidate_id"]}).filter(pa.array(usable))
    ranked = ranked.sort_by([("f", "ascending"), ("d", "ascending"), ("c", "ascending")])
    f = ranked["f"].to_numpy()
    c = ranked["c"].combine_chunks().dictionary_encode()
    cidx = c.indices.to_numpy()
    fresh = np.r_[True, (f[1:] != f[:-1]) | (cidx[1:] != cidx[:-1])]  # a pair found in several bands counts once
    f, cidx = f[fresh], cidx[fresh]
    rank = rank_in_runs(f)
    names, cands = keys.to_pylist(), c.dictionary.to_pylist()
    out: dict[str, list[str]] = {names[i]: [] for i in np.unique(fi).tolist()}
    for i, j in zip(f[rank < k].tolist(), cidx[rank < k].tolist()):
        out[names[i]].append(cands[j])
    return out


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
    ]
)


class EncodeFragments:
    """Encode new fragments (plain or delta) into fragments-table rows, in catalog order (a
    restore walks a model in that order, so it reads neighbouring row groups)."""

    def __init__(self, library_url: str, config: LibraryConfig):
        self.library = FragmentLibrary.open(library_url, config, create=False)
        self.level = config.zstd_level
        self.reader = ByteRanges()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.chaos import maybe_die

        maybe_die("encode")
        rows = batch.to_pylist()
        from_library = {i for r in rows for i, u in zip(r["ref_ids"], r["ref_urls"]) if u is None}
        library_raw = self.library.fetch_raw(from_library) if from_library else {}
        out = []
        for r in rows:
            data = self.reader.read(r["url"], r["byte_offset"], r["byte_len"])
            refs = []
            for rid, url, off, ln, rdt in zip(r["ref_ids"], r["ref_urls"], r["ref_offsets"], r["ref_lens"], r["ref_dtypes"]):
                raw = library_raw[rid] if url is None else self.reader.read(url, off, ln)
                refs.append((rid, raw, rdt))
            p = PendingFragment(r["fragment_id"], r["dtype"], data, FragmentType(r["fragment_type"]), 0)
            out.append(encode_fragment(p, refs, self.level))
        return pa.Table.from_pylist(out, schema=SCHEMAS["fragments"])


def manifest_rows(occurrences: pa.Table) -> pa.Table:
    """The manifests-table rows of the run's models, straight from their occurrences."""
    t = occurrences
    n = t.num_rows
    cols = {c: t[c] for c in ("model_id", "file_index", "tensor_index", "tensor_name", "dtype", "shape", "fragment_seq", "fragment_id", "elem_offset", "elem_count", "fragment_type")}
    cols["source_fragment_id"] = t["fragment_id"]
    cols["max_abs_error"] = pa.array([0.0] * n)
    cols["rel_l2_error"] = pa.array([0.0] * n)
    return pa.table(cols).cast(SCHEMAS["manifests"])


def dtype_size(name: str) -> int:
    return lookup_dtype(name).itemsize


def hamming_limit(config: SignatureConfig, cosine: float) -> int:
    """Hamming distance at which SimHash's expected collision rate matches `cosine`."""
    return int(config.bits * math.acos(max(min(cosine, 1.0), -1.0)) / math.pi)
