"""Lossless deltas of a fragment against a reference fragment.

Two residuals are tried and the smaller kept: XOR of the bit patterns (a fine-tune keeps
sign, exponent and high mantissa bits, so the XOR is mostly zero bits, as in ZipLLM/BitX)
and the wrapping integer difference of the words (smaller when values move by a few ulps
across a carry). Both are exact, so restore is bit-exact whatever the reference is.
"""
from __future__ import annotations

import numpy as np

from haagenti.codecs.core import PLANES, chain_for, encode_smallest
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import Encoding

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def cast_reference(ref: bytes, ref_dtype: str, target_dtype: str) -> bytes:
    """The reference's values in the target dtype (e.g. a bf16 base cast to fp16), so a re-export
    is stored as the small residual of the cast. Casts are IEEE round-to-nearest: deterministic."""
    if ref_dtype == target_dtype:
        return ref
    import torch  # only cross-dtype deltas need it (numpy has no bfloat16)

    src, dst = lookup_dtype(ref_dtype), lookup_dtype(target_dtype)
    t = torch.frombuffer(bytearray(ref), dtype=src.torch_dtype) if ref else torch.empty(0, dtype=src.torch_dtype)
    return t.to(dst.torch_dtype).view(torch.uint8).numpy().tobytes()


def _words(data: bytes, itemsize: int) -> np.ndarray:
    return np.frombuffer(data, dtype=_UINT[itemsize])


def residual(encoding: Encoding, raw: bytes, ref: bytes, itemsize: int) -> bytes:
    a, b = _words(raw, itemsize), _words(ref, itemsize)
    if encoding is Encoding.DELTA_XOR:
        return np.bitwise_xor(a, b).tobytes()
    return np.subtract(a, b).tobytes()  # unsigned arithmetic wraps: exact and invertible


def apply_delta(encoding: Encoding, res: bytes, ref: bytes, itemsize: int) -> bytes:
    a, b = _words(res, itemsize), _words(ref, itemsize)
    if encoding is Encoding.DELTA_XOR:
        return np.bitwise_xor(a, b).tobytes()
    return np.add(a, b).tobytes()


# Residuals longer than this many words are compared on their first PROBE_WORDS words only,
# and only the smaller is encoded whole: full encodes of both residuals were a third of the zstd
# time of an ingest with similarity (measurement in docs/decisions.md).
PROBE_WORDS = 16384


def best_delta(raw: bytes, ref: bytes, dtype_name: str, level: int | str = PLANES) -> tuple[Encoding, str, bytes]:
    """The smaller of the XOR and difference residuals, encoded. `ref` is already cast. Long
    residuals are compared by the encoded size of their first PROBE_WORDS words (both through
    the same chain), short ones by their whole encoded size."""
    d = lookup_dtype(dtype_name)
    chain = chain_for(d.itemsize, d.is_float, level)
    residuals = {enc: residual(enc, raw, ref, d.itemsize) for enc in (Encoding.DELTA_XOR, Encoding.DELTA_SUB)}
    probe = PROBE_WORDS * d.itemsize
    if len(raw) >= 4 * probe:
        pick = min(residuals, key=lambda enc: len(chain.encode(residuals[enc][:probe])))
        residuals = {pick: residuals[pick]}
    encoded = [(enc, *encode_smallest(res, chain)) for enc, res in residuals.items()]
    return min(encoded, key=lambda e: len(e[2]))
