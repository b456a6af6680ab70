"""Turning cut fragments into stored rows (exact / delta / plain / lossy), and back.

Both directions are plain functions over bytes and tables so the single-process library and
the Ray pipeline run the very same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from haagenti.codecs import apply_delta, cast_reference, chain_for, codec_chain, encode_smallest, smallest_encoding
from haagenti.codecs.predict import apply_prediction, predictable, prediction_residual, residual_bytes, residual_fits
from haagenti.config import MAX_CHAIN_DEPTH, MAX_RAW_FRAGMENT
from haagenti.errors import FragmentError
from haagenti.formats.dtypes import castable
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import Encoding, FragmentType
from haagenti.hashing import content_hash
from haagenti.lru import SizedLru
from haagenti.parallel import Workers
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
    if not isinstance(row["raw_size"], int) or not 0 <= row["raw_size"] <= MAX_RAW_FRAGMENT:
        raise FragmentError(f"fragment {row['fragment_id']} is damaged: its record claims {row['raw_size']} bytes")
    try:
        enc = Encoding(row["encoding"])
        predicted = enc is Encoding.PREDICTED
        raw = codec_chain(row["codec"]).decode(row["blob"], residual_bytes(row["dtype"], row["raw_size"]) if predicted else row["raw_size"])
        if predicted:
            if not predictable(row["dtype"], row["raw_size"], ref_dtype, len(ref_raw)) or not residual_fits(row["dtype"], row["raw_size"], len(raw)):
                raise FragmentError(f"fragment {row['fragment_id']} is damaged: {len(raw)} bytes of {row['dtype']} cannot be predicted from a {ref_dtype} reference of {len(ref_raw)} bytes")
            raw = apply_prediction(raw, row["dtype"], ref_raw, ref_dtype)
        elif enc is not Encoding.PLAIN:
            ref = cast_reference(ref_raw, ref_dtype, row["dtype"])
            raw = apply_delta(enc, raw, ref, lookup_dtype(row["dtype"]).itemsize)
    except FragmentError:
        raise
    except Exception as e:  # stored bytes and fields are untrusted: any decoder failure is damage (ZstdError, ...)
        raise FragmentError(f"fragment {row['fragment_id']} is damaged: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if content_hash(raw) != row["fragment_id"]:
        raise FragmentError(f"fragment {row['fragment_id']} failed verification: content hash mismatch")
    return raw


def decode_rows(rows: list[dict], fetch_refs: Callable[[set[str]], list[dict]], cache: RawCache | None = None,
                workers: Workers | None = None, place: Callable[[str, bytes], bool] | None = None) -> dict[str, bytes]:
    """Decode stored rows; delta references neither among `rows` nor in `cache` are fetched
    with `fetch_refs`, a hop at a time: a reference may be a delta itself, at most
    MAX_CHAIN_DEPTH hops from a plain fragment. Decoding runs in waves over `workers`, each wave
    the rows whose references are decoded (plain rows first). A chain that loops or runs deeper
    is refused after MAX_CHAIN_DEPTH fetches and waves: crafted rows cost bounded work.
    `place(id, raw)` is called on each of `rows` in the worker that decoded it; what it took
    (True) is left out of the answer and let go once no delta needs it (a restore writes it
    where it belongs: nothing of a batch is held until the batch is done)."""
    by_id = {r["fragment_id"]: r for r in rows}
    every = dict(by_id)
    out: dict[str, bytes] = {}

    def held(ids: set[str]) -> set[str]:
        """Take what the cache holds now (decoding may evict it); the rest."""
        for f in ids:
            raw = cache.get(f) if cache else None
            if raw is not None:
                out[f] = raw
        return ids - out.keys()

    wanted = held({r["ref_id"] for r in rows if r["ref_id"]} - every.keys())
    for hop in range(MAX_CHAIN_DEPTH + 1):
        if not wanted:
            break
        if hop == MAX_CHAIN_DEPTH:
            raise FragmentError(f"fragment {sorted(wanted)[0]}: a reference chain is deeper than {MAX_CHAIN_DEPTH} hops")
        fetched = {r["fragment_id"]: r for r in fetch_refs(wanted)}
        absent = wanted - fetched.keys()
        if absent:
            raise FragmentError(f"delta reference fragment(s) missing from the library: {sorted(absent)[:3]}")
        every.update(fetched)
        wanted = held({r["ref_id"] for r in fetched.values() if r["ref_id"]} - every.keys())
    held(every.keys() - out.keys())
    todo = [row for fid, row in every.items() if fid not in out]
    needed = {r["ref_id"] for r in todo if r["ref_id"]}
    placed: set[str] = set()

    def one(r: dict) -> bytes | None:
        raw = decode_row(r, out[r["ref_id"]] if r["ref_id"] else None, r["ref_dtype"])
        fid = r["fragment_id"]
        if place is not None and fid in by_id and place(fid, raw):
            placed.add(fid)
            return raw if fid in needed else None
        return raw

    each = workers.each if workers is not None else lambda fn, xs: [fn(x) for x in xs]
    for wave in range(MAX_CHAIN_DEPTH + 2):
        if not todo:
            break
        ready = [r for r in todo if not r["ref_id"] or r["ref_id"] in out]
        if not ready or wave > MAX_CHAIN_DEPTH:
            raise FragmentError(f"fragment {min(r['fragment_id'] for r in todo)}: its reference chain loops or is deeper than {MAX_CHAIN_DEPTH} hops")
        for row, raw in zip(ready, each(one, ready)):
            if raw is None:
                continue
            out[row["fragment_id"]] = raw
            if cache is not None:
                cache.put(row["fragment_id"], raw)
        done = {r["fragment_id"] for r in ready}
        todo = [r for r in todo if r["fragment_id"] not in done]
    return {fid: out[fid] for fid in by_id if fid not in placed}


def encode_fragment(p: PendingFragment, refs: list[tuple[str, bytes, str, int]], level: int | str, quality: str = "exact") -> dict:
    """The fragments-table row for `p`: plain, a delta against the reference (id, raw bytes,
    dtype, chain depth) whose encoded residual is smallest, or quantized blocks predicted from
    a float reference of as many values, or int8/uint8 codes predicted likewise
    (haagenti.codecs.predict); the smallest of all wins,
    plain on ties. Other references (a float for blocks it does not predict) are left out."""
    deltas = [r for r in refs if castable(r[2], p.dtype)]
    casts = [cast_reference(ref_raw, cand_dtype, p.dtype) for _, ref_raw, cand_dtype, _ in deltas]
    enc, i, spec, blob = smallest_encoding(p.data, casts, p.dtype, level)
    chosen = deltas[i] if i is not None else None
    for ref in refs:
        if predictable(p.dtype, len(p.data), ref[2], len(ref[1])):
            pspec, pblob = encode_smallest(prediction_residual(p.data, p.dtype, ref[1], ref[2]), chain_for(p.dtype, level))
            if len(pblob) < len(blob):
                enc, spec, blob, chosen = Encoding.PREDICTED, pspec, pblob, ref
    ref_id, ref_dtype = (chosen[0], chosen[2]) if chosen is not None else (None, None)
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
        "depth": chosen[3] + 1 if chosen is not None else 0,
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
    """Rows as a table; large_binary columns (the blobs) wrap each row's bytes without a copy:
    from_pylist copied every blob into one fresh buffer, 0.1 s per 64 MB batch (docs/decisions/0037-every-core.md)."""
    return pa.Table.from_arrays([_blobs(rows, f.name) if f.type == pa.large_binary() else pa.array([r[f.name] for r in rows], f.type) for f in schema], schema=schema)


def _blobs(rows: list[dict], name: str) -> pa.ChunkedArray:
    chunks = [pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, len(r[name])], np.int64)), pa.py_buffer(r[name])]) for r in rows]
    return pa.chunked_array(chunks, pa.large_binary())
