"""Turning cut fragments into stored rows (exact / delta / plain / lossy), and back.

Both directions are plain functions over bytes and tables so the single-process library and
the Ray pipeline run the very same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from haagenti.codecs import apply_delta, cast_reference, codec_chain, smallest_encoding
from haagenti.errors import FragmentError
from haagenti.formats.dtypes import castable
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import Encoding, FragmentType
from haagenti.hashing import content_hash
from haagenti.lru import SizedLru
from haagenti.signature import FragmentSignature


@dataclass
class PendingFragment:
    """A piece of a tensor, cut and hashed, not yet stored."""

    fragment_id: str
    dtype: str
    data: bytes
    fragment_type: FragmentType
    elem_offset: int

    @property
    def n_elements(self) -> int:
        return len(self.data) // lookup_dtype(self.dtype).itemsize


class RawCache(SizedLru[bytes]):
    """Decoded fragment bytes by fragment id, bounded by their total size."""


def fragment_rows(table: pa.Table) -> list[dict]:
    """Rows of a fragments table as dicts, each blob a memoryview into Arrow's buffer: turning
    blobs into Python bytes copied every stored byte once more on each restore."""
    rows = table.drop_columns(["blob"]).to_pylist()
    blobs: list[memoryview] = []
    for chunk in table["blob"].chunks:  # large_binary: int64 offsets, then the bytes
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset : chunk.offset + len(chunk) + 1].tolist()
        data = memoryview(chunk.buffers()[2] or b"")
        blobs.extend(data[a:b] for a, b in zip(offsets, offsets[1:]))
    for row, blob in zip(rows, blobs):
        row["blob"] = blob
    return rows


def decode_row(row: dict, ref_raw: bytes | None, ref_dtype: str | None) -> bytes:
    """Raw bytes of one stored fragment row, verified against its id."""
    if row["encoding"] != Encoding.PLAIN.value and (ref_raw is None or ref_dtype is None):
        raise FragmentError(f"fragment {row['fragment_id']}: reference {row['ref_id']} is missing")
    try:
        raw = codec_chain(row["codec"]).decode(row["blob"])
        enc = Encoding(row["encoding"])
        if enc is not Encoding.PLAIN:
            ref = cast_reference(ref_raw, ref_dtype, row["dtype"])
            raw = apply_delta(enc, raw, ref, lookup_dtype(row["dtype"]).itemsize)
    except FragmentError:
        raise
    except Exception as e:  # stored bytes and fields are untrusted: any decoder failure is damage (ZstdError, ...)
        raise FragmentError(f"fragment {row['fragment_id']} is damaged: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if content_hash(raw) != row["fragment_id"]:
        raise FragmentError(f"fragment {row['fragment_id']} failed verification: content hash mismatch")
    return raw


def decode_rows(rows: list[dict], fetch_refs: Callable[[set[str]], list[dict]], cache: RawCache | None = None) -> dict[str, bytes]:
    """Decode stored rows; delta references not among `rows` are fetched with `fetch_refs`.
    References are always plain (one hop), so this needs at most one extra read."""
    by_id = {r["fragment_id"]: r for r in rows}
    missing_refs = {r["ref_id"] for r in rows if r["ref_id"] and r["ref_id"] not in by_id and not (cache and r["ref_id"] in cache)}
    ref_rows = {r["fragment_id"]: r for r in fetch_refs(missing_refs)} if missing_refs else {}
    absent = missing_refs - ref_rows.keys()
    if absent:
        raise FragmentError(f"delta reference fragment(s) missing from the library: {sorted(absent)[:3]}")
    out: dict[str, bytes] = {}

    def raw_of(fid: str) -> bytes:
        if fid in out:
            return out[fid]
        cached = cache.get(fid) if cache else None
        if cached is not None:
            return cached
        row = by_id.get(fid) or ref_rows[fid]
        ref_raw = raw_of(row["ref_id"]) if row["ref_id"] else None
        raw = decode_row(row, ref_raw, row["ref_dtype"])
        if cache is not None:
            cache.put(fid, raw)
        return raw

    for fid in by_id:
        out[fid] = raw_of(fid)
    return out


def encode_fragment(p: PendingFragment, refs: list[tuple[str, bytes, str]], level: int | str, quality: str = "exact") -> dict:
    """The fragments-table row for `p`: plain, or a delta against the reference (id, raw bytes,
    dtype) whose encoded residual is smallest; the smallest of all wins. References that cannot
    stand for `p`'s dtype (a float for quantized blocks) are left out."""
    refs = [r for r in refs if castable(r[2], p.dtype)]
    casts = [cast_reference(ref_raw, cand_dtype, p.dtype) for _, ref_raw, cand_dtype in refs]
    enc, i, spec, blob = smallest_encoding(p.data, casts, p.dtype, level)
    ref_id, ref_dtype = (refs[i][0], refs[i][2]) if i is not None else (None, None)
    return {
        "fragment_id": p.fragment_id,
        "dtype": p.dtype,
        "n_elements": p.n_elements,
        "raw_size": len(p.data),
        "stored_size": len(blob),
        "encoding": enc.value,
        "codec": spec,
        "ref_id": ref_id,
        "ref_dtype": ref_dtype,
        "fragment_type": p.fragment_type.value,
        "quality": quality,
        "blob": blob,
    }


def signature_row(p: PendingFragment, s: FragmentSignature) -> dict:
    return {
        "fragment_id": p.fragment_id,
        "dtype": p.dtype,
        "n_elements": p.n_elements,
        "bits": s.bits,
        "scale": s.scale,
        "mean": s.mean,
        "std": s.std,
        "min": s.min,
        "max": s.max,
        "nonfinite": s.nonfinite,
        "histogram": list(s.histogram),
    }


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
