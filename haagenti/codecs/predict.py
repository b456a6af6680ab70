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
any values. K-quants (Q2_K to Q6_K) keep their sub-block scales as stored and predict their
codes from them (KQuant below). Measured in docs/decisions/0281-quantized-prediction.md.

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
    """Whether `raw_bytes` of `dtype_name` can be predicted from `ref_bytes` of `ref_dtype`: whole
    blocks of a legacy type or a K-quant, or int8/uint8 codes (LINEAR), against a float
    reference of as many values."""
    from haagenti.formats.dtypes import BY_NAME

    size, r = BLOCK_BYTES.get(dtype_name, 1 if dtype_name in LINEAR else None), BY_NAME.get(ref_dtype)
    return (size is not None and r is not None and r.is_float and raw_bytes % size == 0
            and ref_bytes == raw_bytes // size * VALUES_PER_BLOCK.get(dtype_name, 1) * r.itemsize)


def residual_bytes(dtype_name: str, raw_bytes: int) -> int:
    """The most bytes of a residual that stands for `raw_bytes` of `dtype_name`: the blocks' own
    size, or the codes' plus a LINEAR header (per channel: runs of MIN_RUN values at least)."""
    return raw_bytes + CHANNELS_HEADER + 5 * (raw_bytes // MIN_RUN + 2) if dtype_name in LINEAR else raw_bytes


def residual_fits(dtype_name: str, raw_bytes: int, residual: int) -> bool:
    """Whether a residual of `residual` bytes can stand for `raw_bytes` of `dtype_name` (the
    decoder checks a per-channel header against the codes it covers)."""
    if dtype_name in LINEAR:
        return residual == raw_bytes + LINEAR_HEADER or raw_bytes + CHANNELS_HEADER < residual <= residual_bytes(dtype_name, raw_bytes)
    return residual == raw_bytes


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
            lo, hi = _extreme(x, np.minimum), _extreme(x, np.maximum)
            return [(hi - lo) / np.float32(t.divisor), lo]
        if t.signed:
            return [_extreme(np.abs(x), np.maximum) / np.float32(t.divisor)]
        at = np.abs(x).argmax(axis=1)[:, None]
        return [np.take_along_axis(x, at, axis=1) / np.float32(t.divisor)]


def _predicted_codes(x: np.ndarray, fields: list[np.ndarray], t: Legacy) -> np.ndarray:
    """The codes of values `x` under the fields (float32), as the reference quantizer sets them
    (computed in place: each pass over a fragment's values costs as much as the arithmetic)."""
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.subtract(x, fields[1]) if t.fields == 2 else x.copy()
        q *= _inverse(fields[0])
        if t.signed:  # roundf, half away from zero: floor(a) + floor(2 (a - floor(a))) with a = |q|
            whole = np.abs(q)
            half = whole.copy()
            np.floor(whole, out=whole)
            half -= whole
            half *= np.float32(2)
            np.floor(half, out=half)
            whole += half
            np.copysign(whole, q, out=q)
        else:
            q += np.float32(t.offset)
            np.trunc(q, out=q)
    q[np.isnan(q)] = 0
    np.clip(q, -128 if t.signed else 0, 127 if t.signed else (1 << t.bits) - 1, out=q)
    return q.astype(np.int8).view(np.uint8) if t.signed else q.astype(np.uint8)


def _extreme(x: np.ndarray, pick: np.ufunc) -> np.ndarray:
    """Each row's min or max (`pick`: np.minimum, np.maximum), halving the rows' width: a
    reduction along rows of 32 values pays numpy's per-row overhead."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = pick(x[:, :half], x[:, half:])
    return x


def _fields_used(source: list[np.ndarray], bits: np.ndarray, stored: np.ndarray) -> list[np.ndarray]:
    """The fields the codes are predicted with: each block's unrounded source field where its
    fp16 rounding (`bits`) is the stored one (what the quantizer used), else the stored field."""
    return [np.where(bits[:, i : i + 1] == stored[:, i : i + 1], f, stored[:, i : i + 1].view(np.float16).astype(np.float32))
            for i, f in enumerate(source)]


def _values(ref: bytes | memoryview, ref_dtype: str, width: int) -> np.ndarray:
    """The reference's values as float32 rows of `width`. A NaN's payload may differ from
    haagenti.codecs.cast's (F16 without the quiet bit set): no payload reaches a prediction."""
    if ref_dtype == "F16":
        x = np.frombuffer(ref, np.float16).astype(np.float32)
    elif ref_dtype == "BF16":
        x = (np.frombuffer(ref, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        x = np.frombuffer(ref if ref_dtype == "F32" else cast(ref, ref_dtype, "F32"), np.float32)
    return x.reshape(-1, width)


def _predict(data: bytes | memoryview, dtype_name: str, ref: bytes | memoryview, ref_dtype: str, decode: bool) -> bytes:
    """Blocks to residual (decode False) or residual to blocks (decode True), against `ref`."""
    if dtype_name in LINEAR:
        return _predict_linear(data, dtype_name, ref, ref_dtype, decode)
    if dtype_name in KQUANTS:
        return _predict_k(data, dtype_name, ref, ref_dtype, decode)
    t = LEGACY[dtype_name]
    blocks = np.frombuffer(data, np.uint8).reshape(-1, t.size).copy()
    x = _values(ref, ref_dtype, BLOCK)
    source = _source_fields(x, t)
    bits = np.concatenate([_f16_bits(f) for f in source], axis=1)
    head = 2 * t.fields
    fields = blocks[:, :head].copy().view(np.uint16)
    stored = fields ^ bits if decode else fields
    predicted = _predicted_codes(x, _fields_used(source, bits, stored), t)
    codes = _codes(blocks, t)
    mask = np.uint8((1 << t.bits) - 1)
    _put_codes(blocks, (codes + predicted if decode else codes - predicted) & mask, t)
    blocks[:, :head] = (stored if decode else fields ^ bits).view(np.uint8)
    return blocks.tobytes()


def prediction_residual(raw: bytes | memoryview, dtype_name: str, ref: bytes | memoryview, ref_dtype: str) -> bytes:
    """The blocks `raw` as a residual against the float values `ref` (predictable() holds)."""
    return _predict(raw, dtype_name, ref, ref_dtype, decode=False)


def apply_prediction(residual: bytes | memoryview, dtype_name: str, ref: bytes | memoryview, ref_dtype: str) -> bytes:
    """The blocks a residual of prediction_residual stands for."""
    return _predict(residual, dtype_name, ref, ref_dtype, decode=True)


# ---- K-quants: sub-block scales as stored, codes predicted ----------------------------------
@dataclass(frozen=True)
class KQuant:
    """A K-quant type, blocks of 256 values. Its sub-block scales come from a search the source
    does not fix (make_qkx2_quants), so the residual keeps them as stored; its codes are what
    the quantizer's last pass sets from them (ggml-quants.c, quantize_row_q*_K_ref): ggml's
    nearest_int (half to even) of (x + dmin m) / (d sc) for Q2_K, Q4_K and Q5_K, of x / (d sc)
    for Q3_K and Q6_K, clamped to the code's range (from `least`) and stored less `least`; a
    NaN gives 0."""

    size: int  # bytes per block
    bits: int  # code bits
    sub: int  # values per sub-block scale
    least: int = 0  # the smallest code: -4 (Q3_K), -32 (Q6_K)


KQUANTS = {"Q2_K": KQuant(84, 2, 16), "Q3_K": KQuant(110, 3, 16, -4), "Q4_K": KQuant(144, 4, 32), "Q5_K": KQuant(176, 5, 32),
           "Q6_K": KQuant(210, 6, 16, -32)}
VALUES_PER_BLOCK = {**{n: BLOCK for n in LEGACY}, **{n: 256 for n in KQUANTS}}
BLOCK_BYTES = {**{n: t.size for n, t in LEGACY.items()}, **{n: k.size for n, k in KQUANTS.items()}}


def _k_scales(blocks: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(d x sc, dmin x m) of each sub-block as float32 columns; Q3_K and Q6_K have no min (None)."""
    with np.errstate(invalid="ignore"):  # Inf x 0
        if name == "Q6_K":
            d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
            return (d * blocks[:, 192:208].copy().view(np.int8).astype(np.float32))[:, :, None], None
        if name == "Q3_K":  # 16 6-bit scales, less 32: low nibbles in bytes 0-7, top 2 bits in 8-11
            d = blocks[:, 108:110].copy().view(np.float16).astype(np.float32)
            s = blocks[:, 96:108]
            low = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)
            high = ((s[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3).reshape(-1, 16)
            return (d * ((low | (high << 4)).astype(np.float32) - np.float32(32)))[:, :, None], None
        if name == "Q2_K":  # 16 scales and mins, 4 bits each
            d, dmin = (blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32) for at in (80, 82))
            s = blocks[:, :16]
            return (d * (s & 15).astype(np.float32))[:, :, None], (dmin * (s >> 4).astype(np.float32))[:, :, None]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    s = blocks[:, 4:16]  # 6-bit scales and mins of 8 sub-blocks (ggml's get_scale_min_k4)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 2) & 48)], axis=1).astype(np.float32)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 2) & 48)], axis=1).astype(np.float32)
    with np.errstate(invalid="ignore"):
        return (d * sc)[:, :, None], (dmin * m)[:, :, None]


def _k_predicted(x: np.ndarray, blocks: np.ndarray, name: str, k: KQuant) -> np.ndarray:
    scale, low = _k_scales(blocks, name)
    q = x.reshape(len(blocks), -1, k.sub)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        q = q + low if low is not None else q.copy()
        q /= scale
        np.rint(q, out=q)
    q[np.isnan(q)] = 0
    np.clip(q, k.least, k.least + (1 << k.bits) - 1, out=q)
    q -= np.float32(k.least)
    return q.reshape(len(blocks), 256).astype(np.uint8)


def _k_codes(blocks: np.ndarray, name: str) -> np.ndarray:
    """(blocks, 256) codes in value order, as gguf's dequantize unpacks them."""
    n = len(blocks)
    if name in ("Q2_K", "Q3_K"):  # 2 low bits: four to a byte, bytes of 32 values; Q3_K's third in hmask
        qs = blocks[:, 16:80] if name == "Q2_K" else blocks[:, 32:96]
        codes = ((qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(n, 256)
        if name == "Q3_K":
            codes |= (((blocks[:, :32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << 2).reshape(n, 256)
        return codes
    if name == "Q6_K":
        ql, qh = blocks[:, :128].reshape(n, 2, 64), blocks[:, 128:192].reshape(n, 2, 1, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=2)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        return (low | (high.reshape(n, 2, 128) << 4)).reshape(n, 256)
    qs = blocks[:, -128:].reshape(n, 4, 1, 32)
    codes = ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(n, 256)
    if name == "Q5_K":
        qh = blocks[:, 16:48].reshape(n, 1, 32)
        codes |= (((qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << 4).reshape(n, 256)
    return codes


def _k_put_codes(blocks: np.ndarray, codes: np.ndarray, name: str) -> None:
    """Write (blocks, 256) codes into `blocks` (inverse of _k_codes)."""
    n = len(blocks)
    if name in ("Q2_K", "Q3_K"):
        low = (codes & 3).reshape(n, 2, 4, 32)
        packed = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(n, 64)
        if name == "Q2_K":
            blocks[:, 16:80] = packed
            return
        blocks[:, 32:96] = packed
        high = ((codes >> 2) & 1).reshape(n, 8, 32)
        blocks[:, :32] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
        return
    if name == "Q6_K":
        low, high = (codes & 15).reshape(n, 2, 128), (codes >> 4).reshape(n, 2, 4, 32)
        blocks[:, :128] = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
        blocks[:, 128:192] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
        return
    sub = (codes & 15).reshape(n, 4, 2, 32)
    blocks[:, -128:] = (sub[:, :, 0] | (sub[:, :, 1] << 4)).reshape(n, 128)
    if name == "Q5_K":
        high = ((codes >> 4) & 1).reshape(n, 8, 32)
        blocks[:, 16:48] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)


def _predict_k(data: bytes | memoryview, name: str, ref: bytes | memoryview, ref_dtype: str, decode: bool) -> bytes:
    k = KQUANTS[name]
    blocks = np.frombuffer(data, np.uint8).reshape(-1, k.size).copy()
    predicted = _k_predicted(_values(ref, ref_dtype, 256), blocks, name, k)  # the scales are the same bytes either way
    codes = _k_codes(blocks, name)
    mask = np.uint8((1 << k.bits) - 1)
    _k_put_codes(blocks, (codes + predicted if decode else codes - predicted) & mask, name)
    return blocks.tobytes()


# ---- ONNX linear quantization: int8/uint8 codes, scales and zero points --------------------
# QuantizeLinear and onnxruntime's quantize_dynamic (quant_utils.quantize_nparray) set each code
# to saturate(round_half_even(x / scale) + zero_point) in float32, with one (scale, zero point)
# per tensor or, per channel, one per slice along an axis: quantize_dynamic(per_channel=True)
# quantizes a MatMul weight per output column, which haagenti stores as W, so each channel is a
# run of consecutive values. A fragment does not see the graph's scale initializers, so the
# encoder estimates the pairs from the values and the codes and stores them ahead of the
# residual. Per tensor: LINEAR_HEADER bytes, float32 scale then the zero point's byte. Per
# channel: CHANNELS_MARK (in the scale's place: a NaN with its sign set, which the per-tensor
# encoder never writes), uint32 run length w and uint32 start (the fragment's first value is
# value `start` of its first run), then the runs' float32 scales and their zero point bytes.
LINEAR = {"I8": (-128, 127), "U8": (0, 255)}  # code range of each dtype
LINEAR_HEADER = 5
CHANNELS_MARK = b"\xff\xff\xff\xff"
CHANNELS_HEADER = 12  # mark, run length, start
MIN_RUN = 16  # values per run at least: bounds a per-channel header to 5 bytes per 16 codes
_CODES = {"I8": np.int8, "U8": np.uint8}
_TRIES = 8  # float32 neighbours of the estimated scale tried on each side
_PAIR_STEP = 32  # neighbours whose codes differ this much give their run's scale within 1/32
_CANDIDATES = 32  # run lengths tried: the most frequent distances between consecutive changes
_JUMP = 0.07  # a change of log scale between neighbouring estimates beyond their noise (2/32)


def _linear_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, dtype_name: str) -> np.ndarray:
    """saturate(rint(x / scale) + zero) as the dtype's bytes (scale and zero: one each, or one
    per value); a NaN gives 0."""
    lo, hi = LINEAR[dtype_name]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        q = x / scale
        np.rint(q, out=q)
        q += np.asarray(zero, np.float32)
    q[np.isnan(q)] = 0
    np.clip(q, lo, hi, out=q)
    return q.astype(_CODES[dtype_name]).view(np.uint8)


def _per_value(runs: np.ndarray, n: int, scales: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of `n` values' scale and zero point (float32) from its run's (runs: their offsets)."""
    counts = np.diff(np.append(runs, n))
    return np.repeat(scales.astype(np.float32), counts), np.repeat(zeros.astype(np.float32), counts)


def _runs(n: int, run: int, start: int) -> np.ndarray:
    """Offsets of the runs of `run` values in a fragment of `n` whose first value is value
    `start` of its run."""
    return np.arange(0, start + n, run, dtype=np.int64).clip(start) - start


def _linear_fit(x: np.ndarray, codes: np.ndarray, dtype_name: str, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The (scale, zero point) of each run (beginning at `starts`) that predicts most of its
    codes from `x`, and the codes missed: a least-squares line codes ~ x / scale + zero per run,
    its zero point rounded, the scale narrowed to the interval every code allows, then
    the float32 scales nearest it tried on the whole run. Any answer is exact (the residual
    holds the rest); this only keeps it small."""
    lo, hi = LINEAR[dtype_name]
    if not len(x):
        return np.ones(1, np.float32), np.zeros(1), 0
    counts = np.diff(np.append(starts, len(x)))
    each = lambda a: np.repeat(a, counts)  # noqa: E731  (a run's number at each of its values)
    add = lambda a: np.add.reduceat(a, starts)  # noqa: E731
    q = codes.view(_CODES[dtype_name]).astype(np.float64)
    v = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ok = np.isfinite(v) & (q > lo) & (q < hi)
        n = add(ok.astype(np.float64))
        v0, q0 = np.where(ok, v, 0), np.where(ok, q, 0)
        mv, mq = add(v0) / n, add(q0) / n
        dv = np.where(ok, v - each(mv), 0)
        slope = add(dv * (q0 - each(mq))) / add(dv * dv)  # closed form: np.polyfit's SVD cost 11 ms a fragment
        intercept = mq - slope * mv
        fitted = (n >= 2) & np.isfinite(slope) & np.isfinite(intercept) & (slope != 0)
        zero = np.clip(np.rint(np.where(fitted, intercept, np.where(n > 0, mq, 0))), lo, hi)
        scale = np.where(fitted, 1 / slope, 1.0)
        k = q - each(zero)
        use = ok & (np.abs(k) >= 1) & each(fitted)  # every x / scale lies in [k - 1/2, k + 1/2]: the scales all codes allow
        a, b = v / (k + np.sign(k) * 0.5), v / (k - np.sign(k) * 0.5)
        # a saturated code only bounds the scale from above: x / scale beyond its edge less 1/2
        edge = np.where(q == hi, k - 0.5, np.where(q == lo, k + 0.5, np.nan))
        clipped = each(fitted) & np.isfinite(v) & (edge * v > 0) & (np.abs(edge) > 0)
        low = np.maximum.reduceat(np.where(use, np.minimum(a, b), -np.inf), starts)
        high = np.minimum.reduceat(np.where(use, np.maximum(a, b), np.where(clipped, v / edge, np.inf)), starts)
        scale = np.where((low > 0) & (low <= high), (low + high) / 2, scale)
        bits = np.abs(scale).astype(np.float32).view(np.uint32).astype(np.int64)  # quantizers' scales are positive
    zero32 = each(zero).astype(np.float32)
    best, missed = np.ones(len(starts), np.float32), np.full(len(starts), len(x) + 1)
    for i in range(-_TRIES, _TRIES + 1):
        s = np.clip(bits + i, 0, (1 << 31) - 1).astype(np.uint32).view(np.float32)
        misses = add((_linear_codes(x, each(s), zero32, dtype_name) != codes).astype(np.int64))
        better = misses < missed
        best, missed = np.where(better, s, best), np.where(better, misses, missed)
    return best, zero, int(missed.sum())


def _channel_run(x: np.ndarray, codes: np.ndarray, dtype_name: str) -> tuple[int, int] | None:
    """The run length and start of a fragment's channels, or None: the scale estimated from
    neighbouring values whose codes differ by _PAIR_STEP or more changes where a run ends. The
    run length is the distance between consecutive changes that puts most of them on run
    boundaries (a divisor would too: the longest of those within a tenth of the best); the
    start is where they fall."""
    q = codes.view(_CODES[dtype_name]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        dq, dv = np.diff(q), np.diff(x.astype(np.float64))
        ratio = dv / dq
        at = np.flatnonzero((np.abs(dq) >= _PAIR_STEP) & np.isfinite(ratio) & (ratio > 0))
        log = np.log(ratio[at])
    jumps = np.flatnonzero(np.abs(np.diff(log)) > _JUMP)
    if len(at) < 4 or len(jumps) < 2:
        return None
    ends = (at[jumps] + at[jumps + 1]) // 2 + 1  # a run ends between the two estimates
    gaps = np.diff(ends)
    gaps, seen = np.unique(gaps[gaps >= MIN_RUN], return_counts=True)
    if not len(gaps):
        return None
    best: list[tuple[int, int, int]] = []
    for run in gaps[np.argsort(-seen, kind="stable")[:_CANDIDATES]]:
        votes = np.bincount(ends % run, minlength=run)
        votes = votes + np.roll(votes, 1) + np.roll(votes, -1)  # the estimates put an end within a value or so
        best.append((int(votes.max()), int(run), int(votes.argmax())))
    top = max(v for v, _, _ in best)
    run, end = max((r, e) for v, r, e in best if v >= 0.9 * top)
    return run, (run - end) % run


def _linear_header(dtype_name: str, scales: np.ndarray, zeros: np.ndarray, run: int = 0, start: int = 0) -> bytes:
    z = zeros.astype(_CODES[dtype_name]).tobytes()
    if not run:
        return scales.astype(np.float32).tobytes() + z
    return CHANNELS_MARK + np.array([run, start], "<u4").tobytes() + scales.astype(np.float32).tobytes() + z


def _predict_linear(data: bytes | memoryview, dtype_name: str, ref: bytes | memoryview, ref_dtype: str, decode: bool) -> bytes:
    x = _values(ref, ref_dtype, 1).reshape(-1)
    raw = np.frombuffer(data, np.uint8)
    n = len(x)
    if decode:
        if len(raw) == n + LINEAR_HEADER:
            scale, zero = raw[:4].copy().view(np.float32), raw[4:5].view(_CODES[dtype_name])
            return (raw[LINEAR_HEADER:] + _linear_codes(x, scale, zero, dtype_name)).tobytes()
        run, start = (int(v) for v in raw[4:CHANNELS_HEADER].copy().view("<u4")) if len(raw) >= CHANNELS_HEADER else (0, 0)
        runs = _runs(n, run, start) if run >= MIN_RUN and start < run else np.zeros(0, np.int64)
        k = len(runs)
        if bytes(raw[:4]) != CHANNELS_MARK or not k or len(raw) != CHANNELS_HEADER + 5 * k + n:
            raise ValueError(f"a per-channel header of {len(raw) - n} bytes (runs of {run} from {start}) does not fit {n} codes")
        scales = raw[CHANNELS_HEADER : CHANNELS_HEADER + 4 * k].copy().view(np.float32)
        zeros = raw[CHANNELS_HEADER + 4 * k : CHANNELS_HEADER + 5 * k].view(_CODES[dtype_name])
        return (raw[CHANNELS_HEADER + 5 * k :] + _linear_codes(x, *_per_value(runs, n, scales, zeros), dtype_name)).tobytes()
    runs = np.zeros(1, np.int64)
    scales, zeros, missed = _linear_fit(x, raw, dtype_name, runs)
    head = _linear_header(dtype_name, scales, zeros)
    channels = _channel_run(x, raw, dtype_name) if missed * 100 > n else None  # per tensor, nearly every code predicted
    if channels is not None:
        fit = _linear_fit(x, raw, dtype_name, _runs(n, *channels))
        if fit[2] + CHANNELS_HEADER + 5 * len(fit[0]) < missed:  # a code missed costs about a byte
            runs, (scales, zeros, _) = _runs(n, *channels), fit
            head = _linear_header(dtype_name, scales, zeros, *channels)
    return head + (raw - _linear_codes(x, *_per_value(runs, n, scales, zeros), dtype_name)).tobytes()
