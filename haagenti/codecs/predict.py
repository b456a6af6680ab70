"""Quantized blocks predicted from their float source.

A GGUF block of a legacy type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) is a deterministic function of
the 32 values it was quantized from: llama.cpp's reference quantizer (and gguf's numpy port of
it) takes the block's scale (and min) from the values' extremes, rounds them to fp16 for
storage, and sets each code to the nearest integer of the value under the unrounded scale.
With the float source stored, the blocks are stored as a residual against that computation:
each scale or min field XOR the fp16 field the source gives, each code minus the code the source
gives (modulo the code's bits), in the blocks' own layout, so the same block planes code it and
a source that is the quantizer's input leaves planes of zeros. A block whose stored scale is not
the source's (another source, another quantizer) predicts its codes with the stored scale,
nearest integer; whatever differs is in the residual, so any blocks round-trip exactly against
any values. Measured in docs/decisions/0281-quantized-prediction.md.

Determinism is the format: every step is an IEEE float32 operation numpy performs the same on
any machine (no fused multiply-add); a NaN field's fp16 bits are 0x7E00 and a NaN code is 0,
so no NaN payload reaches the residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from haagenti.codecs.cast import cast

BLOCK = 32  # values per block of every legacy type


@dataclass(frozen=True)
class Legacy:
    """A legacy block type: `fields` fp16 scale fields (d, or d and min), `bits` per code,
    the quantizer's divisor of the range and its rounding offset (ggml-quants.c)."""

    size: int  # bytes per block
    fields: int  # fp16 fields at the start of a block: 1 (d) or 2 (d, min)
    bits: int  # code bits: 8, 5 or 4
    divisor: float  # d = max / divisor (symmetric types, signed max) or (max - min) / divisor
    offset: float  # code = trunc(x / d + offset): 8.5 (Q4_0), 16.5 (Q5_0), 0.5 with a min

    @property
    def signed(self) -> bool:
        return self.bits == 8


LEGACY = {
    "Q8_0": Legacy(34, 1, 8, 127.0, 0.0),
    "Q4_0": Legacy(18, 1, 4, -8.0, 8.5),
    "Q4_1": Legacy(20, 2, 4, 15.0, 0.5),
    "Q5_0": Legacy(22, 1, 5, -16.0, 16.5),
    "Q5_1": Legacy(24, 2, 5, 31.0, 0.5),
}


def predictable(dtype_name: str, raw_bytes: int, ref_dtype: str, ref_bytes: int) -> bool:
    """Whether `raw_bytes` of blocks of `dtype_name` can be predicted from `ref_bytes` of
    `ref_dtype`: whole blocks of a legacy type, a float reference of as many values."""
    from haagenti.formats.dtypes import BY_NAME

    t, r = LEGACY.get(dtype_name), BY_NAME.get(ref_dtype)
    return t is not None and r is not None and r.is_float and raw_bytes % t.size == 0 and ref_bytes == raw_bytes // t.size * BLOCK * r.itemsize


def _codes(blocks: np.ndarray, t: Legacy) -> np.ndarray:
    """(blocks, 32) codes as unsigned integers of `t.bits` bits, in value order."""
    at = 2 * t.fields
    if t.bits == 8:
        return blocks[:, at:].copy()
    if t.bits == 5:
        high = np.unpackbits(blocks[:, at : at + 4], axis=1, bitorder="little")
        at += 4
    qs = blocks[:, at:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    return codes | (high << 4) if t.bits == 5 else codes


def _put_codes(blocks: np.ndarray, codes: np.ndarray, t: Legacy) -> None:
    """Write (blocks, 32) codes into `blocks` in the type's packing (inverse of _codes)."""
    at = 2 * t.fields
    if t.bits == 8:
        blocks[:, at:] = codes
        return
    if t.bits == 5:
        blocks[:, at : at + 4] = np.packbits((codes >> 4) & 1, axis=1, bitorder="little")
        at += 4
    blocks[:, at:] = (codes[:, :16] & 0x0F) | ((codes[:, 16:] & 0x0F) << 4)


def _f16_bits(x: np.ndarray) -> np.ndarray:
    """fp16 bits of float32 fields, every NaN as 0x7E00 (a NaN's payload is the machine's)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(np.isnan(x), np.uint16(0x7E00), x.astype(np.float16).view(np.uint16))


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _source_fields(x: np.ndarray, t: Legacy) -> list[np.ndarray]:
    """The quantizer's unrounded (float32) fields of each block: [d] or [d, min]."""
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf: NaN, as in the quantizer
        if t.fields == 2:
            lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
            return [(hi - lo) / np.float32(t.divisor), lo]
        if t.signed:
            return [np.abs(x).max(axis=1, keepdims=True) / np.float32(t.divisor)]
        at = np.abs(x).argmax(axis=1)[:, None]
        return [np.take_along_axis(x, at, axis=1) / np.float32(t.divisor)]


def _predicted_codes(x: np.ndarray, fields: list[np.ndarray], t: Legacy) -> np.ndarray:
    """The codes of values `x` under the fields (float32), as the reference quantizer sets them."""
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = (x - fields[1] if t.fields == 2 else x) * _inverse(fields[0])
        if t.signed:  # roundf: half away from zero
            a = np.abs(scaled)
            whole = np.floor(a)
            q = np.sign(scaled) * (whole + np.floor(np.float32(2) * (a - whole)))
        else:
            q = np.trunc(scaled + np.float32(t.offset))
    q = np.clip(np.where(np.isnan(q), 0, q), -128 if t.signed else 0, 127 if t.signed else (1 << t.bits) - 1)
    return q.astype(np.int16).astype(np.uint8) & np.uint8((1 << t.bits) - 1)


def _fields_used(source: list[np.ndarray], bits: np.ndarray, stored: np.ndarray) -> list[np.ndarray]:
    """The fields the codes are predicted with: each block's unrounded source field where its
    fp16 rounding (`bits`) is the stored one (what the quantizer used), else the stored field."""
    return [np.where(bits[:, i : i + 1] == stored[:, i : i + 1], f, stored[:, i : i + 1].view(np.float16).astype(np.float32))
            for i, f in enumerate(source)]


def _split(raw: bytes | memoryview, ref: bytes | memoryview, ref_dtype: str, t: Legacy) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """(a copy of the blocks, the reference's values by block, their unrounded fields, and
    those fields' fp16 bits)."""
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, t.size).copy()
    x = np.frombuffer(cast(ref, ref_dtype, "F32"), np.float32).reshape(-1, BLOCK)
    source = _source_fields(x, t)
    return blocks, x, source, np.concatenate([_f16_bits(f) for f in source], axis=1)


def prediction_residual(raw: bytes | memoryview, dtype_name: str, ref: bytes | memoryview, ref_dtype: str) -> bytes:
    """The blocks `raw` as a residual against the float values `ref` (predictable() holds)."""
    t = LEGACY[dtype_name]
    blocks, x, source, bits = _split(raw, ref, ref_dtype, t)
    stored = blocks[:, : 2 * t.fields].copy().view(np.uint16)
    mask = np.uint8((1 << t.bits) - 1)
    residual = (_codes(blocks, t) - _predicted_codes(x, _fields_used(source, bits, stored), t)) & mask
    _put_codes(blocks, residual, t)
    blocks[:, : 2 * t.fields] = (stored ^ bits).view(np.uint8)
    return blocks.tobytes()


def apply_prediction(residual: bytes | memoryview, dtype_name: str, ref: bytes | memoryview, ref_dtype: str) -> bytes:
    """The blocks a residual of prediction_residual stands for."""
    t = LEGACY[dtype_name]
    blocks, x, source, bits = _split(residual, ref, ref_dtype, t)
    stored = blocks[:, : 2 * t.fields].copy().view(np.uint16) ^ bits
    mask = np.uint8((1 << t.bits) - 1)
    codes = (_codes(blocks, t) + _predicted_codes(x, _fields_used(source, bits, stored), t)) & mask
    _put_codes(blocks, codes, t)
    blocks[:, : 2 * t.fields] = stored.view(np.uint8)
    return blocks.tobytes()
