"""Casts between BF16, F16 and F32 in numpy, bit-identical to torch's CPU casts.

A cross-dtype delta stores the residual of a fragment against its reference *cast* to the
fragment's dtype, so the cast is part of the format: it must give the same bits at ingest and at
restore. These are torch's casts (what formats 2 and 3 used), written without torch so that a
restore does not pay its import (~1-2 s): IEEE round-to-nearest-even on every finite value, with
torch's NaN rules, which differ by path:

- to F32: BF16 is a shift; F16 keeps the payload and sets the quiet bit;
- to F16: the sign, the quiet bit and the top 10 payload bits (what x86's F16C does);
- to BF16: 0xFFFF from F32 (torch's vectorised kernel), 0x7FC0 from F16.

Every 16-bit pattern of each path is tested against torch (tests/test_codecs.py). Other float
pairs (F64, fp8) are rare in references and still go through torch.
"""
from __future__ import annotations

import numpy as np

NUMPY_CASTS = {"BF16", "F16", "F32"}


def cast(raw: bytes | memoryview, src: str, dst: str) -> bytes:
    """`raw` (little-endian `src` values) as `dst` values."""
    if src == dst:
        return bytes(raw)
    if src in NUMPY_CASTS and dst in NUMPY_CASTS:
        x = _to_f32(raw, src)
        if dst == "F32":
            return x.tobytes()
        out = _f32_to_f16(x) if dst == "F16" else _f32_to_bf16(x, nan=0x7FC0 if src == "F16" else 0xFFFF)
        return out.tobytes()
    return _torch_cast(raw, src, dst)


def _to_f32(raw: bytes | memoryview, src: str) -> np.ndarray:
    if src == "F32":
        return np.frombuffer(raw, np.float32)
    if src == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    h = np.frombuffer(raw, np.float16)
    x = h.astype(np.float32)
    nan = np.isnan(h)
    if nan.any():
        x.view(np.uint32)[nan] |= 0x00400000  # quiet bit
    return x


def _f32_to_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow to Inf is the IEEE result
        out = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        u = x.view(np.uint32)[nan]
        out[nan] = ((u >> 16) & 0x8000 | 0x7E00 | (u >> 13) & 0x3FF).astype(np.uint16)
    return out


def _f32_to_bf16(x: np.ndarray, nan: int) -> np.ndarray:
    u = x.view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u  # round to nearest even: a carry out of the mantissa bumps the exponent (to Inf at the top)
    r >>= 16
    out = r.astype(np.uint16)
    isnan = np.isnan(x)
    if isnan.any():
        out[isnan] = nan
    return out


def _torch_cast(raw: bytes | memoryview, src: str, dst: str) -> bytes:
    import torch

    from haagenti.formats.dtypes import dtype as lookup_dtype

    s, d = lookup_dtype(src), lookup_dtype(dst)
    t = torch.frombuffer(bytearray(raw), dtype=s.torch_dtype) if len(raw) else torch.empty(0, dtype=s.torch_dtype)
    return t.to(d.torch_dtype).view(torch.uint8).numpy().tobytes()
