"""Lossless deltas of a fragment against a reference fragment.

Two residuals are tried and the smaller kept: XOR of the bit patterns (a fine-tune keeps
sign, exponent and high mantissa bits, so the XOR is mostly zero bits, as in ZipLLM/BitX)
and the wrapping integer difference of the words (smaller when values move by a few ulps
across a carry). Both are exact, so restore is bit-exact whatever the reference is.
"""
from __future__ import annotations

import numpy as np
import torch

from haagenti.codecs.core import PLANES, chain_for, encode_smallest
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import Encoding

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def cast_reference(ref: bytes, ref_dtype: str, target_dtype: str) -> bytes:
    """The reference's values in the target dtype (e.g. a bf16 base cast to fp16), so a re-export
    is stored as the small residual of the cast. Casts are IEEE round-to-nearest: deterministic."""
    if ref_dtype == target_dtype:
        return ref
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


def best_delta(raw: bytes, ref: bytes, dtype_name: str, level: int | str = PLANES) -> tuple[Encoding, str, bytes]:
    """The smaller of the XOR and difference residuals, encoded. `ref` is already cast."""
    d = lookup_dtype(dtype_name)
    chain = chain_for(d.itemsize, d.is_float, level)
    best: tuple[Encoding, str, bytes] | None = None
    for enc in (Encoding.DELTA_XOR, Encoding.DELTA_SUB):
        spec, blob = encode_smallest(residual(enc, raw, ref, d.itemsize), chain)
        if best is None or len(blob) < len(best[2]):
            best = (enc, spec, blob)
    assert best is not None
    return best
